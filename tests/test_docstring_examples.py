"""Every example in the shipped docstrings runs, as a user would type it.

The examples import from ``inference_guard.*``, the one import root a user
has (``guard``, ``detectors`` and ``middleware`` are folders of this
repository, not packages of the install). Run as doctests, one test per
module holding examples.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from types import ModuleType

import pytest

import inference_guard.detectors
import inference_guard.guard
import inference_guard.middleware

_PACKAGES = (inference_guard.guard, inference_guard.detectors, inference_guard.middleware)


def _modules() -> list[str]:
    names: list[str] = []
    for package in _PACKAGES:
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            names.append(info.name)
    return sorted(names)


def _with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    return [
        name
        for name in _modules()
        if any(t.examples for t in finder.find(importlib.import_module(name)))
    ]


MODULES = _with_examples()


def test_the_examples_are_found() -> None:
    # the modules known to carry examples: a finder that sees none would pass vacuously
    for name in ("inference_guard.detectors.rate", "inference_guard.guard.payload.degrade"):
        assert name in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module: ModuleType = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
