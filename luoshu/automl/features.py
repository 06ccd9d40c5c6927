"""Automated feature engineering for tabular and CTR data: `AutoFeatures`, a scikit-learn transformer.

From numeric columns: the raw value, log1p of skewed non-negative columns, quantile-bin index. From
categorical columns (and chosen crosses of two of them): frequency encoding and out-of-fold target
encoding. Crosses are chosen by a greedy gain search: a pair's gain is how much its out-of-fold target
encoding lowers the loss (log loss, or squared error for regression) below the better of its two fields'
own encodings; the best pairs are taken while they gain. Finally the features can be cut to the most
important ones by a GBDT's split gains.

For `luoshu.ctr`: `slot_keys(X)` gives each categorical field and chosen cross as an embedding slot
(key 0: a category unseen in training), and `write_ctr_data` writes the transformed table as a
`luoshu.ctr` Parquet data set (dense features = the engineered ones, slots = the fields and crosses)
with its file list and `slot_size_array`, ready for `ctr.DataReaderParams`.

`fit_transform` (what a Pipeline calls while fitting) gives each training row target encodings learnt
without that row's fold, as scikit-learn's `TargetEncoder` does; `transform` uses the encodings of the
whole training set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from luoshu.automl.space import TuneError
from luoshu.ml.base import DataError, ParameterError


def _codes(column: np.ndarray, categories: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(categories, code per row); with categories given, an unseen value gets code -1."""
    if categories is None:
        categories, codes = np.unique(column, return_inverse=True)
        return categories, codes.reshape(-1)
    idx = np.searchsorted(categories, column)
    idx = np.clip(idx, 0, len(categories) - 1)
    codes = np.where(categories[idx] == column, idx, -1)
    return categories, codes


def _target_means(codes: np.ndarray, Y: np.ndarray, n_categories: int, smooth: float) -> np.ndarray:
    """Smoothed per-category means of each target column: (sum + smooth * prior) / (count + smooth)."""
    prior = Y.mean(0)
    sums = np.zeros((n_categories, Y.shape[1]))
    np.add.at(sums, codes, Y)
    counts = np.bincount(codes, minlength=n_categories)[:, None]
    return (sums + smooth * prior) / (counts + smooth)


def _loss(Y: np.ndarray, pred: np.ndarray, classification: bool) -> float:
    if classification:
        p = np.clip(pred, 1e-6, 1 - 1e-6)
        return float(-(Y * np.log(p) + (1 - Y) * np.log(1 - p)).sum(1).mean())
    return float(((Y - pred) ** 2).mean())


