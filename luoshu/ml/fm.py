"""Factorization machines: `FactorizationMachine` (2-way FM) and `FieldAwareFM` (FFM), classification or regression.

FM: `y = w0 + <w, x> + sum_{i<j} <v_i, v_j> x_i x_j`, computed as
`0.5 * sum_f ((X V)_f^2 - (X^2 V^2)_f)` (Rendle's O(nnz k) form). FFM gives each feature
one factor per field: `sum_{i<j} <v_{i,F(j)}, v_{j,F(i)}> x_i x_j`, computed per pair of
fields from `A[f, g] = sum_{i in f} x_i v_{i,g}` (prediction; torch kernels). Training runs one
compiled epoch per pass (`_fm_kernels`: forward, backward and mini-batch AdaGrad fused over each batch's
non-zeros; only the touched features' rows are updated and regularised, as on the parameter servers).
Classification with K > 2 classes trains K score functions under a softmax. Inputs may be dense or CSR.

Parameter-server mode (`FactorizationMachine(ps_addresses=...)` or `ps="launch"` under
`luoshu launch --servers S`): each feature's row `[w_i, v_i]` lives in a `luoshu.ps`
table keyed by the raw column index (any id below 2^63, e.g. hashed ids up to 2^40), the
servers apply AdaGrad, and each worker pulls only the rows its batch touches. After
`fit` the touched rows are pulled once more so `predict` and `save` need no server.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.utils import ClassifierTags, RegressorTags
from sklearn.utils.metaestimators import available_if

from luoshu.ml import _fm_kernels as _kernels
from luoshu.ml.base import (
    DataError,
    Estimator,
    ParameterError,
    check_choice,
    check_positive,
    check_X,
    check_X_y,
    encode_labels,
    to_torch,
)

__all__ = ["FactorizationMachine", "FieldAwareFM", "SparseLogisticRegression"]


def _loss_and_residual(task: str, k_out: int, Z: torch.Tensor, target: torch.Tensor):
    """Per-row loss and dLoss/dZ for scores Z (b, K)."""
    if task == "regression":
        r = Z - target
        return 0.5 * (r * r).sum(1), r
    if k_out == 1:
        return torch.nn.functional.softplus(Z[:, 0]) - target[:, 0] * Z[:, 0], torch.sigmoid(Z) - target
    lse = torch.logsumexp(Z, 1, keepdim=True)
    return (lse[:, 0] - (Z * target).sum(1)), torch.exp(Z - lse) - target


def _is_classifier(est) -> bool:
    return est.task == "classification"


def columns_of_ids(X, ids: np.ndarray) -> sp.csr_matrix:
    """X with column `ids[j]` renumbered j, for a model trained on parameter servers: only the feature ids
    its data touched have parameters, so other columns weigh 0 (dropped). At least one column."""
    X = sp.csr_matrix(X)
    pos = np.clip(np.searchsorted(ids, X.indices), 0, max(len(ids) - 1, 0))
    known = (ids[pos] == X.indices) if len(ids) else np.zeros(len(X.indices), dtype=bool)
    return sp.csr_matrix((np.where(known, X.data, 0.0), pos, X.indptr), shape=(X.shape[0], max(len(ids), 1)))


class _FMBase(Estimator):
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        # one class, two roles: the task parameter decides which sklearn contract applies
        if self.task == "classification":
            tags.estimator_type, tags.classifier_tags = "classifier", ClassifierTags()
        else:
            tags.estimator_type, tags.regressor_tags = "regressor", RegressorTags()
        return tags

    def _check_common(self) -> None:
        check_choice(self, "task", self.task, ("classification", "regression"))
        check_positive(self, n_epochs=self.n_epochs, batch_size=self.batch_size, learning_rate=self.learning_rate)
        if not (isinstance(self.n_factors, (int, np.integer)) and self.n_factors >= 0):
            raise ParameterError(f"{type(self).__name__}: n_factors must be an integer >= 0, found {self.n_factors!r}")
        if not (self.reg_linear >= 0 and self.reg_factors >= 0 and self.init_std >= 0):
            raise ParameterError(f"{type(self).__name__}: reg_linear, reg_factors and init_std must be >= 0")

    def _targets(self, y) -> tuple[torch.Tensor, int]:
        if self.task == "regression":
            y = np.asarray(y, dtype=np.float64)
            return torch.from_numpy(y)[:, None], 1
        self.classes_, codes = encode_labels(self, y)
        k_out = 1 if len(self.classes_) == 2 else len(self.classes_)
        codes = torch.from_numpy(codes)
        if k_out == 1:
            return (codes == 1).double()[:, None], 1
        return torch.nn.functional.one_hot(codes, k_out).double(), k_out

    # subclasses: _init_params(d, k_out, gen) -> dict; _scores(Xt, params) -> (Z, cache) and
    # _grads(Xt, params, cache, R) -> dict (prediction and the parameter-server path); _epoch(...) -> loss sum

    def _train_local(self, X, target: torch.Tensor, k_out: int) -> None:
        n, d = X.shape
        rng = np.random.default_rng(0 if self.random_state is None else self.random_state)
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        params = {name: p.numpy() for name, p in self._init_params(d, k_out, gen).items()}
        accum = {name: np.zeros_like(p) for name, p in params.items()}
        # dense input too: its non-zeros are the features a row touches
        X = sp.csr_matrix(X, dtype=np.float64)
        if not X.has_canonical_format:  # a repeated column would count as two features (FM's x_j^2 term)
            X = X.copy()
            X.sum_duplicates()
        csr = (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data)
        task_code = (
            _kernels.REGRESSION if self.task == "regression" else _kernels.BINARY if k_out == 1 else _kernels.SOFTMAX
        )
        target = np.ascontiguousarray(target.numpy())
        self.loss_curve_ = []
        for _ in range(int(self.n_epochs)):
            order = rng.permutation(n)
            total = self._epoch(csr, order, target, task_code, params, accum)
            self.loss_curve_.append(total / n)
        self.loss_curve_ = np.asarray(self.loss_curve_)
        self.feature_ids_ = None
        for name, p in params.items():
            setattr(self, name + "_", p)
        self.n_iter_ = int(self.n_epochs)

    def _predict_scores(self, X) -> np.ndarray:
        self._check_fitted("w0_")
        X = check_X(self, X, reset=False)
        ids = getattr(self, "feature_ids_", None)
        if ids is not None:
            X = columns_of_ids(X, ids)
        params = {name: torch.from_numpy(np.asarray(getattr(self, name + "_"))) for name in self._param_names}
        if ids is not None and len(ids) == 0:
            params["w"], params["V"] = (
                torch.zeros(1, 1, dtype=torch.float64),
                torch.zeros(1, 1, int(self.n_factors), dtype=torch.float64),
            )
        Z, _ = self._scores(to_torch(X), params)
        return Z.numpy()

    @available_if(_is_classifier)
    def decision_function(self, X) -> np.ndarray:
        Z = self._predict_scores(X)
        return Z[:, 0] if Z.shape[1] == 1 else Z

    @available_if(_is_classifier)
    def predict_proba(self, X) -> np.ndarray:
        Z = torch.from_numpy(self._predict_scores(X))
        if Z.shape[1] == 1:
            p = torch.sigmoid(Z[:, 0])
            return torch.stack([1 - p, p], 1).numpy()
        return torch.softmax(Z, 1).numpy()

    def predict(self, X) -> np.ndarray:
        if self.task == "regression":
            return self._predict_scores(X)[:, 0]
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]

    def score(self, X, y, sample_weight=None) -> float:
        if self.task == "regression":
            return RegressorMixin.score(self, X, y, sample_weight)
        return ClassifierMixin.score(self, X, y, sample_weight)


class FactorizationMachine(_FMBase):
    """A 2-way factorization machine trained by mini-batch AdaGrad (optionally on parameter servers)."""

    _param_names = ("w0", "w", "V")

    def __init__(
        self,
        task: str = "classification",
        n_factors: int = 8,
        n_epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 0.1,
        reg_linear: float = 0.0,
        reg_factors: float = 1e-4,
        init_std: float = 0.01,
        random_state: int | None = None,
        ps_addresses: list[str] | None = None,
        ps: str | None = None,
        ps_table: str = "luoshu_ml_fm",
    ):
        self.task = task
        self.n_factors = n_factors
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.reg_linear = reg_linear
        self.reg_factors = reg_factors
        self.init_std = init_std
        self.random_state = random_state
        self.ps_addresses = ps_addresses
        self.ps = ps
        self.ps_table = ps_table

    def fit(self, X, y):
        self._check_common()
        if self.ps is not None:
            check_choice(self, "ps", self.ps, ("launch",))
        X, y = check_X_y(self, X, y, y_numeric=self.task == "regression")
        target, k_out = self._targets(y)
        if self.ps is None and self.ps_addresses is None:
            self._train_local(X, target, k_out)
        else:
            if k_out != 1:
                raise DataError(
                    "FactorizationMachine: parameter-server training takes binary classification or "
                    f"regression, found {k_out} classes"
                )
            from luoshu.ml.ps_training import train_fm_on_servers

            train_fm_on_servers(self, sp.csr_matrix(X), target)
        return self

    def _init_params(self, d: int, k_out: int, gen) -> dict:
        k = int(self.n_factors)
        return {
            "w0": torch.zeros(k_out, dtype=torch.float64),
            "w": torch.zeros(d, k_out, dtype=torch.float64),
            "V": torch.randn(k_out, d, k, generator=gen, dtype=torch.float64) * self.init_std,
        }

    def _epoch(self, csr, order, target, task, params, accum) -> float:
        return _kernels.fm_epoch(
            *csr, order, int(self.batch_size), target, task, params["w0"], params["w"], params["V"],
            accum["w0"], accum["w"], accum["V"], float(self.learning_rate), float(self.reg_linear),
            float(self.reg_factors),
        )  # fmt: skip

    @staticmethod
    def _square(X: torch.Tensor) -> torch.Tensor:
        if X.layout == torch.sparse_csr:
            return torch.sparse_csr_tensor(
                X.crow_indices(), X.col_indices(), X.values() ** 2, size=X.shape, check_invariants=False
            )
        return X * X

    def _scores(self, X: torch.Tensor, params: dict):
        V = params["V"]  # (K, d, k)
        k_out, d, k = V.shape
        Vflat = V.permute(1, 0, 2).reshape(d, k_out * k)
        S = (X @ Vflat).view(X.shape[0], k_out, k)  # sum_i v_if x_i
        X2 = self._square(X)
        Q = (X2 @ (Vflat * Vflat)).view(X.shape[0], k_out, k)
        Z = params["w0"] + X @ params["w"] + 0.5 * (S * S - Q).sum(2)
        return Z, (S, X2)

    def _grads(self, X: torch.Tensor, params: dict, cache, R: torch.Tensor) -> dict:
        S, X2 = cache
        V = params["V"]
        k_out, d, k = V.shape
        Xt = X.t() if X.layout != torch.sparse_csr else X.to_sparse_coo().t()
        X2t = X2.t() if X2.layout != torch.sparse_csr else X2.to_sparse_coo().t()
        gw = Xt @ R + self.reg_linear * params["w"]
        RS = (R[:, :, None] * S).reshape(R.shape[0], k_out * k)
        gV = (Xt @ RS).view(d, k_out, k).permute(1, 0, 2) - (X2t @ R).T[:, :, None] * V
        gV = gV + self.reg_factors * V
        return {"w0": R.sum(0), "w": gw, "V": gV.contiguous()}


class SparseLogisticRegression(FactorizationMachine):
    """Logistic regression by mini-batch AdaGrad for sparse, high-dimensional data: an FM without factors.

    With `ps_addresses=` or `ps="launch"` the weights live on the parameter servers, one row
    per feature id (the CSR column index: hashed ids up to 2^40 need no dense array); the
    fitted `w_` holds the rows of `feature_ids_`. Binary classification; the penalty is
    `reg_linear / 2 * ||w||^2` per batch.
    """

    task = "classification"
    n_factors = 0
    reg_factors = 0.0

    def __init__(
        self,
        n_epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 0.1,
        reg_linear: float = 0.0,
        random_state: int | None = None,
        ps_addresses: list[str] | None = None,
        ps: str | None = None,
        ps_table: str = "luoshu_ml_lr",
    ):
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.reg_linear = reg_linear
        self.random_state = random_state
        self.ps_addresses = ps_addresses
        self.ps = ps
        self.ps_table = ps_table
        self.init_std = 0.0


class FieldAwareFM(_FMBase):
    """A field-aware factorization machine; `fields[i]` is feature i's field (default: one field per feature)."""

    _param_names = ("w0", "w", "V")

    def __init__(
        self,
        task: str = "classification",
        fields=None,
        n_factors: int = 4,
        n_epochs: int = 20,
        batch_size: int = 256,
        learning_rate: float = 0.1,
        reg_linear: float = 0.0,
        reg_factors: float = 1e-4,
        init_std: float = 0.01,
        random_state: int | None = None,
    ):
        self.task = task
        self.fields = fields
        self.n_factors = n_factors
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.reg_linear = reg_linear
        self.reg_factors = reg_factors
        self.init_std = init_std
        self.random_state = random_state

    def fit(self, X, y):
        self._check_common()
        X, y = check_X_y(self, X, y, y_numeric=self.task == "regression")
        d = X.shape[1]
        fields = np.arange(d) if self.fields is None else np.asarray(self.fields)
        if fields.shape != (d,) or fields.dtype.kind not in "iu" or (fields.size and fields.min() < 0):
            raise DataError(
                f"FieldAwareFM: fields must give a non-negative integer field for each of the {d} "
                f"features, found {self.fields!r}"
            )
        self.fields_ = fields.astype(np.int64)
        self.n_fields_ = int(fields.max()) + 1 if d else 0
        target, k_out = self._targets(y)
        self._train_local(X, target, k_out)
        return self

    def _init_params(self, d: int, k_out: int, gen) -> dict:
        F, k = self.n_fields_, int(self.n_factors)
        return {
            "w0": torch.zeros(k_out, dtype=torch.float64),
            "w": torch.zeros(d, k_out, dtype=torch.float64),
            "V": torch.randn(d, F, k_out, k, generator=gen, dtype=torch.float64) * self.init_std,
        }

    def _epoch(self, csr, order, target, task, params, accum) -> float:
        return _kernels.ffm_epoch(
            *csr, self.fields_, order, int(self.batch_size), target, task, params["w0"], params["w"], params["V"],
            accum["w0"], accum["w"], accum["V"], float(self.learning_rate), float(self.reg_linear),
            float(self.reg_factors),
        )  # fmt: skip

    def _field_onehot(self, d: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(self.fields_), self.n_fields_).double()  # (d, F)

    def _scores(self, X: torch.Tensor, params: dict):
        V = params["V"]  # (d, F, K, k): v_{i, g}
        d, F, k_out, k = V.shape
        onehot = self._field_onehot(d)
        # W[i, f, g] = v_{i,g} when feature i is in field f: A = X W gives A[f, g] = sum_{i in f} x_i v_{i,g}
        W = onehot[:, :, None, None, None] * V[:, None]  # (d, F, F, K, k)
        A = (X @ W.reshape(d, -1)).view(-1, F, F, k_out, k)
        pair = (A * A.transpose(1, 2)).sum(4)  # (b, F, F, K): <A_fg, A_gf>
        own = V[torch.arange(d), torch.from_numpy(self.fields_)]  # v_{i, F(i)}: (d, K, k)
        X2 = FactorizationMachine._square(X)
        diag = X2 @ (own * own).sum(2)  # sum_i x_i^2 |v_{i,F(i)}|^2: (b, K)
        # sum over f<g of pair, plus half of each f==g term minus the i==j terms
        Z = params["w0"] + X @ params["w"] + 0.5 * (pair.sum((1, 2)) - diag)
        return Z, (A, X2, onehot, own)

    def _grads(self, X: torch.Tensor, params: dict, cache, R: torch.Tensor) -> dict:
        A, X2, onehot, own = cache
        V = params["V"]
        d, F, k_out, k = V.shape
        Xt = X.t() if X.layout != torch.sparse_csr else X.to_sparse_coo().t()
        X2t = X2.t() if X2.layout != torch.sparse_csr else X2.to_sparse_coo().t()
        # dZ/dA[f, g] = A[g, f] (the f == g term is halved twice over: 0.5 * 2 A_ff)
        GA = R[:, None, None, :, None] * A.transpose(1, 2)
        gW = (Xt @ GA.reshape(GA.shape[0], -1)).view(d, F, F, k_out, k)
        gV = (onehot[:, :, None, None, None] * gW).sum(1)  # dW[i, f, g]/dV[i, g] = [F(i) == f]
        gV[torch.arange(d), torch.from_numpy(self.fields_)] -= (X2t @ R)[:, :, None] * own
        gV = gV + self.reg_factors * V
        return {"w0": R.sum(0), "w": Xt @ R + self.reg_linear * params["w"], "V": gV}
