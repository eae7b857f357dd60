"""msgate.listener"""
