"""The victims attack clients steal from or evade, and the natural rows they draw on.

A :class:`Victim` is a fitted classifier and the data split around it:

* ``X_train``: what the model (and ``guard calibrate``) was fitted on;
* the held-out rows (``benign``), never used for training, split in two halves
  by a fixed seeded permutation: ``pool``, the attacker's natural data (JbDA
  seed rows, Knockoff-natural queries, inputs to evade), and ``eval``, where a
  stolen model's agreement with the real one is measured (never queried by an
  attacker). Benign clients replay all of ``benign``: they train nothing;
* ``lo``/``hi``: the per-feature minimum and maximum of the training rows, the
  scale every attack parameter is expressed in (a JbDA step is a fraction of
  each feature's span, Knockoff-uniform draws from this box, evasion clients
  work in ``(x - lo) / span``), so no attack carries a digits constant.

:func:`victim` builds the benchmark's deployments by name from
:data:`DATASETS` (scikit-learn's bundled data sets: no download) and
:data:`FAMILIES` (a linear and a non-linear model family), on a seeded,
stratified 70/30 split. :func:`digits` is the ``guard demo`` model
(``middleware.demo.train_digits_model``), which ``guard simulate``'s clients
judge their results against.

:func:`photo_patches` is the *open-world* attacker's natural data for 8x8 digit
images (Knockoff Nets' main setting: natural images from another, public
distribution): patches of the two photos shipped with scikit-learn, turned into
digits-like rows. Loading the photos needs Pillow (the bench extra).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DATASETS",
    "FAMILIES",
    "Recorded",
    "Victim",
    "agreement",
    "digits",
    "photo_patches",
    "recorded",
    "victim",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Victim:
    """A served classifier and the row sets attacks and benign clients draw from."""

    #: ``<dataset>-<family>``; also the model name in the OIP v2 path
    name: str
    dataset: str
    family: str
    #: fitted estimator with ``predict_proba`` on raw rows (a scikit-learn pipeline)
    model: Any
    #: class labels in the column order of the probabilities
    classes: I64
    X_train: F64
    y_train: I64
    #: the attacker's natural rows (half of the held-out rows)
    pool: F64
    #: the other half: agreement of stolen models is measured here
    eval: F64
    #: what benign clients replay (all held-out rows)
    benign: F64
    #: indices of the ``eval`` rows in ``benign`` (``eval == benign[eval_index]``)
    eval_index: I64
    #: per-feature minimum of the training rows
    lo: F64
    #: per-feature maximum of the training rows
    hi: F64
    #: for a linear model, its class scores on raw rows ``X @ coef.T + intercept``
    linear: tuple[F64, F64] | None = None
    #: ``model.predict_proba`` in plain numpy on pre-extracted weights (checked equal at
    #: build time): the attacks ask for one row thousands of times
    fast: Callable[[F64], F64] | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def span(self) -> F64:
        """Per-feature training span, 1 where a feature never varies (it is kept fixed)."""
        s = self.hi - self.lo
        return np.where(s > 0, s, 1.0)

    @property
    def movable(self) -> NDArray[np.bool_]:
        """Features that vary in the training rows (an attacker leaves the others alone)."""
        return self.hi > self.lo

    @property
    def path(self) -> str:
        return f"/v2/models/{self.name}/infer"

    def predict_proba(self, X: F64) -> F64:
        if self.fast is not None:
            with np.errstate(all="ignore"):
                return self.fast(np.asarray(X, dtype=np.float64).reshape(-1, self.n_features))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            return np.asarray(self.model.predict_proba(np.asarray(X, dtype=np.float64)))

    def predict(self, X: F64) -> I64:
        return np.asarray(self.classes[np.argmax(self.predict_proba(X), axis=1)], dtype=np.int64)

    def normalize(self, X: F64) -> F64:
        """Rows in the attacker's unit box: ``(X - lo) / span``."""
        return np.asarray((np.asarray(X, dtype=np.float64) - self.lo) / self.span)

    def denormalize(self, Z: F64) -> F64:
        """Unit-box rows back to raw features; features that never vary stay at ``lo``."""
        X = self.lo + np.asarray(Z, dtype=np.float64) * self.span
        return np.asarray(np.where(self.movable, X, self.lo))

    def uniform(self, n: int, rng: np.random.Generator) -> F64:
        """``n`` rows drawn uniformly from the training box ``[lo, hi]``."""
        return np.asarray(rng.uniform(self.lo, self.hi, size=(n, self.n_features)))

    @functools.cached_property
    def eval_labels(self) -> I64:
        """The real model's answers on ``eval``."""
        return self.predict(self.eval)


