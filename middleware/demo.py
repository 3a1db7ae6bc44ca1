"""A small, real model server to put the guard in front of: digits classification.

The model is a multinomial logistic regression trained on scikit-learn's bundled
``load_digits`` data (8x8 images, 64 pixel intensities in ``0..16``, 10 classes;
no download). :func:`build_model_app` serves it as a plain Starlette app with no
guard logic at all, so it can be benchmarked bare; :func:`build_demo_app` wraps it
in :class:`~middleware.asgi.GuardMiddleware`.

Endpoints
---------
``POST /v2/models/digits/infer`` (also ``/v2/models/digits/versions/1/infer``)
    Open Inference Protocol v2. Request::

        {"id"?: str, "inputs": [{"name": "input-0", "shape": [n, 64],
          "datatype": "FP32", "data": [...flat row-major or nested...]}],
         "outputs"?: [{"name": "label" | "probabilities"}]}

    Exactly one input tensor is accepted; as in MLServer's scikit-learn runtime its
    name is not checked. ``datatype`` must be a numeric one (``BOOL``, ``UINT*``,
    ``INT*``, ``FP16``, ``FP32``, ``FP64``); the values are used as float64.
    Response::

        {"model_name": "digits", "model_version": "1", "id": <request id or a uuid4 hex>,
         "outputs": [{"name": "label", "shape": [n], "datatype": "INT64", "data": [...]},
                     {"name": "probabilities", "shape": [n, 10], "datatype": "FP32",
                      "data": [...n*10 values, row-major, rounded to float32...]}]}

    ``outputs`` in the request selects (and orders) the output tensors; absent or
    empty means both. Triton's binary tensor extension is answered for outputs
    that ask for it (``outputs[].parameters.binary_data: true``, or
    ``parameters.binary_data_output: true`` for all): the body is then the JSON
    header (``Inference-Header-Content-Length`` bytes, those outputs carrying
    ``parameters.binary_data_size`` instead of ``data``) followed by their raw
    little-endian tensors, as ``application/octet-stream``.

``POST /v1/models/digits:predict``
    KServe v1 / TensorFlow Serving. Row form ``{"instances": [[64 numbers], ...]}``
    is answered by ``{"predictions": [[10 probabilities], ...]}``: **by default each
    prediction is the full class-probability vector** (index ``k`` is the
    probability of digit ``k``, full float64 precision), as TF Serving classifiers
    answer, because the guard's degrade action and extraction detectors work on
    probabilities. With ``"parameters": {"labels_only": true}`` in the body, each
    prediction is the integer label instead: ``{"predictions": [3, 7, ...]}``.
    Column form ``{"inputs": [[64 numbers], ...]}`` (or ``{"inputs": {"input-0":
    [...]}}``) is answered the same way under ``"outputs"`` instead of
    ``"predictions"``. ``signature_name`` is accepted and ignored.

``GET /v2/models/digits`` (also ``/v2/models/digits/versions/1``)
    Model metadata: tensor names, datatypes and shapes.

``GET /v2/health/ready``, ``GET /v2/health/live``, ``GET /healthz``
    ``200 {"status": "ok"}``.

Every invalid request (bad JSON, wrong shape, non-numeric or non-finite values,
unknown output names) is answered ``400 {"error": "..."}``; unknown paths and
methods get ``404`` / ``405`` with the same JSON error shape. The server never
answers 500 for client input. ``/metrics`` belongs to the middleware, not to this
app.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import yaml
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inference_guard.guard.config import OIP_DATATYPES
from inference_guard.middleware.types import ASGIApp

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "N_CLASSES",
    "N_FEATURES",
    "DigitsModel",
    "build_demo_app",
    "build_model_app",
    "train_digits_model",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

MODEL_NAME: Final = "digits"
MODEL_VERSION: Final = "1"
N_FEATURES: Final = 64
N_CLASSES: Final = 10
#: the largest pixel intensity in ``load_digits``; inputs are divided by it
PIXEL_MAX: Final = 16.0
#: share of the shuffled data used for training; the rest is ``X_test``
TRAIN_FRACTION: Final = 0.8

# the v2 datatypes this model reads from JSON numbers: the protocol's, but BYTES (strings)
# and BF16 (no JSON form the demo reads)
_NUMERIC_DATATYPES: Final = OIP_DATATYPES - {"BYTES", "BF16"}
_OUTPUT_NAMES: Final = ("label", "probabilities")
_JSON: Final = "application/json"
_SEPARATORS: Final = (",", ":")


@dataclass(frozen=True, eq=False)
class DigitsModel:
    """A fitted digits classifier and the data split it was trained on.

    Inputs are raw pixel rows (64 values in ``0..16``). The estimator was fitted on
    rows divided by :data:`PIXEL_MAX`; :meth:`predict_proba` folds that scaling into
    its pre-extracted weights and computes the softmax in plain numpy, skipping
    scikit-learn's per-call validation (which costs more than the arithmetic for
    one row). It equals ``estimator.predict_proba(X / 16)`` to rounding error.
    """

    #: the fitted scikit-learn estimator (expects inputs already divided by 16)
    estimator: LogisticRegression
    #: weights for raw pixel inputs, shape ``(10, 64)``: ``estimator.coef_ / 16``
    coef: FloatArray
    #: intercepts, shape ``(10,)``
    intercept: FloatArray
    #: class labels in column order of the probabilities (the digits 0..9)
    classes: IntArray
    #: training rows (raw pixels), shape ``(n_train, 64)``
    X_train: FloatArray
    #: held-out rows (raw pixels), shape ``(n_test, 64)``
    X_test: FloatArray
    #: training labels
    y_train: IntArray
    #: held-out labels
    y_test: IntArray

    def decision_function(self, X: FloatArray) -> FloatArray:
        """Class scores (logits) for raw pixel rows ``X`` of shape ``(n, 64)``."""
        scores: FloatArray = X @ self.coef.T + self.intercept
        return scores

    def predict_proba(self, X: FloatArray) -> FloatArray:
        """Class probabilities, shape ``(n, 10)``; rows sum to 1.

        Rows whose scores overflow give non-finite values (and numpy warnings);
        callers serving untrusted input check :func:`numpy.isfinite`.
        """
        z = self.decision_function(X)
        # subtracting the row maximum keeps exp() from overflowing; softmax is
        # invariant to it
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict(self, X: FloatArray) -> IntArray:
        """Predicted digit for each raw pixel row."""
        labels: IntArray = self.classes[np.argmax(self.decision_function(X), axis=1)]
        return labels


def train_digits_model(seed: int = 0) -> DigitsModel:
    """Train the demo classifier on a seeded 80/20 split of ``load_digits``.

    The rows are shuffled with ``numpy.random.default_rng(seed)``; the first 80%
    train the model and the rest are exposed as ``X_test``/``y_test``, so
    benchmarks and calibration reuse the very same split. Takes well under a
    second and converges without warnings.
    """
    X_all, y_all = load_digits(return_X_y=True)
    X = np.asarray(X_all, dtype=np.float64)
    y = np.asarray(y_all, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_train = int(TRAIN_FRACTION * len(y))
    train, test = order[:n_train], order[n_train:]
    # lbfgs fits the multinomial model; it converges in under 100 iterations here
    estimator = LogisticRegression(max_iter=1000)
    estimator.fit(X[train] / PIXEL_MAX, y[train])
    return DigitsModel(
        estimator=estimator,
        coef=np.ascontiguousarray(estimator.coef_ / PIXEL_MAX, dtype=np.float64),
        intercept=np.asarray(estimator.intercept_, dtype=np.float64),
        classes=np.asarray(estimator.classes_, dtype=np.int64),
        X_train=X[train],
        X_test=X[test],
        y_train=y[train],
        y_test=y[test],
    )


class _BadRequest(Exception):
    """Client input the model cannot serve; answered 400 with its message."""


def _json_response(content: object, status_code: int = 200) -> Response:
    body = json.dumps(content, separators=_SEPARATORS)
    return Response(body, status_code=status_code, media_type=_JSON)


def _error(message: str, status_code: int = 400) -> Response:
    return _json_response({"error": message}, status_code)


async def _read_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        payload = json.loads(body)
    except RecursionError:
        raise _BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _BadRequest("request body must be a JSON object")
    return payload


def _to_array(data: object, what: str) -> FloatArray:
    """Convert JSON numbers (any nesting) to float64; reject everything else."""
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise _BadRequest(f"{what} must be a regular array of numbers") from None
    if arr.dtype.kind not in "biuf":
        # strings, nulls, objects, ragged lists and ints too large for int64
        raise _BadRequest(f"{what} must be a regular array of numbers")
    return arr.astype(np.float64, copy=False)


def _rows(arr: FloatArray, what: str) -> FloatArray:
    if arr.ndim != 2 or arr.shape[1] != N_FEATURES:
        raise _BadRequest(f"{what} must have shape [n, {N_FEATURES}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise _BadRequest(f"{what} must contain at least one row")
    if not np.isfinite(arr).all():
        raise _BadRequest(f"{what} must contain only finite numbers")
    return arr


def _predict(model: DigitsModel, X: FloatArray) -> FloatArray:
    # Finite but huge inputs can overflow the logits; answer 400, not NaN JSON.
    with np.errstate(all="ignore"):
        probs = model.predict_proba(X)
    if not np.isfinite(probs).all():
        raise _BadRequest("input values are too large for the model")
    return probs


def _v2_input(payload: Mapping[str, Any]) -> FloatArray:
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _BadRequest("'inputs' must be a list holding exactly one tensor object")
    tensor: dict[str, Any] = inputs[0]
    datatype = tensor.get("datatype")
    if datatype not in _NUMERIC_DATATYPES:
        raise _BadRequest(f"input datatype must be one of {sorted(_NUMERIC_DATATYPES)}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise _BadRequest(f"input shape must be [n, {N_FEATURES}]")
    if "data" not in tensor:
        raise _BadRequest("input tensor has no 'data'")
    arr = _to_array(tensor["data"], "input data")
    if arr.size != math.prod(shape):
        raise _BadRequest(
            f"input data has {arr.size} values but shape {shape} needs {math.prod(shape)}"
        )
    return _rows(arr.reshape(shape), "input")


def _v2_output_names(payload: Mapping[str, Any]) -> tuple[str, ...]:
    outputs = payload.get("outputs")
    if outputs is None or outputs == []:
        return _OUTPUT_NAMES
    if not isinstance(outputs, list):
        raise _BadRequest("'outputs' must be a list of {\"name\": ...} objects")
    names: list[str] = []
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in _OUTPUT_NAMES:
            raise _BadRequest(f"requested outputs must be named one of {list(_OUTPUT_NAMES)}")
        if name not in names:
            names.append(name)
    return tuple(names)


def _make_v2_infer(model: DigitsModel) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def infer(request: Request) -> Response:
        """Open Inference Protocol v2 ``infer``."""
        try:
            payload = await _read_object(request)
            request_id = payload.get("id")
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif not isinstance(request_id, str):
                raise _BadRequest("'id' must be a string")
            X = _v2_input(payload)
            names = _v2_output_names(payload)
            probs = _predict(model, X)
        except _BadRequest as exc:
            return _error(str(exc))
        n = X.shape[0]
        outputs: list[dict[str, object]] = []
        for name in names:
            if name == "label":
                labels = model.classes[np.argmax(probs, axis=1)]
                outputs.append(
                    {"name": "label", "shape": [n], "datatype": "INT64", "data": labels.tolist()}
                )
            else:
                outputs.append(
                    {
                        "name": "probabilities",
                        "shape": [n, N_CLASSES],
                        "datatype": "FP32",
                        "data": probs.astype(np.float32).ravel().tolist(),
                    }
                )
        answer = {
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "id": request_id,
            "outputs": outputs,
        }
        binary = _v2_binary_outputs(payload)
        if any(o["name"] in binary for o in outputs):
            return _binary_response(answer, binary)
        return _json_response(answer)

    return infer


def _v2_binary_outputs(payload: Mapping[str, Any]) -> set[str]:
    """The names of the outputs the request asks for in Triton's binary extension."""
    params = payload.get("parameters")
    if isinstance(params, dict) and params.get("binary_data_output") is True:
        return set(_OUTPUT_NAMES)
    outputs = payload.get("outputs")
    return {
        o["name"]
        for o in outputs or ()
        if isinstance(o, dict)
        and isinstance(o.get("parameters"), dict)
        and o["parameters"].get("binary_data") is True
    }


