"""Getting a trained model out: ONNX export checked against PyTorch, MLflow tracking and the
registry, and the HTTP model server.
"""
