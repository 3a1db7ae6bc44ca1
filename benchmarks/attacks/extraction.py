"""Model-extraction clients: JbDA, Knockoff (uniform, natural, open world), equation solving.

Each client steals a victim (``_data.Victim``; by default the demo's digits
model) through an :class:`~._http.Oracle` with at most ``rows`` query rows,
then reports its stolen model's agreement with the real one on rows it never
queried (``Victim.eval``). Every parameter is relative to the victim's scale:
the input box is the training rows' per-feature ``[lo, hi]``, JbDA's step is a
fraction of each feature's span, and substitutes learn on ``(x - lo) / span``. A client that gets
refused (403 after a quarantine, 429, ...) stops querying and trains on what it
already has, as a real attacker would.

* :func:`jbda`: Papernot et al., *Practical Black-Box Attacks against Machine
  Learning* (2017): a few natural seed rows, a local substitute (multinomial
  logistic regression), then rounds of Jacobian-based dataset augmentation
  ``x + lambda * sign(grad_x p_label(x))`` on the substitute (analytic for a
  linear softmax model), each new row labelled by the oracle; ``lambda`` (a
  fraction of each feature's span) flips sign every ``tau`` rounds as in the paper.
* :func:`knockoff_uniform` / :func:`knockoff_natural` /
  :func:`knockoff_open_world`: Orekondy et al., *Knockoff Nets* (2019), random
  strategy: query rows drawn uniformly from the training box; natural rows of the
  victim's own distribution it was not trained on (a *closed-world* attacker,
  who holds held-out data like the victim's: benign clients send the same
  rows); or, the paper's main setting, natural images from another, public
  distribution (*open world*: 8x8 patches of photos, ``_data.photo_patches``).
  Each fits a substitute on the answers' labels (:func:`substitute_agreement`).
* :func:`equation_solving`: Tramer et al., *Stealing Machine Learning Models
  via Prediction APIs* (2016). For a multinomial logistic model,
  ``log(p_k / p_r) = (w_k - w_r) . x + (b_k - b_r)`` is linear in ``x``: with a
  few more than ``d + 1`` random rows, least squares on the log-ratios recovers
  ``W`` and ``b`` (up to the softmax's shift). Rounded probabilities lose the
  small ones (0 has no logarithm) and blur the rest, which is what the guard's
  ``degrade: decimals`` trades on. Against a non-linear victim the same
  client fits the best softmax-linear model to the answers: its agreement is
  reported, its parameter error is not (there are no true parameters).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression

from ._data import Victim, agreement, digits, photo_patches
from ._http import Oracle, Refused

__all__ = [
    "ExtractionResult",
    "equation_solving",
    "jbda",
    "knockoff_natural",
    "knockoff_open_world",
    "knockoff_uniform",
    "solve_softmax",
    "substitute_agreement",
]

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ExtractionResult:
    """What an extraction client achieved."""

    #: share of held-out eval rows where the stolen model agrees with the real one
    agreement: float
    #: rows the client sent (refused requests included)
    rows: int
    #: rows that came back with an answer (what the substitute learnt from)
    answered: int
    #: why it stopped early, or None
    stopped: str | None = None
    #: equation solving only: relative error of the recovered parameters (Frobenius norm)
    param_error: float | None = None


class _Substitute:
    """A multinomial logistic regression on rows scaled to the victim's unit box."""

    def __init__(self, X: F64, y: I64, v: Victim) -> None:
        self.v = v
        self.classes = np.unique(y)
        self.model: LogisticRegression | None = None
        if self.classes.shape[0] >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.model = LogisticRegression(max_iter=1000).fit(v.normalize(X), y)

    def predict(self, X: F64) -> I64:
        if self.model is None:
            return np.full(X.shape[0], self.classes[0] if self.classes.size else 0, dtype=np.int64)
        return np.asarray(self.model.predict(self.v.normalize(X)), dtype=np.int64)

    def grad_sign(self, X: F64, y: I64) -> F64:
        """``sign(d p_y / d x)`` per row, for the substitute's probability of label ``y``."""
        if self.model is None:
            return np.zeros_like(X)
        W = np.asarray(self.model.coef_, dtype=np.float64)
        if W.shape[0] == 1:  # binary: p_1 = sigmoid(w.x + b), d p_0 = -d p_1
            sign = np.where(y == self.classes[1], 1.0, -1.0)[:, None]
            return np.asarray(np.sign(sign * W[0][None, :]), dtype=np.float64)
        P = self.model.predict_proba(self.v.normalize(X))
        idx = np.searchsorted(self.classes, y)
        # d p_y / d z = p_y (w_y - sum_j p_j w_j); the positive factor p_y leaves the sign
        # alone, and so does the positive span between z and x
        grad = W[idx] - P @ W
        return np.asarray(np.sign(grad), dtype=np.float64)


