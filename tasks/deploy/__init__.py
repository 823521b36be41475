"""Prefect tasks over components.deploy: export to ONNX and log and register in MLflow.
Registration is the last step, after every artifact is stored.
"""
