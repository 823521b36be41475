"""Prefect tasks over components.similarity: the similarity score and the saved domain profile.
Both read the engine's caches; neither runs the backbone when embed has run.
"""
