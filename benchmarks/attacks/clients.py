"""One entry point per client, by name: what ``guard simulate`` and the benchmark call.

:func:`simulate` runs one client against a deployment and returns a
:class:`Report`: the oracle (every request it sent, with statuses) and a line
saying what the attacker achieved. Agreement and evasion success are measured
against the demo's digits model, so they mean something only when the target
serves that model.

``knockoff-natural`` queries held-out rows of the victim's own distribution
(closed world); ``knockoff-open-world`` queries 8x8 patches of natural photos,
data from another distribution, and needs Pillow to load them (bench extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import extraction
from ._data import digits
from ._http import Oracle, Refused

__all__ = ["DEFAULT_ROWS", "NAMES", "Report", "simulate"]

#: the clients, in the order the benchmark reports them
NAMES: tuple[str, ...] = (
    "jbda",
    "knockoff-uniform",
    "knockoff-natural",
    "knockoff-open-world",
    "equation-solving",
    "hopskipjump",
    "boundary",
    "benign",
)

#: rows each client sends by default (evasion clients: the cap per attacked input)
DEFAULT_ROWS: dict[str, int] = {
    "jbda": 640,
    "knockoff-uniform": 1000,
    "knockoff-natural": 180,
    "knockoff-open-world": 1000,
    "equation-solving": 130,
    "hopskipjump": 4000,
    "boundary": 4000,
    "benign": 100,
}


@dataclass
class Report:
    """What one client did and achieved."""

    attack: str
    oracle: Oracle
    #: one line: the attacker's result (agreement, evasion success, ...)
    result: str


def simulate(
    name: str,
    url: str,
    *,
    api_keys: Sequence[str] = ("simulate",),
    rows: int | None = None,
    seed: int = 0,
    inputs: int = 1,
) -> Report:
    """Run client ``name`` against ``url``; ``rows`` overrides its row budget."""
    if name not in NAMES:
        raise ValueError(f"unknown attack {name!r} (choose from {', '.join(NAMES)})")
    budget = DEFAULT_ROWS[name] if rows is None else rows
    oracle = Oracle(url, list(api_keys), reference=digits().predict_proba)
    try:
        if name in ("hopskipjump", "boundary"):
            from . import evasion

            fn = evasion.hopskipjump if name == "hopskipjump" else evasion.boundary
            ev = fn(oracle, n_inputs=inputs, seed=seed, cap=budget)
            med = "n/a" if math.isnan(ev.median_l2) else f"{ev.median_l2:.2f}"
            stops = sorted({r.stopped for r in ev.inputs if r.stopped})
            result = (
                f"evasion succeeded on {round(ev.success_rate * len(ev.inputs))} of "
                f"{len(ev.inputs)} inputs (misclassified within {ev.max_ratio:g}x the smallest "
                f"possible L2); median L2 of misclassified rows {med}"
                + (f"; stopped: {', '.join(stops)}" if stops else "")
            )
        elif name == "benign":
            result = _benign(oracle, budget, seed)
        else:
            ex = {
                "jbda": extraction.jbda,
                "knockoff-uniform": extraction.knockoff_uniform,
                "knockoff-natural": extraction.knockoff_natural,
                "knockoff-open-world": extraction.knockoff_open_world,
                "equation-solving": extraction.equation_solving,
            }[name](oracle, rows=budget, seed=seed)
            result = (
                f"stolen model agrees with the demo model on {ex.agreement:.1%} of "
                f"{digits().eval.shape[0]} held-out rows (learnt from {ex.answered} answered rows)"
                + (f"; {ex.stopped}" if ex.stopped else "")
            )
    finally:
        oracle.close()
    return Report(name, oracle, result)


def _benign(oracle: Oracle, rows: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pool = digits().benign
    order = rng.permutation(pool.shape[0])
    sent = 0
    try:
        while sent < rows:
            n = min(int(rng.integers(1, 33)), rows - sent)
            oracle.query(pool[order[np.arange(sent, sent + n) % pool.shape[0]]])
            sent += n
    except Refused as exc:
        return f"refused ({exc.status}) after {exc.rows_sent} rows"
    return f"{sent} natural held-out rows answered"
