"""What every task shares: the run's folders and identity, the retry policy, and quiet logs for
user errors. Retries are for transient I/O only, never for a deterministic failure.
"""
