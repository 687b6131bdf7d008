"""polyfm.medseg"""
