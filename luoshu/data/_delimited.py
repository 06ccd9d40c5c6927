"""Streaming delimited text (TSV/CSV) in line chunks: pyarrow parses each chunk, and when it
refuses one, a line-by-line rescan of that chunk names the exact line, column and value."""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv

from luoshu.data._files import open_binary
from luoshu.data.errors import DataError

# per-column kinds: "int" (may be empty when nullable), "float", "str"
_PA_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def _check_field(text: str, kind: str, nullable: bool) -> str | None:
    """Why `text` is not a valid `kind` value, or None when it is."""
    if text == "":
        return None if nullable or kind == "str" else "an empty value"
    try:
        if kind == "int":
            int(text)
        elif kind == "float":
            float(text)
    except ValueError:
        return f"the value {text!r}"
    return None


def _locate(path, lines: list[bytes], first_line: int, names, kinds, nullable, delimiter: str, arrow_msg: str):
    for k, raw in enumerate(lines):
        line_no = first_line + k
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not text:
            continue
        fields = text.split(delimiter)
        if len(fields) != len(names):
            return DataError(f"{path}: line {line_no}: expected {len(names)} columns, found {len(fields)}")
        for name, kind, null_ok, field in zip(names, kinds, nullable, fields):
            why = _check_field(field, kind, null_ok)
            if why:
                kind_name = {"int": "an integer", "float": "a number"}.get(kind, "text")
                return DataError(f"{path}: line {line_no}, column {name!r}: expected {kind_name}, found {why}")
    last = first_line + len(lines) - 1
    return DataError(f"{path}: lines {first_line}-{last}: cannot parse: {arrow_msg}")


def iter_delimited(path: str | os.PathLike, names: Sequence[str], kinds: Sequence[str], nullable: Sequence[bool],
                   delimiter: str, header: Sequence[str] | None = None,
                   chunk_rows: int = 1 << 16) -> Iterator[tuple[int, pa.Table]]:
    """Yields `(first line number, table)` per chunk of up to `chunk_rows` lines (1-based line
    numbers; `header`, when given, must match the first line)."""
    # pyarrow's delimiter is one byte; a longer one (MovieLens-1M "::") is rewritten to a tab.
    arrow_delim = delimiter if len(delimiter) == 1 else "\t"
    options = dict(
        read_options=pacsv.ReadOptions(column_names=list(names)),
        parse_options=pacsv.ParseOptions(delimiter=arrow_delim, quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={n: _PA_TYPES[k] for n, k in zip(names, kinds)},
            null_values=[""], strings_can_be_null=False, quoted_strings_can_be_null=False))
    with open_binary(path) as f:
        line_no = 1
        if header is not None:
            first = f.readline().decode("utf-8", errors="replace").rstrip("\r\n")
            found = [h.strip() for h in first.split(delimiter)]
            if found != list(header):
                raise DataError(f"{path}: line 1: expected the header {delimiter.join(header)!r}, found {first!r}")
            line_no = 2
        while True:
            try:
                lines = list(itertools.islice(f, chunk_rows))
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: corrupt or truncated gzip stream after line {line_no - 1}: {exc}") from None
            if not lines:
                return
            chunk = b"".join(lines)
            if not chunk.endswith(b"\n"):
                chunk += b"\n"
            if arrow_delim != delimiter:
                chunk = chunk.replace(delimiter.encode(), b"\t")
            try:
                table = pacsv.read_csv(io.BytesIO(chunk), **options)
            except pa.ArrowInvalid as exc:
                raise _locate(path, lines, line_no, names, kinds, nullable, delimiter, str(exc)) from None
            # pyarrow accepts what the line rules refuse in one case: an empty non-nullable field.
            for name, null_ok in zip(names, nullable):
                if not null_ok and table.column(name).null_count:
                    raise _locate(path, lines, line_no, names, kinds, nullable, delimiter, "missing value")
            yield line_no, table
            line_no += len(lines)
