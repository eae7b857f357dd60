"""msgate.cli"""
