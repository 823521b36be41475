"""Prefect tasks over components.training: train the planned case and evaluate it.
A retried training task resumes from its last epoch checkpoint.
"""
