"""msgate.hl7"""
