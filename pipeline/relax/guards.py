"""Run-time guards shared by both relaxation paths: a relaxation that meets one stops as a failed row.

NaN/inf energy or forces, a force above ``max_force`` (eV/A) and a cell volume outside ``volume_range`` times the
initial volume (collapse or blow-up). These only stop runs that have gone wrong; physical plausibility checks of
finished relaxations are :mod:`pipeline.relax.sanity`'s job.
"""

from __future__ import annotations

import math
from typing import Protocol

__all__ = ["GuardError", "check_guards"]


class GuardError(RuntimeError):
    """A relaxation went wrong (the message names the problem and the step)."""


class _Limits(Protocol):
    max_force: float
    volume_range: tuple[float, float]


def check_guards(*, finite: bool, max_force: float, volume: float, volume0: float | None, opts: _Limits,
                 step: int) -> None:
    """Raise :class:`GuardError` when a guard is hit (``volume0`` None: the cell is not relaxed)."""
    if not finite or not math.isfinite(max_force):
        raise GuardError(f"energy or forces are NaN/inf at step {step}")
    if max_force > opts.max_force:
        raise GuardError(f"force {max_force:.3g} eV/A above the limit {opts.max_force:g} at step {step}")
    if volume0:
        ratio = volume / volume0
        low, high = opts.volume_range
        if not low <= ratio <= high:
            what = "collapsed" if ratio < low else "blew up"
            raise GuardError(f"volume {what}: V/V0 = {ratio:.3g} outside [{low:g}, {high:g}] at step {step}")
