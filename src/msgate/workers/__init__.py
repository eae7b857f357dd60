"""msgate.workers"""
