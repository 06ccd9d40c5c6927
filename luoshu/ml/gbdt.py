"""Gradient-boosted decision trees: `GBDTClassifier` (binary / softmax) and `GBDTRegressor` (squared error).

LightGBM's algorithm on `luoshu.ml.histogram`: quantile bins, leaf-wise trees on
gradient/hessian histograms, L2 on leaf values, minimum child weight and count,
shrinkage, row subsampling per iteration and feature subsampling per tree, early
stopping on a validation set, and missing values sent to the side each split learnt.
`dump_model_text()` writes LightGBM's text model format (readable by
`lightgbm.Booster(model_str=...)`).

Data parallel: with `distributed=True` inside `luoshu launch -n N`, each worker passes its
own rows; bin edges come from every k-th row of the concatenated data (up to 200k rows,
all-gathered), every histogram and total is all-reduced, and so every worker grows the
tree one process would grow on the concatenated rows (with `subsample=1`: row sampling
draws per worker).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassifierMixin, RegressorMixin

from luoshu.ml._tree_kernels import add_to_rows
from luoshu.ml.base import (
    DataError,
    Estimator,
    ParameterError,
    check_positive,
    check_X,
    check_X_y,
    encode_labels,
)
from luoshu.ml.histogram import MAX_BINS, BinMapper, GrowParams, KeptCodes, Tree, grow_tree, tree_from_dict

__all__ = ["GBDTClassifier", "GBDTRegressor"]

BIN_SAMPLE_ROWS = 200_000  # as LightGBM's bin_construct_sample_cnt
KEPT_MAX_DENSITY = 0.75  # root histograms skip most frequent bins when at least 25% of codes are in them


def _dense(X) -> np.ndarray:
    """Trees bin dense columns; a sparse X is densified (its implicit zeros are values, not missing)."""
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


class _Collectives:
    """Sums and gathers across data-parallel workers (identities in one process)."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.world = 1
        self.rank = 0
        if distributed:
            from luoshu import distributed as dist

            dist.init()
            self.world = dist.world_size()
            self.rank = dist.rank()

    @property
    def pg(self):
        """The workers' process group (None in one process), looked up rather than kept: a fitted
        model that outlives `luoshu.distributed.shutdown()` must not keep the destroyed group alive."""
        if not self.distributed:
            return None
        from luoshu import distributed as dist

        return dist.process_group()

    def allreduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.pg is None:
            return t
        import torch.distributed as torch_dist

        t = t.contiguous()
        torch_dist.all_reduce(t, group=self.pg)
        return t

    def row_counts(self, n: int) -> list[int]:
        """Every worker's number of rows, in rank order."""
        if self.pg is None:
            return [n]
        import torch.distributed as torch_dist

        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        torch_dist.all_gather(counts, torch.tensor([n], dtype=torch.int64), group=self.pg)
        return [int(c) for c in counts]

    def allgather_rows(self, X: np.ndarray) -> np.ndarray:
        """Every worker's rows, in rank order (for the bin edges): padded to the largest count, then trimmed."""
        if self.pg is None:
            return X
        import torch.distributed as torch_dist

        counts = self.row_counts(X.shape[0])
        most = max(counts)
        mine = torch.full((most, X.shape[1]), float("nan"), dtype=torch.float64)
        mine[: X.shape[0]] = torch.from_numpy(X)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        torch_dist.all_gather(parts, mine, group=self.pg)
        return np.concatenate([p[: int(c)].numpy() for p, c in zip(parts, counts)])


