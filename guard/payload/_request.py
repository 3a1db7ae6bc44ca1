"""The parsed-request value and the small checks every payload adapter shares.

Re-exported by :mod:`guard.payload.adapters`; the format modules (``_oip``,
``_tabular``, ``_openai``) build :class:`ParsedRequest` values from here so that
none of them has to import the dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.config import LimitsConfig
from inference_guard.guard.errors import PayloadError

__all__ = ["ParsedRequest", "check_rows", "check_texts", "fail"]


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """One inference request, as far as the guard understood it."""

    #: ``oip_v2``, ``kserve_v1``, ``tf_columns``, ``mlflow``, ``openai_chat``,
    #: ``openai_completion``, ``json_array`` or ``unknown``
    fmt: str
    #: ``(n_rows, n_features)`` C-contiguous float64 matrix, or ``None`` (text, opaque, unknown)
    rows: NDArray[np.float64] | None
    #: prompt texts: one string per prompt (a chat's message contents joined with ``"\n"``)
    texts: tuple[str, ...] = ()
    #: rows or prompts the request carries; an unknown payload counts as 1
    n_rows: int = 1
    #: format-specific extras (``max_tokens``, ``n``, ``logprobs``, ``binary``, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the model-signature check reads, as decoded (so that nothing decodes the
    #: body a second time): OIP v2's ``inputs``, KServe v1's and MLflow's list of
    #: instances; ``None`` for other formats
    inputs: object = field(default=None, repr=False, compare=False)


def fail(status: int, reason: str, message: str) -> NoReturn:
    """Raise a :class:`PayloadError`; ``message`` must never quote the payload."""
    raise PayloadError(status, reason, message)


def check_rows(n_rows: int, limits: LimitsConfig) -> None:
    """Refuse empty batches (400 ``bad_shape``) and batches over ``max_rows`` (413)."""
    if n_rows > limits.max_rows:
        fail(413, "too_many_rows", f"the request carries more than {limits.max_rows} rows")
    if n_rows < 1:
        fail(400, "bad_shape", "the request carries no rows")


def check_texts(texts: tuple[str, ...], limits: LimitsConfig) -> None:
    """Refuse texts whose total length exceeds ``max_text_chars`` (413 ``text_too_long``)."""
    if sum(map(len, texts)) > limits.max_text_chars:
        fail(413, "text_too_long", f"the texts exceed {limits.max_text_chars} characters in total")
