"""msgate.model"""
