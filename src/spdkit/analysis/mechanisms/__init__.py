"""analysis/mechanisms"""
