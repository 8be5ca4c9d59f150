"""decoder_only"""
