"""The bare digits model server: the model itself, each endpoint, and bad input."""

from __future__ import annotations

import asyncio
import json
import warnings
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from inference_guard.middleware.demo import (
    DigitsModel,
    build_model_app,
    train_digits_model,
)

V2 = "/v2/models/digits/infer"
V1 = "/v1/models/digits:predict"


@pytest.fixture(scope="module")
def model() -> DigitsModel:
    return train_digits_model()


class Client:
    """A synchronous in-process client over ``httpx.ASGITransport``.

    (``starlette.testclient`` warns when used with ``httpx``, and warnings are errors.)
    The transport re-raises application exceptions, so a would-be 500 fails the test.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async def send() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                return await c.request(method, path, **kwargs)

        return asyncio.run(send())

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)


@pytest.fixture(scope="module")
def client(model: DigitsModel) -> Client:
    return Client(build_model_app(model))


def _v2_body(rows: np.ndarray[Any, Any], *, nested: bool = False, **extra: Any) -> dict[str, Any]:
    data = rows.tolist() if nested else rows.ravel().tolist()
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP32", "data": data}
    return {"inputs": [tensor], **extra}


# --- the model -------------------------------------------------------------------------


def test_training_is_accurate_and_warning_free() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ConvergenceWarning would fail here
        m = train_digits_model(seed=0)
    assert m.X_train.shape[1] == 64 and m.X_test.shape[1] == 64
    assert len(m.X_train) + len(m.X_test) == 1797
    assert len(m.X_train) == int(0.8 * 1797)
    assert m.X_train.shape[0] == m.y_train.shape[0] and m.X_test.shape[0] == m.y_test.shape[0]
    assert float(np.mean(m.predict(m.X_test) == m.y_test)) > 0.9
    assert m.classes.tolist() == list(range(10))


def test_split_is_seeded() -> None:
    a, b, c = train_digits_model(0), train_digits_model(0), train_digits_model(1)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    np.testing.assert_array_equal(a.coef, b.coef)
    assert not np.array_equal(a.y_test, c.y_test)
    # train and test together are exactly the data set, each row once
    X, y = load_digits(return_X_y=True)
    both = np.hstack([np.vstack([a.X_train, a.X_test]), np.r_[a.y_train, a.y_test][:, None]])
    full = np.hstack([X, y[:, None]])
    np.testing.assert_array_equal(np.unique(both, axis=0), np.unique(full, axis=0))
    assert len(both) == len(full)


def test_numpy_hot_path_matches_sklearn(model: DigitsModel) -> None:
    X = np.vstack([model.X_test, model.X_train[:50]])
    expected = model.estimator.predict_proba(X / 16.0)
    np.testing.assert_allclose(model.predict_proba(X), expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(model.predict(X), model.estimator.predict(X / 16.0))
    # one row, as in the hot path
    np.testing.assert_allclose(
        model.predict_proba(X[:1]), model.estimator.predict_proba(X[:1] / 16.0), atol=1e-9, rtol=0
    )


# --- Open Inference Protocol v2 ----------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_v2_infer_matches_model(client: Client, model: DigitsModel, nested: bool) -> None:
    rows = model.X_test
    r = client.post(V2, json=_v2_body(rows, nested=nested, id="req-1"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == "1"
    assert body["id"] == "req-1"
    label, probs = body["outputs"]
    n = len(rows)
    assert label["name"] == "label" and label["datatype"] == "INT64" and label["shape"] == [n]
    assert label["data"] == model.predict(rows).tolist()
    assert float(np.mean(np.asarray(label["data"]) == model.y_test)) > 0.9
    assert probs["name"] == "probabilities" and probs["datatype"] == "FP32"
    assert probs["shape"] == [n, 10]
    p = np.asarray(probs["data"]).reshape(n, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, model.estimator.predict_proba(rows / 16.0), atol=1e-6)
    # served values are float32-exact, as the declared datatype says
    np.testing.assert_array_equal(p, p.astype(np.float32))


def test_v2_versioned_route_and_generated_id(client: Client, model: DigitsModel) -> None:
    rows = model.X_test[:2]
    first = client.post("/v2/models/digits/versions/1/infer", json=_v2_body(rows)).json()
    second = client.post(V2, json=_v2_body(rows)).json()
    assert isinstance(first["id"], str) and first["id"]
    assert first["id"] != second["id"]
    assert first["outputs"] == second["outputs"]


@pytest.mark.parametrize(
    ("requested", "served"),
    [
        ([{"name": "label"}], ["label"]),
        ([{"name": "probabilities"}], ["probabilities"]),
        ([{"name": "probabilities"}, {"name": "label"}], ["probabilities", "label"]),
        ([], ["label", "probabilities"]),
        ([{"name": "label"}, {"name": "label"}], ["label"]),
    ],
)
def test_v2_output_selection(
    client: Client, model: DigitsModel, requested: list[dict[str, str]], served: list[str]
) -> None:
    r = client.post(V2, json=_v2_body(model.X_test[:3], outputs=requested))
    assert r.status_code == 200
    assert [o["name"] for o in r.json()["outputs"]] == served


@pytest.mark.parametrize("datatype", ["FP64", "INT32", "INT64", "UINT8"])
def test_v2_accepts_numeric_datatypes(client: Client, model: DigitsModel, datatype: str) -> None:
    body = _v2_body(model.X_test[:1].astype(int))
    body["inputs"][0]["datatype"] = datatype
    r = client.post(V2, json=body)
    assert r.status_code == 200
    assert r.json()["outputs"][0]["data"] == model.predict(model.X_test[:1]).tolist()


# --- KServe v1 / TF Serving -----------------------------------------------------------------


def test_v1_default_predictions_are_probability_vectors(client: Client, model: DigitsModel) -> None:
    rows = model.X_test
    r = client.post(V1, json={"instances": rows.tolist()})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    preds = np.asarray(r.json()["predictions"])
    assert preds.shape == (len(rows), 10)
    np.testing.assert_allclose(preds.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(preds, model.estimator.predict_proba(rows / 16.0), atol=1e-9)
    np.testing.assert_array_equal(preds.argmax(axis=1), model.predict(rows))
    assert float(np.mean(preds.argmax(axis=1) == model.y_test)) > 0.9


def test_v1_labels_only(client: Client, model: DigitsModel) -> None:
    rows = model.X_test[:20]
    body = {"instances": rows.tolist(), "parameters": {"labels_only": True}}
    r = client.post(V1, json=body)
    assert r.status_code == 200
    assert r.json() == {"predictions": model.predict(rows).tolist()}
    off = client.post(V1, json={**body, "parameters": {"labels_only": False}}).json()
    assert np.asarray(off["predictions"]).shape == (20, 10)


@pytest.mark.parametrize("named", [False, True])
def test_v1_column_form_answers_outputs(client: Client, model: DigitsModel, named: bool) -> None:
    rows = model.X_test[:4].tolist()
    inputs: Any = {"input-0": rows} if named else rows
    r = client.post(V1, json={"signature_name": "serving_default", "inputs": inputs})
    assert r.status_code == 200
    out = np.asarray(r.json()["outputs"])
    assert out.shape == (4, 10)
    np.testing.assert_array_equal(out.argmax(axis=1), model.predict(model.X_test[:4]))


# --- metadata and health ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v2/models/digits", "/v2/models/digits/versions/1"])
def test_metadata(client: Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "name": "digits",
        "versions": ["1"],
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/health/live", "/healthz"])
def test_health(client: Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_metrics_is_not_served_by_the_bare_app(client: Client) -> None:
    r = client.get("/metrics")
    assert r.status_code == 404
    assert r.json() == {"error": "Not Found"}


def test_wrong_method_is_json_405(client: Client) -> None:
    r = client.get(V2)
    assert r.status_code == 405
    assert "error" in r.json()
    assert "POST" in r.headers["allow"]


# --- bad input: always 400 JSON, never 500 ------------------------------------------------

_ROW = [1.0] * 64


def _tensor(**changes: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "input-0", "shape": [1, 64], "datatype": "FP32", "data": _ROW}
    tensor.update(changes)
    return {"inputs": [tensor]}


def _nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


_BAD_V2: list[tuple[str, Any]] = [
    ("not json", b"{not json"),
    ("invalid utf-8", b"\xff\xfe\x00"),
    ("empty body", b""),
    ("array body", []),
    ("no inputs", {}),
    ("inputs not a list", {"inputs": {"name": "input-0"}}),
    ("two inputs", {"inputs": [_tensor()["inputs"][0]] * 2}),
    ("tensor not an object", {"inputs": [[1, 2]]}),
    ("bytes datatype", _tensor(datatype="BYTES")),
    ("missing datatype", _tensor(datatype=None)),
    ("unknown datatype", _tensor(datatype="FP128")),
    ("wrong width", _tensor(shape=[1, 63], data=_ROW[:63])),
    ("one-d shape", _tensor(shape=[64])),
    ("three-d shape", _tensor(shape=[1, 1, 64])),
    ("shape not list", _tensor(shape="1,64")),
    ("negative dim", _tensor(shape=[-1, 64])),
    ("bool dim", _tensor(shape=[True, 64])),
    ("float dim", _tensor(shape=[1.0, 64])),
    ("zero rows", _tensor(shape=[0, 64], data=[])),
    ("size mismatch", _tensor(shape=[2, 64])),
    ("no data", {"inputs": [{"name": "input-0", "shape": [1, 64], "datatype": "FP32"}]}),
    ("string values", _tensor(data=["1.0"] * 64)),
    ("null values", _tensor(data=[None] * 64)),
    ("object values", _tensor(data=[{"b64": "AAAA"}] * 64)),
    ("ragged nested", _tensor(shape=[2, 64], data=[_ROW, _ROW[:63]])),
    ("huge int", _tensor(data=[10**30, *_ROW[1:]])),
    (
        "nan",
        b'{"inputs":[{"name":"input-0","shape":[1,64],"datatype":"FP32","data":[NaN'
        + b",1" * 63
        + b"]}]}",
    ),
    (
        "infinity",
        b'{"inputs":[{"name":"input-0","shape":[1,64],"datatype":"FP32","data":[1e999'
        + b",1" * 63
        + b"]}]}",
    ),
    ("id not a string", {**_tensor(), "id": 7}),
    ("unknown output", {**_tensor(), "outputs": [{"name": "logits"}]}),
    ("outputs not a list", {**_tensor(), "outputs": {"name": "label"}}),
    ("output not an object", {**_tensor(), "outputs": ["label"]}),
    ("deep nesting", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("numpy-deep nesting", _tensor(data=_nested(70))),
]

_BAD_V1: list[tuple[str, Any]] = [
    ("not json", b"[1,"),
    ("array body", [[1.0] * 64]),
    ("neither form", {"signature_name": "x"}),
    ("both forms", {"instances": [_ROW], "inputs": [_ROW]}),
    ("flat instance", {"instances": _ROW}),
    ("wrong width", {"instances": [_ROW[:10]]}),
    ("empty", {"instances": []}),
    ("b64", {"instances": [{"b64": "AAAA"}]}),
    ("strings", {"instances": [["1"] * 64]}),
    ("ragged", {"instances": [_ROW, _ROW[:3]]}),
    ("two named inputs", {"inputs": {"a": [_ROW], "b": [_ROW]}}),
    ("parameters not object", {"instances": [_ROW], "parameters": True}),
    ("labels_only not bool", {"instances": [_ROW], "parameters": {"labels_only": "yes"}}),
]


def _post(client: Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, content=json.dumps(body))


@pytest.mark.parametrize(("case", "body"), _BAD_V2, ids=[c for c, _ in _BAD_V2])
def test_v2_bad_input_is_400_json(client: Client, case: str, body: Any) -> None:
    r = _post(client, V2, body)
    assert r.status_code == 400, case
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


@pytest.mark.parametrize(("case", "body"), _BAD_V1, ids=[c for c, _ in _BAD_V1])
def test_v1_bad_input_is_400_json(client: Client, case: str, body: Any) -> None:
    r = _post(client, V1, body)
    assert r.status_code == 400, case
    assert r.headers["content-type"] == "application/json"
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-1e999"])
def test_non_finite_input_is_named_as_such(client: Client, token: bytes) -> None:
    v2 = b'{"inputs":[{"shape":[1,64],"datatype":"FP64","data":[' + token + b",0" * 63 + b"]}]}"
    v1 = b'{"instances":[[' + token + b",0" * 63 + b"]]}"
    for path, body in ((V2, v2), (V1, v1)):
        r = _post(client, path, body)
        assert r.status_code == 400
        assert "finite" in r.json()["error"]


def test_overflowing_logits_are_400_not_nan(client: Client, model: DigitsModel) -> None:
    # finite inputs chosen so that the first class's logit overflows to +inf
    row = np.sign(model.coef[0]) * np.finfo(np.float64).max
    with np.errstate(all="ignore"):
        assert not np.isfinite(model.predict_proba(row[None, :])).all()
    for r in (
        client.post(V2, json=_v2_body(row[None, :])),
        client.post(V1, json={"instances": [row.tolist()]}),
    ):
        assert r.status_code == 400
        assert "too large" in r.json()["error"]


def test_build_model_app_trains_a_default_model() -> None:
    c = Client(build_model_app())
    r = c.post(V1, json={"instances": [_ROW], "parameters": {"labels_only": True}})
    assert r.status_code == 200
    assert r.json()["predictions"][0] in range(10)