def _binary_response(answer: dict[str, Any], binary: set[str]) -> Response:
    """``answer`` with the ``binary`` outputs as raw little-endian tensors after the header."""
    blobs = []
    for out in answer["outputs"]:
        if out["name"] in binary:
            dtype = "<i8" if out["datatype"] == "INT64" else "<f4"
            blob = np.asarray(out.pop("data"), dtype=dtype).tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
    header = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"inference-header-content-length": str(len(header))},
    )


def _v1_labels_only(payload: Mapping[str, Any]) -> bool:
    parameters = payload.get("parameters")
    if parameters is None:
        return False
    if not isinstance(parameters, dict):
        raise _BadRequest("'parameters' must be an object")
    labels_only = parameters.get("labels_only", False)
    if not isinstance(labels_only, bool):
        raise _BadRequest("'parameters.labels_only' must be true or false")
    return labels_only


def _make_v1_predict(model: DigitsModel) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def predict(request: Request) -> Response:
        """KServe v1 / TF Serving ``:predict`` (row or column form)."""
        try:
            payload = await _read_object(request)
            if ("instances" in payload) == ("inputs" in payload):
                raise _BadRequest("body must hold exactly one of 'instances' or 'inputs'")
            if "instances" in payload:
                field, key, data = "instances", "predictions", payload["instances"]
            else:
                field, key, data = "inputs", "outputs", payload["inputs"]
                if isinstance(data, dict):
                    if len(data) != 1:
                        raise _BadRequest("named 'inputs' must hold exactly one input")
                    (data,) = data.values()
            labels_only = _v1_labels_only(payload)
            X = _rows(_to_array(data, f"'{field}'"), f"'{field}'")
            probs = _predict(model, X)
        except _BadRequest as exc:
            return _error(str(exc))
        if labels_only:
            result: list[Any] = model.classes[np.argmax(probs, axis=1)].tolist()
        else:
            result = probs.tolist()
        return _json_response({key: result})

    return predict


