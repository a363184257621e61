"""Relaxation settings shared by the ASE path and the batched relaxer (defaults as matbench-discovery: FIRE,
fmax 0.05 eV/A, 500 steps, Frechet cell filter)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.relax.fire import FireParams

__all__ = ["DEFAULT_SETTINGS", "ENGINES", "OPTIMIZER_NAMES", "RelaxSettings"]

OPTIMIZER_NAMES = ("BFGS", "FIRE", "LBFGS")
ENGINES = ("auto", "batched", "ase")

#: fields that only change speed or memory, never the result: left out of the content key
_PERFORMANCE_ONLY = ("max_atoms", "max_edges", "skin")


@dataclass(frozen=True)
class RelaxSettings:
    """Convergence: the optimizer's force measure below ``fmax`` (eV/A; with the cell filter it includes the
    Frechet cell forces); ``steps`` caps the optimizer.

    engine: 'batched' (:mod:`pipeline.relax.batched`, FIRE only, needs an mfhull potential), 'ase' (the reference
    path: one structure at a time through an ASE calculator) or 'auto' (batched when possible).
    max_atoms / max_edges: batch budget of the batched relaxer; ``max_atoms="auto"`` (default) measures it on the
    device (:mod:`pipeline.relax.autobatch`: the peak memory of probe calls against the free memory; on CPU at
    most 512 atoms), and then ``max_edges``, when given, still applies. skin (A): neighbour-list skin.
    max_force (eV/A), volume_range (x initial volume): guards that stop a run as failed.
    symmetry: keep the starting space group (spglib, as ASE's FixSymmetry at ``symprec``)."""

    fmax: float = 0.05
    steps: int = 500
    optimizer: str = "FIRE"
    relax_cell: bool = True
    engine: str = "auto"
    max_atoms: int | str = "auto"
    max_edges: int | None = None
    skin: float = 1.0
    max_force: float = 1.0e3
    volume_range: tuple[float, float] = (0.2, 5.0)
    symmetry: bool = False
    symprec: float = 0.01
    fire: FireParams = field(default_factory=FireParams)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZER_NAMES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown relaxation engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.engine == "batched" and self.optimizer != "FIRE":
            raise ValueError(f"the batched engine runs FIRE only, not {self.optimizer}; use engine='ase'")
        if not self.fmax > 0 or self.steps < 0:
            raise ValueError(f"need fmax > 0 and steps >= 0, got fmax={self.fmax}, steps={self.steps}")
        if self.max_atoms != "auto" and (isinstance(self.max_atoms, (str, bool)) or not self.max_atoms >= 1):
            raise ValueError(f"max_atoms must be 'auto' or an integer >= 1, got {self.max_atoms!r}")
        if self.max_edges is not None and not self.max_edges >= 1:
            raise ValueError(f"max_edges must be None or an integer >= 1, got {self.max_edges!r}")
        low, high = self.volume_range
        if not 0 < low < 1 < high:
            raise ValueError(f"volume_range must satisfy 0 < low < 1 < high, got {self.volume_range}")

    def result_settings(self, engine: str, dtype: str | None = None) -> dict[str, Any]:
        """The settings that can change a result, for keys and tables: these fields, the engine actually used,
        the cell filter ('FrechetCellFilter' or 'none') and the floating-point type the model ran in
        (``dtype``, e.g. 'float32'; None for a calculator that does not say)."""
        out = {k: v for k, v in asdict(self).items() if k not in _PERFORMANCE_ONLY}
        out["engine"] = engine
        out["volume_range"] = list(self.volume_range)
        out["filter"] = "FrechetCellFilter" if self.relax_cell else "none"
        out["dtype"] = dtype
        return out


DEFAULT_SETTINGS = RelaxSettings()
