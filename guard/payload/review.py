"""A model's answer, decoded once: read for the guard, then rewritten for the client.

The engine may need both from one answer: what it says (labels and
probabilities, for the detectors that learn from answers and for the capture
file) and a coarsened copy for the client (``degrade``). :func:`review_answer`
decodes the body once and does both, reading first: what is read is the
model's own answer, before any rounding or noise. It never raises.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from inference_guard.detectors.base import Answer
from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload._binary_answer import review_binary
from inference_guard.guard.payload._json import (
    dump_compact,
    dump_decoded,
    load_json_lenient_checked,
)
from inference_guard.guard.payload.adapters import read_answer_doc
from inference_guard.guard.payload.degrade import RowNoise, degrade_doc
from inference_guard.guard.payload.formats import PayloadFormat

__all__ = ["Reviewed", "review_answer"]


class Reviewed(NamedTuple):
    """What :func:`review_answer` made of one answer."""

    #: the answer for the client: rewritten, the body itself when it held nothing
    #: to coarsen, ``None`` when it was not rewritten (not asked, or not an answer
    #: the guard understands)
    body: bytes | None = None
    #: what the answer says, read before any rewriting (``None``: not asked, or
    #: nothing recognisable)
    answer: Answer | None = None
    #: the rewritten binary answer's ``Inference-Header-Content-Length`` (``None``:
    #: not a binary answer, or not rewritten)
    header_length: int | None = None


def review_answer(
    body: bytes,
    content_type: str | None,
    *,
    fmt: str,
    payload: PayloadFormat | None = None,
    spec: DegradeConfig | None = None,
    noise: RowNoise | None = None,
    read: bool = False,
    binary_header: int | None = None,
) -> Reviewed:
    """Read (``read``) and rewrite (``spec``) one answer, decoding it once.

    Parameters
    ----------
    body, content_type
        The complete answer and its ``Content-Type``; only JSON is read.
    fmt
        The request's format; answers are recognised by their own shape.
    payload
        The policy's own format (``payload:``), which then reads and rewrites.
    spec, noise
        How to coarsen the answer (:func:`~guard.payload.degrade.degrade_response`);
        ``None``: leave it alone.
    read
        Whether to read labels and probabilities out of it.
    binary_header
        The answer's ``Inference-Header-Content-Length``: a Triton binary answer
        (:mod:`guard.payload._binary_answer`), read and rewritten like a JSON one.

    Examples
    --------
    >>> from inference_guard.guard.config import DegradeConfig
    >>> r = review_answer(b'{"predictions": [[0.1234, 0.8766]]}', "application/json",
    ...                   fmt="kserve_v1", spec=DegradeConfig(decimals=2, noise=0.0), read=True)
    >>> r.body, r.answer.probabilities.tolist()
    (b'{"predictions":[[0.12,0.88]]}', [[0.1234, 0.8766]])
    """
    if binary_header is not None:
        if payload is not None:  # a custom shape has no binary form
            return Reviewed()
        new_body, length, read_answer = review_binary(
            body, binary_header, fmt=fmt, spec=spec, noise=noise, read=read
        )
        return Reviewed(new_body, read_answer, length)
    try:
        doc, strict = load_json_lenient_checked(body, content_type)
    except Exception:  # an odd answer is neither read nor rewritten, never a 500
        return Reviewed()
    answer = None
    if read:
        try:
            answer = payload.read_doc(doc) if payload is not None else read_answer_doc(doc, fmt)
        except Exception:  # a guard must not fail on a model's odd answer
            answer = None
    new = None
    if spec is not None and doc is not None:
        new = _rewrite(body, doc, fmt, payload, spec, noise, strict=strict)
    return Reviewed(new, answer)


def _rewrite(
    body: bytes,
    doc: Any,
    fmt: str,
    payload: PayloadFormat | None,
    spec: DegradeConfig,
    noise: RowNoise | None,
    *,
    strict: bool = False,
) -> bytes | None:
    """The rewritten answer, ``body`` when nothing changed, ``None`` when not understood.

    ``strict``: orjson decoded ``doc``; a built-in format's rewrite then puts
    only Python numbers, strings, lists and dicts in it, so it may be encoded
    through :func:`dump_decoded`. A custom payload's rewrite is encoded by
    ``json``, whatever it put there.
    """
    try:
        if payload is not None:  # the policy's own shape: its answers hold probabilities there
            done = payload.rewrite_doc(doc, spec=spec, noise=noise)
        else:
            changed = degrade_doc(doc, fmt, spec, noise)
            done = None if changed is None else (doc, changed)
        if done is None:
            return None
        root, changed = done
        if not changed:
            return body
        return dump_decoded(root) if strict and payload is None else dump_compact(root)
    except Exception:  # an odd answer is passed through, never turned into a 500
        return None
