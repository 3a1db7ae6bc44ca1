"""The shape the code keeps: imports point one way, and the ASGI layer stays a translator.

``middleware/ -> guard/ -> detectors/``: no module of ``guard/`` imports the
ASGI layer (``guard/__init__.py`` re-exports ``GuardMiddleware`` lazily, as the
package's face), and ``detectors/`` imports neither. The middleware turns ASGI
into engine calls and back; these limits keep the engine's work from creeping
back into it.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import middleware.asgi
from middleware.asgi import GuardMiddleware

ROOT = Path(__file__).resolve().parent.parent
#: the limits issue 11 set (GuardMiddleware.__call__ was 150 lines, middleware/asgi.py 930)
MAX_CALL_LINES = 40
MAX_ASGI_LINES = 350


def test_guard_middleware_call_stays_short() -> None:
    lines = inspect.getsource(GuardMiddleware.__call__).splitlines()
    assert len(lines) <= MAX_CALL_LINES, f"GuardMiddleware.__call__ has {len(lines)} lines"


def test_asgi_module_stays_short() -> None:
    path = Path(middleware.asgi.__file__)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_ASGI_LINES, f"{path.name} has {len(lines)} lines"


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function bodies and TYPE_CHECKING too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("guard", ("middleware",)), ("detectors", ("middleware", "guard"))],
)
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path == ROOT / "guard" / "__init__.py":
            continue  # the package face: GuardMiddleware, re-exported lazily
        for name in imported(path):
            if name.split(".")[0] in forbidden:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)