class _GBDT(Estimator):
    _loss_name = ""

    def __init__(
        self,
        n_estimators: int = 100,
        learning_rate: float = 0.1,
        num_leaves: int = 31,
        max_depth: int | None = -1,
        min_child_samples: int = 20,
        min_child_weight: float = 1e-3,
        reg_lambda: float = 0.0,
        min_split_gain: float = 0.0,
        subsample: float = 1.0,
        colsample_bytree: float = 1.0,
        max_bins: int = 255,
        n_iter_no_change: int | None = None,
        validation_fraction: float = 0.1,
        random_state: int | None = None,
        distributed: bool = False,
        n_jobs: int | None = None,
    ):
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.max_depth = max_depth
        self.min_child_samples = min_child_samples
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.min_split_gain = min_split_gain
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.max_bins = max_bins
        self.n_iter_no_change = n_iter_no_change
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.distributed = distributed
        self.n_jobs = n_jobs

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        return tags

    def _check_params(self) -> None:
        name = type(self).__name__
        check_positive(self, n_estimators=self.n_estimators, learning_rate=self.learning_rate)
        if not (isinstance(self.num_leaves, (int, np.integer)) and self.num_leaves >= 2):
            raise ParameterError(f"{name}: num_leaves must be an integer >= 2, found {self.num_leaves!r}")
        if not (isinstance(self.max_bins, (int, np.integer)) and 2 <= self.max_bins <= MAX_BINS):
            raise ParameterError(f"{name}: max_bins must be an integer in [2, {MAX_BINS}], found {self.max_bins!r}")
        for pname in ("subsample", "colsample_bytree"):
            v = getattr(self, pname)
            if not 0.0 < v <= 1.0:
                raise ParameterError(f"{name}: {pname} must be in (0, 1], found {v!r}")
        for pname in ("reg_lambda", "min_split_gain", "min_child_weight", "min_child_samples"):
            if not getattr(self, pname) >= 0:
                raise ParameterError(f"{name}: {pname} must be >= 0, found {getattr(self, pname)!r}")
        if self.n_iter_no_change is not None:
            check_positive(self, n_iter_no_change=self.n_iter_no_change)
            if not 0.0 < self.validation_fraction < 1.0:
                raise ParameterError(
                    f"{name}: validation_fraction must be in (0, 1), found {self.validation_fraction!r}"
                )

    # -- the loss, per subclass: raw scores (n, K)
    def _init_score(self, y: torch.Tensor, comm: _Collectives) -> torch.Tensor:
        raise NotImplementedError

    def _grad_hess(self, raw: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _loss(self, raw: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def _fit_boosting(self, X: np.ndarray, y: torch.Tensor, k: int, eval_set) -> None:
        self._check_params()
        threads = torch.get_num_threads() if self.n_jobs is None else int(self.n_jobs)
        if threads < 1:
            raise ParameterError(f"{type(self).__name__}: n_jobs must be >= 1, found {self.n_jobs!r}")
        if threads == 1:
            return self._boost(X, y, k, eval_set, None)
        # Histograms go to our own threads, each running torch single-threaded: scatter_add_
        # gets slower, not faster, with torch's intra-op threads.
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # OpenMP's thread count is per thread: each pool thread sets its own
            with ThreadPoolExecutor(threads, "luoshu-gbdt", initializer=torch.set_num_threads, initargs=(1,)) as pool:
                return self._boost(X, y, k, eval_set, pool)
        finally:
            torch.set_num_threads(before)

    def _boost(self, X: np.ndarray, y: torch.Tensor, k: int, eval_set, pool) -> None:
        comm = _Collectives(self.distributed)
        rng = np.random.default_rng(0 if self.random_state is None else self.random_state)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        X_val = y_val = None
        if eval_set is not None:
            X_val = _dense(check_X(self, eval_set[0], reset=False, allow_nan=True))
            y_val = eval_set[1]
        elif self.n_iter_no_change is not None:
            perm = rng.permutation(X.shape[0])
            n_val = max(1, int(round(self.validation_fraction * X.shape[0])))
            val, tr = perm[:n_val], np.sort(perm[n_val:])
            X_val, y_val, X, y = X[val], y[torch.from_numpy(val)], X[tr], y[torch.from_numpy(tr)]
        if X_val is not None and not isinstance(y_val, torch.Tensor):
            y_val = self._encode_eval_y(y_val)

        # Bin edges from every stride-th row of the concatenated data (all rows up to BIN_SAMPLE_ROWS):
        # each worker takes its rows of that global sample, so N workers find the edges one process finds.
        counts = comm.row_counts(X.shape[0])
        offset = sum(counts[: comm.rank])
        stride = max(1, -(-sum(counts) // BIN_SAMPLE_ROWS))
        sample = X[(-offset) % stride :: stride]
        mapper = BinMapper.fit(comm.allgather_rows(sample), self.max_bins)
        codes = mapper.transform(X, pool, padded=True)  # (n, >= d) uint8
        n, d = X.shape
        codes_by_feature = np.ascontiguousarray(codes[:, :d].T)
        # None when too few codes would be skipped to pay for the extra indirection
        kept = KeptCodes.of(codes, d, pool, KEPT_MAX_DENSITY)
        n_bins = torch.from_numpy(mapper.n_bins)

        init = self._init_score(y, comm)  # (K,)
        raw = init.expand(n, k).clone()
        raw_val = init.expand(X_val.shape[0], k).clone() if X_val is not None else None
        codes_val = torch.from_numpy(mapper.transform(X_val, pool)) if X_val is not None else None
        params = GrowParams(
            max_leaves=int(self.num_leaves),
            max_depth=-1 if self.max_depth is None else int(self.max_depth),
            min_child_samples=float(self.min_child_samples),
            min_child_weight=float(self.min_child_weight),
            reg_lambda=float(self.reg_lambda),
            min_split_gain=float(self.min_split_gain),
            shrinkage=float(self.learning_rate),
            allreduce=comm.allreduce if comm.pg is not None else None,
            n_bins=n_bins,
            pool=pool,
            kept=kept,
        )
        trees: list[list[Tree]] = []
        best_loss, best_iter, since_best = np.inf, 0, 0
        self.validation_loss_ = []
        all_rows = torch.arange(n)
        channels = np.empty((n, 3))  # (g, h, count) of one class's tree, filled per tree
        channels[:, 2] = 1.0
        raw_np = raw.numpy()  # shares memory: the leaf values go in place
        for it in range(int(self.n_estimators)):
            rows = all_rows
            if self.subsample < 1.0:
                rows = torch.nonzero(torch.rand(n, generator=gen) < self.subsample).view(-1)
            if self.colsample_bytree < 1.0:
                n_pick = max(1, int(round(self.colsample_bytree * d)))
                mask = torch.zeros(d, dtype=torch.bool)
                mask[torch.randperm(d, generator=gen)[:n_pick]] = True
                params.feature_mask = mask
            g, h = self._grad_hess(raw, y)
            round_trees = []
            for c in range(k):
                channels[:, 0] = g[:, c].numpy()
                channels[:, 1] = h[:, c].numpy()
                tree, leaf_rows = grow_tree(codes, codes_by_feature, channels, rows, 1, params, mapper.threshold)
                if rows.numel() == n:
                    for leaf, r in enumerate(leaf_rows):
                        add_to_rows(raw_np, r.numpy(), c, float(tree.leaf_value[leaf, 0]))
                else:
                    raw[:, c] += torch.from_numpy(tree.leaf_value[:, 0])[tree.apply_bins(codes)]
                if raw_val is not None:
                    raw_val[:, c] += torch.from_numpy(tree.leaf_value[:, 0])[tree.apply_bins(codes_val)]
                round_trees.append(tree)
            trees.append(round_trees)
            if raw_val is not None:
                loss = self._loss(raw_val, y_val)
                self.validation_loss_.append(loss)
                if loss < best_loss - 1e-12:
                    best_loss, best_iter, since_best = loss, it + 1, 0
                else:
                    since_best += 1
                    if self.n_iter_no_change is not None and since_best >= self.n_iter_no_change:
                        break
        if raw_val is not None and self.n_iter_no_change is not None:
            trees = trees[:best_iter]
        self.best_iteration_ = len(trees)
        self.n_iter_ = max(len(trees), 1)
        self.init_score_ = init.numpy().copy()
        self.bin_edges_ = mapper.edges
        self.trees_ = trees
        self.n_trees_per_iteration_ = k
        self.validation_loss_ = np.asarray(self.validation_loss_, dtype=np.float64)

    def _fitted_state(self) -> dict:
        state = super()._fitted_state()
        state["trees_"] = [[t.to_dict() for t in rnd] for rnd in self.trees_]
        return state

    def _restore_state(self, state: dict) -> None:
        state = dict(state)
        trees = state.pop("trees_")
        super()._restore_state(state)
        self.trees_ = [[tree_from_dict(t) for t in rnd] for rnd in trees]

    def _raw_predict(self, X) -> np.ndarray:
        self._check_fitted("trees_")
        X = torch.from_numpy(_dense(check_X(self, X, reset=False, allow_nan=True)))
        k = self.n_trees_per_iteration_
        raw = torch.from_numpy(self.init_score_).expand(X.shape[0], k).clone()
        for rnd in self.trees_:
            for c, tree in enumerate(rnd):
                raw[:, c] += torch.from_numpy(tree.leaf_value[:, 0])[tree.apply(X)]
        return raw.numpy()

    def feature_importances(self, importance_type: str = "split") -> np.ndarray:
        """Per-feature split counts ("split") or total gains ("gain"), as LightGBM reports them."""
        self._check_fitted("trees_")
        out = np.zeros(self.n_features_in_)
        for rnd in self.trees_:
            for t in rnd:
                np.add.at(out, t.split_feature, 1.0 if importance_type == "split" else t.split_gain)
        return out

    @property
    def feature_importances_(self) -> np.ndarray:
        imp = self.feature_importances("gain")
        total = imp.sum()
        return imp / total if total > 0 else imp

    def dump_model_text(self) -> str:
        """The model in LightGBM's text format (v4), e.g. for `lightgbm.Booster(model_str=...)`."""
        self._check_fitted("trees_")
        k = self.n_trees_per_iteration_
        d = self.n_features_in_
        blocks = []
        index = 0
        for it, rnd in enumerate(self.trees_):
            for c, tree in enumerate(rnd):
                # LightGBM folds the initial score into the first tree's leaves
                bias = float(self.init_score_[c]) if it == 0 else 0.0
                blocks.append(_tree_text(index, tree, bias, float(self.learning_rate)))
                index += 1
        infos = []
        for f in range(d):
            e = self.bin_edges_[f]
            infos.append("none" if len(e) == 0 else f"[{_num(e[0])}:{_num(e[-1])}]")
        head = [
            "tree",
            "version=v4",
            f"num_class={k}",
            f"num_tree_per_iteration={k}",
            "label_index=0",
            f"max_feature_idx={d - 1}",
            f"objective={self._lgb_objective()}",
            "feature_names=" + " ".join(f"Column_{i}" for i in range(d)),
            "feature_infos=" + " ".join(infos),
            "tree_sizes=" + " ".join(str(len(b.encode())) for b in blocks),
            "",
        ]
        return "\n".join(head) + "\n" + "".join(blocks) + "end of trees\n\npandas_categorical:null\n"


def _num(x: float) -> str:
    return repr(float(x))


def _tree_text(index: int, tree: Tree, bias: float, shrinkage: float) -> str:
    def join(values, fmt=_num):
        return " ".join(fmt(v) for v in values)

    leaf_values = tree.leaf_value[:, 0] + bias
    lines = [f"Tree={index}", f"num_leaves={tree.n_leaves}", "num_cat=0"]
    if tree.n_leaves > 1:
        # decision_type: bit 1 = default left, bits 2-3 = missing type (2: NaN)
        decision = [(2 if dl else 0) | (2 << 2) for dl in tree.default_left]
        lines += [
            f"split_feature={join(tree.split_feature, str)}",
            f"split_gain={join(tree.split_gain)}",
            f"threshold={join(tree.threshold)}",
            f"decision_type={join(decision, str)}",
            f"left_child={join(tree.left_child, str)}",
            f"right_child={join(tree.right_child, str)}",
        ]
    lines += [
        f"leaf_value={join(leaf_values)}",
        f"leaf_weight={join(tree.leaf_weight)}",
        f"leaf_count={join(tree.leaf_count.astype(np.int64), str)}",
    ]
    if tree.n_leaves > 1:
        lines += [
            f"internal_value={join(tree.internal_value[:, 0])}",
            f"internal_weight={join(tree.internal_weight)}",
            f"internal_count={join(tree.internal_count.astype(np.int64), str)}",
        ]
    lines += ["is_linear=0", f"shrinkage={_num(shrinkage)}", "", ""]
    return "\n".join(lines) + "\n"


class GBDTClassifier(ClassifierMixin, _GBDT):
    """Histogram GBDT for classification: log loss (one tree per round) or softmax (one tree per class per round)."""

    def _encode_eval_y(self, y) -> torch.Tensor:
        _, codes = encode_labels(self, np.asarray(y), self.classes_)
        return torch.from_numpy(codes)

    def fit(self, X, y, eval_set: tuple | None = None):
        """Fits on X, y; with `eval_set=(X_val, y_val)` the validation loss is tracked (and early stopping uses it)."""
        X, y = check_X_y(self, X, y, allow_nan=True)
        self.classes_, codes = encode_labels(self, y)
        k = 1 if len(self.classes_) == 2 else len(self.classes_)
        self._k = k
        self._fit_boosting(_dense(X), torch.from_numpy(codes), k, eval_set)
        return self

    def _init_score(self, y: torch.Tensor, comm) -> torch.Tensor:
        k = self._k
        counts = comm.allreduce(torch.bincount(y, minlength=max(k, 2)).double())
        prior = (counts / counts.sum()).clamp(1e-15, 1 - 1e-15)
        if k == 1:
            return torch.log(prior[1:] / prior[0])
        return torch.log(prior)

    def _grad_hess(self, raw, y):
        if self._k == 1:
            p = torch.sigmoid(raw)
            t = (y == 1).double()[:, None]
            return p - t, (p * (1 - p)).clamp(min=1e-16)
        p = torch.softmax(raw, 1)
        t = torch.nn.functional.one_hot(y, self._k).double()
        return p - t, (p * (1 - p)).clamp(min=1e-16)

    def _loss(self, raw, y) -> float:
        if raw.shape[1] == 1:
            t = (y == 1).double()[:, None]
            return float((torch.nn.functional.softplus(raw) - t * raw).mean())
        return float((torch.logsumexp(raw, 1) - raw.gather(1, y[:, None])[:, 0]).mean())

    def _lgb_objective(self) -> str:
        return (
            "binary sigmoid:1"
            if self.n_trees_per_iteration_ == 1
            else f"multiclass num_class:{self.n_trees_per_iteration_}"
        )

    def decision_function(self, X) -> np.ndarray:
        raw = self._raw_predict(X)
        return raw[:, 0] if raw.shape[1] == 1 else raw

    def predict_proba(self, X) -> np.ndarray:
        raw = torch.from_numpy(self._raw_predict(X))
        if raw.shape[1] == 1:
            p = torch.sigmoid(raw[:, 0])
            return torch.stack([1 - p, p], 1).numpy()
        return torch.softmax(raw, 1).numpy()

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


class GBDTRegressor(RegressorMixin, _GBDT):
    """Histogram GBDT for regression (squared error)."""

    def _encode_eval_y(self, y) -> torch.Tensor:
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if not np.isfinite(y).all():
            raise DataError("GBDTRegressor: eval_set targets contain NaN or infinity")
        return torch.from_numpy(y)

    def fit(self, X, y, eval_set: tuple | None = None):
        """Fits on X, y; with `eval_set=(X_val, y_val)` the validation loss is tracked (and early stopping uses it)."""
        X, y = check_X_y(self, X, y, allow_nan=True, y_numeric=True)
        self._fit_boosting(_dense(X), torch.from_numpy(np.asarray(y, dtype=np.float64)), 1, eval_set)
        return self

    def _init_score(self, y, comm) -> torch.Tensor:
        s = comm.allreduce(torch.tensor([float(y.sum()), float(y.numel())], dtype=torch.float64))
        return (s[0] / s[1]).reshape(1)

    def _grad_hess(self, raw, y):
        return raw - y[:, None], torch.ones_like(raw)

    def _loss(self, raw, y) -> float:
        return float(((raw[:, 0] - y) ** 2).mean())

    def _lgb_objective(self) -> str:
        return "regression"

    def predict(self, X) -> np.ndarray:
        return self._raw_predict(X)[:, 0]
