"""Fixtures for the end-to-end tests: real model servers in processes of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.model_servers import MLServer, mlserver


@pytest.fixture(scope="session")
def mlserver_iris(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServer]:
    """MLServer serving an iris LogisticRegression's ``predict_proba``, for the session.

    Skips (fails in CI) when MLServer is not installed: see tests/e2e/model_servers.py.
    """
    with mlserver(tmp_path_factory.mktemp("mlserver")) as server:
        yield server
