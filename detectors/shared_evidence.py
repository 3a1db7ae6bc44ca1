"""The extraction detectors' evidence, shared by every worker and replica.

Behind a round-robin balancer each of ``N`` workers sees ``1/N`` of a client's
rows; a detector that judged only those would need ``N`` times the rows to
convict. The hot per-row work (parsing, fingerprinting, projecting, binning)
stays where the request landed; what it produces is small, and that is what
is shared: a near-duplicate fingerprint (50 hashes), a PRADA row projected to
32 floats and its predicted class, a boundary row's coverage cells, answer
confidence and class. Each worker appends its request's evidence to a log in
the store and, in the same round trip, reads what the other workers appended
since its last request; it applies theirs, then its own, to its local
structures, in the log's order. Every worker's per-client state thus follows
the same rows a single worker would have seen, and a client's detection takes
about the same rows whatever the number of workers.

The log (:class:`SharedLog`, one per detector) is bounded and expires: it
keeps the last ``max_entries`` entries (one per request, at most
``max_rows`` rows each), and disappears ``ttl`` seconds after the last
append. It is a transport, not the memory: each worker keeps the evidence in
its own bounded structures, as without sharing.

Consistency: a worker's evidence reaches the others on *their* next request
after its exchange, whichever client that request is from. A worker that
falls more than ``count`` entries behind reads the next ``count`` each time
and catches up over several requests; one idle for longer than the log holds
misses what was trimmed, and a worker that starts reads the last ``count``
entries, not the whole history.

Only a store that shares (``redis://``, ``redis+cluster://``: see
:class:`~detectors.store.EvidenceStore`) gets a log; with ``memory://`` the
detectors keep their evidence to themselves and decide exactly as before.

Entries are framed here, never unpickled: arrays of a few fixed dtypes, with
their shapes, checked on the way back; an entry that does not parse is skipped.
"""

from __future__ import annotations

import math
import secrets
import struct
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from inference_guard.detectors.store import EvidenceStore, KeyValueStore

__all__ = ["EVIDENCE_PREFIX", "Evidence", "SharedLog"]

#: the prefix of every evidence log's key
EVIDENCE_PREFIX = "evidence:"

_ORIGIN_BYTES = 8
# the dtypes an entry may carry, by one-byte code (little-endian on the wire)
_DTYPES: dict[int, np.dtype[np.generic]] = {
    0: np.dtype("<i8"),
    1: np.dtype("<u8"),
    2: np.dtype("<f4"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("i1"),
    6: np.dtype("<f8"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_MAX_DIMS = 2

#: one request's evidence: the client and the detector's arrays (one row each per row)
Evidence = tuple[str, list[NDArray[np.generic]]]


def encode(client: str, arrays: Sequence[NDArray[np.generic]]) -> bytes:
    """Frame ``client`` and ``arrays`` (at most 2-D, of the dtypes above) as bytes."""
    name = client.encode("utf-8")
    parts = [struct.pack("<HB", len(name), len(arrays)), name]
    for a in arrays:
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        code = _CODES.get(np.dtype(dt))
        if code is None or a.ndim > _MAX_DIMS or a.ndim < 1:
            raise ValueError(f"cannot frame an array of {a.dtype} with {a.ndim} dimensions")
        shape = (*a.shape, 1)[:_MAX_DIMS]
        parts.append(struct.pack("<BBII", code, a.ndim, *shape))
        parts.append(np.ascontiguousarray(a, dtype=_DTYPES[code]).tobytes())
    return b"".join(parts)


def decode(data: bytes) -> Evidence | None:
    """The client and arrays framed by :func:`encode`; ``None`` if ``data`` does not parse."""
    try:
        n_name, n_arrays = struct.unpack_from("<HB", data, 0)
        pos = 3
        client = data[pos : pos + n_name].decode("utf-8")
        pos += n_name
        arrays: list[NDArray[np.generic]] = []
        for _ in range(n_arrays):
            code, ndim, d0, d1 = struct.unpack_from("<BBII", data, pos)
            pos += 10
            dt = _DTYPES.get(code)
            if dt is None or not 1 <= ndim <= _MAX_DIMS:
                return None
            shape = (d0,) if ndim == 1 else (d0, d1)
            size = math.prod(shape) * dt.itemsize
            if pos + size > len(data):
                return None
            arrays.append(
                np.frombuffer(data, dtype=dt, count=math.prod(shape), offset=pos).reshape(shape)
            )
            pos += size
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return (client, arrays) if pos == len(data) else None


class SharedLog:
    """One detector's evidence log in a sharing store.

    Build it with :meth:`of`, which gives ``None`` for a store that does not
    share. Each instance (a worker's detector) has a random origin tag, so it
    can tell its own entries from the others'.

    Parameters
    ----------
    store : EvidenceStore
        A store whose ``shares_evidence`` is true.
    namespace : str
        ``"<detector type>:<detector name>"``: the log's key is
        ``evidence:<namespace>``.
    max_entries : int, default=1024
        Entries (requests) the log keeps.
    max_rows : int, default=256
        Rows of one request shared; the rest stay local.
    ttl : float, default=600
        Seconds the log lasts after its last append.
    count : int, default=64
        Most entries read in one exchange.
    """

    def __init__(
        self,
        store: EvidenceStore,
        namespace: str,
        *,
        max_entries: int = 1024,
        max_rows: int = 256,
        ttl: float = 600.0,
        count: int = 64,
    ) -> None:
        for pname, value in (
            ("max_entries", max_entries),
            ("max_rows", max_rows),
            ("count", count),
        ):
            if value < 1:
                raise ValueError(f"{pname} must be >= 1, got {value!r}")
        if not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a number of seconds > 0, got {ttl!r}")
        self.store = store
        self.key = f"{EVIDENCE_PREFIX}{namespace}"
        self.max_entries = max_entries
        self.max_rows = max_rows
        self.ttl = float(ttl)
        self.count = count
        self.origin = secrets.token_bytes(_ORIGIN_BYTES)
        self.cursor = b""
        #: entries of other workers read, and entries that did not parse (skipped)
        self.received = 0
        self.malformed = 0

    @classmethod
    def of(
        cls,
        store: KeyValueStore,
        namespace: str,
        *,
        max_entries: int = 1024,
        max_rows: int = 256,
        ttl: float = 600.0,
        count: int = 64,
    ) -> SharedLog | None:
        """A log for ``store`` if it shares evidence between processes, else ``None``."""
        if not (isinstance(store, EvidenceStore) and store.shares_evidence):
            return None
        return cls(
            store, namespace, max_entries=max_entries, max_rows=max_rows, ttl=ttl, count=count
        )

    async def exchange(self, client: str, arrays: Sequence[NDArray[np.generic]]) -> list[Evidence]:
        """Share this request's evidence; the other workers' since the last exchange, in order.

        ``arrays`` hold one entry per row (the first axis); at most
        ``max_rows`` rows are shared. Raises the store's ``StateError`` when the
        store fails: the caller applies its own evidence locally all the same.
        """
        cut = [a[: self.max_rows] for a in arrays]
        entry = self.origin + encode(client, cut)
        cursor, entries = await self.store.exchange(
            self.key,
            entry,
            self.cursor,
            max_entries=self.max_entries,
            ttl=self.ttl,
            count=self.count,
        )
        self.cursor = cursor
        out: list[Evidence] = []
        for raw in entries:
            if raw[:_ORIGIN_BYTES] == self.origin:
                continue
            evidence = decode(raw[_ORIGIN_BYTES:])
            if evidence is None:
                self.malformed += 1
                continue
            out.append(evidence)
        self.received += len(out)
        return out
