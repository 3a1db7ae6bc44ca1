"""The data every attack client shares: the victim model and the natural rows.

The victim is the demo's digits model (``middleware.demo.train_digits_model``,
seed 0), so the stolen models can be compared with the real one. Its 360
held-out rows (``X_test``, never used for training) are split in two halves by
a fixed seeded permutation:

* ``pool``: the attacker's natural data (JbDA seed rows, Knockoff-natural
  queries, inputs to evade);
* ``eval``: where a stolen model's agreement with the real one is measured,
  never queried by an attacker.

Benign clients replay all of ``X_test`` (``benign``): they train nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from middleware.demo import PIXEL_MAX, DigitsModel, train_digits_model

__all__ = ["HIGH", "LOW", "Digits", "agreement", "digits"]

LOW = 0.0
HIGH = float(PIXEL_MAX)


@dataclass(frozen=True, eq=False)
class Digits:
    """The victim and the row sets attacks and benign clients draw from."""

    model: DigitsModel
    #: the attacker's natural rows (half of the held-out rows)
    pool: NDArray[np.float64]
    #: the other half: agreement of stolen models is measured here
    eval: NDArray[np.float64]
    #: what benign clients replay (all held-out rows)
    benign: NDArray[np.float64]

    @property
    def eval_labels(self) -> NDArray[np.int64]:
        """The real model's answers on ``eval``."""
        return self.model.predict(self.eval)


@functools.cache
def digits() -> Digits:
    model = train_digits_model()
    order = np.random.default_rng(12345).permutation(model.X_test.shape[0])
    half = order.shape[0] // 2
    return Digits(
        model=model,
        pool=model.X_test[order[:half]],
        eval=model.X_test[order[half:]],
        benign=model.X_test,
    )


def agreement(predicted: NDArray[np.integer], data: Digits | None = None) -> float:
    """Share of ``eval`` rows on which a stolen model's labels equal the real model's."""
    data = data or digits()
    return float(np.mean(np.asarray(predicted) == data.eval_labels))
