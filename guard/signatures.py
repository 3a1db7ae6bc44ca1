"""Model signatures: the inputs a model takes, checked before it runs.

A policy with ``signature: {learn: true}`` learns each model's inputs (name,
datatype, shape with ``-1`` wildcards) from the Open Inference Protocol's
metadata endpoint ``GET /v2/models/{name}[/versions/{v}]``, on first sight of
the model and again once ``ttl_s`` has passed; ``signature: {inputs: [...]}``
gives them instead. A request whose inputs do not match is refused with 400
``bad_type`` (a datatype) or ``bad_shape`` (a name, a rank or a size) before
the model sees it. A model of one numeric input also has the untyped row
formats (KServe v1 ``instances``, MLflow, a JSON array) checked against it: no
strings or objects, the input's rank and number of values per row
(:func:`check_rows`); a KServe v1 route's model is looked up by its name.

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
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from inference_guard.guard._counts import Counts
from inference_guard.guard.config import OIP_DATATYPES, SignatureConfig, TensorSpec
from inference_guard.guard.payload._request import ParsedRequest, fail

__all__ = ["MetadataSource", "Signatures", "check_inputs", "check_rows", "parse_metadata"]

log = logging.getLogger("guard")

#: ``path -> (status, body)`` of a ``GET`` of the metadata endpoint
MetadataSource = Callable[[str], Awaitable[tuple[int, bytes]]]

_INFER: Final = re.compile(r"(/v2/models/[^/]+(?:/versions/[^/]+)?)/infer/?\Z")
#: a KServe v1 route: its model's OIP v2 metadata is read from ``/v2/models/{name}``
_PREDICT: Final = re.compile(r"/v1/models/([^/:]+):predict\Z")
#: the untyped row formats a one-input signature also checks (:func:`check_rows`)
ROW_FORMATS: Final = frozenset({"kserve_v1", "tf_columns", "mlflow", "json_array"})
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


def check_rows(parsed: ParsedRequest, specs: tuple[TensorSpec, ...]) -> None:
    """Refuse an untyped row request (KServe v1, MLflow, a JSON array) that a model of
    one numeric input ``specs`` cannot take.

    These formats name no datatype, so what the parser found stands for it:
    strings (``texts``) or objects (neither rows nor texts) where the model takes
    numbers are 400 ``bad_type``; rows whose instances have another rank than the
    input's, or another number of values, are 400 ``bad_shape``. A signature of
    several inputs, or of a ``BYTES`` input, does not say how such rows map onto
    it: nothing is checked then.
    """
    if len(specs) != 1 or specs[0].datatype == "BYTES":
        return
    spec = specs[0]
    if parsed.rows is None:
        what = "strings" if parsed.texts else "objects"
        fail(400, "bad_type", f"the model takes {spec.datatype} numbers, not {what}")
    rank = _instance_rank(parsed.inputs)
    if rank is not None and len(spec.shape) >= 1 and rank != len(spec.shape) - 1:
        wanted = "[" + ", ".join(str(d) for d in spec.shape) + "]"
        fail(400, "bad_shape", f"the model's input has shape {wanted}: rows of rank {rank}")
    per_row = spec.shape[1:]
    if all(d >= 0 for d in per_row):
        width = math.prod(per_row)
        if parsed.rows.shape[1] != width:
            fail(400, "bad_shape", f"the model takes rows of {width} values")


def _instance_rank(instances: object) -> int | None:
    """The rank of the first instance of a decoded list of instances (``None``: not known).

    The parser has checked that the instances form a regular tensor, so the first
    one's nesting is every one's.
    """
    if not isinstance(instances, list) or not instances:
        return None
    rank, level = 0, instances[0]
    while isinstance(level, list) and level:
        rank += 1
        level = level[0]
    return rank


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

    async def check(self, path: str, parsed: ParsedRequest) -> None:
        """Refuse a request on ``path`` that its model cannot take: an OIP v2 request
        whose ``inputs`` (as the parser decoded them: the body is not read again) do
        not match, or an untyped row request (:data:`ROW_FORMATS`) that a one-input
        numeric model cannot take (:func:`check_rows`)."""
        if parsed.fmt == "oip_v2":
            specs = self._config.inputs or await self.lookup(path)
            if specs:
                check_inputs(parsed.inputs, specs)
        elif parsed.fmt in ROW_FORMATS:
            specs = self._config.inputs or await self.lookup(path)
            if specs:
                check_rows(parsed, specs)

    async def prefetch(self, models: Iterable[str]) -> None:
        """Learn the signatures of ``models`` (names) now, as on their first sight."""
        for name in models:
            await self.lookup(f"/v2/models/{name}/infer")

    async def lookup(self, path: str) -> tuple[TensorSpec, ...] | None:
        """The learned inputs of the model ``path`` infers on (``None``: not known)."""
        if not self._config.learn:
            return None
        m = _INFER.search(path)
        if m is not None:
            model = m.group(1)
        else:
            v1 = _PREDICT.search(path)
            if v1 is None:
                return None
            model = f"/v2/models/{v1.group(1)}"
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
