"""msgate.storage"""
