"""Relax structures with any ASE calculator (ASE optimizers + FrechetCellFilter), one row per structure.

``relax_structure`` relaxes one structure; ``relax_many`` runs a batch where a failure becomes a ``failed`` row
with its error and the rest carry on, appending each result to a resumable Parquet dataset when one is given
(a re-run skips the ids already stored for the same model and fidelity).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.io import ParquetDataset
from pipeline.schema import KEYS, RELAXATIONS_SCHEMA

log = logging.getLogger(__name__)

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


@dataclass(frozen=True)
class RelaxSettings:
    """Convergence: max force ``fmax`` (eV/A; stresses scaled by the cell filter); ``steps`` caps the optimizer."""

    fmax: float = 0.05
    steps: int = 300
    optimizer: str = "FIRE"
    relax_cell: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}")


def _to_atoms(structure: Structure | Atoms) -> Atoms:
    return structure.copy() if isinstance(structure, Atoms) else AseAtomsAdaptor.get_atoms(structure)


def _to_structure(structure: Structure | Atoms) -> Structure:
    return AseAtomsAdaptor.get_structure(structure) if isinstance(structure, Atoms) else structure


def relax_structure(
    candidate_id: str,
    structure: Structure | Atoms,
    calculator: Calculator,
    settings: RelaxSettings = RelaxSettings(),
    *,
    model_id: str = "unknown",
    fidelity: str = "unknown",
    role: str = "candidate",
) -> dict[str, Any]:
    """Relax one structure; return a RELAXATIONS_SCHEMA row (status 'failed' with the error if anything broke)."""
    start = time.perf_counter()
    initial = _to_structure(structure)
    comp = initial.composition
    row: dict[str, Any] = {
        "candidate_id": str(candidate_id), "model_id": model_id, "fidelity": fidelity, "role": role,
        "formula": comp.reduced_formula, "chemsys": comp.chemical_system,
        "nsites": len(initial), "structure_initial": json.dumps(initial.as_dict()), "structure": None,
        "energy": None, "energy_per_atom": None, "fmax": None, "smax": None, "n_steps": None,
        "status": "failed", "error": None, "wall_s": None,
    }
    try:
        atoms = _to_atoms(structure)
        atoms.calc = calculator
        relax_cell = settings.relax_cell and bool(atoms.pbc.all())
        target = FrechetCellFilter(atoms) if relax_cell else atoms
        opt = OPTIMIZERS[settings.optimizer](target, logfile=None)
        converged = bool(opt.run(fmax=settings.fmax, steps=settings.steps))
        energy = float(atoms.get_potential_energy())
        if not np.isfinite(energy):
            raise FloatingPointError("energy is NaN or inf after relaxation")
        forces = atoms.get_forces()
        row.update(
            structure=json.dumps(AseAtomsAdaptor.get_structure(atoms).as_dict()),
            energy=energy, energy_per_atom=energy / len(atoms),
            fmax=float(np.linalg.norm(forces, axis=1).max()),
            smax=float(np.abs(atoms.get_stress()).max()) if relax_cell else None,
            n_steps=int(opt.nsteps), status="converged" if converged else "not_converged",
        )
    except Exception as exc:  # noqa: BLE001 - a failed structure is a row with its error
        row["error"] = f"{type(exc).__name__}: {exc}"
        log.warning("relaxation of %s failed: %s", candidate_id, row["error"])
    row["wall_s"] = time.perf_counter() - start
    return row


def relax_many(
    items: Iterable[tuple[str, Structure | Atoms]],
    calculator: Calculator | Callable[[], Calculator],
    settings: RelaxSettings = RelaxSettings(),
    *,
    model_id: str = "unknown",
    fidelity: str = "unknown",
    role: str = "candidate",
    out: str | Path | None = None,
) -> pa.Table:
    """Relax every (id, structure); with ``out`` (a dataset folder) each row is stored as it finishes and ids
    already stored for this model and fidelity are skipped. Returns this batch's rows (stored ones included)."""
    dataset = ParquetDataset(out, RELAXATIONS_SCHEMA, KEYS["relaxations"]) if out is not None else None
    done: dict[str, dict[str, Any]] = {}
    if dataset is not None and dataset.exists():
        for r in dataset.read().to_pylist():
            if r["model_id"] == model_id and r["fidelity"] == fidelity:
                done[r["candidate_id"]] = r
    rows = []
    calc = calculator() if callable(calculator) and not isinstance(calculator, Calculator) else calculator
    for cid, structure in items:
        if cid in done:
            rows.append(done[cid])
            continue
        row = relax_structure(cid, structure, calc, settings, model_id=model_id, fidelity=fidelity, role=role)
        if dataset is not None:
            dataset.append(pa.Table.from_pylist([row], schema=RELAXATIONS_SCHEMA))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=RELAXATIONS_SCHEMA)
