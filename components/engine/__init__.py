"""The engine below every stage: backbones, decoding and preprocessing, ONNX graphs, and the one
extraction engine that runs a backbone over images once and caches its rows by content.
"""
