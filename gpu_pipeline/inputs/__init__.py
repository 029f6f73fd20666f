"""Inputs: finding image files and decoding them to the uint8 images every backend receives."""
