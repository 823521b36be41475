"""Plain-Python stages of the pipeline, one subpackage per stage, no Prefect anywhere.

Layers, lowest first: common, engine, data, similarity, training, decision, deploy; a package
imports only itself and the layers below it (``tests/test_architecture.py`` checks it).
"""
