"""Shared pytest set-up: fixture plugins and the real-data location."""

from __future__ import annotations

pytest_plugins = [
    "tests.unit.conftest_mlflow",
    "tests.unit.conftest_store",
]
