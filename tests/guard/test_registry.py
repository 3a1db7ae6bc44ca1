"""The detector registry: one explicit table of built-ins, run-time registration on top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import inference_guard.guard.registry as registry
from inference_guard.detectors.base import Detector, DetectorResult, Query
from inference_guard.guard.builtin_detectors import BUILTIN_DETECTORS
from inference_guard.guard.config import DetectorSpec
from inference_guard.guard.errors import ConfigurationError
from inference_guard.guard.registry import (
    BuildContext,
    build_detector,
    register_detector,
    registered,
)
from inference_guard.guard.stores.memory import MemoryStore

GUARD = Path(registry.__file__).parent
BUILTIN_TYPES = {
    "rate",
    "envelope",
    "mahalanobis",
    "iforest",
    "knn",
    "text",
    "anomaly_rate",
    "prada",
    "near_duplicate",
    "boundary",
}


class Quiet(Detector):
    async def inspect(self, query: Query) -> DetectorResult:
        return DetectorResult.ok(self.name)


def quiet(spec: DetectorSpec, ctx: BuildContext) -> Detector:
    return Quiet(spec.name)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run-time registrations made by the test are forgotten after it."""
    monkeypatch.setattr(registry, "_FACTORIES", {})


def test_the_table_lists_every_built_in_detector() -> None:
    assert set(BUILTIN_DETECTORS) == BUILTIN_TYPES
    assert set(registered()) >= BUILTIN_TYPES


@pytest.mark.usefixtures("fresh")
def test_third_parties_register_beside_the_built_ins() -> None:
    register_detector("quiet", quiet)
    assert "quiet" in registered()
    built = build_detector(DetectorSpec(type="quiet", name="q"), BuildContext(store=MemoryStore()))
    assert isinstance(built, Quiet)
    with pytest.raises(ValueError, match="already registered"):
        register_detector("quiet", quiet)


@pytest.mark.usefixtures("fresh")
def test_a_built_in_is_replaced_only_when_asked() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_detector("rate", quiet)
    register_detector("rate", quiet, replace=True)
    spec = DetectorSpec(type="rate", name="r")
    assert isinstance(build_detector(spec, BuildContext(store=MemoryStore())), Quiet)


def test_an_unknown_type_names_the_known_ones() -> None:
    spec = DetectorSpec(type="nope", name="n", key="policies[0].detectors[0]")
    with pytest.raises(ConfigurationError) as info:
        build_detector(spec, BuildContext(store=MemoryStore()))
    assert info.value.key == "policies[0].detectors[0].type"
    assert "rate" in info.value.problem and "boundary" in info.value.problem


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


#: the modules that define the built-in factories, read from the table itself
FACTORY_MODULES = sorted({factory.__module__ for factory in BUILTIN_DETECTORS.values()})


def test_the_factory_modules_are_the_three_families() -> None:
    assert FACTORY_MODULES == [
        "inference_guard.guard.anomaly_factories",
        "inference_guard.guard.extraction_factories",
        "inference_guard.guard.rate_factories",
    ]


@pytest.mark.parametrize(
    "module",
    ["inference_guard.guard.builtin_detectors", "inference_guard.guard.factory", *FACTORY_MODULES],
)
def test_nothing_the_registry_lists_imports_the_registry(module: str) -> None:
    # registry -> builtin_detectors -> *_factories must not lead back to registry
    path = GUARD / f"{module.removeprefix('inference_guard.guard.')}.py"
    assert "inference_guard.guard.registry" not in _imports(path)
