"""The README's one-line wrap, run from a project with its own `middleware` and `detectors`.

Run by .ci/wheel-smoke from that project's directory, with the wheel installed in
the virtualenv named by argv[1]. Exits non-zero on any failed check.
"""

from __future__ import annotations

import sys
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import detectors
import middleware
from inference_guard.middleware import GuardMiddleware

venv = Path(sys.argv[1]).resolve()
served = Path(sys.modules[GuardMiddleware.__module__].__file__ or "").resolve()


async def infer(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(
        {"model_name": "m", "outputs": [{"name": "probabilities", "shape": [1, 2],
                                         "datatype": "FP64", "data": [0.123456, 0.876544]}]}
    )


model = Starlette(routes=[Route("/v2/models/m/infer", infer, methods=["POST"])])
app = GuardMiddleware(model)  # the README's wrap, with the safe defaults

checks = {
    "the project's own middleware package is untouched": middleware.OWN.endswith("middleware"),
    "the project's own detectors package is untouched": detectors.OWN.endswith("detectors"),
    "the guard comes from the installed wheel": served.is_relative_to(venv),
}
client = TestClient(app, client=("127.0.0.1", 50000))  # metrics answer loopback only
row = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]}]}
ok = client.post("/v2/models/m/infer", json=row)
checks["a valid request is answered 200"] = ok.status_code == 200
checks["its answer is rounded (2 decimals)"] = (
    ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [0.12, 0.88]
)
bad = client.post("/v2/models/m/infer", content=b'{"inputs": [1, NaN]}',
                  headers={"content-type": "application/json"})
checks["NaN is refused with a 400"] = bad.status_code == 400
metrics = client.get("/metrics")
checks["metrics are served"] = metrics.status_code == 200 and "guard_requests" in metrics.text

for name, passed in checks.items():
    print(f"{'ok  ' if passed else 'FAIL'} {name}")
sys.exit(0 if all(checks.values()) else 1)
