"""polyfm.ts"""
