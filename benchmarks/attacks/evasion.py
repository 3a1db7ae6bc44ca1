"""Query-based evasion clients: ART's HopSkipJump and Boundary attacks over HTTP.

Both are decision-based (they read only the predicted label) and untargeted:
for each input they look for a nearby row the model labels differently. They
are the adversarial-robustness-toolbox implementations
(``art.attacks.evasion.HopSkipJump``, ``BoundaryAttack``) run on an
``art.estimators.classification.BlackBoxClassifier`` whose predict function
is an HTTP call to the deployment (clip values (0, 16), input shape (64,), 10
classes). ART is imported lazily: only these two clients need it.

Reproducibility. ART draws its starting point with an unseeded
``np.random.RandomState()``, so the client finds it itself, seeded: uniform
noise images until one is labelled differently, then a 10-step binary search
on the blend between the input and that image (foolbox's
``LinearSearchBlendedUniformNoiseAttack``), passed as ``x_adv_init``. The
global numpy RNG, which ART uses for its random directions, is seeded per
input. Against a bare model the runs are then deterministic; against a guard
that adds noise to its answers they are not (the guard's noise is unseeded
on purpose).

Success is judged on the *real* model, offline: the returned row is
misclassified (its label differs from the input's) and its L2 distance from
the input is at most ``max_ratio`` (3) times the smallest distance that can
change that input's label at all. The victim is linear, so that smallest
distance is exact (:func:`min_adversarial_l2`: for each other class, the
box-constrained projection onto its half-space). Against the bare model both
clients stay within 2.5 times it on every input we tried; their noisy,
binary-searched starting points are 3 to 12 times it. A client that gets refused (403 after a
quarantine) or exhausts ``cap`` rows on one input keeps the closest row it had
*seen* labelled differently, as a real attacker would.
"""

from __future__ import annotations

import logging
import math
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from middleware.demo import DigitsModel

from ._data import HIGH, LOW, digits
from ._http import Oracle, Refused

__all__ = [
    "MAX_RATIO",
    "EvasionResult",
    "InputResult",
    "boundary",
    "hopskipjump",
    "min_adversarial_l2",
    "require_art",
]

F64 = NDArray[np.float64]
#: a misclassified row counts as a success within this many times the smallest possible L2
MAX_RATIO = 3.0


class MissingART(RuntimeError):
    """adversarial-robustness-toolbox is not installed."""


def require_art() -> Any:
    """The ``art`` package, or :class:`MissingART` with the install hint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "PyTorch not found" and friends
            import art.attacks.evasion
            import art.estimators.classification
        # ART logs every starting point it finds at INFO; the clients report for themselves
        logging.getLogger("art").setLevel(logging.WARNING)
    except ImportError as exc:
        raise MissingART(
            "the hopskipjump and boundary clients need adversarial-robustness-toolbox: "
            "pip install -e '.[bench]'"
        ) from exc
    return art


@dataclass(frozen=True, slots=True)
class InputResult:
    """One attacked input."""

    #: rows spent on this input
    rows: int
    #: L2 distance of the returned row from the input (0 when nothing was found)
    l2: float
    #: the real model labels the returned row differently from the input
    misclassified: bool
    #: the smallest L2 perturbation that changes the input's label (exact, linear victim)
    opt: float
    #: why the attack on this input stopped early, or None
    stopped: str | None = None


@dataclass(frozen=True, slots=True)
class EvasionResult:
    """An evasion client's inputs and the success criterion."""

    inputs: tuple[InputResult, ...]
    #: a success is misclassified within ``max_ratio`` times the smallest possible L2
    max_ratio: float = MAX_RATIO

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.inputs)

    @property
    def success_rate(self) -> float:
        """Share of inputs with a misclassified row within ``max_ratio`` x the smallest L2."""
        if not self.inputs:
            return 0.0
        ok = [r.misclassified and r.l2 <= self.max_ratio * r.opt for r in self.inputs]
        return sum(ok) / len(self.inputs)

    @property
    def misclassified_rate(self) -> float:
        """Share of inputs with a misclassified row at any distance."""
        if not self.inputs:
            return 0.0
        return sum(r.misclassified for r in self.inputs) / len(self.inputs)

    @property
    def median_l2(self) -> float:
        """Median L2 of the misclassified rows (NaN when there are none)."""
        values = [r.l2 for r in self.inputs if r.misclassified]
        return statistics.median(values) if values else math.nan

    @property
    def median_ratio(self) -> float:
        """Median of L2 / smallest possible L2 over the misclassified rows (NaN if none)."""
        values = [r.l2 / r.opt for r in self.inputs if r.misclassified and r.opt > 0]
        return statistics.median(values) if values else math.nan


