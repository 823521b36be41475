"""Prefect tasks over components.decision: choose the case and verify it against its runner-up.
They write the decision report and publish it as an artifact.
"""
