"""``guard proxy`` in front of KServe's own model server, over KServe v1 ``:predict``.

MLServer has no v1 endpoints, so v1 is tested against KServe (its Python
``ModelServer`` with a custom iris model, tests/e2e/kserve_iris.py), run from the
virtualenv that ``.ci/kserve-env`` makes.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.e2e.model_servers import MODEL, kserve, run_proxy
from tests.e2e.test_server import metric

pytestmark = pytest.mark.e2e

PREDICT = f"/v1/models/{MODEL}:predict"
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.0, 3.0, 5.0, 1.8], [6.3, 2.8, 5.1, 1.5]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("kserve")
    with kserve(tmp) as upstream, run_proxy(tmp, upstream.url) as proxy:
        yield upstream, proxy


def test_v1_predict_through_the_proxy(servers: tuple[Server, Server]) -> None:
    upstream, proxy = servers
    with httpx.Client(timeout=10) as c:
        exact = c.post(upstream.url + PREDICT, json={"instances": ROWS})
        guarded = c.post(proxy.url + PREDICT, json={"instances": ROWS})
        ready = c.get(proxy.url + f"/v1/models/{MODEL}")
    assert exact.status_code == guarded.status_code == 200, guarded.text
    assert ready.json() == {"name": MODEL, "ready": True}
    p_exact = np.array(exact.json()["predictions"])
    p_guarded = np.array(guarded.json()["predictions"])
    assert p_guarded.shape == p_exact.shape == (3, 3)
    # the default policy rounds the probability vectors to 2 decimals
    assert np.array_equal(p_guarded, np.round(p_guarded, 2))
    assert not np.array_equal(p_exact, np.round(p_exact, 2))
    assert np.abs(p_guarded - p_exact).max() <= 0.005 + 1e-12
    assert guarded.headers["x-request-id"]


def test_v1_invalid_input_is_refused_before_kserve(servers: tuple[Server, Server]) -> None:
    _, proxy = servers
    with httpx.Client(timeout=10) as c:
        nan = c.post(
            proxy.url + PREDICT,
            content=b'{"instances": [[1.0, 2.0, NaN, 4.0]]}',
            headers={"content-type": "application/json"},
        )
        ragged = c.post(proxy.url + PREDICT, json={"instances": [[1.0, 2.0], [1.0]]})
        text = c.get(proxy.url + "/metrics").text
    assert nan.status_code == 400
    assert ragged.status_code == 400
    assert metric(text, "guard_invalid_requests_total", reason="non_finite") == 1
    assert metric(text, "guard_upstream_errors_total", reason="connect") == 0
