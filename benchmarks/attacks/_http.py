"""The attacker's view of a deployment: an OIP v2 JSON client that counts rows.

Every attack client talks to the model only through :class:`Oracle`. It sends
rows in one ``POST /v2/models/<name>/infer`` per call (over HTTP to a URL, or
through an in-process ASGI ``transport``, :class:`~._asgi.InProcess`), with its own
``x-api-key`` (or a list of keys used round-robin, one per request, for a
Sybil attacker), and records each request: the ``x-request-id`` the guard
returns (which is also the audit line's ``request_id``), how many rows it
carried, the rows sent so far, the status, the labels it got, whether the
answer was rounded (every probability a round number; a float32 answer almost
never is) and, given the model the deployment is known to serve
(``reference``), whether it was *perturbed*: further from the model's own
probabilities than its rounding explains, which is how the guard's silent
``degrade`` noise shows.

Stdlib ``http.client`` only, so ``guard simulate`` works without the bench extra.
An oracle's keys can be handed over (``keys``) to make one attacker's requests
look like many clients.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from numpy.typing import NDArray

__all__ = ["V2_PATH", "Oracle", "Refused", "Sent"]

V2_PATH = "/v2/models/digits/infer"


class Refused(Exception):
    """The deployment did not answer a query (403 quarantine, 429, 4xx, 5xx)."""

    def __init__(self, status: int, rows_sent: int) -> None:
        super().__init__(f"answered {status} after {rows_sent} rows")
        self.status = status
        self.rows_sent = rows_sent


@dataclass(frozen=True, slots=True)
class Sent:
    """One request, as the client saw it."""

    #: the guard's ``x-request-id`` ("" without a guard)
    request_id: str
    #: which of the oracle's keys sent it
    key: str
    #: rows in this request
    rows: int
    #: rows this oracle had sent when the request completed, this one included
    cum_rows: int
    #: HTTP status
    status: int
    #: every probability in the answer was a round number (4 decimals or fewer)
    coarse: bool
    #: the answer differed from the reference model's beyond its rounding
    perturbed: bool = False
    #: the labels the answer gave, one per row (empty when it was refused)
    labels: tuple[int, ...] = ()


@dataclass
class Oracle:
    """Queries a deployment's v2 infer endpoint; counts rows, statuses and coarse answers.

    Parameters
    ----------
    url
        Base URL, ``http://host:port`` ("" with a ``transport``).
    keys
        API keys sent as ``x-api-key``, one per request, round-robin (one key for a
        normal client; several for an attacker who spreads one attack over keys).
    drop_blocked
        On a 403, drop that key and resend the rows with the next one (an attacker
        who rotates accounts); :class:`Refused` only once every key is refused.
    reference
        The served model's ``predict_proba``, when known (the demo's): answers are
        then checked for perturbation.
    transport
        An object with ``post(path, body, headers) -> (status, headers, body)``
        (:class:`~._asgi.InProcess`) used instead of HTTP to ``url``.
    """

    url: str
    keys: Sequence[str]
    path: str = V2_PATH
    timeout: float = 30.0
    drop_blocked: bool = False
    reference: Callable[[NDArray[np.float64]], NDArray[np.float64]] | None = None
    transport: Any = None
    log: list[Sent] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    rows: int = 0
    _next_key: int = 0
    _conn: http.client.HTTPConnection | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("need at least one API key")
        self._live = list(self.keys)
        if self.transport is not None:
            return
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"target must be http://host:port, got {self.url!r}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._base = parts.path.rstrip("/")

    # ------------------------------------------------------------------ transport

    def _post(self, body: bytes, key: str) -> tuple[int, bytes, str]:
        headers = {"content-type": "application/json", "x-api-key": key}
        if self.transport is not None:
            status, got, data = self.transport.post(self.path, body, headers)
            return status, data, got.get("x-request-id", "")
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.timeout
                )
            try:
                self._conn.request("POST", self._base + self.path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                return resp.status, data, resp.getheader("x-request-id") or ""
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ queries

    def query(self, X: NDArray[np.floating]) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Labels and probabilities for the rows of ``X`` (one request).

        Raises :class:`Refused` for any answer but 200.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        n, d = X.shape
        body = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input-0",
                        "shape": [n, d],
                        "datatype": "FP32",
                        "data": [round(float(v), 5) for v in X.ravel()],
                    }
                ]
            },
            separators=(",", ":"),
        ).encode()
        while True:
            key = self._live[self._next_key % len(self._live)]
            self._next_key += 1
            status, data, request_id = self._post(body, key)
            self.rows += n
            self.statuses[status] += 1
            labels = probs = None
            if status == 200:
                labels, probs = _parse(data, n)
            coarse = probs is not None and bool(np.all(probs == np.round(probs, 4)))
            perturbed = (
                probs is not None
                and self.reference is not None
                and _perturbed(probs, self.reference(X))
            )
            got = () if labels is None else tuple(int(v) for v in labels)
            self.log.append(Sent(request_id, key, n, self.rows, status, coarse, perturbed, got))
            if labels is not None and probs is not None:
                return labels, probs
            if status == 403 and self.drop_blocked and len(self._live) > 1:
                self._live.remove(key)
                continue
            raise Refused(status, self.rows)

    def predict_proba(self, X: NDArray[np.floating], batch: int = 64) -> NDArray[np.float64]:
        """Probabilities for any number of rows, ``batch`` rows per request."""
        X = np.asarray(X, dtype=np.float64)
        out = [self.query(X[i : i + batch])[1] for i in range(0, X.shape[0], batch)]
        return np.vstack(out) if out else np.empty((0, 0))

    def labels(self, X: NDArray[np.floating], batch: int = 64) -> NDArray[np.int64]:
        """Labels for any number of rows, ``batch`` rows per request (the answer's ``label``)."""
        X = np.asarray(X, dtype=np.float64)
        out = [self.query(X[i : i + batch])[0] for i in range(0, X.shape[0], batch)]
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------ summary

    @property
    def requests(self) -> int:
        return len(self.log)

    @property
    def live_keys(self) -> int:
        """Keys not (yet) dropped after a 403."""
        return len(self._live)

    @property
    def coarse(self) -> int:
        """Answers whose probabilities all looked rounded."""
        return sum(s.coarse for s in self.log)

    @property
    def perturbed(self) -> int:
        """Answers further from the reference model than their rounding explains."""
        return sum(s.perturbed for s in self.log)


def _decimals(values: NDArray[np.float64]) -> int | None:
    """The fewest decimals every value is rounded to (None: not rounded, float32 noise)."""
    for d in range(7):
        if np.all(values == np.round(values, d)):
            return d
    return None


def _perturbed(got: NDArray[np.float64], expected: NDArray[np.float64]) -> bool:
    d = _decimals(got)
    # rounding to d decimals moves a value by at most half a unit; float32 by ~1e-7
    tol = 1e-5 if d is None else 0.5 * 10.0**-d + 1e-5
    return bool(np.any(np.abs(got - expected) > tol))


_Parsed = tuple[NDArray[np.int64], NDArray[np.float64]] | tuple[None, None]


def _parse(data: bytes, n: int) -> _Parsed:
    """Labels and probabilities from an OIP v2 answer for ``n`` rows.

    The probabilities are the output named ``probabilities`` (the demo's), or
    else the first floating-point output holding ``n`` rows of two or more
    values (any model's); the labels the output named ``label``, or else their
    argmax.
    """
    try:
        doc = json.loads(data)
        outputs = {o["name"]: o for o in doc["outputs"]}
        chosen = outputs.get("probabilities") or next(
            o
            for o in doc["outputs"]
            if str(o.get("datatype", "FP32")).startswith("FP")
            and len(o.get("shape", ())) == 2
            and o["shape"][0] == n
            and o["shape"][1] >= 2
        )
        probs = np.asarray(chosen["data"], dtype=np.float64).reshape(n, -1)
        if "label" in outputs:
            labels = np.asarray(outputs["label"]["data"], dtype=np.int64).reshape(n)
        else:
            labels = probs.argmax(axis=1).astype(np.int64)
    except (ValueError, KeyError, TypeError, StopIteration):
        return None, None
    return labels, probs