def _static_json(content: object) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    body = json.dumps(content, separators=_SEPARATORS).encode()

    async def endpoint(request: Request) -> Response:
        """Answer with a constant JSON document."""
        return Response(body, media_type=_JSON)

    return endpoint


_METADATA: Final = {
    "name": MODEL_NAME,
    "versions": [MODEL_VERSION],
    "platform": "sklearn",
    "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, N_FEATURES]}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, N_CLASSES]},
    ],
}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Render Starlette's 404/405 (and other HTTP errors) as ``{"error": ...}``."""
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        raise exc
    response = _error(exc.detail, exc.status_code)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


def build_model_app(model: DigitsModel | None = None) -> Starlette:
    """The bare digits model server (no guard): see the module docstring for the API.

    ``model`` defaults to ``train_digits_model()``.
    """
    if model is None:
        model = train_digits_model()
    infer = _make_v2_infer(model)
    metadata = _static_json(_METADATA)
    ok = _static_json({"status": "ok"})
    base = f"/v2/models/{MODEL_NAME}"
    routes = [
        # the inference routes first: they are what the latency benchmark hits
        Route(f"{base}/infer", infer, methods=["POST"]),
        Route(f"/v1/models/{MODEL_NAME}:predict", _make_v1_predict(model), methods=["POST"]),
        Route(f"{base}/versions/{MODEL_VERSION}/infer", infer, methods=["POST"]),
        Route(base, metadata, methods=["GET"]),
        Route(f"{base}/versions/{MODEL_VERSION}", metadata, methods=["GET"]),
        Route("/v2/health/ready", ok, methods=["GET"]),
        Route("/v2/health/live", ok, methods=["GET"]),
        Route("/healthz", ok, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})


