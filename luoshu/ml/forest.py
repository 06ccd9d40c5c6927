"""Random forests on the histogram trees: `RandomForestClassifier` (Gini) and `RandomForestRegressor` (variance).

Each tree sees a bootstrap sample (as per-row weights, so no rows are copied) and
draws `max_features` candidate features at every node. With gradient `-w * onehot(y)`
and hessian `w`, the histogram gain `sum_k G_k^2 / H` of a split is the weighted Gini
(classification) or variance (regression) decrease, and a leaf's value `-G / H` is its
class frequencies or mean, so the GBDT machinery grows CART-style trees unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import ClassifierMixin, RegressorMixin

from luoshu.ml.base import Estimator, ParameterError, check_positive, check_X, check_X_y, encode_labels
from luoshu.ml.gbdt import _dense
from luoshu.ml.histogram import MAX_BINS, BinMapper, GrowParams, grow_tree, tree_from_dict

__all__ = ["RandomForestClassifier", "RandomForestRegressor"]


class _Forest(Estimator):
    _default_max_features: str | float = "sqrt"

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int | None = None,
        min_samples_leaf: int = 1,
        max_features: str | int | float | None = "sqrt",
        max_leaf_nodes: int | None = None,
        bootstrap: bool = True,
        max_bins: int = 255,
        random_state: int | None = None,
    ):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.max_leaf_nodes = max_leaf_nodes
        self.bootstrap = bootstrap
        self.max_bins = max_bins
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        return tags

    def _n_features_per_node(self, d: int) -> int:
        mf = self.max_features
        name = type(self).__name__
        if mf is None:
            return d
        if mf == "sqrt":
            return max(1, int(math.sqrt(d)))
        if mf == "log2":
            return max(1, int(math.log2(d)))
        if isinstance(mf, (int, np.integer)) and not isinstance(mf, bool) and 1 <= mf:
            return min(int(mf), d)
        if isinstance(mf, float) and 0.0 < mf <= 1.0:
            return max(1, int(mf * d))
        raise ParameterError(
            f"{name}: max_features must be 'sqrt', 'log2', None, an int >= 1 or a float in (0, 1], found {mf!r}"
        )

    def _grow(self, X: np.ndarray, targets: torch.Tensor) -> None:
        """targets: (n, K) per-row values whose weighted means the leaves hold."""
        check_positive(self, n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf)
        if not (isinstance(self.max_bins, (int, np.integer)) and 2 <= self.max_bins <= MAX_BINS):
            raise ParameterError(f"{type(self).__name__}: max_bins must be in [2, {MAX_BINS}], found {self.max_bins!r}")
        for pname in ("max_depth", "max_leaf_nodes"):
            v = getattr(self, pname)
            if v is not None:
                check_positive(self, **{pname: v})
        n, d = X.shape
        k = targets.shape[1]
        rng = np.random.default_rng(0 if self.random_state is None else self.random_state)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        mapper = BinMapper.fit(X, self.max_bins)
        codes_np = mapper.transform(X)
        codes = codes_np  # (n, d) uint8
        codes_by_feature = np.ascontiguousarray(codes_np.T)
        params = GrowParams(
            max_leaves=int(self.max_leaf_nodes or max(2, n)),
            max_depth=int(self.max_depth or -1),
            min_child_samples=float(self.min_samples_leaf),
            min_child_weight=0.0,
            reg_lambda=0.0,
            features_per_node=self._n_features_per_node(d),
            generator=gen,
            n_bins=torch.from_numpy(mapper.n_bins),
        )
        trees = []
        for _ in range(int(self.n_estimators)):
            if self.bootstrap:
                w = torch.from_numpy(np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64))
            else:
                w = torch.ones(n, dtype=torch.float64)
            rows = torch.nonzero(w > 0).view(-1)
            channels = torch.cat([-w[:, None] * targets, w[:, None], w[:, None]], 1)
            tree, _ = grow_tree(codes, codes_by_feature, channels, rows, k, params, mapper.threshold)
            trees.append(tree)
        self.trees_ = trees
        self.bin_edges_ = mapper.edges

    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        state["trees_"] = [t.to_dict() for t in self.trees_]
        return state

    def _restore_state(self, state: dict) -> None:
        state = dict(state)
        trees = state.pop("trees_")
        super()._restore_state(state)
        self.trees_ = [tree_from_dict(t) for t in trees]

    def _mean_leaf_values(self, X) -> np.ndarray:
        self._check_fitted("trees_")
        X = torch.from_numpy(_dense(check_X(self, X, reset=False, allow_nan=True)))
        out = None
        for tree in self.trees_:
            v = torch.from_numpy(tree.leaf_value)[tree.apply(X)]
            out = v if out is None else out + v
        return (out / len(self.trees_)).numpy()


class RandomForestClassifier(ClassifierMixin, _Forest):
    """A random forest of Gini trees; `predict_proba` averages the trees' leaf class frequencies."""

    def fit(self, X, y):
        X, y = check_X_y(self, X, y, allow_nan=True)
        self.classes_, codes = encode_labels(self, y)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(codes), len(self.classes_)).double()
        self._grow(_dense(X), onehot)
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self._mean_leaf_values(X)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


class RandomForestRegressor(RegressorMixin, _Forest):
    """A random forest of variance-reduction trees (`max_features=1.0` by default, as scikit-learn)."""

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int | None = None,
        min_samples_leaf: int = 1,
        max_features: str | int | float | None = 1.0,
        max_leaf_nodes: int | None = None,
        bootstrap: bool = True,
        max_bins: int = 255,
        random_state: int | None = None,
    ):
        super().__init__(
            n_estimators=n_estimators,
            max_depth=max_depth,
            min_samples_leaf=min_samples_leaf,
            max_features=max_features,
            max_leaf_nodes=max_leaf_nodes,
            bootstrap=bootstrap,
            max_bins=max_bins,
            random_state=random_state,
        )

    def fit(self, X, y):
        X, y = check_X_y(self, X, y, allow_nan=True, y_numeric=True)
        self._grow(_dense(X), torch.from_numpy(np.asarray(y, dtype=np.float64))[:, None])
        return self

    def predict(self, X) -> np.ndarray:
        return self._mean_leaf_values(X)[:, 0]
