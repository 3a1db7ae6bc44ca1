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

:func:`photo_patches` is the *open-world* attacker's natural data (Knockoff
Nets' main setting: natural images from another, public distribution): 8x8
patches of the two photos shipped with scikit-learn, turned into digits-like
rows. Loading the photos needs Pillow (the bench extra).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from middleware.demo import PIXEL_MAX, DigitsModel, train_digits_model

__all__ = ["HIGH", "LOW", "Digits", "agreement", "digits", "photo_patches"]

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
    #: indices of the ``eval`` rows in ``benign`` (``eval == benign[eval_index]``)
    eval_index: NDArray[np.int64]

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
        eval_index=order[half:].astype(np.int64),
    )


def agreement(predicted: NDArray[np.integer], data: Digits | None = None) -> float:
    """Share of ``eval`` rows on which a stolen model's labels equal the real model's."""
    data = data or digits()
    return float(np.mean(np.asarray(predicted) == data.eval_labels))


#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses)
_LUMA = np.array([0.299, 0.587, 0.114])
#: side of the victim's input images, in pixels
_SIDE = 8


@functools.cache
def _photos() -> tuple[NDArray[np.float64], ...]:
    """The scikit-learn sample photos (china.jpg, flower.jpg) in grayscale, 0..255."""
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.float64) @ _LUMA for im in load_sample_images().images)


def _area_matrix(size: int) -> NDArray[np.float64]:
    """``(8, size)`` weights: ``A @ patch @ A.T`` averages ``size``-px blocks to 8x8 by area.

    Output pixel ``i`` covers input span ``[i * size / 8, (i + 1) * size / 8)``;
    each input pixel weighs by how much of it falls inside (a box filter, exact
    also for sizes that are not multiples of 8).
    """
    edges = np.arange(_SIDE + 1) * size / _SIDE
    left = np.arange(size)
    overlap = np.minimum(edges[1:, None], left[None, :] + 1) - np.maximum(
        edges[:-1, None], left[None, :]
    )
    weights: NDArray[np.float64] = np.clip(overlap, 0.0, None) / (size / _SIDE)
    return weights


@functools.cache
def photo_patches(
    n: int,
    seed: int = 0,
    *,
    sizes: tuple[int, int] = (16, 128),
    blank: float = 0.5,
    min_contrast: float = 16.0,
) -> NDArray[np.float64]:
    """``n`` digits-like rows cut from natural photos: the open-world attacker's queries.

    Each row, as an attacker who knows only the victim's input format would make it:

    1. a square crop of a random side in ``sizes`` (pixels, inclusive) at a random
       place in one of the two photos, chosen at random;
    2. grayscale (BT.601 luma), averaged by area down to 8x8;
    3. inverted, since digits are dark ink on a light page stored as high = ink;
    4. contrast-stretched to 0..16: the patch's ``blank`` quantile maps to 0 and its
       darkest pixel to 16, clipped, because about half of a digit's pixels are blank
       page (0); ``blank=0`` is a plain min-max stretch;
    5. rounded to integers, as the digits data are.

    Crops whose 8x8 contrast (``max - blank quantile``) is under ``min_contrast``
    grey levels (flat sky, blur) are drawn again: stretching them would only
    amplify JPEG noise. Seeded and cached; the first ``k`` rows do not depend on
    ``n``. The result is read-only.
    """
    if n < 0 or not 0 <= blank < 1 or not _SIDE <= sizes[0] <= sizes[1]:
        raise ValueError(f"bad arguments: n={n}, sizes={sizes}, blank={blank}")
    photos = _photos()
    if sizes[1] > min(min(p.shape) for p in photos):
        raise ValueError(f"crop sizes {sizes} larger than the photos")
    rng = np.random.default_rng(seed)
    out = np.empty((n, _SIDE * _SIDE))
    made = tries = 0
    while made < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"too few crops reach min_contrast={min_contrast}")
        photo = photos[int(rng.integers(len(photos)))]
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        top = int(rng.integers(photo.shape[0] - size + 1))
        left = int(rng.integers(photo.shape[1] - size + 1))
        area = _area_matrix(size)
        ink = 255.0 - area @ photo[top : top + size, left : left + size] @ area.T
        lo, hi = float(np.quantile(ink, blank)), float(ink.max())
        if hi - lo < min_contrast:
            continue
        out[made] = np.rint(np.clip((ink - lo) / (hi - lo), 0.0, 1.0) * HIGH).ravel()
        made += 1
    out.flags.writeable = False
    return out
