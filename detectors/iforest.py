"""Isolation Forest, fitted by scikit-learn and scored by plain numpy.

scikit-learn grows the trees; :func:`flatten_forest` then converts them once
into five flat arrays over all nodes of all trees (feature, threshold, left
child, right child, and for leaves the path length including the ``c(n)``
correction for the samples left in the leaf). Scoring walks every tree at once,
one vectorised step per level, so the hot path never enters scikit-learn and
its per-call validation, joblib dispatch and locks. The result equals
``IsolationForest.score_samples`` to floating-point summation order (about
1e-15; the tests require 1e-9).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Self

import numpy as np
from numpy.typing import NDArray
from sklearn.ensemble import IsolationForest

from inference_guard.detectors.outlier_base import FloatArray, RowOutlierBase, check_int

__all__ = ["FlatForest", "IsolationForestOutlier", "average_path_length", "flatten_forest"]

IntArray = NDArray[np.int64]


def average_path_length(n: NDArray[Any] | float) -> FloatArray:
    """``c(n)``: mean path length of an unsuccessful search in a BST of ``n`` nodes.

    The same piecewise definition as scikit-learn (``c(n<=1) = 0``, ``c(2) = 1``,
    ``c(n) = 2 (ln(n - 1) + gamma) - 2 (n - 1) / n``), so scores match exactly.
    """
    arr = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(arr)
    out[arr == 2] = 1.0
    big = arr > 2
    m = arr[big]
    out[big] = 2.0 * (np.log(m - 1.0) + np.euler_gamma) - 2.0 * (m - 1.0) / m
    return out


class FlatForest(NamedTuple):
    """All trees of a forest as flat arrays over their nodes (leaves loop to themselves)."""

    #: feature tested at each node (column of the full input row)
    feature: IntArray
    #: go left when ``x[feature] <= threshold``
    threshold: FloatArray
    left: IntArray
    right: IntArray
    #: path length credited at each leaf: depth + c(samples in leaf) - 1; 0 elsewhere
    leaf_value: FloatArray
    #: root node index of each tree
    roots: IntArray
    #: the deepest leaf, in edges: this many steps bring every walk to a leaf
    max_depth: int
    #: ``n_trees * c(max_samples)``, the score's normaliser
    denominator: float


def flatten_forest(forest: Any, n_features: int) -> FlatForest:
    """Convert a fitted :class:`sklearn.ensemble.IsolationForest` into a :class:`FlatForest`."""
    features_l: list[IntArray] = []
    thresholds_l: list[FloatArray] = []
    lefts_l: list[IntArray] = []
    rights_l: list[IntArray] = []
    values_l: list[FloatArray] = []
    roots: list[int] = []
    offset = 0
    max_depth = 0
    for est, cols in zip(forest.estimators_, forest.estimators_features_, strict=True):
        tree = est.tree_
        n_nodes = int(tree.node_count)
        left = np.asarray(tree.children_left, dtype=np.int64)
        right = np.asarray(tree.children_right, dtype=np.int64)
        is_leaf = left == -1
        idx = np.arange(n_nodes, dtype=np.int64)
        feat = np.asarray(tree.feature, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        # scikit-learn only subsets columns when max_features < n_features;
        # otherwise the trees index the full row (see _compute_chunked_score_samples)
        feat = np.where(is_leaf, 0, feat)  # leaves hold -2 (TREE_UNDEFINED)
        if cols.size != n_features:
            feat = cols[feat]
        # node depths counted from 1 at the root, as tree_.compute_node_depths()
        depth = np.ones(n_nodes, dtype=np.int64)
        for node in range(n_nodes):  # parents precede children in sklearn trees
            if not is_leaf[node]:
                depth[left[node]] = depth[right[node]] = depth[node] + 1
        n_samples = np.asarray(tree.n_node_samples, dtype=np.float64)
        value = np.where(is_leaf, depth + average_path_length(n_samples) - 1.0, 0.0)
        features_l.append(feat)
        thresholds_l.append(np.where(is_leaf, 0.0, np.asarray(tree.threshold, dtype=np.float64)))
        lefts_l.append(np.where(is_leaf, idx, left) + offset)
        rights_l.append(np.where(is_leaf, idx, right) + offset)
        values_l.append(value)
        roots.append(offset)
        max_depth = max(max_depth, int(depth.max()) - 1)
        offset += n_nodes
    n_trees = len(roots)
    denominator = n_trees * float(average_path_length(float(forest.max_samples_)))
    return FlatForest(
        feature=np.concatenate(features_l),
        threshold=np.concatenate(thresholds_l),
        left=np.concatenate(lefts_l),
        right=np.concatenate(rights_l),
        leaf_value=np.concatenate(values_l),
        roots=np.asarray(roots, dtype=np.int64),
        max_depth=max_depth,
        denominator=denominator,
    )


def score_flat(flat: FlatForest, X: FloatArray) -> FloatArray:
    """scikit-learn's ``score_samples`` (``-2^(-E[h(x)] / c(max_samples))``) in numpy."""
    # scikit-learn casts inputs to float32 before walking the trees, and the
    # comparison happens in float64 against the float64 thresholds; doing the
    # same round trip keeps every split decision identical
    x = X.astype(np.float32).astype(np.float64)
    n = x.shape[0]
    rows = np.arange(n)[:, None]
    node = np.broadcast_to(flat.roots, (n, flat.roots.size))
    for _ in range(flat.max_depth):
        go_left = x[rows, flat.feature[node]] <= flat.threshold[node]
        node = np.where(go_left, flat.left[node], flat.right[node])
    depths = flat.leaf_value[node].sum(axis=1)
    if flat.denominator == 0:  # a forest of one-sample trees: sklearn scores 1
        return -np.ones(n)
    scores: FloatArray = -np.exp2(-depths / flat.denominator)
    return scores


