"""Prefect tasks over components.data: scan, validate, count.
Each is a thin wrapper that logs and publishes what the component returns.
"""
