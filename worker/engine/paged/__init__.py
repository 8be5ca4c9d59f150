"""paged"""
