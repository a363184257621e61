"""Progress bars for long loops (training epochs, relaxations, ingestion), one switch for all of them.

A thin layer over tqdm so that every stage shows progress the same way and so that it stays quiet where nobody is
watching: bars are drawn on stderr only when stderr is a terminal, unless ``MFHULL_PROGRESS`` says otherwise
(``1``/``true``: always, ``0``/``false``: never). Library code calls :func:`progress` and never tqdm directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def progress_enabled() -> bool:
    """Whether bars are drawn: ``MFHULL_PROGRESS`` when set, else whether stderr is a terminal."""
    value = os.environ.get("MFHULL_PROGRESS", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar (structures done / total, rate, ETA), disabled when :func:`progress_enabled` is false.

    Use as an iterable wrapper (``for x in progress(xs, desc="relax")``) or as a manual bar
    (``bar = progress(total=n); bar.update(1); bar.set_postfix(loss=...); bar.close()``).
    """
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=not progress_enabled(),
        dynamic_ncols=True,
        file=sys.stderr,
        **kwargs,
    )
