"""polyfm.mol"""
