"""The error data readers, loaders and transforms raise for bad input."""

from __future__ import annotations

from luoshu.core.errors import Error


class DataError(Error, ValueError):
    """Bad data: a malformed file (names the file and the byte, record or line), a missing
    dataset file, a batch that cannot be collated, or a transform given an image it cannot take."""
