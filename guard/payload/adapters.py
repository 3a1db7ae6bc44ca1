"""Payload adapters: requests in, :class:`ParsedRequest` out; answers in, :class:`Answer` out.

The format is recognised by path first (see ``guard.config.DEFAULT_ROUTES``;
any prefix before the protocol's path is allowed, for servers mounted below a
root path), then by the shape of the JSON body. :func:`parse_request` is the
guard's first contact with untrusted bytes: it raises
:class:`~guard.errors.PayloadError` for anything it refuses and no other
exception, whatever the input. :func:`parse_response` never raises.

Formats and what they yield (``rows`` is ``(n_rows, n_features)`` float64):

========================  ===============================================================
``oip_v2``                first numeric input tensor; ``BYTES`` strings → ``texts``
``kserve_v1``             ``instances`` (a flat list of scalars is one feature per row)
``tf_columns``            ``inputs`` as a tensor or as named columns (first numeric one)
``mlflow``                ``dataframe_split`` / ``dataframe_records`` / ``instances`` / ``inputs``
``openai_chat``           ``texts``: one prompt, message texts joined with ``"\\n"``
``openai_completion``     ``texts``: one per prompt string (token-id prompts are only counted)
``json_array``            a list of numbers is one row, a list of lists is rows
``custom``                a policy's ``payload:`` pointers (:mod:`guard.payload.formats`)
``unknown``               anything else that is valid JSON: ``rows=None``, ``n_rows=1``
========================  ===============================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from inference_guard.detectors.base import Answer
from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.payload._binary import split_body
from inference_guard.guard.payload._json import is_json_media_type, load_json, load_json_lenient
from inference_guard.guard.payload._oip import parse_oip
from inference_guard.guard.payload._openai import parse_chat, parse_completion
from inference_guard.guard.payload._probabilities import (
    Found,
    from_list,
    from_named,
    from_v2_outputs,
)
from inference_guard.guard.payload._request import ParsedRequest, fail
from inference_guard.guard.payload._tabular import parse_json_array, parse_kserve, parse_mlflow
from inference_guard.guard.payload.formats import PayloadFormat

__all__ = [
    "ParsedRequest",
    "check_readable_answer",
    "detect_format",
    "parse_request",
    "parse_response",
    "pattern_format",
    "read_answer_doc",
]

_PATHS = re.compile(
    r"(?:(?P<oip_v2>/v2/models/[^/]+(?:/versions/[^/]+)?/infer)"
    r"|(?P<kserve_v1>/v1/models/[^/]+(?:/(?:versions|labels)/[^/]+)?:(?:predict|classify|regress))"
    r"|(?P<mlflow>/invocations)"
    r"|(?P<openai_chat>/v1/chat/completions)"
    r"|(?P<openai_completion>/v1/completions))"
    r"/?\Z"
)
#: what stands for one path segment in a route pattern (guard.policy.compile_routes)
_WILDCARDS = re.compile(r"\*\*|\*|\{[^}]*\}")
_HEADER = "inference-header-content-length"
_PREDICT = re.compile(r":predict/?\Z")
_FORMAT_MEMO: dict[str, str | None] = {}
_FORMAT_MEMO_SIZE = 1024
_OCTET = "application/octet-stream"
_OPENAI = ("openai_chat", "openai_completion")

_PARSERS: dict[str, Callable[[Any, LimitsConfig], ParsedRequest]] = {
    "oip_v2": parse_oip,
    "kserve_v1": parse_kserve,
    "tf_columns": parse_kserve,
    "mlflow": parse_mlflow,
    "openai_chat": parse_chat,
    "openai_completion": parse_completion,
}


def detect_format(path: str) -> str | None:
    """The payload format a request path implies, or ``None`` when the path says nothing.

    Examples
    --------
    >>> detect_format("/v2/models/iris/versions/3/infer")
    'oip_v2'
    >>> detect_format("/v1/models/iris:predict")
    'kserve_v1'
    >>> detect_format("/healthz") is None
    True
    """
    memo = _FORMAT_MEMO
    if path in memo:
        return memo[path]
    m = _PATHS.search(path)
    fmt = m.lastgroup if m is not None else None
    if len(memo) < _FORMAT_MEMO_SIZE:  # paths are client-chosen: the memo stops growing
        memo[path] = fmt
    return fmt


def pattern_format(pattern: str) -> str | None:
    """The payload format the paths of a route pattern name, or ``None``.

    Examples
    --------
    >>> pattern_format("/v1/models/*:predict")
    'kserve_v1'
    >>> pattern_format("/predict") is None
    True
    """
    return detect_format(_WILDCARDS.sub("m", pattern))


def _body_format(doc: object) -> str:
    if isinstance(doc, list):
        return "json_array"
    if not isinstance(doc, dict):
        return "unknown"
    inputs = doc.get("inputs")
    first = inputs[0] if isinstance(inputs, list) and inputs else None
    if isinstance(first, dict) and "datatype" in first:
        return "oip_v2"
    if "instances" in doc:
        return "kserve_v1"
    if "dataframe_split" in doc or "dataframe_records" in doc:
        return "mlflow"
    if "messages" in doc:
        return "openai_chat"
    if "prompt" in doc:
        return "openai_completion"
    if inputs is not None:
        return "tf_columns"
    return "unknown"


def _media(content_type: str | None) -> str:
    return "" if content_type is None else content_type.partition(";")[0].strip().lower()


def parse_request(
    body: bytes,
    *,
    path: str,
    content_type: str | None,
    headers: Mapping[str, str],
    limits: LimitsConfig,
    want_rows: bool = True,
    payload: PayloadFormat | None = None,
) -> ParsedRequest:
    """Validate and parse one inference request body.

    Parameters
    ----------
    body
        The complete request body.
    path
        The request path; it picks the format when it names a known protocol.
    content_type
        The ``Content-Type`` header, or ``None``. JSON formats take
        ``application/json``, ``application/*+json`` or no content type; the
        Triton binary extension also ``application/octet-stream``.
    headers
        Request headers with lower-case names (as ASGI gives them); only
        ``inference-header-content-length`` is read.
    limits
        Body, nesting, row, feature and text bounds.
    want_rows
        ``False`` when nothing will look at the feature matrix (a policy with no
        detectors): the payload is validated exactly as otherwise, but an OIP v2
        JSON request's matrix is not built (``rows`` is ``None``), which keeps
        numpy off the guard's cheapest path.
    payload
        The policy's own format (``payload:`` in its config), which then reads
        every request instead of the built-in formats.

    Returns
    -------
    ParsedRequest
        ``fmt="unknown"`` (``rows=None``, ``n_rows=1``) for valid JSON of no known
        shape, or a non-JSON body on a path that names no protocol.

    Raises
    ------
    PayloadError
        413 ``body_too_large`` / ``too_many_rows`` / ``text_too_long`` /
        ``too_many_containers`` / ``too_many_elements`` / ``too_many_values``, 415
        ``unsupported_media_type``, or 400 ``bad_encoding``, ``invalid_json``,
        ``too_deep``, ``non_finite``, ``bad_shape``, ``bad_type``,
        ``too_many_features``, ``bad_header``. No other exception escapes.

    Examples
    --------
    >>> from inference_guard.guard.config import LimitsConfig
    >>> body = b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}'
    >>> req = parse_request(body, path="/v2/models/m/infer", content_type="application/json",
    ...                     headers={}, limits=LimitsConfig())
    >>> req.fmt, req.rows.tolist(), req.n_rows
    ('oip_v2', [[1.0, 2.0]], 1)
    """
    if len(body) > limits.max_body_bytes:
        fail(413, "body_too_large", f"the request body exceeds {limits.max_body_bytes} bytes")
    if payload is not None:
        return payload.parse(body, content_type=content_type, limits=limits)
    fmt = detect_format(path)
    header_length = headers.get(_HEADER)
    if header_length is not None and fmt in (None, "oip_v2"):
        if _media(content_type) != _OCTET and not is_json_media_type(content_type):
            fail(415, "unsupported_media_type", "binary requests must be application/octet-stream")
        header, tensors = split_body(body, header_length)
        return parse_oip(
            load_json(header, max_depth=limits.max_json_depth, budget=limits), limits, tensors
        )
    if not is_json_media_type(content_type):
        if fmt is None:
            return ParsedRequest("unknown", None)
        fail(415, "unsupported_media_type", "this endpoint takes application/json")
    doc = load_json(body, max_depth=limits.max_json_depth, budget=limits)
    if fmt is None:
        fmt = _body_format(doc)
        if fmt == "json_array":
            return parse_json_array(doc, limits)
        if fmt == "unknown":
            return ParsedRequest("unknown", None)
    if fmt == "oip_v2" and not want_rows:
        return parse_oip(doc, limits, want_rows=False)
    if fmt == "kserve_v1" and _PREDICT.search(path) and _only_examples(doc):
        fail(
            400,
            "bad_shape",
            "':predict' takes 'instances' or 'inputs'; 'examples' is for "
            "':classify' and ':regress'",
        )
    return _PARSERS[fmt](doc, limits)


def _only_examples(doc: object) -> bool:
    """A KServe v1 body whose only rows are ``examples`` (what ``parse_kserve`` would read)."""
    return isinstance(doc, dict) and "examples" in doc and not {"instances", "inputs"} & doc.keys()


def check_readable_answer(parsed: ParsedRequest) -> None:
    """Refuse request options whose answers the guard could not round, degrade or watch.

    Streamed log-probabilities would otherwise carry full-precision probabilities
    past the output policy (400 ``bad_type``). Triton's binary outputs are read
    and rewritten like JSON ones (:mod:`guard.payload._binary_answer`).
    """
    extra = parsed.extra
    if extra.get("stream") and (extra.get("logprobs") or extra.get("top_logprobs")):
        fail(400, "bad_type", "log-probabilities cannot be streamed on this route")


def _found(doc: object, fmt: str) -> Found | None:
    if isinstance(doc, list):
        return from_list(doc)
    if not isinstance(doc, dict):
        return None
    outputs = doc.get("outputs")
    if (
        isinstance(outputs, list)
        and outputs
        and all(isinstance(o, dict) for o in outputs)
        and any("data" in o for o in outputs)
    ):
        return from_v2_outputs(outputs)
    for key in ("predictions", "outputs"):
        value = doc.get(key)
        if isinstance(value, list):
            return from_list(value)
        if isinstance(value, dict):
            return from_named(value)
    return None


def parse_response(body: bytes, *, fmt: str, content_type: str | None) -> Answer | None:
    """Read the predicted labels and class probabilities out of a model's JSON answer.

    Parameters
    ----------
    body
        The complete response body (the caller skips oversized and streamed ones).
    fmt
        The request's format (:attr:`ParsedRequest.fmt`); answers are recognised
        by their own shape, so ``unknown`` works too.
    content_type
        The response's ``Content-Type``; anything but JSON gives ``None``.

    Returns
    -------
    Answer or None
        ``labels`` (int64) and ``probabilities`` (``(n, k)`` float64) where
        present, labels defaulting to the probabilities' argmax. An OpenAI
        completion gives an ``Answer`` without arrays. ``None`` when nothing is
        recognisable; this function never raises.
    """
    try:
        return read_answer_doc(load_json_lenient(body, content_type), fmt)
    except Exception:  # a guard must not fail on a model's odd answer
        return None


def read_answer_doc(doc: object, fmt: str) -> Answer | None:
    """:func:`parse_response` on an answer already decoded (``None``: not JSON).

    Only reads ``doc``: the arrays it returns are copies, so the document can
    be rewritten afterwards (:mod:`guard.payload.review` decodes an answer once
    for both). It may raise on a document of an odd shape; the callers catch.
    """
    if doc is None:
        return None
    if fmt in _OPENAI or (isinstance(doc, dict) and isinstance(doc.get("choices"), list)):
        return Answer() if isinstance(doc, dict) and "choices" in doc else None
    found = _found(doc, fmt)
    if found is None or (found.probs is None and found.labels is None):
        return None
    labels = found.labels
    if labels is None and found.probs is not None:
        labels = found.probs.argmax(axis=1).astype("int64")
    return Answer(labels=labels, probabilities=found.probs)
