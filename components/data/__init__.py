"""The user's folder as data: its layout (decided or refused), a walk past clutter and links,
scanning into a manifest, Great Expectations validation, counts, and per-split arrays.
"""