@dataclass(frozen=True, eq=False)
class Recorded(Victim):
    """A deployment known only from the owner's reference rows (``guard simulate --reference``).

    The served model itself is not here: its answers on the ``eval`` rows are
    whatever the reference recorded (``labels`` or ``proba`` in the ``.npz``),
    or unknown. :func:`agreement` then measures a stolen model against those
    recorded answers, or gives NaN. ``predict`` and ``predict_proba`` raise:
    clients that judge success with the model itself (the evasion ones) do not
    run against it.
    """

    #: the served model's labels for ``eval`` (None: not recorded)
    recorded: I64 | None = None
    #: path of the OIP v2 infer route (``/v2/models/<name>/infer``)
    route: str = ""

    @property
    def path(self) -> str:
        return self.route or f"/v2/models/{self.name}/infer"

    def predict_proba(self, X: F64) -> F64:
        raise ValueError(
            f"the model served as {self.name!r} is not known here, only its reference rows"
        )

    @functools.cached_property
    def eval_labels(self) -> I64:
        if self.recorded is None:
            raise ValueError("the reference holds no recorded answers (labels or proba)")
        return self.recorded


def recorded(
    name: str,
    rows: F64 | None,
    *,
    n_features: int,
    answers: I64 | None = None,
    n_classes: int = 0,
    seed: int = 0,
) -> Recorded:
    """A :class:`Recorded` victim from reference ``rows`` (``None``: only the width is known).

    The rows are split like a benchmark deployment's held-out rows: a seeded
    permutation gives the attacker's ``pool`` (half) and ``eval`` (the other
    half); benign clients replay all of them. The box ``[lo, hi]`` is the rows'
    per-feature range; without rows it is ``[0, 1]`` in every feature (only the
    width came from the model's metadata), which is all the uniform clients
    need. ``answers`` are the model's labels on ``rows`` (recorded by the owner).
    """
    X = np.empty((0, n_features)) if rows is None else np.asarray(rows, dtype=np.float64)
    order = np.random.default_rng(12345 + seed).permutation(X.shape[0])
    half = order.shape[0] // 2
    lo = X.min(axis=0) if X.shape[0] else np.zeros(n_features)
    hi = X.max(axis=0) if X.shape[0] else np.ones(n_features)
    if answers is not None:
        classes = np.unique(np.asarray(answers, dtype=np.int64))
    else:
        classes = np.arange(n_classes, dtype=np.int64)
    return Recorded(
        name=name,
        dataset="reference",
        family="unknown",
        model=None,
        classes=classes,
        X_train=X,
        y_train=np.empty(0, dtype=np.int64),
        pool=X[order[:half]],
        eval=X[order[half:]],
        benign=X,
        eval_index=order[half:].astype(np.int64),
        lo=lo,
        hi=hi,
        recorded=None if answers is None else np.asarray(answers, dtype=np.int64)[order[half:]],
    )


def agreement(predicted: NDArray[np.integer], data: Victim | None = None) -> float:
    """Share of ``eval`` rows on which a stolen model's labels equal the real model's.

    NaN when the real model's answers are not known (a :class:`Recorded` victim
    whose reference recorded none, or one without rows).
    """
    data = data or digits()
    if isinstance(data, Recorded) and (data.recorded is None or data.eval.shape[0] == 0):
        return math.nan
    return float(np.mean(np.asarray(predicted) == data.eval_labels))


# --------------------------------------------------------------------------- registry


def _load(name: str) -> Callable[[], tuple[F64, I64]]:
    def load() -> tuple[F64, I64]:
        import sklearn.datasets

        X, y = getattr(sklearn.datasets, name)(return_X_y=True)
        return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)

    return load


#: the benchmark's data sets: scikit-learn's bundled ones, of different shapes and scales
DATASETS: dict[str, Callable[[], tuple[F64, I64]]] = {
    "digits": _load("load_digits"),  # 1797 x 64, 0..16, 10 classes
    "wine": _load("load_wine"),  # 178 x 13, ~0.1..1680, 3 classes
    "breast_cancer": _load("load_breast_cancer"),  # 569 x 30, ~0..4250, 2 classes
}


def _linear(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def _mlp(seed: int) -> Any:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=800, random_state=seed),
    )


#: the model families: every data set is served with each
FAMILIES: dict[str, Callable[[int], Any]] = {"linear": _linear, "mlp": _mlp}


