"""Payload formats as objects: detect, parse rows or texts, find and rewrite probabilities.

A :class:`PayloadFormat` is everything the guard knows about one wire format.
So far the custom JSON shape a policy declares with ``payload:`` is one
(:class:`PointerFormat`); the built-in protocols are still dispatched by
:mod:`guard.payload.adapters` and :mod:`guard.payload.degrade`, and move behind this
interface with the engine redesign.

A policy's format is built once, at start-up, by :func:`payload_format`. It is
authoritative on the policy's routes: every request there is read through its
pointers, so a client cannot steer the guard to other data than the app reads
(a body holding both ``features`` and ``instances``, say). Its metric label is
always ``custom``, never the pointer text.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.base import Answer
from inference_guard.guard.config import DegradeConfig, LimitsConfig, PayloadConfig
from inference_guard.guard.payload._json import (
    dump_compact,
    is_json_media_type,
    load_json,
    load_json_lenient,
)
from inference_guard.guard.payload._probabilities import prob_matrix
from inference_guard.guard.payload._request import ParsedRequest, check_rows, check_texts, fail
from inference_guard.guard.payload._tensor import check_values, finish_rows, leaves, to_float
from inference_guard.guard.payload.degrade import RowNoise, coarsen, perturb
from inference_guard.guard.pointer import MISSING, parse_pointer, replace_at, resolve

__all__ = ["CUSTOM", "PayloadFormat", "PointerFormat", "payload_format"]

#: the format label of every custom shape (metrics, capture lines, ``Query.fmt``)
CUSTOM: Final = "custom"


class PayloadFormat(Protocol):
    """One wire format: how its requests are read and its answers found and rewritten.

    ``parse`` is the guard's first contact with untrusted bytes: it raises
    :class:`~guard.errors.PayloadError` for anything it refuses and no other
    exception. ``read_answer`` and ``rewrite_answer`` never raise; ``read_doc``
    and ``rewrite_doc``, the same on an answer already decoded (the engine
    decodes each answer once for both, :mod:`guard.payload.review`), may raise
    on an odd document and leave catching to the caller.
    """

    #: the format's label in metrics (a small closed set)
    name: str

    def detect(self, doc: object) -> bool:
        """Whether a decoded request holds what this format reads."""
        ...

    def parse(
        self, body: bytes, *, content_type: str | None, limits: LimitsConfig
    ) -> ParsedRequest:
        """Validate a request body (already within ``max_body_bytes``) into rows or texts."""
        ...

    def read_answer(self, body: bytes, content_type: str | None) -> Answer | None:
        """Labels and probabilities of a model's answer; ``None`` when none are found."""
        ...

    def rewrite_answer(
        self,
        body: bytes,
        content_type: str | None,
        *,
        spec: DegradeConfig,
        noise: RowNoise | None = None,
    ) -> bytes | None:
        """The answer coarsened by ``spec``; ``body`` when it holds no probabilities to
        coarsen; ``None`` when it is not an answer of this format."""
        ...

    def read_doc(self, doc: object) -> Answer | None:
        """:meth:`read_answer` on a decoded answer (``None``: not JSON); only reads it."""
        ...

    def rewrite_doc(
        self, doc: object, *, spec: DegradeConfig, noise: RowNoise | None = None
    ) -> tuple[Any, bool] | None:
        """:meth:`rewrite_answer` on a decoded answer, changed in place where it can be.

        ``(root, True)`` when rewritten (``root`` is the document to serialise),
        ``(doc, False)`` when it holds nothing to coarsen, ``None`` when it is not
        an answer of this format.
        """
        ...