def _labels(oracle: Oracle, X: F64, batch: int) -> tuple[I64, str | None]:
    """Oracle labels for ``X`` in ``batch``-row requests; stops at the first refusal."""
    got: list[I64] = []
    for i in range(0, X.shape[0], batch):
        try:
            got.append(oracle.query(X[i : i + batch])[0])
        except Refused as exc:
            return _cat(got), f"refused ({exc.status}) after {exc.rows_sent} rows"
    return _cat(got), None


def _cat(parts: list[I64]) -> I64:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def jbda(
    oracle: Oracle,
    *,
    victim: Victim | None = None,
    rows: int = 640,
    seed: int = 0,
    n_seed: int = 20,
    lam: float = 0.25,
    tau: int = 3,
    batch: int = 32,
) -> ExtractionResult:
    """Jacobian-based dataset augmentation (Papernot et al.), at most ``rows`` query rows.

    ``n_seed`` natural rows, then rounds that each double the set (20, 40, ...,
    640 rows after 5 rounds). ``lam`` is the step as a fraction of each feature's
    training span: the paper's 0.1 on 0..1 pixels is 0.1; on the digits 0.25 gave
    the best substitutes (agreement about 0.75 after 640 rows, against 0.6 with 0.1).
    """
    rng = np.random.default_rng(seed)
    data = victim or digits()
    start = oracle.rows
    S = data.pool[rng.choice(data.pool.shape[0], size=min(n_seed, rows), replace=False)]
    y, stopped = _labels(oracle, S, batch)
    S = S[: y.shape[0]]
    rnd = 0
    while stopped is None and oracle.rows - start < rows and S.shape[0] > 0:
        sub = _Substitute(S, y, data)
        budget = rows - (oracle.rows - start)
        pick = rng.permutation(S.shape[0])[: min(S.shape[0], budget)]
        step = lam * (-1.0) ** (rnd // tau) * data.span * data.movable
        new = np.clip(S[pick] + step * sub.grad_sign(S[pick], y[pick]), data.lo, data.hi)
        y_new, stopped = _labels(oracle, new, batch)
        S = np.vstack([S, new[: y_new.shape[0]]])
        y = np.concatenate([y, y_new])
        rnd += 1
    stolen = _Substitute(S, y, data) if S.shape[0] else None
    return ExtractionResult(
        agreement=agreement(stolen.predict(data.eval), data) if stolen else 0.0,
        rows=oracle.rows - start,
        answered=int(y.shape[0]),
        stopped=stopped,
    )


def substitute_agreement(X: F64, y: I64, victim: Victim | None = None) -> float:
    """Agreement on ``eval`` of the substitute a Knockoff attacker fits on rows ``X``, labels ``y``.

    Also what any client that holds answers (a benign one included) could learn from them.
    """
    data = victim or digits()
    pred = (
        _Substitute(X, y, data).predict(data.eval)
        if y.shape[0]
        else np.zeros(data.eval.shape[0], dtype=np.int64)
    )
    return agreement(pred, data)


def _knockoff(oracle: Oracle, X: F64, batch: int, victim: Victim | None) -> ExtractionResult:
    start = oracle.rows
    y, stopped = _labels(oracle, X, batch)
    score = substitute_agreement(X[: y.shape[0]], y, victim)
    return ExtractionResult(score, oracle.rows - start, int(y.shape[0]), stopped)


def knockoff_uniform(
    oracle: Oracle,
    *,
    victim: Victim | None = None,
    rows: int = 1000,
    seed: int = 0,
    batch: int = 32,
) -> ExtractionResult:
    """Knockoff with rows drawn uniformly from the training box ``[lo, hi]``."""
    rng = np.random.default_rng(seed)
    data = victim or digits()
    return _knockoff(oracle, data.uniform(rows, rng), batch, data)


def knockoff_natural(
    oracle: Oracle,
    *,
    victim: Victim | None = None,
    rows: int = 1000,
    seed: int = 0,
    batch: int = 16,
) -> ExtractionResult:
    """Knockoff with natural rows the victim never saw (at most the attacker's pool)."""
    rng = np.random.default_rng(seed)
    data = victim or digits()
    pool = data.pool
    return _knockoff(oracle, pool[rng.permutation(pool.shape[0])[:rows]], batch, data)


def knockoff_open_world(
    oracle: Oracle,
    *,
    victim: Victim | None = None,
    rows: int = 1000,
    seed: int = 0,
    batch: int = 32,
) -> ExtractionResult:
    """Knockoff with natural data from another distribution: ``rows`` photo patches.

    The open-world attacker of Knockoff Nets does not hold the victim's data; it
    queries natural images it can get (here, random 16 to 128 px crops of the two
    scikit-learn sample photos, made into 8x8 rows in 0..16 like digits: see
    ``_data.photo_patches``). Digits-shaped victims only; needs Pillow to load the photos.
    """
    data = victim or digits()
    if data.n_features != 64:
        raise ValueError(f"photo patches are 8x8 digit images, not {data.n_features} features")
    return _knockoff(oracle, np.array(photo_patches(rows, seed)), batch, data)


def solve_softmax(X: F64, P: F64) -> tuple[F64, F64]:
    """``(W, b)`` of a softmax-linear model from rows and (possibly rounded) probabilities.

    For each row, with ``r`` its most probable class, every class ``k`` with
    ``p_k > 0`` gives one equation ``(theta_k - theta_r) . [x, 1] = log p_k - log p_r``;
    ``theta_0`` is fixed at 0 (softmax is shift-invariant). Solved by least squares
    (minimum norm when under-determined).
    """
    n, d = X.shape
    k = P.shape[1]
    Xt = np.hstack([X, np.ones((n, 1))])
    width = d + 1
    rows_a: list[F64] = []
    rhs: list[float] = []
    for i in range(n):
        p = P[i]
        r = int(np.argmax(p))
        if p[r] <= 0:
            continue
        for c in np.flatnonzero(p > 0):
            if c == r:
                continue
            a = np.zeros((k - 1) * width)
            if c > 0:
                a[(c - 1) * width : c * width] += Xt[i]
            if r > 0:
                a[(r - 1) * width : r * width] -= Xt[i]
            rows_a.append(a)
            rhs.append(float(np.log(p[c]) - np.log(p[r])))
    theta = np.zeros((k, width))
    if rows_a:
        sol = np.linalg.lstsq(np.vstack(rows_a), np.asarray(rhs), rcond=None)[0]
        theta[1:] = sol.reshape(k - 1, width)
    return theta[:, :d], theta[:, d]


def equation_solving(
    oracle: Oracle,
    *,
    victim: Victim | None = None,
    rows: int | None = None,
    seed: int = 0,
    batch: int = 32,
) -> ExtractionResult:
    """Tramer et al.'s equation solving on ``rows`` uniform rows of the box (2 (d + 1) default)."""
    rng = np.random.default_rng(seed)
    data = victim or digits()
    rows = 2 * (data.n_features + 1) if rows is None else rows
    X = data.uniform(rows, rng)
    start = oracle.rows
    probs: list[F64] = []
    stopped = None
    for i in range(0, rows, batch):
        try:
            probs.append(oracle.query(X[i : i + batch])[1])
        except Refused as exc:
            stopped = f"refused ({exc.status}) after {exc.rows_sent} rows"
            break
    P = np.vstack(probs) if probs else np.empty((0, data.n_classes))
    W, b = solve_softmax(X[: P.shape[0]], P)
    # a deployment known only from reference rows may not know its classes: answer columns
    classes = data.classes if data.classes.shape[0] == P.shape[1] else np.arange(P.shape[1])
    pred = classes[np.argmax(data.eval @ W.T + b, axis=1)]
    return ExtractionResult(
        agreement(pred, data),
        oracle.rows - start,
        int(P.shape[0]),
        stopped,
        _param_error(W, b, data) if data.linear is not None else None,
    )


def _param_error(W: F64, b: F64, data: Victim) -> float:
    """``|theta - theta_real| / |theta_real|`` with both shifted so that class 0 is zero."""
    assert data.linear is not None
    coef, intercept = data.linear
    real = np.hstack([coef - coef[0], (intercept - intercept[0])[:, None]])
    stolen = np.hstack([W - W[0], (b - b[0])[:, None]])
    return float(np.linalg.norm(stolen - real) / np.linalg.norm(real))
