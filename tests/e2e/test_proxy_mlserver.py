"""``guard proxy`` in front of a real MLServer, spoken to with Triton's own HTTP client.

MLServer (scikit-learn runtime, iris LogisticRegression answering
``predict_proba``) runs as its own process from the virtualenv that
``.ci/mlserver-env`` makes; ``guard proxy`` runs as its own process with the
default policy; the clients are ``tritonclient.http`` and httpx.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import Server
from tests.e2e.model_servers import MODEL, MLServer, mlserver, run_proxy
from tests.e2e.test_server import metric

pytestmark = pytest.mark.e2e

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.0, 3.0, 5.0, 1.8], [6.3, 2.8, 5.1, 1.5]])
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def proxy(mlserver_iris: MLServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_proxy(tmp_path_factory.mktemp("proxy"), mlserver_iris.url) as srv:
        yield srv


def client(srv: Server | MLServer) -> triton.InferenceServerClient:
    port = srv.port if isinstance(srv, Server) else srv.http_port
    return triton.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=30.0)


def infer(
    c: triton.InferenceServerClient, *, binary_in: bool = False, binary_out: bool = False
) -> np.ndarray:
    tensor = triton.InferInput("input-0", list(ROWS.shape), "FP64")
    tensor.set_data_from_numpy(ROWS, binary_data=binary_in)
    wanted = triton.InferRequestedOutput("predict_proba", binary_data=binary_out)
    result = c.infer(MODEL, [tensor], outputs=[wanted])
    probs: np.ndarray = result.as_numpy("predict_proba")
    return probs


def v2_body(rows: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(rows.shape),
                "datatype": "FP64",
                "data": rows.ravel().tolist(),
            }
        ]
    }


def test_triton_client_json_through_the_proxy(proxy: Server, mlserver_iris: MLServer) -> None:
    c = client(proxy)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready(MODEL)
    meta = c.get_model_metadata(MODEL)
    assert meta["inputs"][0]["name"] == "input-0"
    assert meta["outputs"][0]["name"] == "predict_proba"

    guarded = infer(c)
    exact = infer(client(mlserver_iris))
    assert guarded.shape == exact.shape == (3, 3)
    # the default policy rounds every answer's probabilities to 2 decimals
    assert np.array_equal(guarded, np.round(guarded, 2))
    assert not np.array_equal(exact, np.round(exact, 2))
    assert np.abs(guarded - exact).max() <= 0.005 + 1e-12
    assert (guarded.argmax(axis=1) == exact.argmax(axis=1)).all()

    text = httpx.get(proxy.url + "/metrics", timeout=5).text
    assert metric(text, "guard_requests_total", policy="inference", decision="allow") >= 1


def test_triton_client_reads_the_guards_400_and_429_as_server_errors(
    mlserver_iris: MLServer, tmp_path: Path
) -> None:
    # the guard's refusals on an OIP route are the protocol's {"error": "<message>"}:
    # tritonclient raises them as it raises MLServer's own errors, message a string
    rate = {
        "type": "rate",
        "name": "rows-per-hour",
        "action": "throttle",
        "params": {"key": "client", "cost": "rows", "limits": [{"rate": 6, "per": "1h"}]},
    }
    config = {"policies": [{"name": "inference", "routes": [INFER], "detectors": [rate]}]}
    with run_proxy(tmp_path, mlserver_iris.url, config=config) as proxy:
        c = client(proxy)
        tensor = triton.InferInput("input-0", list(ROWS.shape), "FP64")
        tensor.set_data_from_numpy(np.where(ROWS > 6, np.nan, ROWS), binary_data=False)
        with pytest.raises(InferenceServerException) as bad:
            c.infer(MODEL, [tensor])
        assert bad.value.status() == "400"
        assert isinstance(bad.value.message(), str) and "NaN" in bad.value.message()

        assert infer(c).shape == (3, 3)
        assert infer(c).shape == (3, 3)  # 6 rows: the hour's budget
        with pytest.raises(InferenceServerException) as throttled:
            infer(c)
        assert throttled.value.status() == "429"
        assert throttled.value.message() == "too many requests; retry later"
        assert "rows-per-hour" not in str(throttled.value)


@pytest.mark.parametrize("binary_out", [False, True], ids=["json_out", "binary_out"])
@pytest.mark.parametrize("binary_in", [False, True], ids=["json_in", "binary_in"])
def test_triton_client_binary_and_json_tensors_through_the_proxy(
    proxy: Server, mlserver_iris: MLServer, binary_in: bool, binary_out: bool
) -> None:
    if binary_in:
        # MLServer 1.7.1's REST server does not implement binary inputs and answers
        # 422 (its own FastAPI error): the guard reads the binary request, lets it
        # on unchanged, and MLServer's answer reaches the client as it is
        for srv in (mlserver_iris, proxy):
            with pytest.raises(InferenceServerException) as refused:
                infer(client(srv), binary_in=True, binary_out=binary_out)
            assert refused.value.status() == "422"
            assert "json_invalid" in str(refused.value.message())
        return
    # MLServer 1.7.1 answers a request for binary outputs in JSON (it does not
    # implement the extension); the guard's binary rewrite is tested against a
    # server that answers binary: tests/e2e/test_proxy_binary.py
    guarded = infer(client(proxy), binary_out=binary_out)
    exact = infer(client(mlserver_iris), binary_out=binary_out)
    assert guarded.shape == exact.shape == (3, 3)
    # rounded to 2 decimals under the default policy, binary outputs included
    assert np.array_equal(guarded, np.round(guarded, 2))
    assert not np.array_equal(exact, np.round(exact, 2))
    assert np.abs(guarded - exact).max() <= 0.005 + 1e-12


def test_invalid_input_is_refused_before_mlserver(proxy: Server) -> None:
    bad = b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[1,2,3,NaN]}]}'
    r = httpx.post(
        proxy.url + INFER, content=bad, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 400
    assert isinstance(r.json()["error"], str) and r.headers["x-request-id"]
    # an error MLServer makes itself (a model it does not have) passes through as it is
    r = httpx.post(proxy.url + "/v2/models/nope/infer", json=v2_body(ROWS), timeout=10)
    assert r.status_code == 404
    assert "nope" in r.text


def test_mlserver_has_no_kserve_v1(proxy: Server) -> None:
    # MLServer speaks the Open Inference Protocol (v2) only: its 404 passes through
    # (tests/e2e/test_proxy_kserve.py tests v1 against KServe's own model server)
    r = httpx.post(
        proxy.url + f"/v1/models/{MODEL}:predict", json={"instances": ROWS.tolist()}, timeout=10
    )
    assert r.status_code == 404
    assert r.json() == {"detail": "Not Found"}


async def _load(
    url: str, n: int, concurrency: int, after: int, on_after: asyncio.Event
) -> list[tuple[int | str, float]]:
    """``n`` inference requests, ``concurrency`` at a time; status (or error) and seconds."""
    results: list[tuple[int | str, float]] = []
    queue = iter(range(n))
    body = v2_body(ROWS)

    async def worker(c: httpx.AsyncClient) -> None:
        for _ in queue:
            started = time.monotonic()
            try:
                status: int | str = (await c.post(INFER, json=body)).status_code
            except httpx.HTTPError as exc:  # a hang shows here, as a client timeout
                status = type(exc).__name__
            results.append((status, time.monotonic() - started))
            if len(results) == after:
                on_after.set()

    async with httpx.AsyncClient(base_url=url, timeout=15.0) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return results


def test_upstream_killed_mid_load(tmp_path: Path) -> None:
    with (
        mlserver(tmp_path / "mlserver") as upstream,
        run_proxy(
            tmp_path, upstream.url, args=("--connect-timeout", "2", "--read-timeout", "5")
        ) as proxy,
    ):

        async def scenario() -> list[tuple[int | str, float]]:
            killed = asyncio.Event()
            load = asyncio.ensure_future(_load(proxy.url, 200, 8, 40, killed))
            await killed.wait()
            await asyncio.to_thread(upstream.kill)
            return await load

        results = asyncio.run(asyncio.wait_for(scenario(), 120))
        statuses = [s for s, _ in results]
        assert len(statuses) == 200
        # every request answered, by the model or by the proxy, none hung
        assert set(statuses) <= {200, 502, 504}, statuses
        assert max(seconds for _, seconds in results) < 10.0
        assert statuses.count(200) >= 40
        failed = statuses.count(502) + statuses.count(504)
        assert failed > 0
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        counted = sum(
            metric(text, "guard_upstream_errors_total", reason=r)
            for r in ("connect", "timeout", "pool", "reset", "other")
        )
        assert counted == failed

        upstream.start()
        after = [
            httpx.post(proxy.url + INFER, json=v2_body(ROWS), timeout=10).status_code
            for _ in range(20)
        ]
        assert after == [200] * 20


def test_signature_learned_from_mlserver_metadata(mlserver_iris: MLServer, tmp_path: Path) -> None:
    # MLServer's GET /v2/models/iris names the input the model-settings.json declares:
    # input-0, FP64, [-1, 4]; requests off it are refused before MLServer sees them
    config = {
        "policies": [
            {"name": "inference", "routes": ["/v2/models/*/infer"], "signature": {"learn": True}}
        ]
    }
    with run_proxy(tmp_path, mlserver_iris.url, config=config) as proxy:
        c = client(proxy)
        assert infer(c).shape == (3, 3)
        for name, datatype, rows, expected in [
            ("input-0", "FP32", ROWS.astype(np.float32), "must be FP64"),
            ("input-0", "FP64", ROWS[:, :3], "must have shape [-1, 4]"),
            ("x", "FP64", ROWS, "no input named 'x'"),
        ]:
            tensor = triton.InferInput(name, list(rows.shape), datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(rows), binary_data=False)
            with pytest.raises(InferenceServerException) as refused:
                c.infer(MODEL, [tensor])
            assert refused.value.status() == "400"
            assert expected in refused.value.message()
        # a model MLServer has no metadata for: no signature, counted once; its 404 passes
        for _ in range(2):
            r = httpx.post(proxy.url + "/v2/models/nope/infer", json=v2_body(ROWS), timeout=10)
            assert r.status_code == 404
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_errors_total", component="signature") == 1
        assert (
            metric(text, "guard_invalid_requests_total", policy="inference", reason="bad_type") == 1
        )
        assert (
            metric(text, "guard_invalid_requests_total", policy="inference", reason="bad_shape")
            == 2
        )


def test_signatures_are_learned_at_start_up(tmp_path: Path) -> None:
    # guard proxy asks MLServer's repository index for its models and learns their
    # signatures before it serves: with MLServer gone, a request off the signature
    # is still refused 400 (not 502), and a valid one finds no upstream
    config = {
        "policies": [
            {"name": "inference", "routes": ["/v2/models/*/infer"], "signature": {"learn": True}}
        ]
    }
    with (
        mlserver(tmp_path / "mlserver") as upstream,
        run_proxy(tmp_path, upstream.url, config=config, args=("--connect-timeout", "2")) as proxy,
    ):
        upstream.kill()
        bad = v2_body(ROWS)
        bad["inputs"][0]["datatype"] = "FP32"  # type: ignore[index]
        r = httpx.post(proxy.url + INFER, json=bad, timeout=10)
        assert r.status_code == 400 and r.json() == {"error": "input 'input-0' must be FP64"}
        r = httpx.post(proxy.url + INFER, json=v2_body(ROWS), timeout=10)
        assert r.status_code == 502
        text = httpx.get(proxy.url + "/metrics", timeout=5).text
        assert metric(text, "guard_errors_total", component="signature") == 0