class PointerFormat:
    """A custom JSON shape, located by the JSON pointers of a policy's ``payload:``.

    Requests carry rows at ``rows`` (a list of rows of numbers, or one flat row)
    and/or texts at ``texts`` (a string or a list of strings); at least one must
    be present. Validation is the built-in formats': finite numbers, rectangular
    rows, ``max_rows``, ``max_features``, ``max_text_chars``, with the same
    reasons. Answers carry class probabilities at ``probabilities`` (rows, or one
    flat row); labels are their argmax.

    Examples
    --------
    >>> from inference_guard.guard.config import LimitsConfig, PayloadConfig
    >>> fmt = PointerFormat(PayloadConfig(rows="/features", probabilities="/probabilities"))
    >>> fmt.detect({"features": [[1, 2]]}), fmt.detect({"instances": [[1, 2]]})
    (True, False)
    >>> req = fmt.parse(b'{"features": [[1, 2], [3, 4]]}', content_type=None, limits=LimitsConfig())
    >>> req.fmt, req.n_rows, req.rows.tolist()
    ('custom', 2, [[1.0, 2.0], [3.0, 4.0]])
    >>> fmt.rewrite_answer(b'{"probabilities": [[0.123, 0.877]]}', None,
    ...                    spec=DegradeConfig(decimals=1, noise=0.0))
    b'{"probabilities":[[0.1,0.9]]}'
    """

    name = CUSTOM

    def __init__(self, config: PayloadConfig) -> None:
        self.config = config
        self._rows = _pointer(config.rows)
        self._texts = _pointer(config.texts)
        self._probs = _pointer(config.probabilities)
        self._where = " or ".join(p for p in (config.rows, config.texts) if p is not None)

    def detect(self, doc: object) -> bool:
        return any(
            tokens is not None and resolve(doc, tokens) is not MISSING
            for tokens in (self._rows, self._texts)
        )

    def parse(
        self, body: bytes, *, content_type: str | None, limits: LimitsConfig
    ) -> ParsedRequest:
        if not is_json_media_type(content_type):
            fail(415, "unsupported_media_type", "this endpoint takes application/json")
        doc = load_json(body, max_depth=limits.max_json_depth, budget=limits)
        raw_rows = MISSING if self._rows is None else resolve(doc, self._rows)
        raw_texts = MISSING if self._texts is None else resolve(doc, self._texts)
        if raw_rows is MISSING and raw_texts is MISSING:
            fail(400, "bad_shape", f"the request holds nothing at {self._where}")
        rows = None
        if raw_rows is not MISSING:
            rows = _rows(raw_rows, limits, f"'{self.config.rows}'")
        texts: tuple[str, ...] = ()
        if raw_texts is not MISSING:
            texts = _texts(raw_texts, limits, f"'{self.config.texts}'")
        n_rows = rows.shape[0] if rows is not None else len(texts)
        return ParsedRequest(CUSTOM, rows, texts, n_rows)

    def read_answer(self, body: bytes, content_type: str | None) -> Answer | None:
        try:
            return self.read_doc(load_json_lenient(body, content_type))
        except Exception:  # a guard must not fail on a model's odd answer
            return None

    def rewrite_answer(
        self,
        body: bytes,
        content_type: str | None,
        *,
        spec: DegradeConfig,
        noise: RowNoise | None = None,
    ) -> bytes | None:
        try:
            done = self.rewrite_doc(load_json_lenient(body, content_type), spec=spec, noise=noise)
            if done is None:
                return None
            root, changed = done
            return dump_compact(root) if changed else body
        except Exception:  # an odd answer is passed through, never turned into a 500
            return None

    def read_doc(self, doc: object) -> Answer | None:
        found = self._find(doc)
        if found is None:
            return None
        probs = found[1]
        return Answer(labels=probs.argmax(axis=1).astype(np.int64), probabilities=probs)

    def rewrite_doc(
        self, doc: object, *, spec: DegradeConfig, noise: RowNoise | None = None
    ) -> tuple[Any, bool] | None:
        if doc is None or self._probs is None:
            return None
        value = resolve(doc, self._probs)
        if value is MISSING:
            return None  # not an answer of this shape (an error body, say)
        found = self._find(doc)
        if found is None:
            return doc, False  # something else at the pointer (labels, regression values)
        flat, probs = found
        noisy = perturb(probs, spec, noise)
        coarse = coarsen(noisy, spec)
        new: Any
        if spec.labels_only:
            labels = [int(i) for i in noisy.argmax(axis=1)]
            new = labels[0] if flat else labels
        else:
            new = coarse[0].tolist() if flat else coarse.tolist()
        return replace_at(doc, self._probs, new), True

    def _find(self, doc: object) -> tuple[bool, NDArray[np.float64]] | None:
        """``(flat, probabilities)`` at the pointer: ``flat`` for one row given as a flat list."""
        if doc is None or self._probs is None:
            return None
        value = resolve(doc, self._probs)
        if not isinstance(value, list) or not value:
            return None
        flat = not isinstance(value[0], list)
        probs = prob_matrix([value] if flat else value, named=True)
        return None if probs is None else (flat, probs)


def payload_format(config: PayloadConfig | None) -> PayloadFormat | None:
    """The format a policy's ``payload:`` declares, or ``None`` for the built-in formats."""
    return None if config is None else PointerFormat(config)


def _pointer(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else parse_pointer(text)


def _rows(value: object, limits: LimitsConfig, what: str) -> NDArray[np.float64]:
    """A list of rows of numbers (or one flat row) as a validated ``(n, d)`` matrix."""
    if not isinstance(value, list):
        fail(400, "bad_type", f"{what} must be a list of rows")
    if len(value) > limits.max_rows and isinstance(value[0], list):
        # before converting a huge batch
        fail(413, "too_many_rows", f"the request carries more than {limits.max_rows} rows")
    found = leaves(value)
    if not found.values:
        fail(400, "bad_shape", f"{what} is empty")
    check_values(len(found.values), limits)
    arr = to_float(value, found, allow_bool=True, what=what)
    return finish_rows(arr, limits, one_d_is_row=True, what=what)


def _texts(value: object, limits: LimitsConfig, what: str) -> tuple[str, ...]:
    """A string (one prompt) or a non-empty list of strings."""
    if isinstance(value, str):
        texts: tuple[str, ...] = (value,)
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        texts = tuple(value)
    else:
        fail(400, "bad_type", f"{what} must be a string or a list of strings")
    check_rows(len(texts), limits)
    check_texts(texts, limits)
    return texts