def _softmax(z: F64) -> F64:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _fast(model: Any, linear: tuple[F64, F64] | None) -> Callable[[F64], F64] | None:
    """Plain-numpy ``predict_proba`` for the two families (None: use the estimator)."""
    if linear is not None:
        coef, intercept = linear
        coef_t = np.ascontiguousarray(coef.T)
        return lambda X: _softmax(X @ coef_t + intercept)
    steps = getattr(model, "steps", None)
    mlp = steps[-1][1] if steps else None
    if mlp is None or not hasattr(mlp, "coefs_") or mlp.activation != "relu" or len(steps) != 2:
        return None
    mean, scale = steps[0][1].mean_, steps[0][1].scale_
    (w1, w2), (b1, b2) = mlp.coefs_, mlp.intercepts_
    binary = w2.shape[1] == 1

    def proba(X: F64) -> F64:
        h = np.maximum((X - mean) / scale @ w1 + b1, 0.0)
        z = h @ w2 + b2
        if binary:
            p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.column_stack([1.0 - p1, p1])
        return _softmax(z)

    return proba


def _raw_linear(model: Any) -> tuple[F64, F64] | None:
    """Class scores on raw rows for a StandardScaler + LogisticRegression pipeline."""
    steps = getattr(model, "steps", None)
    if not steps or len(steps) != 2 or not hasattr(steps[-1][1], "coef_"):
        return None
    scaler, lr = steps[0][1], steps[1][1]
    coef = np.asarray(lr.coef_, dtype=np.float64) / scaler.scale_
    intercept = np.asarray(lr.intercept_, dtype=np.float64) - coef @ scaler.mean_
    if coef.shape[0] == 1:  # binary: p_1 = sigmoid(z), i.e. softmax of (0, z)
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    return coef, intercept


@functools.cache
def victim(dataset: str, family: str, seed: int = 0) -> Victim:
    """The deployment ``<dataset>-<family>``: model fitted on a seeded stratified 70/30 split."""
    from sklearn.model_selection import train_test_split

    if dataset not in DATASETS or family not in FAMILIES:
        raise ValueError(f"unknown deployment {dataset}-{family}")
    X, y = DATASETS[dataset]()
    X_tr, X_te, y_tr, _ = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    model = FAMILIES[family](seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP convergence on the small sets
        model.fit(X_tr, y_tr)
    return _split(
        f"{dataset}-{family}",
        dataset,
        family,
        model,
        np.asarray(model.classes_, dtype=np.int64),
        (X_tr, y_tr, X_te),
        seed,
        _raw_linear(model),
    )


def _split(
    name: str,
    dataset: str,
    family: str,
    model: Any,
    classes: I64,
    data: tuple[F64, I64, F64],
    seed: int,
    linear: tuple[F64, F64] | None,
) -> Victim:
    X_train, y_train, held_out = data
    fast = _fast(model, linear)
    if fast is not None:
        check = np.vstack([X_train[:50], held_out])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = model.predict_proba(check)
        if not np.allclose(fast(check), want, rtol=1e-6, atol=1e-9):
            fast = None
    order = np.random.default_rng(12345 + seed).permutation(held_out.shape[0])
    half = order.shape[0] // 2
    return Victim(
        name=name,
        dataset=dataset,
        family=family,
        model=model,
        classes=classes,
        X_train=X_train,
        y_train=np.asarray(y_train, dtype=np.int64),
        pool=held_out[order[:half]],
        eval=held_out[order[half:]],
        benign=held_out,
        eval_index=order[half:].astype(np.int64),
        lo=X_train.min(axis=0),
        hi=X_train.max(axis=0),
        linear=linear,
        fast=fast,
    )


@functools.cache
def digits() -> Victim:
    """The ``guard demo`` digits model (its own 80/20 split); what ``guard simulate`` judges by.

    Its box is the pixel range 0..16 for every feature, as the demo documents it.
    """
    from inference_guard.middleware.demo import PIXEL_MAX, train_digits_model

    m = train_digits_model()
    v = _split(
        "digits",
        "digits",
        "linear",
        m,
        m.classes,
        (m.X_train, m.y_train, m.X_test),
        0,
        (m.coef, m.intercept),
    )
    d = m.X_train.shape[1]
    return dataclasses.replace(v, lo=np.zeros(d), hi=np.full(d, float(PIXEL_MAX)))


# --------------------------------------------------------------------------- photo patches

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses)
_LUMA = np.array([0.299, 0.587, 0.114])
#: side of the digit images, in pixels
_SIDE = 8
#: the digits' largest pixel intensity
HIGH = 16.0


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
