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
from ._data import Recorded, digits
from ._http import Oracle, Refused

__all__ = ["DEFAULT_ROWS", "DEMO_ONLY", "NAMES", "NEEDS_ROWS", "Report", "simulate"]

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


#: clients that judge their success with the served model itself (evasion), or that only
#: make digits-shaped rows: against the demo model only
DEMO_ONLY: frozenset[str] = frozenset({"hopskipjump", "boundary", "knockoff-open-world"})
#: clients that need natural rows of the model's distribution (a reference)
NEEDS_ROWS: frozenset[str] = frozenset({"jbda", "knockoff-natural", "benign"})


def simulate(
    name: str,
    url: str,
    *,
    api_keys: Sequence[str] = ("simulate",),
    rows: int | None = None,
    seed: int = 0,
    inputs: int = 1,
    victim: Recorded | None = None,
) -> Report:
    """Run client ``name`` against ``url``; ``rows`` overrides its row budget.

    Without ``victim`` the target serves the demo's digits model; with one
    (:func:`._data.recorded`: any deployment, known from the owner's reference
    rows) the client queries ``victim.path`` and results are judged against the
    answers the reference recorded, where it recorded any.
    """
    if name not in NAMES:
        raise ValueError(f"unknown attack {name!r} (choose from {', '.join(NAMES)})")
    if victim is not None and name in DEMO_ONLY:
        raise ValueError(
            f"{name} runs against the demo's digits model only (it judges its success with "
            "the served model itself, or makes digits-shaped rows)"
        )
    if victim is not None and name in NEEDS_ROWS and victim.pool.shape[0] < 2:
        raise ValueError(f"{name} needs natural rows of the model's data: pass --reference")
    budget = DEFAULT_ROWS[name] if rows is None else rows
    if victim is None:
        oracle = Oracle(url, list(api_keys), reference=digits().predict_proba)
    else:
        oracle = Oracle(url, list(api_keys), path=victim.path)
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
            result = _benign(oracle, budget, seed, victim)
        else:
            ex = {
                "jbda": extraction.jbda,
                "knockoff-uniform": extraction.knockoff_uniform,
                "knockoff-natural": extraction.knockoff_natural,
                "knockoff-open-world": extraction.knockoff_open_world,
                "equation-solving": extraction.equation_solving,
            }[name](oracle, victim=victim, rows=budget, seed=seed)
            learnt = f"learnt from {ex.answered} answered rows"
            if victim is None:
                result = (
                    f"stolen model agrees with the demo model on {ex.agreement:.1%} of "
                    f"{digits().eval.shape[0]} held-out rows ({learnt})"
                )
            elif math.isnan(ex.agreement):
                result = (
                    f"stolen model's agreement not measured: the reference records no answers "
                    f"of the model (add labels or proba to the .npz) ({learnt})"
                )
            else:
                result = (
                    f"stolen model agrees with the answers the reference records on "
                    f"{ex.agreement:.1%} of {victim.eval.shape[0]} held-out reference rows "
                    f"({learnt})"
                )
            if ex.stopped:
                result += f"; {ex.stopped}"
    finally:
        oracle.close()
    return Report(name, oracle, result)


def _benign(oracle: Oracle, rows: int, seed: int, victim: Recorded | None = None) -> str:
    rng = np.random.default_rng(seed)
    pool = (victim or digits()).benign
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
