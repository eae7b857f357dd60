"""msgate.results"""