class AutoFeatures(TransformerMixin, BaseEstimator):
    """Generates, encodes, crosses and selects features of a table (a 2-D array; categorical columns may be
    strings or integer codes).

    categorical: column indices of the categorical fields, or "auto" (non-numeric columns, and integer-valued
    ones with at most `max_categories` distinct values). Unseen categories at transform time encode as the
    training prior (target) and 0 (frequency). max_crosses: how many pairwise crosses the greedy search may
    add (0: none). max_features: keep this many features by GBDT importance (None: keep all).
    """

    def __init__(
        self,
        categorical="auto",
        *,
        log_transform: bool = True,
        n_bins: int = 10,
        frequency_encoding: bool = True,
        target_encoding: bool = True,
        cv: int = 5,
        smooth: float = 10.0,
        max_crosses: int = 4,
        min_cross_gain: float = 1e-3,
        max_features: int | None = None,
        max_categories: int = 32,
        random_state: int = 0,
    ):
        self.categorical = categorical
        self.log_transform = log_transform
        self.n_bins = n_bins
        self.frequency_encoding = frequency_encoding
        self.target_encoding = target_encoding
        self.cv = cv
        self.smooth = smooth
        self.max_crosses = max_crosses
        self.min_cross_gain = min_cross_gain
        self.max_features = max_features
        self.max_categories = max_categories
        self.random_state = random_state

    # --- input --------------------------------------------------------------------------------------------
    def _table(self, X, fitting: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2:
            raise DataError(f"AutoFeatures: expected a 2-D table, found shape {X.shape}")
        if X.shape[0] == 0:
            raise DataError("AutoFeatures: found 0 rows; a table with at least one row is required")
        if not fitting and X.shape[1] != self.n_features_in_:
            raise DataError(
                f"AutoFeatures: X has {X.shape[1]} features, but AutoFeatures is expecting "
                f"{self.n_features_in_} features as input"
            )
        return X

    def _split_columns(self, X: np.ndarray) -> tuple[list[int], list[int]]:
        d = X.shape[1]
        if self.categorical == "auto":
            cats = []
            for j in range(d):
                col = X[:, j]
                try:
                    values = col.astype(np.float64)
                except (TypeError, ValueError):
                    cats.append(j)
                    continue
                finite = values[np.isfinite(values)]
                if finite.size and np.all(finite == np.round(finite)) and len(np.unique(finite)) <= self.max_categories:
                    cats.append(j)
        else:
            cats = sorted(int(j) for j in self.categorical)
            for j in cats:
                if not 0 <= j < d:
                    raise ParameterError(f"AutoFeatures: categorical column {j} is out of range for {d} columns")
        return [j for j in range(d) if j not in cats], cats

    def _numeric(self, X: np.ndarray, columns: list[int]) -> np.ndarray:
        try:
            values = X[:, columns].astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"AutoFeatures: numeric columns {columns} hold non-numbers ({exc}); list them as categorical"
            ) from None
        if not np.all(np.isfinite(values)):
            bad = columns[int(np.argwhere(~np.isfinite(values))[0, 1])]
            raise DataError(f"AutoFeatures: numeric column {bad} contains NaN or infinity")
        return values

    # --- fit ----------------------------------------------------------------------------------------------
    def _target(self, y) -> tuple[np.ndarray, bool]:
        from sklearn.utils.multiclass import type_of_target

        y = np.asarray(y).reshape(-1)
        kind = type_of_target(y)
        if kind == "continuous":
            if not np.all(np.isfinite(y.astype(np.float64))):
                raise DataError("AutoFeatures: y contains NaN or infinity")
            return y.astype(np.float64)[:, None], False
        if kind not in ("binary", "multiclass"):
            raise DataError(f"AutoFeatures: y must be class labels or a continuous target, found {kind!r}")
        self.classes_ = np.unique(y)
        Y = (y[:, None] == self.classes_[None, :]).astype(np.float64)
        return (Y[:, 1:] if len(self.classes_) == 2 else Y), True

    def _folds(self, y_raw, n: int):
        from sklearn.model_selection import KFold, StratifiedKFold

        if self._classification:
            return list(
                StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state).split(np.zeros(n), y_raw)
            )
        return list(KFold(self.cv, shuffle=True, random_state=self.random_state).split(np.zeros(n)))

    def _oof(self, codes: np.ndarray, n_categories: int, Y: np.ndarray, folds) -> np.ndarray:
        out = np.empty((len(codes), Y.shape[1]))
        for train, test in folds:
            out[test] = _target_means(codes[train], Y[train], n_categories, self.smooth)[codes[test]]
        return out

    def fit(self, X, y) -> AutoFeatures:
        self.fit_transform(X, y)
        return self

    def fit_transform(self, X, y=None, **fit_params) -> np.ndarray:
        if y is None:
            raise DataError(
                "AutoFeatures requires y to be passed, but the target y is None (target encoding and "
                "the cross search learn from it)"
            )
        if not (isinstance(self.cv, int) and self.cv >= 2):
            raise ParameterError(f"AutoFeatures: cv must be an integer >= 2, found {self.cv!r}")
        if not (isinstance(self.n_bins, int) and self.n_bins >= 0):
            raise ParameterError(f"AutoFeatures: n_bins must be a non-negative integer, found {self.n_bins!r}")
        X = self._table(X, fitting=True)
        if len(np.asarray(y).reshape(-1)) != X.shape[0]:
            raise DataError(f"AutoFeatures: X has {X.shape[0]} rows but y has {len(np.asarray(y).reshape(-1))}")
        self.n_features_in_ = X.shape[1]
        Y, self._classification = self._target(y)
        numeric_cols, cat_cols = self._split_columns(X)
        self.numeric_columns_, self.categorical_columns_ = numeric_cols, cat_cols
        values = self._numeric(X, numeric_cols)
        # numeric transforms
        self.log_columns_ = []
        self.bin_edges_ = []
        for k, j in enumerate(numeric_cols):
            v = values[:, k]
            std = v.std()
            skew = float(((v - v.mean()) ** 3).mean() / std**3) if std > 0 else 0.0
            if self.log_transform and v.min() >= 0 and skew > 1.0:
                self.log_columns_.append(j)
            edges = (
                np.unique(np.quantile(v, np.linspace(0, 1, self.n_bins + 1)[1:-1])) if self.n_bins > 1 else np.empty(0)
            )
            self.bin_edges_.append(edges)
        # categorical fields: codes, then the greedy cross search over pairs
        fields = {(j,): _codes(X[:, j].astype(str))[1] for j in cat_cols}
        n = X.shape[0]
        folds = self._folds(np.asarray(y).reshape(-1), n)
        self.crosses_ = self._search_crosses(fields, Y, folds) if self.max_crosses else []
        for a, b in self.crosses_:
            fields[(a, b)] = _codes(self._cross_values(X, a, b))[1]
        # the encodings of the whole training set (for transform), and the out-of-fold ones (for these rows)
        self.categories_, self.frequencies_, self.target_means_ = {}, {}, {}
        self.prior_ = Y.mean(0)
        encoded = {}
        for key, codes in fields.items():
            raw = X[:, key[0]].astype(str) if len(key) == 1 else self._cross_values(X, *key)
            cats, codes = _codes(raw)
            name = self._field_name(key)
            self.categories_[name] = cats
            self.frequencies_[name] = np.bincount(codes, minlength=len(cats)) / n
            self.target_means_[name] = _target_means(codes, Y, len(cats), self.smooth)
            encoded[name] = (self.frequencies_[name][codes], self._oof(codes, len(cats), Y, folds))
        features, names = self._assemble(X, values, encoded)
        self.feature_names_all_ = np.asarray(names, dtype=object)
        self.selected_ = self._select(features, np.asarray(y).reshape(-1))
        return features[:, self.selected_]

    @staticmethod
    def _cross_values(X: np.ndarray, a: int, b: int) -> np.ndarray:
        return np.char.add(np.char.add(X[:, a].astype(str), "\x1f"), X[:, b].astype(str))

    def _field_name(self, key: tuple) -> str:
        return f"x{key[0]}" if len(key) == 1 else f"x{key[0]}*x{key[1]}"

    def _search_crosses(self, fields: dict, Y: np.ndarray, folds) -> list[tuple[int, int]]:
        """Greedy: the pair whose out-of-fold target encoding lowers the loss most below its better field,
        then the next, while the gain exceeds `min_cross_gain` (each field pair at most once)."""
        single = {}
        for key, codes in fields.items():
            single[key[0]] = _loss(Y, self._oof(codes, codes.max() + 1, Y, folds), self._classification)
        gains = []
        keys = sorted(k[0] for k in fields)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                ca, cb = fields[(a,)], fields[(b,)]
                codes = _codes(ca * (cb.max() + 1) + cb)[1]
                loss = _loss(Y, self._oof(codes, codes.max() + 1, Y, folds), self._classification)
                gains.append((min(single[a], single[b]) - loss, a, b))
        gains.sort(reverse=True)
        self.cross_gains_ = {f"x{a}*x{b}": g for g, a, b in gains}
        return [(a, b) for g, a, b in gains[: self.max_crosses] if g > self.min_cross_gain]

    def _assemble(self, X: np.ndarray, values: np.ndarray, encoded: dict) -> tuple[np.ndarray, list[str]]:
        columns, names = [], []
        for k, j in enumerate(self.numeric_columns_):
            v = values[:, k]
            columns.append(v)
            names.append(f"x{j}")
            if j in self.log_columns_:
                columns.append(np.log1p(v))
                names.append(f"log1p(x{j})")
            if len(self.bin_edges_[k]):
                columns.append(np.searchsorted(self.bin_edges_[k], v, side="right").astype(np.float64))
                names.append(f"bin(x{j})")
        for name, (freq, target) in encoded.items():
            if self.frequency_encoding:
                columns.append(freq)
                names.append(f"freq({name})")
            if self.target_encoding:
                for c in range(target.shape[1]):
                    columns.append(target[:, c])
                    suffix = "" if target.shape[1] == 1 else f"[{self.classes_[c]}]"
                    names.append(f"target({name}){suffix}")
        if not columns:
            raise DataError("AutoFeatures: no features to produce (no numeric column and encodings switched off)")
        return np.column_stack(columns), names

    def _select(self, features: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Indices of the features kept: all, or the `max_features` with the largest GBDT split gains."""
        if self.max_features is None or self.max_features >= features.shape[1]:
            return np.arange(features.shape[1])
        if not (isinstance(self.max_features, int) and self.max_features >= 1):
            raise ParameterError(
                f"AutoFeatures: max_features must be a positive integer or None, found {self.max_features!r}"
            )
        from luoshu.ml import GBDTClassifier, GBDTRegressor

        model = (GBDTClassifier if self._classification else GBDTRegressor)(
            n_estimators=30, num_leaves=15, random_state=self.random_state
        )
        importance = model.fit(features, y).feature_importances_
        self.importances_ = importance
        return np.sort(np.argsort(-importance, kind="stable")[: self.max_features])

    # --- transform ----------------------------------------------------------------------------------------
    def transform(self, X) -> np.ndarray:
        self._check_is_fitted()
        X = self._table(X, fitting=False)
        values = self._numeric(X, self.numeric_columns_)
        encoded = {}
        for name, cats in self.categories_.items():
            _, codes = _codes(self._raw_field(X, name), cats)
            known = codes >= 0
            freq = np.where(known, self.frequencies_[name][np.maximum(codes, 0)], 0.0)
            target = np.where(known[:, None], self.target_means_[name][np.maximum(codes, 0)], self.prior_[None, :])
            encoded[name] = (freq, target)
        return self._assemble(X, values, encoded)[0][:, self.selected_]

    def slot_keys(self, X) -> np.ndarray:
        """(n, fields + crosses) int64 keys: per categorical field and chosen cross (in `slot_names_`
        order) the training category's index + 1, or 0 for a category training never saw."""
        self._check_is_fitted()
        X = self._table(X, fitting=False)
        keys = np.zeros((X.shape[0], len(self.categories_)), dtype=np.int64)
        for s, (name, cats) in enumerate(self.categories_.items()):
            _, codes = _codes(self._raw_field(X, name), cats)
            keys[:, s] = codes + 1
        return keys

    @property
    def slot_names_(self) -> list[str]:
        return list(self.categories_)

    @property
    def slot_sizes_(self) -> list[int]:
        """Keys per slot: the training categories plus the unseen key 0."""
        return [len(c) + 1 for c in self.categories_.values()]

    def _raw_field(self, X: np.ndarray, name: str) -> np.ndarray:
        if "*" in name:
            a, b = (int(p[1:]) for p in name.split("*"))
            return self._cross_values(X, a, b)
        return X[:, int(name[1:])].astype(str)

    def _check_is_fitted(self) -> None:
        if not hasattr(self, "selected_"):
            from luoshu.ml.base import NotFittedError

            raise NotFittedError("AutoFeatures: this transformer is not fitted yet; call fit first")

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        if not hasattr(self, "selected_"):
            raise TuneError("AutoFeatures: not fitted yet")
        return self.feature_names_all_[self.selected_]


@dataclass
class CTRData:
    """What `write_ctr_data` wrote: the file list to name as `source` / `eval_source`, and the shape."""

    source: str
    slot_size_array: list[int]
    dense_dim: int
    num_slots: int
    num_rows: int


def write_ctr_data(
    features: AutoFeatures, X, y, folder: str | os.PathLike, *, fit: bool = False, num_files: int = 1
) -> CTRData:
    """Writes the table X, y as a `luoshu.ctr` Parquet data set in `folder` through `features`.

    Columns `label`, `I1`.. (the engineered features, `features.transform`) and `C1`.. (one slot per
    categorical field and chosen cross, `features.slot_keys`), in `num_files` files listed in
    `folder/file_list.txt`. With `fit=True` the features are fitted on these rows first, and the rows
    get out-of-fold target encodings (`fit_transform`): use it for the training set, then `fit=False`
    for the evaluation set. Pass `slot_size_array` to `ctr.DataReaderParams` so each slot's keys get
    their own range.
    """
    from luoshu.ctr.reader import write_file_list
    from luoshu.data.parquet import write_ctr_parquet

    if not (isinstance(num_files, int) and num_files >= 1):
        raise ParameterError(f"write_ctr_data: num_files must be an integer >= 1, found {num_files!r}")
    dense = features.fit_transform(X, y) if fit else features.transform(X)
    keys = features.slot_keys(X)
    label = np.asarray(y).reshape(-1)
    if getattr(features, "_classification", False):
        if len(features.classes_) != 2:
            raise DataError(f"write_ctr_data: CTR labels are binary, found {len(features.classes_)} classes")
        label = (label == features.classes_[1]).astype(np.float32)
    if len(label) != len(dense):
        raise DataError(f"write_ctr_data: X has {len(dense)} rows but y has {len(label)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(label)
    files = []
    for i in range(num_files):
        part = slice(n * i // num_files, n * (i + 1) // num_files)
        path = folder / f"part_{i}.parquet"
        write_ctr_parquet(path, {"dense": dense[part], "sparse": keys[part], "label": label[part]})
        files.append(path.name)
    source = folder / "file_list.txt"
    write_file_list(source, files)
    return CTRData(str(source), features.slot_sizes_, dense.shape[1], keys.shape[1], n)
