"""The automl tests share the ml tests' one-thread fixture (many small kernels on a shared CPU)."""

from tests.ml.conftest import one_torch_thread  # noqa: F401  (autouse)