class IsolationForestOutlier(RowOutlierBase):
    """Isolation Forest (Liu et al. 2008) with a numpy hot path.

    Fitted with :class:`sklearn.ensemble.IsolationForest`, converted once with
    :func:`flatten_forest`; ``score_samples`` equals scikit-learn's (higher is
    more normal, in ``[-1, 0]``) without calling it.

    Parameters
    ----------
    n_estimators : int, default=100
        Number of trees.
    max_samples : int or "auto", default="auto"
        Rows drawn to grow each tree (``"auto"``: ``min(256, n)``).
    max_features : float, default=1.0
        Fraction of the features each tree may split on.
    target_fpr : float, default=0.01
        False-positive rate at which ``offset_`` is set on the held-out rows.
    holdout : float, default=0.2
        Fraction of the rows given to ``fit`` that is held out to set ``offset_``.
    random_state : int or None, default=0
        Seed of the held-out split and of the forest.

    Attributes
    ----------
    forest_ : FlatForest
        The flattened trees (all the scoring needs).
    estimator_ : sklearn.ensemble.IsolationForest
        The fitted scikit-learn forest; only after ``fit``, never saved or loaded.
    offset_ : float
        Threshold: rows scoring below it are anomalous.
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from inference_guard.detectors.iforest import IsolationForestOutlier
    >>> X = np.random.default_rng(0).normal(size=(1000, 4))
    >>> det = IsolationForestOutlier(n_estimators=50, target_fpr=0.01).fit(X)
    >>> det.predict([[0.0, 0.0, 0.0, 0.0], [6.0, -6.0, 6.0, -6.0]]).tolist()
    [1, -1]
    >>> bool(np.allclose(det.score_samples(X[:5]), det.estimator_.score_samples(X[:5])))
    True
    """

    kind = "iforest"

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_samples: int | str = "auto",
        max_features: float = 1.0,
        target_fpr: float = 0.01,
        holdout: float = 0.2,
        random_state: int | None = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.max_features = max_features
        self.target_fpr = target_fpr
        self.holdout = holdout
        self.random_state = random_state

    def _validate_params(self) -> None:
        check_int("n_estimators", self.n_estimators, minimum=1)
        if self.max_samples != "auto":
            check_int("max_samples", self.max_samples, minimum=2)
        mf = self.max_features
        if isinstance(mf, bool) or not isinstance(mf, int | float) or not 0.0 < float(mf) <= 1.0:
            raise ValueError(f"max_features must be a fraction in (0, 1], got {mf!r}")

    def _fit(self, X: FloatArray) -> None:
        max_samples: int | str = self.max_samples
        if isinstance(max_samples, int):
            max_samples = min(max_samples, X.shape[0])
        estimator = IsolationForest(
            n_estimators=int(self.n_estimators),
            max_samples=max_samples,
            max_features=float(self.max_features),
            random_state=self.random_state,
        )
        estimator.fit(X)
        self.estimator_ = estimator
        self.forest_ = flatten_forest(estimator, X.shape[1])

    def _score(self, X: FloatArray) -> FloatArray:
        return score_flat(self.forest_, X)

    def export_state(self) -> dict[str, NDArray[Any]]:
        common = self._common_state()  # raises NotFittedError first
        f = self.forest_
        return {
            **common,
            "feature": f.feature,
            "threshold": f.threshold,
            "left": f.left,
            "right": f.right,
            "leaf_value": f.leaf_value,
            "roots": f.roots,
            "max_depth": np.asarray(f.max_depth, dtype=np.int64),
            "denominator": np.asarray(f.denominator, dtype=np.float64),
            "n_features_in_": np.asarray(self.n_features_in_, dtype=np.int64),
        }

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, NDArray[Any]]) -> Self:
        model = cls(**params)
        model._validate_params()
        d = int(state["n_features_in_"])
        n = state["feature"].shape[0] if state["feature"].ndim == 1 else 0
        for name in ("feature", "threshold", "left", "right", "leaf_value"):
            if state[name].shape != (n,):
                raise ValueError(f"iforest state: {name} must have shape ({n},)")
        feature = state["feature"].astype(np.int64)
        left = state["left"].astype(np.int64)
        right = state["right"].astype(np.int64)
        roots = state["roots"].astype(np.int64)
        max_depth = int(state["max_depth"])
        # a corrupt index would read out of bounds or loop forever: check them all
        if (
            d < 1 or n < 1 or roots.ndim != 1 or roots.size < 1
            or (feature < 0).any() or (feature >= d).any()
            or (left < 0).any() or (left >= n).any() or (right < 0).any() or (right >= n).any()
            or (roots < 0).any() or (roots >= n).any() or not 0 <= max_depth <= 64
        ):
            raise ValueError("iforest state: node indices out of range")
        model.forest_ = FlatForest(
            feature=feature,
            threshold=state["threshold"].astype(np.float64),
            left=left,
            right=right,
            leaf_value=state["leaf_value"].astype(np.float64),
            roots=roots,
            max_depth=max_depth,
            denominator=float(state["denominator"]),
        )
        model.n_features_in_ = d
        model._restore_common(state)
        return model
