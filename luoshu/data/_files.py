"""Opening local data files: transparent gzip (detected by its magic bytes) and clear errors."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO

from luoshu.data.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Opens `path` for reading bytes, decompressing it on the fly when it is gzip."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (luoshu never downloads; put the dataset files there)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}") from None
    if f.peek(2)[:2] != _GZIP_MAGIC:
        return f
    f.close()
    return gzip.open(path, "rb")  # owns (and closes) its file


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole (decompressed) content of `path`."""
    with open_binary(path) as f:
        try:
            return f.read()
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip stream: {exc}") from None
