"""Triton binary outputs through ``guard proxy``: rewritten like JSON ones, never refused.

The upstream is the digits demo model (:mod:`middleware.demo`) on its own
uvicorn, which answers Triton's binary tensor extension (MLServer 1.7.1 answers
binary-output requests in JSON: tests/e2e/test_proxy_mlserver.py); the client
is ``tritonclient.http``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from tests.conftest import Server, run_server
from tests.e2e.model_servers import run_proxy

pytestmark = pytest.mark.e2e

MODEL = "digits"
INFER = f"/v2/models/{MODEL}/infer"
ROWS = load_digits().data[:5].astype(np.float32)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("model"), app="tests.e2e.apps:model_app") as srv:
        yield srv


def client(srv: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=f"127.0.0.1:{srv.port}", network_timeout=30.0)


def infer(
    srv: Server, *, binary_in: bool = False, binary_out: bool = True
) -> dict[str, np.ndarray]:
    tensor = triton.InferInput("input-0", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary_in)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary_out)
        for name in ("label", "probabilities")
    ]
    result = client(srv).infer(MODEL, [tensor], outputs=outputs)
    names = [o["name"] for o in result.get_response()["outputs"]]
    return {name: result.as_numpy(name) for name in names}


def rounded(probs: np.ndarray, decimals: int = 2) -> bool:
    return bool(np.abs(probs - np.round(probs.astype(np.float64), decimals)).max() < 1e-6)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
def test_binary_and_json_outputs_are_rounded(
    upstream: Server, tmp_path: Path, binary_out: bool
) -> None:
    with run_proxy(tmp_path, upstream.url) as proxy:
        exact = infer(upstream, binary_out=binary_out)
        guarded = infer(proxy, binary_out=binary_out)
    assert exact["probabilities"].dtype == guarded["probabilities"].dtype == np.float32
    assert guarded["probabilities"].shape == exact["probabilities"].shape == (5, 10)
    assert not rounded(exact["probabilities"])
    assert rounded(guarded["probabilities"])
    assert np.abs(guarded["probabilities"] - exact["probabilities"]).max() <= 0.005 + 1e-6
    assert np.array_equal(guarded["label"], exact["label"])


def test_binary_answer_sizes_are_fixed_up(upstream: Server, tmp_path: Path) -> None:
    tensor = triton.InferInput("input-0", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=False)
    body, _ = triton.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton.InferRequestedOutput("probabilities", binary_data=True)]
    )
    with run_proxy(tmp_path, upstream.url) as proxy:
        r = httpx.post(proxy.url + INFER, content=body, timeout=10)
    assert r.status_code == 200
    n = int(r.headers["inference-header-content-length"])
    assert int(r.headers["content-length"]) == len(r.content)
    header = json.loads(r.content[:n])
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == len(r.content) - n == 5 * 10 * 4
    probs = np.frombuffer(r.content[n:], "<f4")
    assert rounded(probs)


@pytest.mark.parametrize(
    ("degrade", "check"),
    [
        ({"top_k": 1, "decimals": 2}, "top_k"),
        ({"labels_only": True}, "labels_only"),
        ({"decimals": 1}, "decimals"),
    ],
)
def test_binary_outputs_follow_the_policys_degrade(
    upstream: Server, tmp_path: Path, degrade: dict[str, Any], check: str
) -> None:
    config = {
        "policies": [
            {"name": "inference", "routes": [INFER], "degrade": {"always": True, **degrade}}
        ]
    }
    with run_proxy(tmp_path, upstream.url, config=config) as proxy:
        exact = infer(upstream)
        guarded = infer(proxy)
    assert np.array_equal(guarded["label"], exact["label"])
    if check == "labels_only":
        assert "probabilities" not in guarded
        return
    probs = guarded["probabilities"]
    assert probs.shape == (5, 10)
    if check == "top_k":
        assert rounded(probs) and ((probs > 0).sum(axis=1) == 1).all()
    else:
        assert rounded(probs, 1) and not rounded(exact["probabilities"], 1)


def test_binary_inputs_reach_the_model_unchanged(upstream: Server, tmp_path: Path) -> None:
    # the guard reads Triton's binary inputs and lets them on; the demo model reads
    # JSON only, and its own 400 reaches the client as it is
    with run_proxy(tmp_path, upstream.url) as proxy:
        for srv in (upstream, proxy):
            with pytest.raises(InferenceServerException) as refused:
                infer(srv, binary_in=True)
            assert refused.value.status() == "400"
            assert "JSON" in str(refused.value.message())
