"""Argument types for the ``mfhull`` command line: every number and path is checked when it is parsed, so a bad
value ends as argparse's one-line usage error (exit 2) naming the option, never as a traceback later.

argparse calls ``type(value)`` and turns ``ArgumentTypeError`` into ``mfhull CMD: error: argument --X: <msg>``;
these factories only add the checks argparse lacks (finite, ranges, file vs folder). The Prefect flows and the
API may reuse them to validate the same settings.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa


def _number(kind: type, value: str) -> float | int:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return number


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (either bound may be None)."""

    def parse(value: str) -> int:
        number = int(_number(int, value))
        if (low is not None and number < low) or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{number} is outside {_bounds(low, high)}")
        return number

    parse.__name__ = "integer"
    return parse


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] (``low_open``/``high_open`` exclude the bound)."""

    def parse(value: str) -> float:
        number = float(_number(float, value))
        below = low is not None and (number <= low if low_open else number < low)
        above = high is not None and (number >= high if high_open else number > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{number:g} is outside {_bounds(low, high, low_open, high_open)}")
        return number

    parse.__name__ = "number"
    return parse


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"


def existing_path(value: str) -> Path:
    """A file or folder that exists."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return path


def existing_file(value: str) -> Path:
    """A readable file (not a folder)."""
    path = existing_path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{value}: not readable")
    return path


def out_dir(value: str) -> Path:
    """An output folder: may not exist yet, but must not be a file, nor under a file."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, expected a folder (or a new path)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, not a folder")
            break
    return path


def out_file(value: str) -> Path:
    """An output file: may not exist yet, but must not be a folder, and its parent must not be a file."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder, expected a file name")
    out_dir(str(path.parent))
    return path


def choice(*options: str, case: bool = True) -> Callable[[str], str]:
    """One of ``options`` (compared case-insensitively when ``case`` is False; the canonical spelling returned)."""

    def parse(value: str) -> str:
        for option in options:
            if value == option or (not case and value.lower() == option.lower()):
                return option
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(options)}")

    parse.__name__ = "choice"
    return parse


def read_input_table(option: str, path: str | os.PathLike[str], schema: pa.Schema) -> pa.Table:
    """A Parquet file or dataset given as ``option``, cast to ``schema``; ValueError naming the option, the file
    and the problem (missing columns, wrong types, not Parquet) instead of pyarrow's traceback."""
    from pipeline.io import read_table

    name = (schema.metadata or {}).get(b"name", b"table").decode()
    try:
        table = read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ValueError(f"{option} {path}: not a readable Parquet file or dataset ({_first_line(exc)})") from None
    missing = [f.name for f in schema if f.name not in table.column_names and not f.nullable]
    if missing:
        raise ValueError(f"{option} {path}: not a {name} table (missing columns: {', '.join(missing)})")
    try:
        table = table.select([f.name for f in schema if f.name in table.column_names])
        for f in schema:
            if f.name not in table.column_names:
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table.select(schema.names).cast(schema)
    except (pa.ArrowException, ValueError) as exc:
        raise ValueError(f"{option} {path}: columns do not fit the {name} schema ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def int_or_auto(low: int | None = None) -> Callable[[str], int | str]:
    """'auto' or an integer >= ``low``."""
    as_int = int_range(low)

    def parse(value: str) -> int | str:
        return "auto" if value.strip().lower() == "auto" else as_int(value)

    parse.__name__ = "'auto' or integer"
    return parse
