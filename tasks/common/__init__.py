"""What every task shares: the run's folders and identity, and the retry policy.
Retries are for transient I/O only, never for a deterministic failure.
"""
