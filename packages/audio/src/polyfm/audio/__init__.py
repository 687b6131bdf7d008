"""polyfm.audio"""
