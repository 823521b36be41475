"""Prefect tasks over components.engine: opening the run's engine and embedding the dataset.
The backbone is built once, in ``open_engine``, and handed to every later task.
"""
