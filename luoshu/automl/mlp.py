"""Small MLPs of the model zoo as scikit-learn estimators: `MLPClassifier` and `MLPRegressor`, so `select` can
search them beside the `luoshu.ml` families.

Each wraps `luoshu.models.MLP` (`n_layers` hidden Linear-ReLU layers of `width` units) in a
define-and-run graph: inputs are standardised with the training mean and scale, the loss is cross
entropy (classes) or mean squared error (the target standardised too), and `luoshu.optim.Adam`
minimises it over shuffled mini-batches for `n_epochs`. Prediction runs the same graph's logits.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from luoshu.ml.base import NotFittedError, ParameterError, check_X, check_X_y, encode_labels


class _MLP(BaseEstimator):
    def __init__(
        self,
        width: int = 64,
        n_layers: int = 1,
        learning_rate: float = 1e-2,
        n_epochs: int = 50,
        batch_size: int = 64,
        random_state: int | None = 0,
    ):
        self.width = width
        self.n_layers = n_layers
        self.learning_rate = learning_rate
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.random_state = random_state

    def _check_params(self) -> None:
        name = type(self).__name__
        for pname in ("width", "n_layers", "n_epochs", "batch_size"):
            v = getattr(self, pname)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ParameterError(f"{name}: {pname} must be an integer >= 1, found {v!r}")
        if not self.learning_rate > 0:
            raise ParameterError(f"{name}: learning_rate must be > 0, found {self.learning_rate!r}")
        self._hidden = (int(self.width),) * int(self.n_layers)

    def _train(self, X: np.ndarray, target: np.ndarray, n_out: int, classification: bool) -> None:
        import luoshu as ls

        self._check_params()
        self.mean_ = X.mean(0)
        self.scale_ = np.where(X.std(0) > 0, X.std(0), 1.0)
        Xs = ((X - self.mean_) / self.scale_).astype(np.float32)
        seed = 0 if self.random_state is None else int(self.random_state)
        ls.manual_seed(seed)
        graph = ls.Graph()
        with graph:
            x = ls.placeholder("x", shape=(None, X.shape[1]), dtype="float32")
            y = ls.placeholder(
                "y", shape=(None,) if classification else (None, 1), dtype="int64" if classification else "float32"
            )
            model = ls.models.MLP(ls.models.MLPConfig(in_features=X.shape[1], hidden=self._hidden, num_classes=n_out))
            logits = model(x)
            F = ls.nn.functional
            loss = F.cross_entropy(logits, y) if classification else F.mse_loss(logits, y)
            step = ls.optim.Adam(model.parameters(), lr=float(self.learning_rate)).minimize(loss)
        rng = np.random.default_rng(seed)
        n, bs = len(Xs), int(self.batch_size)
        self.loss_curve_ = []
        for _ in range(int(self.n_epochs)):
            order = rng.permutation(n)
            total = 0.0
            for a in range(0, n, bs):
                rows = order[a : a + bs]
                value, _ = graph.run([loss, step], feed_dict={x: Xs[rows], y: target[rows]})
                total += float(value) * len(rows)
            self.loss_curve_.append(total / n)
        self.loss_curve_ = np.asarray(self.loss_curve_)
        self.n_iter_ = int(self.n_epochs)
        self._graph, self._x, self._logits = graph, x, logits

    def _forward(self, X) -> np.ndarray:
        if not hasattr(self, "_graph"):
            raise NotFittedError(f"{type(self).__name__}: this estimator is not fitted yet; call fit first")
        X = check_X(self, X, reset=False)
        Xs = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_).astype(np.float32)
        return np.asarray(self._graph.run(self._logits, feed_dict={self._x: Xs}), dtype=np.float64)


class MLPClassifier(ClassifierMixin, _MLP):
    """A zoo MLP trained with cross entropy; `predict_proba` is the softmax of its logits."""

    def fit(self, X, y) -> MLPClassifier:
        X, y = check_X_y(self, X, y)
        self.classes_, codes = encode_labels(self, y)
        self._train(np.asarray(X, dtype=np.float64), codes.astype(np.int64), max(len(self.classes_), 2), True)
        return self

    def predict_proba(self, X) -> np.ndarray:
        z = self._forward(X)
        z = np.exp(z - z.max(1, keepdims=True))
        p = z / z.sum(1, keepdims=True)
        return p[:, : len(self.classes_)] / p[:, : len(self.classes_)].sum(1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class MLPRegressor(RegressorMixin, _MLP):
    """A zoo MLP trained with mean squared error on the standardised target."""

    def fit(self, X, y) -> MLPRegressor:
        X, y = check_X_y(self, X, y, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std()) if y.std() > 0 else 1.0
        target = ((y - self.y_mean_) / self.y_scale_).astype(np.float32)[:, None]
        self._train(np.asarray(X, dtype=np.float64), target, 1, False)
        return self

    def predict(self, X) -> np.ndarray:
        return self._forward(X)[:, 0] * self.y_scale_ + self.y_mean_
