"""The user's folder as data: scanning into a manifest, Great Expectations validation,
counts per class and split, and per-split arrays for the later stages.
"""
