"""Output degradation: rounding, top-k, labels-only and logprob removal on every format."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest

from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload.degrade import coarsen, degrade_response

JSON = "application/json"
ROUND2 = DegradeConfig(decimals=2, noise=0.0)
TOP1 = DegradeConfig(decimals=None, top_k=1, noise=0.0)
LABELS = DegradeConfig(labels_only=True, noise=0.0)


def degrade(doc: Any, spec: DegradeConfig, fmt: str = "unknown", content_type: str = JSON) -> Any:
    out = degrade_response(json.dumps(doc).encode(), fmt=fmt, content_type=content_type, spec=spec)
    return None if out is None else json.loads(out)


def v2_answer() -> dict[str, Any]:
    return {
        "model_name": "iris",
        "id": "42",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [2, 3],
                "datatype": "FP32",
                "data": [0.1234, 0.6543, 0.2223, 0.5, 0.25, 0.25],
            },
        ],
    }


# --------------------------------------------------------------------------- coarsen


def test_coarsen_rounds() -> None:
    out = coarsen(np.array([[0.12345, 0.87655]]), ROUND2)
    assert out.tolist() == [[0.12, 0.88]]


def test_coarsen_top_k_zeroes_the_rest_and_keeps_shape() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    out = coarsen(probs, DegradeConfig(decimals=None, top_k=2))
    assert out.tolist() == [[0.0, 0.6, 0.3], [0.5, 0.0, 0.3]]
    assert probs[0, 0] == 0.1  # input untouched


def test_coarsen_top_k_larger_than_classes_is_identity() -> None:
    probs = np.array([[0.1, 0.9]])
    assert coarsen(probs, DegradeConfig(decimals=None, top_k=5)).tolist() == [[0.1, 0.9]]


# --------------------------------------------------------------------------- OIP v2


def test_v2_rounding_keeps_flat_data_and_shape() -> None:
    out = degrade(v2_answer(), ROUND2, "oip_v2")
    probs = out["outputs"][0]
    assert probs["data"] == [0.12, 0.65, 0.22, 0.5, 0.25, 0.25]
    assert probs["shape"] == [2, 3]
    assert probs["datatype"] == "FP32"
    assert out["id"] == "42"


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 6])
def test_every_format_rounds_a_probability_alike(decimals: int) -> None:
    """The same probabilities come out the same whatever carries them: a flat OIP v2
    tensor (the hot path), a nested one, KServe v1 vectors (the array route), and
    :func:`coarsen`. Values with three decimals, such as 0.015, sit on a tie once
    scaled and are where a different rounding rule would show."""
    rng = random.Random(decimals)
    values = [round(rng.random(), 3) for _ in range(300)] + [rng.random() for _ in range(300)]
    values += [0.015, 0.125, 0.5, 1.0, 0.0, 0.005, 0.995]
    rows = [values[i : i + 3] for i in range(0, len(values) - len(values) % 3, 3)]
    flat = [v for row in rows for v in row]
    spec = DegradeConfig(decimals=decimals, noise=0.0)
    by_array = coarsen(np.array(rows), spec).tolist()
    doc = {
        "outputs": [
            {"name": "probabilities", "shape": [len(rows), 3], "datatype": "FP64", "data": flat}
        ]
    }
    fast = degrade(doc, spec, "oip_v2")["outputs"][0]["data"]
    doc["outputs"][0]["data"] = rows
    nested = degrade(doc, spec, "oip_v2")["outputs"][0]["data"]
    v1 = degrade({"predictions": rows}, spec, "kserve_v1")["predictions"]
    assert [fast[i : i + 3] for i in range(0, len(fast), 3)] == by_array
    assert nested == by_array
    assert v1 == by_array


def test_v2_nested_data_stays_nested() -> None:
    doc = v2_answer()
    doc["outputs"][0]["data"] = [[0.1234, 0.6543, 0.2223], [0.5, 0.25, 0.25]]
    out = degrade(doc, ROUND2, "oip_v2")
    assert out["outputs"][0]["data"] == [[0.12, 0.65, 0.22], [0.5, 0.25, 0.25]]


def test_v2_top_k() -> None:
    out = degrade(v2_answer(), TOP1, "oip_v2")
    assert out["outputs"][0]["data"] == [0.0, 0.6543, 0.0, 0.5, 0.0, 0.0]


def test_v2_labels_only_creates_label_output() -> None:
    out = degrade(v2_answer(), LABELS, "oip_v2")
    assert out["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]}]


def test_v2_labels_only_keeps_existing_label_output() -> None:
    doc = v2_answer()
    doc["outputs"].insert(0, {"name": "predict", "shape": [2], "datatype": "INT64", "data": [1, 0]})
    out = degrade(doc, LABELS, "oip_v2")
    assert [o["name"] for o in out["outputs"]] == ["predict"]
    assert out["outputs"][0]["data"] == [1, 0]


def test_v2_without_probabilities_is_returned_unchanged() -> None:
    body = json.dumps(
        {"outputs": [{"name": "y", "shape": [1, 2], "datatype": "FP32", "data": [12.5, -3.0]}]}
    ).encode()
    assert degrade_response(body, fmt="oip_v2", content_type=JSON, spec=ROUND2) is body


# --------------------------------------------------------------------------- KServe v1 / MLflow


def test_v1_probability_vectors() -> None:
    doc = {"predictions": [[0.123, 0.877], [0.6666, 0.3334]]}
    assert degrade(doc, ROUND2, "kserve_v1") == {"predictions": [[0.12, 0.88], [0.67, 0.33]]}
    assert degrade(doc, TOP1, "kserve_v1") == {"predictions": [[0.0, 0.877], [0.6666, 0.0]]}
    assert degrade(doc, LABELS, "kserve_v1") == {"predictions": [1, 0]}


def test_v1_records() -> None:
    doc = {
        "predictions": [
            {"label": 1, "probabilities": [0.2222, 0.7778]},
            {"label": 0, "probabilities": [0.9111, 0.0889]},
        ]
    }
    assert degrade(doc, ROUND2, "kserve_v1") == {
        "predictions": [
            {"label": 1, "probabilities": [0.22, 0.78]},
            {"label": 0, "probabilities": [0.91, 0.09]},
        ]
    }
    assert degrade(doc, LABELS, "kserve_v1") == {"predictions": [{"label": 1}, {"label": 0}]}


def test_records_without_label_get_one() -> None:
    doc = {"predictions": [{"probs": [0.3, 0.7]}]}
    assert degrade(doc, LABELS, "mlflow") == {"predictions": [{"label": 1}]}


def test_tf_named_outputs() -> None:
    doc = {"outputs": {"scores": [[0.111, 0.889]], "classes": [1]}}
    assert degrade(doc, ROUND2, "tf_columns") == {
        "outputs": {"scores": [[0.11, 0.89]], "classes": [1]}
    }
    assert degrade(doc, LABELS, "tf_columns") == {"outputs": {"classes": [1]}}
    assert degrade({"outputs": {"probabilities": [[0.4, 0.6]]}}, LABELS, "tf_columns") == {
        "outputs": {"label": [1]}
    }


def test_mlflow_predictions() -> None:
    doc = {"predictions": [[0.3333, 0.6667]]}
    assert degrade(doc, DegradeConfig(decimals=1, noise=0.0), "mlflow") == {
        "predictions": [[0.3, 0.7]]
    }


def test_v1_labels_and_regression_are_unchanged() -> None:
    for doc in (
        {"predictions": [1, 0, 1]},
        {"predictions": [12.5, 40.1]},
        {"predictions": [[3.5, 7.25]]},
    ):
        body = json.dumps(doc).encode()
        assert degrade_response(body, fmt="kserve_v1", content_type=JSON, spec=ROUND2) is body


# --------------------------------------------------------------------------- plain list


def test_plain_list() -> None:
    doc = [[0.4444, 0.5556]]
    assert degrade(doc, ROUND2, "json_array") == [[0.44, 0.56]]
    assert degrade(doc, LABELS, "json_array") == [1]


# --------------------------------------------------------------------------- OpenAI


def test_openai_logprobs_dropped() -> None:
    doc = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "logprobs": {"content": [{"token": "hi", "logprob": -0.1, "top_logprobs": []}]},
            },
            {"index": 1, "message": {"role": "assistant", "content": "yo"}, "logprobs": None},
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    out = degrade(doc, ROUND2, "openai_chat")
    assert out["choices"][0]["logprobs"] is None
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert out["usage"]["total_tokens"] == 4


def test_openai_prompt_logprobs_dropped() -> None:
    doc = {"choices": [{"text": "x", "logprobs": {"tokens": ["x"]}}], "prompt_logprobs": [None]}
    out = degrade(doc, LABELS, "openai_completion")
    assert out == {"choices": [{"text": "x", "logprobs": None}], "prompt_logprobs": None}


def test_openai_without_logprobs_unchanged() -> None:
    body = json.dumps({"choices": [{"text": "x"}]}).encode()
    assert degrade_response(body, fmt="openai_completion", content_type=JSON, spec=ROUND2) is body


# --------------------------------------------------------------------------- not understood


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", JSON),
        (b'{"error": "boom"}', JSON),
        (b"42", JSON),
        (b"[]", JSON),
        (b'data: {"choices": []}\n\n', "text/event-stream"),
        (b'{"predictions": [[0.1, 0.9]]}', "application/octet-stream"),
        (b"\xff\xfe", JSON),
        (b"[" * 50_000 + b"]" * 50_000, JSON),
    ],
)
def test_not_understood_is_none(body: bytes, content_type: str) -> None:
    assert degrade_response(body, fmt="unknown", content_type=content_type, spec=ROUND2) is None


def test_output_is_valid_compact_json() -> None:
    out = degrade_response(
        b'{"predictions": [[0.1234, 0.8766]]}',
        fmt="kserve_v1",
        content_type="application/json; charset=utf-8",
        spec=ROUND2,
    )
    assert out == b'{"predictions":[[0.12,0.88]]}'


def test_fuzz_degrade_never_raises() -> None:
    rng = random.Random(5)
    scalars: list[Any] = [0, 1, 0.5, 0.25, 2.5, -1, None, "a", True, [], {}]
    specs = [ROUND2, TOP1, LABELS, DegradeConfig(decimals=0, top_k=2, noise=0.0)]

    def rand(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 4 or r < 0.4:
            return rng.choice(scalars)
        if r < 0.75:
            return [rand(depth + 1) for _ in range(rng.randint(0, 4))]
        keys = [
            "predictions",
            "outputs",
            "data",
            "shape",
            "datatype",
            "name",
            "probabilities",
            "label",
            "choices",
            "logprobs",
        ]
        return {rng.choice(keys): rand(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(2000):
        doc = rng.choice(
            [
                rand(),
                {"predictions": rand()},
                {
                    "outputs": [
                        {"name": "probs", "datatype": "FP32", "shape": rand(), "data": rand()}
                    ]
                },
                {
                    "predictions": [
                        {"probabilities": rand(), "label": rand()},
                        {"probabilities": [0.5]},
                    ]
                },
            ]
        )
        body = json.dumps(doc).encode()
        out = degrade_response(
            body,
            fmt=rng.choice(["oip_v2", "kserve_v1", "unknown"]),
            content_type=JSON,
            spec=rng.choice(specs),
        )
        if out is not None:
            json.loads(out)


def test_noise_flips_close_calls_and_keeps_labels_consistent() -> None:
    """Noise breaks decision-based attacks: near-ties flip at random, confident rows don't."""
    import json as _json

    from inference_guard.guard.config import DegradeConfig as _Spec
    from inference_guard.guard.payload.degrade import degrade_response as _degrade

    rows = [[0.501, 0.499, 0.0]] * 200 + [[0.98, 0.01, 0.01]] * 200
    doc = {
        "outputs": [
            {"name": "label", "shape": [400], "datatype": "INT64", "data": [0] * 400},
            {
                "name": "probabilities",
                "shape": [400, 3],
                "datatype": "FP32",
                "data": [x for r in rows for x in r],
            },
        ]
    }
    out = _degrade(
        _json.dumps(doc).encode(),
        fmt="oip_v2",
        content_type="application/json",
        spec=_Spec(decimals=3, noise=0.05),
    )
    assert out is not None
    res = _json.loads(out)["outputs"]
    labels = res[0]["data"]
    probs = [res[1]["data"][i * 3 : (i + 1) * 3] for i in range(400)]
    # labels agree with the degraded probabilities, row by row
    assert labels == [max(range(3), key=p.__getitem__) for p in probs]
    close, confident = labels[:200], labels[200:]
    assert 40 < sum(1 for x in close if x == 1) < 160  # near-ties are a coin toss
    assert set(confident) == {0}
    assert all(abs(sum(p) - 1.0) < 0.01 for p in probs)


def test_no_noise_leaves_argmax_alone() -> None:
    import json as _json

    from inference_guard.guard.config import DegradeConfig as _Spec
    from inference_guard.guard.payload.degrade import degrade_response as _degrade

    body = _json.dumps({"predictions": [[0.501, 0.499]] * 50}).encode()
    out = _degrade(
        body, fmt="kserve_v1", content_type="application/json", spec=_Spec(decimals=None, noise=0.0)
    )
    assert out is not None
    assert all(p[0] > p[1] for p in _json.loads(out)["predictions"])