def min_adversarial_l2(model: DigitsModel, x: F64) -> float:
    """The smallest L2 change of ``x`` within [0, 16]^64 that changes the model's label.

    For a linear model the set of rows labelled ``k`` rather than ``y`` is the
    half-space ``a . x' + c >= 0`` (``a = w_k - w_y``); the closest point to
    ``x`` in it and in the box is ``clip(x + lam * a)`` for the smallest ``lam >= 0``
    that satisfies the constraint (the KKT conditions of this projection), found
    by bisection. The minimum over ``k`` is the answer (ties on the boundary
    aside); ``inf`` if no class is reachable.
    """
    z = model.decision_function(x[None])[0]
    y = int(np.argmax(z))
    best = math.inf
    for k in range(z.shape[0]):
        if k == y:
            continue
        a = model.coef[k] - model.coef[y]
        c = float(z[k] - z[y])

        def gap(lam: float, a: F64 = a, c: float = c) -> float:
            return float(a @ (np.clip(x + lam * a, LOW, HIGH) - x)) + c

        hi = 1.0
        while gap(hi) < 0 and hi < 1e9:
            hi *= 2
        if gap(hi) < 0:
            continue
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if gap(mid) >= 0:
                hi = mid
            else:
                lo = mid
        best = min(best, float(np.linalg.norm(np.clip(x + hi * a, LOW, HIGH) - x)))
    return best


class _OutOfBudget(Exception):
    pass


class _Probe:
    """ART's predict function: one HTTP request per call, per-input row cap, best row seen."""

    def __init__(self, oracle: Oracle, cap: int) -> None:
        self.oracle = oracle
        self.cap = cap
        self.begin(np.zeros(64))

    def begin(self, x0: F64) -> None:
        """A new input: its row count starts now; its label is not known yet."""
        self.x0 = x0
        self.y0 = -1
        self.start = self.oracle.rows
        self.best: F64 | None = None
        self.best_l2 = math.inf

    @property
    def used(self) -> int:
        return self.oracle.rows - self.start

    def labels(self, X: F64) -> NDArray[np.int64]:
        return np.argmax(self(X), axis=1)

    def __call__(self, X: NDArray[np.floating]) -> NDArray[np.float32]:
        if self.used >= self.cap:
            raise _OutOfBudget
        X = np.asarray(X, dtype=np.float64).reshape(-1, 64)
        labels, probs = self.oracle.query(X)
        adv = np.flatnonzero(labels != self.y0)
        if adv.size and self.y0 >= 0:
            d = np.linalg.norm(X[adv] - self.x0, axis=1)
            j = int(np.argmin(d))
            if d[j] < self.best_l2:
                self.best_l2 = float(d[j])
                self.best = X[adv[j]].copy()
        return probs.astype(np.float32)


def _start_point(probe: _Probe, x0: F64, y0: int, rng: np.random.Generator) -> F64 | None:
    """Uniform noise labelled differently, pulled towards ``x0`` by a blend binary search."""
    for _ in range(50):
        noise = rng.uniform(LOW, HIGH, size=x0.shape)
        if probe.labels(noise[None])[0] != y0:
            break
    else:
        return None
    lo, hi = 0.0, 1.0  # blend (1 - a) x0 + a noise: a = hi is labelled differently
    for _ in range(10):
        mid = (lo + hi) / 2
        if probe.labels(((1 - mid) * x0 + mid * noise)[None])[0] != y0:
            hi = mid
        else:
            lo = mid
    return np.asarray((1 - hi) * x0 + hi * noise, dtype=np.float64)