#: demo calibrations already made in this process, by a digest of the model and its data
_CALIBRATED: dict[str, Path] = {}
#: a file in a calibration directory naming the model and policy it was calibrated for
_DEMO_STAMP: Final = "demo-calibration.key"
#: the modules whose code decides what calibration writes
_CALIBRATION_CODE: Final = (
    "inference_guard.guard.calibrate",
    "inference_guard.guard.score_buckets",
    "inference_guard.guard.sessions",
    "inference_guard.detectors.profile",
    "inference_guard.detectors.fingerprint",
    "inference_guard.detectors.prada",
    "inference_guard.detectors.boundary",
    "inference_guard.detectors.persist",
)


def demo_config(calibration_dir: str | Path, *, model: DigitsModel | None = None) -> dict[str, Any]:
    """The demo policy (``guard/demo.yaml``), every detector calibrated into a directory.

    What ``guard calibrate --config`` does for any deployment, on the model's own
    training split and its answers: the row detectors at a 0.1 % target
    false-positive rate per row, the stateful detectors on simulated benign
    client sessions at 0.1 % per client. It takes several seconds, so a process
    calibrates a given model once and copies the files for later calls.
    """
    from inference_guard.guard.calibrate import calibrate_config
    from inference_guard.guard.config import GuardConfig
    from inference_guard.guard.reference_data import ReferenceData

    model = model if model is not None else train_digits_model()
    text = files("inference_guard.guard").joinpath("demo.yaml").read_text(encoding="utf-8")
    config: dict[str, Any] = yaml.safe_load(text)
    digest = hashlib.sha256(
        model.X_train.tobytes() + model.coef.tobytes() + model.intercept.tobytes() + text.encode()
    )
    for module in _CALIBRATION_CODE:  # a change to how calibration works recalibrates
        source = importlib.util.find_spec(module)
        if source is not None and source.origin is not None:
            digest.update(Path(source.origin).read_bytes())
    key = digest.hexdigest()
    target = Path(calibration_dir)
    stamp = target / _DEMO_STAMP
    if stamp.is_file() and stamp.read_text(encoding="ascii").strip() == key:
        # calibrated by an earlier run for this very model and policy; the guard still
        # verifies every file's checksum (and HMAC) when it loads it
        config["calibration_dir"] = str(calibration_dir)
        return config
    done = _CALIBRATED.get(key)
    if done is None or not done.is_dir():
        done = Path(tempfile.mkdtemp(prefix="guard-demo-calibrated-"))
        atexit.register(shutil.rmtree, done, True)
        data = ReferenceData(
            model.X_train, (), "digits training split", model.predict_proba(model.X_train)
        )
        calibrate_config(GuardConfig.from_dict(config), data, done, target_fpr=0.001)
        _CALIBRATED[key] = done
    if target.resolve() != done.resolve():
        shutil.copytree(done, target, dirs_exist_ok=True)
    stamp.write_text(key + "\n", encoding="ascii")
    config["calibration_dir"] = str(calibration_dir)
    return config


def _demo_cache() -> Path:
    """Where ``guard demo`` keeps its calibration between runs (the user's cache directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "inference-guard" / "demo-calibration"
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        path = Path(tempfile.mkdtemp(prefix="guard-demo-calibration-"))
        atexit.register(shutil.rmtree, path, True)
    return path


def build_demo_app(config: Any = None, *, model: DigitsModel | None = None) -> ASGIApp:
    """The digits model server behind :class:`~middleware.asgi.GuardMiddleware`.

    ``config`` is whatever ``GuardMiddleware`` accepts (a ``GuardConfig``, a
    mapping, a YAML path). ``None`` runs the demo policy (:func:`demo_config`),
    calibrated at the first start (several seconds) into the user's cache
    directory (``$XDG_CACHE_HOME/inference-guard/demo-calibration``) and reused
    by later starts for the same model and policy. The guard
    is imported here, not at module level, so the bare model server never
    depends on it.
    """
    from inference_guard.middleware.asgi import GuardMiddleware

    model = model if model is not None else train_digits_model()
    if config is None:
        config = demo_config(_demo_cache(), model=model)
    # the guard declares every series at 0 as it starts (build info, score layouts,
    # quarantined clients among them)
    return GuardMiddleware(build_model_app(model), config=config)
