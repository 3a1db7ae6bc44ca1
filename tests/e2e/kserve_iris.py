"""A KServe model server for the proxy tests, run by the Python of ``.ci/.venv-kserve``.

``python kserve_iris.py PORT`` serves an iris LogisticRegression as the KServe
custom model ``iris`` on 127.0.0.1:PORT, REST only. KServe v1
``POST /v1/models/iris:predict`` with ``{"instances": [[4 numbers], ...]}`` is
answered ``{"predictions": [[3 class probabilities], ...]}``, as a TF Serving
classifier answers.

Not collected by pytest (it imports kserve, which lives in its own environment).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import uvicorn
from kserve import Model, ModelServer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

# KServe 0.21's REST server binds 0.0.0.0 with no option to change it: the tests keep
# every server on the loopback interface
_config_init = uvicorn.Config.__init__


def _loopback_config(self: uvicorn.Config, app: Any, *args: Any, **kwargs: Any) -> None:
    kwargs["host"] = "127.0.0.1"
    _config_init(self, app, *args, **kwargs)


uvicorn.Config.__init__ = _loopback_config  # type: ignore[method-assign]


class Iris(Model):
    def __init__(self) -> None:
        super().__init__("iris")
        X, y = load_iris(return_X_y=True)
        self.estimator = LogisticRegression(max_iter=1000).fit(X, y)
        self.ready = True

    async def predict(
        self, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        rows = np.asarray(payload["instances"], dtype=np.float64)
        return {"predictions": self.estimator.predict_proba(rows).tolist()}


if __name__ == "__main__":
    port = int(sys.argv[1])
    ModelServer(http_port=port, enable_grpc=False, workers=1).start([Iris()])
