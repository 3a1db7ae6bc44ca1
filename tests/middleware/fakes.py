"""Test doubles that stand in for detectors (the middleware is tested with fakes)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from inference_guard.detectors.base import Answer, Detector, DetectorResult, Query
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import StateError
from inference_guard.guard.registry import BuildContext, register_detector
from inference_guard.middleware.types import Message, Receive, Scope, Send


class FixedDetector(Detector):
    """Fires when a row's first feature is >= ``fire_at`` (or always / never)."""

    technique = "AML.T0029"

    def __init__(self, name: str, fire_at: float | None, retry_after: float | None) -> None:
        super().__init__(name)
        self.fire_at = fire_at
        self.retry_after = retry_after
        self.seen: list[Query] = []

    async def inspect(self, query: Query) -> DetectorResult:
        self.seen.append(query)
        fire = False
        if self.fire_at is not None and query.rows is not None and query.rows.size:
            fire = bool(query.rows[:, 0].max() >= self.fire_at)
        return DetectorResult(
            self.name,
            score=-1.0 if fire else 1.0,
            threshold=0.0,
            anomalous=fire,
            reason="fixed",
            rows_flagged=int(fire),
            retry_after=self.retry_after,
            headers=(("RateLimit", '"fake";r=1;t=1'),),
        )


class ObservingDetector(Detector):
    """Records the answers it observes; fires after the answer when told to."""

    observes_answers = True

    def __init__(self, name: str, fire: bool) -> None:
        super().__init__(name)
        self.fire = fire
        self.answers: list[Answer] = []

    async def inspect(self, query: Query) -> DetectorResult:
        return DetectorResult.ok(self.name)

    async def observe(self, query: Query, answer: Answer) -> DetectorResult | None:
        self.answers.append(answer)
        return DetectorResult(self.name, -1.0 if self.fire else 1.0, 0.0, self.fire)


class BrokenDetector(Detector):
    """Raises: a plain bug (``kind: bug``) or a store failure (``kind: store``)."""

    def __init__(self, name: str, kind: str) -> None:
        super().__init__(name)
        self.kind = kind

    async def inspect(self, query: Query) -> DetectorResult:
        if self.kind == "store":
            raise StateError("redis", "get", "connection refused")
        raise RuntimeError("detector bug")


def _fixed(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    p: Mapping[str, Any] = spec.params
    detector = FixedDetector(spec.name, p.get("fire_at"), p.get("retry_after"))
    if "reads_rows" in p:  # declares whether it reads the request's matrix
        detector.reads_rows = bool(p["reads_rows"])
    return detector


register_detector("test-fixed", _fixed, replace=True)
register_detector(
    "test-observe", lambda s, c: ObservingDetector(s.name, bool(s.params.get("fire"))), replace=True
)
register_detector(
    "test-broken",
    lambda s, c: BrokenDetector(s.name, str(s.params.get("kind", "bug"))),
    replace=True,
)

#: an OIP v2 answer with 2 rows of 3-class probabilities
V2_ANSWER = {
    "model_name": "m",
    "id": "1",
    "outputs": [
        {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]},
        {
            "name": "probabilities",
            "shape": [2, 3],
            "datatype": "FP32",
            "data": [0.1234567, 0.7654321, 0.1111112, 0.5, 0.25, 0.25],
        },
    ],
}


class EchoApp:
    """A model stand-in: records each body it receives, answers a fixed v2 JSON."""

    def __init__(self, answer: Any = None) -> None:
        self.bodies: list[bytes] = []
        self.answer = V2_ANSWER if answer is None else answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg: Message = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        payload = json.dumps(self.answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
