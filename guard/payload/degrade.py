"""Output coarsening: rewrite a model's JSON answer so that it leaks less.

Rounding probabilities to 2-3 decimals weakens equation-solving extraction;
top-k and labels-only answers cut what each query tells an attacker; dropping
an LLM's ``logprobs`` removes its probability vector. Only what
:mod:`guard.payload._probabilities` recognises as probabilities is touched, so a
regression output passes through unchanged.

A degraded client's noise is not drawn afresh per answer: an attacker could
repeat a row and average it away. It comes from a keyed hash of (client, row)
(:class:`RowNoise`), so the same client asking the same row gets the same
perturbed answer, at any batch position; the key is ``GUARD_NOISE_KEY``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference_guard.guard.config import DegradeConfig
from inference_guard.guard.payload._json import dump_compact, load_json_lenient
from inference_guard.guard.payload._probabilities import (
    Found,
    from_list,
    from_named,
    from_v2_outputs,
    is_prob_name,
)

__all__ = [
    "NOISE_KEY_ENV",
    "RowNoise",
    "coarsen",
    "degrade_doc",
    "degrade_response",
    "noise_key",
    "perturb",
]

log = logging.getLogger("guard")

_OPENAI = ("openai_chat", "openai_completion")

#: the environment variable holding the secret the degrade noise is derived from
NOISE_KEY_ENV = "GUARD_NOISE_KEY"

_RNG = np.random.default_rng()  # unseeded on purpose: the attacker must not predict it
_PROCESS_KEY: list[bytes] = []
_PROCESS_KEY_LOCK = threading.Lock()
_TWO_PI = 2.0 * np.pi
_INT_OR_FLOAT = frozenset({int, float})
#: ``10.0 ** decimals`` for the decimals the rounding fast path takes
_SCALES = tuple(10.0**d for d in range(16))


def noise_key(env: str = NOISE_KEY_ENV) -> bytes:
    """The secret degraded answers' noise is derived from: ``env``, hashed to 64 bytes.

    Like ``GUARD_HASH_KEY`` it must be the same on every worker and replica, or
    a client could collect one perturbation per process. Unset, one random key
    per process is drawn and a warning logged once.
    """
    value = os.environ.get(env, "")
    if value:
        return hashlib.blake2b(value.encode("utf-8")).digest()
    with _PROCESS_KEY_LOCK:
        if not _PROCESS_KEY:
            log.warning(
                "%s is not set: degraded answers' noise is keyed with a random per-process "
                "secret, so each worker and replica perturbs a row differently; set it when "
                "several processes serve one model",
                env,
            )
            _PROCESS_KEY.append(secrets.token_bytes(64))
        return _PROCESS_KEY[0]


@dataclass(frozen=True, slots=True)
class RowNoise:
    """Noise for one degraded answer, as a keyed function of (client, row).

    A row is known by its exact float64 bytes when the request has as many
    rows as the answer has probability rows (``-0.0`` is taken as ``0.0``);
    otherwise by the model's probability row rounded to 6 decimals. Each row's
    ``blake2b(key, client, row)`` seeds SHAKE-256, whose output becomes
    standard normals by Box-Muller: a few microseconds a row, paid only by
    degraded answers.

    Examples
    --------
    >>> import numpy as np
    >>> noise = RowNoise(b"k" * 64, "client-a", np.array([[1.0, 2.0], [1.0, 2.0]]))
    >>> z = noise.normals(np.array([[0.4, 0.6], [0.3, 0.7]]))
    >>> bool((z[0] == z[1]).all())  # one row, one draw, whatever the model said
    True
    """

    #: the secret (:func:`noise_key`); at most 64 bytes
    key: bytes
    #: the keyed hash of the client
    client: str
    #: the request's rows, when parsed
    rows: NDArray[np.float64] | None = None

    def normals(self, probs: NDArray[np.float64]) -> NDArray[np.float64]:
        """Standard normals shaped like ``probs``, one fixed draw per (client, row)."""
        n, k = probs.shape
        rows = self.rows
        if rows is not None and rows.ndim == 2 and rows.shape[0] == n:
            ident, kind = np.asarray(rows, dtype=np.float64) + 0.0, b"r"
        else:
            ident, kind = np.round(probs, 6) + 0.0, b"p"
        ident = np.ascontiguousarray(ident)
        base = hashlib.blake2b(key=self.key, digest_size=32, person=b"guard-noise")
        base.update(self.client.encode("utf-8", "surrogateescape") + b"\0" + kind)
        pairs = (k + 1) // 2
        stream = bytearray()
        for i in range(n):
            h = base.copy()
            h.update(ident[i].tobytes())
            stream += hashlib.shake_256(h.digest()).digest(16 * pairs)
        bits = np.frombuffer(bytes(stream), dtype="<u8").reshape(n, 2 * pairs) >> np.uint64(11)
        # Box-Muller on 53-bit uniforms: u1 in (0, 1] keeps the log finite
        u1 = (bits[:, 0::2].astype(np.float64) + 1.0) * 2.0**-53
        u2 = bits[:, 1::2].astype(np.float64) * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.empty((n, 2 * pairs), dtype=np.float64)
        z[:, 0::2] = radius * np.cos(_TWO_PI * u2)
        z[:, 1::2] = radius * np.sin(_TWO_PI * u2)
        return z[:, :k]


def perturb(
    probs: NDArray[np.float64], spec: DegradeConfig, noise: RowNoise | None = None
) -> NDArray[np.float64]:
    """Add ``spec.noise`` (standard deviation) Gaussian noise, clip at 0, renormalise.

    Rows whose top two classes are close (the points a decision-based attack
    probes) then change their argmax, while confident rows keep it. With
    ``noise`` the draw is a keyed function of (client, row), so repeating a
    row cannot average it away; without, it is fresh randomness.
    """
    if spec.noise <= 0.0:
        return probs
    z = noise.normals(probs) if noise is not None else _RNG.standard_normal(size=probs.shape)
    noisy = np.clip(probs + spec.noise * z, 0.0, None)
    sums = noisy.sum(axis=1, keepdims=True)
    sums[sums == 0.0] = 1.0
    return np.asarray(noisy / sums, dtype=np.float64)


def coarsen(probs: NDArray[np.float64], spec: DegradeConfig) -> NDArray[np.float64]:
    """Keep the ``top_k`` largest probabilities per row (the rest become 0.0), then round.

    ``probs`` should already be :func:`perturb`-ed when the spec asks for noise.

    Examples
    --------
    >>> import numpy as np
    >>> from inference_guard.guard.config import DegradeConfig
    >>> coarsen(np.array([[0.123, 0.654, 0.223]]), DegradeConfig(decimals=1, top_k=2)).tolist()
    [[0.0, 0.7, 0.2]]
    """
    out = np.array(probs, dtype=np.float64)
    k = spec.top_k
    if k is not None and k < out.shape[1]:
        drop = np.argpartition(-out, k - 1, axis=1)[:, k:]
        np.put_along_axis(out, drop, 0.0, axis=1)
    if spec.decimals is not None:
        out = np.round(out, spec.decimals)
    return out + 0.0  # no -0.0 in the JSON


def _argmax(probs: NDArray[np.float64]) -> list[int]:
    return [int(i) for i in probs.argmax(axis=1)]


def _nested_like(original: object, values: NDArray[np.float64]) -> list[Any]:
    """``values`` as nested lists, or flat when the original data was flat (OIP)."""
    if isinstance(original, list) and original and not isinstance(original[0], list):
        return [float(v) for v in values.ravel()]
    return values.tolist()  # type: ignore[no-any-return]


def _degrade_v2(
    outputs: list[Any], found: Found, spec: DegradeConfig, noise: RowNoise | None
) -> bool:
    if found.probs is None:
        return False
    i = found.prob_at
    probs = perturb(found.probs, spec, noise)
    coarse = coarsen(probs, spec)
    # labels agree with what the client sees (perturbed, and ties after rounding)
    labels = _argmax(probs if spec.labels_only else coarse)
    if spec.noise > 0.0 and found.label_at is not None:
        outputs[found.label_at]["data"] = labels
    if not spec.labels_only:
        outputs[i]["data"] = _nested_like(outputs[i]["data"], coarse)
        return True
    del outputs[i]
    names = {o.get("name") for o in outputs if isinstance(o, dict)}
    if found.label_at is None and "label" not in names:
        outputs.append(
            {"name": "label", "datatype": "INT64", "shape": [len(labels)], "data": labels}
        )
    return True


def _round_v2_fast(outputs: list[Any], spec: DegradeConfig) -> bool:
    """Rounding only (the default output policy): round a named, flat probability tensor.

    The hot path of every answer, so plain Python on the flat list instead of the
    general numpy route; anything unusual falls back to the general route.
    """
    if spec.noise > 0.0 or spec.labels_only or spec.top_k is not None or spec.decimals is None:
        return False
    for out in outputs:
        if not is_prob_name(out.get("name")):
            continue
        data = out.get("data")
        if not isinstance(data, list) or not data:
            return False
        if not _INT_OR_FLOAT.issuperset(map(type, data)):
            return False  # nested, or not numbers: the general route validates it
        # numbers only: each is in [0, 1] when the least and the greatest are and none
        # is NaN (which min and max may pass over, and which makes the sum NaN)
        if not (min(data) >= 0.0 and max(data) <= 1.0 and not math.isnan(sum(data))):
            return False  # not probabilities (scores, logits): left alone as before
        d = spec.decimals
        if d >= len(_SCALES):
            return False  # past float64's precision: the general route
        # as numpy rounds (the general route, every other format): half to even on
        # the scaled value, then scaled back; for the same numbers the same answer
        scale = _SCALES[d]
        out["data"] = [round(x * scale) / scale for x in data]
        return True
    return False


def _degrade_list(value: list[Any], spec: DegradeConfig, noise: RowNoise | None) -> bool:
    """Degrade a list of predictions in place: probability vectors or records."""
    found = from_list(value)
    if found.probs is None:
        return False
    probs = perturb(found.probs, spec, noise)
    coarse = coarsen(probs, spec)
    labels = _argmax(probs if spec.labels_only else coarse)
    if found.prob_at is None:  # a plain list of probability vectors
        value[:] = labels if spec.labels_only else coarse.tolist()
        return True
    key = found.prob_at
    rows = coarse.tolist()
    for record, row, label in zip(value, rows, labels, strict=True):
        if spec.noise > 0.0 and found.label_at is not None:
            record[found.label_at] = label
        if spec.labels_only:
            del record[key]
            if found.label_at is None:
                record.setdefault("label", label)
        else:
            record[key] = row
    return True


def _degrade_named(value: dict[str, Any], spec: DegradeConfig, noise: RowNoise | None) -> bool:
    found = from_named(value)
    if found.probs is None:
        return False
    key = found.prob_at
    probs = perturb(found.probs, spec, noise)
    coarse = coarsen(probs, spec)
    labels = _argmax(probs if spec.labels_only else coarse)
    if spec.noise > 0.0 and found.label_at is not None:
        value[found.label_at] = labels
    if spec.labels_only:
        del value[key]
        if found.label_at is None:
            value.setdefault("label", labels)
    else:
        value[key] = coarse.tolist()
    return True


def _degrade_openai(doc: dict[str, Any]) -> bool:
    changed = False
    for holder in [doc, *doc["choices"]]:
        if not isinstance(holder, dict):
            continue
        for key in ("logprobs", "prompt_logprobs"):
            if holder.get(key) is not None:
                holder[key] = None
                changed = True
    return changed


def degrade_doc(doc: Any, fmt: str, spec: DegradeConfig, noise: RowNoise | None) -> bool | None:
    """:func:`degrade_response` on an answer already decoded, rewritten in place.

    ``True`` when ``doc`` was changed, ``False`` when it holds nothing to
    coarsen, ``None`` when its format is not understood. It may raise on a
    document of an odd shape; the callers catch.
    """
    if isinstance(doc, list):
        return _degrade_list(doc, spec, noise) if doc else None
    if not isinstance(doc, dict):
        return None
    if fmt in _OPENAI or isinstance(doc.get("choices"), list):
        return _degrade_openai(doc) if isinstance(doc.get("choices"), list) else None
    outputs = doc.get("outputs")
    if (
        isinstance(outputs, list)
        and outputs
        and all(isinstance(o, dict) for o in outputs)
        and any("data" in o for o in outputs)
    ):
        if _round_v2_fast(outputs, spec):
            return True
        return _degrade_v2(outputs, from_v2_outputs(outputs), spec, noise)
    for key in ("predictions", "outputs"):
        value = doc.get(key)
        if isinstance(value, list):
            return _degrade_list(value, spec, noise)
        if isinstance(value, dict):
            return _degrade_named(value, spec, noise)
    return None


def degrade_response(
    body: bytes,
    *,
    fmt: str,
    content_type: str | None,
    spec: DegradeConfig,
    noise: RowNoise | None = None,
) -> bytes | None:
    """Coarsen the probabilities in a model's JSON answer.

    Parameters
    ----------
    body
        The complete response body.
    fmt
        The request's format (:attr:`~guard.payload.adapters.ParsedRequest.fmt`).
    content_type
        The response's ``Content-Type``; only JSON is rewritten.
    spec
        ``decimals`` to round to, ``top_k`` classes to keep (the others become
        0.0, so every shape stays valid), ``labels_only`` to replace probabilities
        with the argmax class. OpenAI answers lose their ``logprobs`` whatever
        the spec.
    noise
        Where ``spec.noise`` comes from for a degraded client (:class:`RowNoise`);
        ``None``: fresh randomness.

    Returns
    -------
    bytes or None
        The re-serialised answer; ``body`` itself when the format is understood
        but holds nothing to coarsen (labels, regression values); ``None`` when
        the body is not a JSON answer of a known format (the caller passes it
        through and counts it). Never raises.

    Examples
    --------
    >>> from inference_guard.guard.config import DegradeConfig
    >>> degrade_response(b'{"predictions": [[0.1234, 0.8766]]}', fmt="kserve_v1",
    ...                  content_type="application/json", spec=DegradeConfig(decimals=2, noise=0.0))
    b'{"predictions":[[0.12,0.88]]}'
    """
    try:
        doc = load_json_lenient(body, content_type)
        if doc is None:
            return None
        changed = degrade_doc(doc, fmt, spec, noise)
        if changed is None:
            return None
        if not changed:
            return body
        return dump_compact(doc)
    except Exception:  # an odd answer is passed through, never turned into a 500
        return None
