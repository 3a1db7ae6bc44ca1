"""Real model servers, started as separate processes for the proxy tests.

MLServer lives in a virtualenv of its own (``.ci/mlserver-env`` makes it), since
it pins FastAPI and Starlette versions the project does not use. The tests find
its ``mlserver`` executable through ``GUARD_TEST_MLSERVER``, else at the path
that script creates. Missing, the tests skip with the reason, except in CI
(``CI=true``), where they fail.

``guard proxy`` runs as its own process too, through the real command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Server, free_port

#: what .ci/mlserver-env creates, and where the tests look when GUARD_TEST_MLSERVER is unset
DEFAULT_MLSERVER = ROOT / ".ci" / ".venv-mlserver" / "bin" / "mlserver"
#: what .ci/kserve-env creates, and where the tests look when GUARD_TEST_KSERVE_PYTHON is unset
DEFAULT_KSERVE_PYTHON = ROOT / ".ci" / ".venv-kserve" / "bin" / "python"
MODEL = "iris"
N_FEATURES = 4
N_CLASSES = 3


def require_executable(env: str, default: Path, how: str) -> Path:
    """The executable named by ``env`` (or ``default``); skip, or fail in CI, without it."""
    named = os.environ.get(env)
    path = Path(named) if named else default
    if path.is_file() and os.access(path, os.X_OK):
        return path
    reason = f"{path} is not an executable ({env}); {how}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def mlserver_executable() -> Path:
    return require_executable(
        "GUARD_TEST_MLSERVER",
        DEFAULT_MLSERVER,
        "run .ci/mlserver-env and set GUARD_TEST_MLSERVER to the path it prints",
    )


# Run by the model server's own Python, so that the pickle matches its scikit-learn.
_TRAIN_IRIS = textwrap.dedent(
    """
    import sys
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(X, y), sys.argv[1])
    """
)


def train_iris(python: Path, out: Path) -> None:
    """Fit an iris LogisticRegression with ``python`` and save it to ``out`` (joblib)."""
    subprocess.run([str(python), "-c", _TRAIN_IRIS, str(out)], check=True, timeout=120)


class MLServer:
    """``mlserver start`` serving the iris classifier (``predict_proba``) on 127.0.0.1.

    The ports stay the same across :meth:`kill` and :meth:`start`, so a proxy in
    front of it finds it again after a restart.
    """

    def __init__(self, executable: Path, root: Path) -> None:
        self.executable = executable
        self.root = root
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log = root / "mlserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        model_dir = root / MODEL
        model_dir.mkdir(parents=True, exist_ok=True)
        train_iris(executable.parent / "python", model_dir / "model.joblib")
        settings = {
            "host": "127.0.0.1",
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            # no metrics server (and no port of its own to collide on)
            "metrics_endpoint": None,
            # MLServer's worker pool does not start under the current uvloop: infer in-process
            "parallel_workers": 0,
            "debug": False,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        model_settings = {
            "name": MODEL,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, N_FEATURES]}],
            "outputs": [{"name": "predict_proba", "datatype": "FP64", "shape": [-1, N_CLASSES]}],
            "parameters": {
                "uri": "./model.joblib",
                "version": "v1",
                # answer class probabilities unless the request names its outputs
                "extra": {"predict_fn": "predict_proba"},
            },
        }
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings))

    def start(self, timeout: float = 90.0) -> None:
        """Start the server and wait until the model is ready."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.executable), "start", str(self.root)],
                cwd=self.root,  # MLServer writes .metrics/ and .envs/ into its cwd
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlserver exited early:\n{self.output()}")
            try:
                ready = httpx.get(f"{self.url}/v2/models/{MODEL}/ready", timeout=1.0)
                if ready.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mlserver did not become ready:\n{self.output()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed or OOM-killed one does."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def mlserver(root: Path) -> Iterator[MLServer]:
    server = MLServer(mlserver_executable(), root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def kserve(tmp_path: Path, timeout: float = 90.0) -> Iterator[Server]:
    """KServe's Python model server with the iris model (tests/e2e/kserve_iris.py)."""
    python = require_executable(
        "GUARD_TEST_KSERVE_PYTHON",
        DEFAULT_KSERVE_PYTHON,
        "run .ci/kserve-env and set GUARD_TEST_KSERVE_PYTHON to the path it prints",
    )
    port = free_port()
    log = tmp_path / f"kserve-{port}.log"
    script = Path(__file__).with_name("kserve_iris.py")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(python), str(script), str(port)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(port, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"kserve exited early:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/v1/models/{MODEL}", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"kserve did not become ready:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def run_proxy(
    tmp_path: Path,
    upstream: str,
    *,
    config: dict[str, Any] | None = None,
    args: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> Iterator[Server]:
    """``guard proxy --upstream UPSTREAM`` as its own process on a free 127.0.0.1 port.

    ``config`` is written to a file for ``--config`` (JSON is YAML); ``None``
    runs the default policy. Ready once the guard's ``/metrics`` answers.
    """
    port = free_port()
    log = tmp_path / f"proxy-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "inference_guard.middleware.cli",
        "proxy",
        "--upstream",
        upstream,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]
    if config is not None:
        path = tmp_path / f"proxy-{port}.yaml"
        path.write_text(json.dumps(config))
        cmd += ["--config", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(port, proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"guard proxy exited early:\n{server.output()}")
            try:
                if httpx.get(server.url + "/metrics", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"guard proxy did not become ready:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
