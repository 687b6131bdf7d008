"""polyfm.geo"""
