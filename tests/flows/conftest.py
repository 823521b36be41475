import pytest


@pytest.fixture(autouse=True)
def _on_prefect(prefect_backend: None) -> None:
    """Every test here runs against the session's Prefect server (tests/conftest.py)."""
