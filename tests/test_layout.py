"""The shape the code keeps: the ASGI layer stays a translator.

The middleware turns ASGI into engine calls and back; these limits keep the
engine's work from creeping back into it. (Which way imports point is
``tests/test_import_graph.py``'s to check.)
"""

from __future__ import annotations

import inspect
from pathlib import Path

from inference_guard.middleware import asgi
from inference_guard.middleware.asgi import GuardMiddleware

#: the limits issue 11 set (GuardMiddleware.__call__ was 150 lines, middleware/asgi.py 930)
MAX_CALL_LINES = 40
MAX_ASGI_LINES = 350


def test_guard_middleware_call_stays_short() -> None:
    lines = inspect.getsource(GuardMiddleware.__call__).splitlines()
    assert len(lines) <= MAX_CALL_LINES, f"GuardMiddleware.__call__ has {len(lines)} lines"


def test_asgi_module_stays_short() -> None:
    path = Path(asgi.__file__)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_ASGI_LINES, f"{path.name} has {len(lines)} lines"
