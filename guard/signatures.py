"""OIP v2 model signatures: the inputs a model takes, checked before it runs.

A policy with ``signature: {learn: true}`` learns each model's inputs (name,
datatype, shape with ``-1`` wildcards) from the Open Inference Protocol's
metadata endpoint ``GET /v2/models/{name}[/versions/{v}]``, on first sight of
the model and again once ``ttl_s`` has passed; ``signature: {inputs: [...]}``
gives them instead. A request whose inputs do not match is refused with 400
``bad_type`` (a datatype) or ``bad_shape`` (a name, a rank or a size) before
the model sees it.

The front end supplies the lookup (:data:`MetadataSource`): the ASGI
middleware asks the app it wraps, in process, which in ``guard proxy`` is the
upstream. A metadata endpoint that fails, is absent or answers something
unreadable leaves the guard working without a signature for that model until
the TTL passes; each failure is counted in ``guard_errors_total{component=
"signature"}`` and logged once per model.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from inference_guard.guard._counts import Counts
from inference_guard.guard.config import OIP_DATATYPES, SignatureConfig, TensorSpec
from inference_guard.guard.payload._request import fail

__all__ = ["MetadataSource", "Signatures", "check_inputs", "parse_metadata"]

log = logging.getLogger("guard")

#: ``path -> (status, body)`` of a ``GET`` of the metadata endpoint
MetadataSource = Callable[[str], Awaitable[tuple[int, bytes]]]

_INFER: Final = re.compile(r"(/v2/models/[^/]+(?:/versions/[^/]+)?)/infer/?\Z")
#: most models whose signature is remembered (names are client-chosen); past it,
#: models not seen yet are not looked up
_MAX_MODELS: Final = 1024
_Entry = tuple[float, tuple[TensorSpec, ...] | None]


def parse_metadata(body: bytes) -> tuple[TensorSpec, ...] | None:
    """The inputs of an OIP v2 metadata answer; ``None`` when it names none readably.

    Examples
    --------
    >>> parse_metadata(b'{"name": "m", "inputs": [{"name": "x", "datatype": "FP32", '
    ...                b'"shape": [-1, 4]}]}')
    (TensorSpec(name='x', datatype='FP32', shape=(-1, 4)),)
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, list) or not inputs:
        return None
    specs = []
    for item in inputs:
        if not isinstance(item, dict):
            return None
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or datatype not in OIP_DATATYPES:
            return None
        if not isinstance(shape, list) or not all(type(d) is int and d >= -1 for d in shape):
            return None
        specs.append(TensorSpec(name, str(datatype), tuple(shape)))
    return tuple(specs)


def check_inputs(inputs: object, specs: tuple[TensorSpec, ...]) -> None:
    """Refuse request ``inputs`` (OIP v2 ``inputs[]``) that do not match ``specs``."""
    by_name = {s.name: s for s in specs}
    if not isinstance(inputs, list):
        return  # the parser has refused it already
    seen = set()
    for tensor in inputs:
        if not isinstance(tensor, dict):
            continue
        name = tensor.get("name")
        spec = by_name.get(name) if isinstance(name, str) else None
        if spec is None:
            fail(400, "bad_shape", f"the model has no input named {name!r}")
        assert spec is not None
        seen.add(spec.name)
        if tensor.get("datatype") != spec.datatype:
            fail(400, "bad_type", f"input {spec.name!r} must be {spec.datatype}")
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != len(spec.shape)
            or any(want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True))
        ):
            wanted = "[" + ", ".join(str(d) for d in spec.shape) + "]"
            fail(400, "bad_shape", f"input {spec.name!r} must have shape {wanted} (-1: any size)")
    missing = [s.name for s in specs if s.name not in seen]
    if missing:
        fail(400, "bad_shape", f"the model's input {missing[0]!r} is missing")


class Signatures:
    """One policy's signatures: given, or learned and cached per model for ``ttl_s``."""

    def __init__(
        self,
        config: SignatureConfig,
        counts: Counts,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._counts = counts
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._warned: set[str] = set()
        #: the metadata lookup (set by the front end); ``None``: nothing is learned
        self.source: MetadataSource | None = None

    async def check(self, path: str, inputs: object) -> None:
        """Refuse an OIP v2 request on ``path`` whose ``inputs`` (as the parser decoded
        them: the body is not read again) do not match its model."""
        specs = self._config.inputs or await self.lookup(path)
        if specs:
            check_inputs(inputs, specs)

    async def prefetch(self, models: Iterable[str]) -> None:
        """Learn the signatures of ``models`` (names) now, as on their first sight."""
        for name in models:
            await self.lookup(f"/v2/models/{name}/infer")

    async def lookup(self, path: str) -> tuple[TensorSpec, ...] | None:
        """The learned inputs of the model ``path`` infers on (``None``: not known)."""
        m = _INFER.search(path)
        if m is None or not self._config.learn:
            return None
        model = m.group(1)
        now = self._clock()
        hit = self._cache.get(model)
        if hit is not None and hit[0] > now:
            return hit[1]
        if hit is None and len(self._cache) >= _MAX_MODELS:
            return None
        specs = await self._fetch(model)
        self._cache[model] = (now + self._config.ttl_s, specs)
        return specs

    async def _fetch(self, model: str) -> tuple[TensorSpec, ...] | None:
        source = self.source
        if source is None:
            return None
        try:
            status, body = await source(model)
            specs = parse_metadata(body) if status == 200 else None
            problem = f"answered {status}" if status != 200 else "named no readable inputs"
        except Exception as exc:
            specs, problem = None, f"failed ({type(exc).__name__})"
        if specs is None:
            self._counts.error("signature")
            if model not in self._warned and len(self._warned) < _MAX_MODELS:
                self._warned.add(model)
                log.warning(
                    "the metadata endpoint GET %s %s: requests to this model are not "
                    "checked against its signature",
                    model,
                    problem,
                )
        return specs
