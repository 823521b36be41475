"""Thin Prefect tasks over the components, in the same stage packages as ``components/``.

A task takes its config section and small values (paths, results, the run's engine), calls the
component, logs and publishes; retries only for transient I/O.
"""
