"""The fast lane: plain requests to a policy whose verdict is fixed, accepted in a few C calls.

Contract. On a *lean* policy (:func:`lean_policies`: no detectors, no
quarantine, no capture, validation on, the built-in formats) and a path that
names a format with a plain reader (OIP v2, KServe v1:
:data:`guard.payload._plain.READERS`), :meth:`FastLane.admit` returns, for a
plain request, exactly the verdict :meth:`Guard.admit
<guard.pipeline.Guard.admit>` would return, counted exactly as ``admit`` counts
it. For every other request, valid or not, and on any failure of its own, it
returns ``None`` having refused and counted nothing, and the caller asks
``admit``, which gives the exact verdict and reason from the same body reader
(a second read gives the same body, or the same error). The lane only ever
accepts, and only what ``admit`` accepts; differential tests hold it to that
(``tests/middleware/test_lean_lane.py``).

A plain request has headers (joined by the engine's own rule,
:meth:`ClientIdentifier.read_headers <guard.identity.ClientIdentifier.read_headers>`),
none of which carries an identity (nothing in such a policy is per client, so
the lane identifies no one; a request with a credential or a forwarding header
goes to ``admit``, and a bad credential is refused as ever), a peer a server
could report, ``content-type`` ``application/json`` or none, no binary-tensor
header, a body the shared :class:`~middleware._body.BodyReader` reads whole
(declared length, cap, deadline), and a body its format's plain reader accepts.

Nothing else is the lane's own: the verdict and its counting are
:meth:`Guard.admit_fixed <guard.pipeline.Guard.admit_fixed>`'s, and the verdict
is carried out by the middleware as any other.
"""

from __future__ import annotations

import logging
from typing import Any

from inference_guard.guard.engine import Pass
from inference_guard.guard.loadout import Loadout
from inference_guard.guard.payload._plain import READERS
from inference_guard.guard.payload.adapters import detect_format
from inference_guard.guard.pipeline import Guard
from inference_guard.guard.policy import CompiledPolicy
from inference_guard.middleware._body import BodyReader
from inference_guard.middleware.types import Scope

__all__ = ["FastLane", "lean_policies"]

log = logging.getLogger("guard")

_JSON = b"application/json"
#: Triton's binary-tensor header: such a body is not plain JSON
_BINARY_HEADER = b"inference-header-content-length"
#: what ASGI servers put in scope["client"]: (host, port), as a tuple or a list, or None
_PEERS = (tuple, list, type(None))


def lean_policies(guard: Guard, loadout: Loadout | None = None) -> frozenset[str]:
    """The policies that may take the fast lane: their verdict is fixed.

    No detectors (the verdict is ``allow``, its answer perhaps rounded), no
    quarantine anywhere, no capture (which needs a client), validation on (an
    invalid request is refused, so a valid one is all the lane must recognise),
    no custom ``payload:``, no model signature to check and answers never watched.
    Of ``loadout``'s policies, the guard's running ones by default.
    """
    loadout = loadout if loadout is not None else guard.loadout
    if loadout.quarantine_enabled or guard.capture is not None:
        return frozenset()
    return frozenset(
        p.name
        for p in loadout.policies
        if p.allow is not None
        and p.config.validate
        and p.name not in loadout.payloads
        and not p.config.signature.enabled
        and not (p.observes or p.passthrough)
    )


class FastLane:
    """The lane of one guard; see the module docstring for its contract."""

    __slots__ = ("_admit_fixed", "_guard", "_identity", "_limits")

    def __init__(self, guard: Guard, loadout: Loadout | None = None) -> None:
        self._guard = guard
        # the verdicts of the loadout whose policies the lane is given (a reload's
        # requests in flight finish on theirs)
        self._admit_fixed = (loadout if loadout is not None else guard.loadout).admit_fixed
        self._limits = guard.config.limits
        self._identity = guard.identifier.header_names

    @staticmethod
    def format_of(path: str) -> str | None:
        """The format ``path`` names when the lane has a plain reader for it, else ``None``."""
        fmt = detect_format(path)
        return fmt if fmt in READERS else None

    async def admit(
        self, policy: CompiledPolicy, fmt: str, scope: Scope, reader: BodyReader
    ) -> Pass | None:
        """``admit``'s verdict on a plain request; ``None``: ask :meth:`Guard.admit`."""
        try:
            raw: Any = scope.get("headers")
            headers = self._guard.identifier.read_headers(raw if raw is not None else ())
            if not (
                headers
                and type(scope.get("client")) in _PEERS  # else identification fails: admit's call
                and self._identity.isdisjoint(headers)
                and headers.get(b"content-type", _JSON) == _JSON
                and _BINARY_HEADER not in headers
            ):
                return None
            body = await reader.read(headers.get(b"content-length"))
        except Exception:  # a refusal, a failure, a disconnect: admit meets it again
            return None
        try:
            n_rows = READERS[fmt](body, self._limits)
        except Exception:  # a reader bug: counted, and admit decides
            self._guard.counts.error("parse")
            log.warning("plain %s reader failed on policy %s", fmt, policy.name, exc_info=True)
            return None
        if n_rows is None:
            return None
        try:
            return self._admit_fixed(policy, fmt, n_rows)
        except Exception:  # admit meets the failure again and applies the failure mode
            return None