def _run(
    oracle: Oracle,
    make_attack: Callable[[Any], Any],
    *,
    n_inputs: int,
    seed: int,
    cap: int,
    max_ratio: float,
) -> EvasionResult:
    art = require_art()
    data = digits()
    rng = np.random.default_rng(seed)
    inputs = data.pool[rng.choice(data.pool.shape[0], size=n_inputs, replace=False)]
    real = data.model
    probe = _Probe(oracle, cap)
    clf = art.estimators.classification.BlackBoxClassifier(
        probe, input_shape=(64,), nb_classes=10, clip_values=(LOW, HIGH)
    )
    attack = make_attack(clf)
    out: list[InputResult] = []
    for i, x0 in enumerate(inputs):
        y_real = int(real.predict(x0[None])[0])
        probe.begin(x0)
        stopped: str | None = None
        x_adv: F64 | None = None
        try:
            y0 = probe.y0 = int(probe.labels(x0[None])[0])  # the attacker's view of its label
            init = _start_point(probe, x0, y0, rng)
            if init is not None:
                np.random.seed((seed * 1_000_003 + i) % 2**32)  # ART's own random directions
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = attack.generate(
                        x=x0[None].astype(np.float32), x_adv_init=init[None].astype(np.float32)
                    )
                x_adv = np.asarray(res[0], dtype=np.float64)
            else:
                stopped = "no starting point"
        except Refused as exc:
            stopped = f"refused ({exc.status})"
        except _OutOfBudget:
            stopped = f"row cap {cap}"
        if x_adv is None:
            x_adv = probe.best if probe.best is not None else x0
        l2 = float(np.linalg.norm(x_adv - x0))
        mis = int(real.predict(x_adv[None])[0]) != y_real
        opt = min_adversarial_l2(real, x0)
        out.append(InputResult(probe.used, l2, mis, opt, stopped))
    return EvasionResult(tuple(out), max_ratio)


def hopskipjump(
    oracle: Oracle,
    *,
    n_inputs: int = 5,
    seed: int = 0,
    max_iter: int = 40,
    max_eval: int = 100,
    init_eval: int = 10,
    cap: int = 4000,
    max_ratio: float = MAX_RATIO,
) -> EvasionResult:
    """ART's HopSkipJump (Chen, Jordan, Wainwright 2020), untargeted, L2.

    The defaults spend about 2 150 rows per input against the bare model.
    """

    def make(clf: Any) -> Any:
        art = require_art()
        return art.attacks.evasion.HopSkipJump(
            clf,
            targeted=False,
            norm=2,
            max_iter=max_iter,
            max_eval=max_eval,
            init_eval=init_eval,
            batch_size=64,
            verbose=False,
        )

    return _run(oracle, make, n_inputs=n_inputs, seed=seed, cap=cap, max_ratio=max_ratio)


def boundary(
    oracle: Oracle,
    *,
    n_inputs: int = 5,
    seed: int = 0,
    max_iter: int = 60,
    num_trial: int = 10,
    sample_size: int = 20,
    delta: float = 0.1,
    epsilon: float = 0.1,
    cap: int = 4000,
    max_ratio: float = MAX_RATIO,
) -> EvasionResult:
    """ART's Boundary attack (Brendel, Rauber, Bethge 2018), untargeted.

    The defaults spend about 1 750 rows per input against the bare model.
    """

    def make(clf: Any) -> Any:
        art = require_art()
        return art.attacks.evasion.BoundaryAttack(
            clf,
            targeted=False,
            delta=delta,
            epsilon=epsilon,
            max_iter=max_iter,
            num_trial=num_trial,
            sample_size=sample_size,
            batch_size=64,
            verbose=False,
        )

    return _run(oracle, make, n_inputs=n_inputs, seed=seed, cap=cap, max_ratio=max_ratio)
