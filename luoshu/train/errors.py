"""The error of a training job that cannot run as configured, and the "did you mean" hint its messages carry."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from luoshu.core.errors import Error


class TrainConfigError(Error, ValueError):
    """A training job that cannot run as configured: an unknown model, dataset, optimizer or key, a
    missing data path, a model that does not fit the dataset's task, a bad value, nothing to resume."""


class Terminated(KeyboardInterrupt):
    """A training run stopped by SIGTERM after saving a checkpoint (a KeyboardInterrupt, as Ctrl-C's is,
    so code that stops on one stops on both); `luoshu train` exits with 143 (128 + SIGTERM)."""


def suggestion(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the known name closest to `name`, or "" when none is close."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
