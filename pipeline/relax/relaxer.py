"""Relax structures, one row per structure: the batched relaxer for mfhull potentials, the ASE path as reference.

``relax_structure`` relaxes one structure through any ASE calculator (ASE optimizer + FrechetCellFilter): the
reference implementation. ``relax_many`` relaxes a list: with an :class:`MFPotentialCalculator` and FIRE it runs
the batched relaxer (:mod:`pipeline.relax.batched`, same steps and convergence test as the ASE path), otherwise
(or with ``engine='ase'``) the ASE path one structure at a time. A failure becomes a ``failed`` row with its
error and the rest carry on; every input appears exactly once in the output, in input order. With ``out`` (a
dataset folder) rows are stored by content key (:mod:`pipeline.relax.store`): a re-run reuses a row only for the
same structure, checkpoint, model fidelity and settings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.calculators.calculator import Calculator
from ase.constraints import FixSymmetry
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS, FIRE, LBFGS
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.progress import progress
from pipeline.relax.batched import RelaxResult, relax_batched, resolve_budget
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.guards import check_guards
from pipeline.relax.settings import DEFAULT_SETTINGS, RelaxSettings
from pipeline.relax.store import RelaxationStore, relax_key
from pipeline.schema import RELAXATIONS_SCHEMA

log = logging.getLogger(__name__)

__all__ = ["OPTIMIZERS", "RelaxSettings", "model_dtype", "relax_many", "relax_structure", "resolve_engine"]

OPTIMIZERS = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}


def _to_atoms(structure: Structure | Atoms) -> Atoms:
    return structure.copy() if isinstance(structure, Atoms) else AseAtomsAdaptor.get_atoms(structure)


def _to_structure(structure: Structure | Atoms) -> Structure:
    return AseAtomsAdaptor.get_structure(structure) if isinstance(structure, Atoms) else structure


def resolve_engine(calculator: Calculator, settings: RelaxSettings) -> str:
    """'batched' or 'ase' for this calculator and settings ('batched' asked with another calculator: error)."""
    batchable = isinstance(calculator, MFPotentialCalculator) and settings.optimizer == "FIRE"
    if settings.engine == "batched" and not batchable:
        raise ValueError(f"engine 'batched' needs an MFPotentialCalculator and FIRE, got "
                         f"{type(calculator).__name__} and {settings.optimizer}; use engine='ase'")
    return "batched" if settings.engine == "batched" or (settings.engine == "auto" and batchable) else "ase"


def model_dtype(calculator: Calculator) -> str | None:
    """'float32' / 'float64' for an mfhull calculator (the dtype its model runs in), else None."""
    if isinstance(calculator, MFPotentialCalculator):
        return str(calculator.model.shift.dtype).removeprefix("torch.")
    return None


def _base_row(candidate_id: str, structure: Structure | Atoms, *, model_id: str, fidelity: str,
              model_fidelity: str | None, role: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "candidate_id": str(candidate_id), "model_id": model_id, "fidelity": fidelity,
        "model_fidelity": model_fidelity, "relax_key": "", "settings": None, "role": role, "structure": None,
        "energy": None, "energy_per_atom": None, "fmax": None, "smax": None, "n_steps": None,
        "status": "failed", "error": None, "wall_s": None,
    }
    try:
        initial = _to_structure(structure)
    except Exception as exc:  # noqa: BLE001 - e.g. a singular cell: describe it from the Atoms, fail the row
        atoms = _to_atoms(structure)
        symbols = sorted(set(atoms.get_chemical_symbols()))
        row.update(formula=atoms.get_chemical_formula(mode="metal", empirical=True), chemsys="-".join(symbols),
                   nsites=len(atoms), error=f"unusable structure: {type(exc).__name__}: {exc}",
                   structure_initial=json.dumps({"numbers": atoms.numbers.tolist(), "cell": atoms.cell.array.tolist(),
                                                 "positions": atoms.positions.tolist(), "pbc": atoms.pbc.tolist()}))
        return row
    comp = initial.composition
    row.update(formula=comp.reduced_formula, chemsys=comp.chemical_system, nsites=len(initial),
               structure_initial=json.dumps(initial.as_dict()))
    return row


def _ase_relax(atoms: Atoms, calculator: Calculator, settings: RelaxSettings) -> RelaxResult:
    """The reference path on a copy of ``atoms`` (raises on failure)."""
    atoms.calc = calculator
    relax_cell = settings.relax_cell and bool(atoms.pbc.all())
    if settings.symmetry and atoms.pbc.all():
        atoms.set_constraint(FixSymmetry(atoms, symprec=settings.symprec))
    volume0 = atoms.get_volume() if relax_cell else None
    target = FrechetCellFilter(atoms) if relax_cell else atoms
    opt = OPTIMIZERS[settings.optimizer](target, logfile=None)

    def guard() -> None:
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        finite = bool(np.isfinite(energy) and np.isfinite(forces).all())
        check_guards(finite=finite, max_force=float(np.linalg.norm(forces, axis=1).max()) if finite else np.nan,
                     volume=atoms.get_volume() if relax_cell else 0.0, volume0=volume0, opts=settings,
                     step=opt.nsteps)

    opt.attach(guard, interval=1)
    converged = bool(opt.run(fmax=settings.fmax, steps=settings.steps))
    optimizable = opt.optimizable
    result = RelaxResult(
        0, "converged" if converged else "not_converged", atoms=atoms,
        energy=float(atoms.get_potential_energy()),
        fmax=float(optimizable.gradient_norm(optimizable.get_gradient())),
        smax=float(np.abs(atoms.get_stress()).max()) if relax_cell else None, n_steps=int(opt.nsteps),
    )
    atoms.set_constraint()  # the symmetry constraint is not part of the result
    return result


def _fill(row: dict[str, Any], result: RelaxResult) -> dict[str, Any]:
    row.update(status=result.status, error=result.error, n_steps=result.n_steps, wall_s=result.wall_s)
    if result.status != "failed" and result.atoms is not None:
        n = len(result.atoms)
        row.update(structure=json.dumps(AseAtomsAdaptor.get_structure(result.atoms).as_dict()),
                   energy=result.energy, energy_per_atom=result.energy / n, fmax=result.fmax, smax=result.smax)
    return row


def relax_structure(
    candidate_id: str,
    structure: Structure | Atoms,
    calculator: Calculator,
    settings: RelaxSettings = DEFAULT_SETTINGS,
    *,
    model_id: str = "unknown",
    fidelity: str = "unknown",
    model_fidelity: str | None = None,
    role: str = "candidate",
) -> dict[str, Any]:
    """Relax one structure on the ASE path; return a RELAXATIONS_SCHEMA row (status 'failed' with the error if
    anything broke). ``fmax`` in the row is the optimizer's own convergence measure."""
    start = time.perf_counter()
    row = _base_row(candidate_id, structure, model_id=model_id, fidelity=fidelity, model_fidelity=model_fidelity,
                    role=role)
    atoms = _to_atoms(structure)
    used = settings.result_settings("ase", model_dtype(calculator))
    row["settings"] = json.dumps(used, sort_keys=True)
    row["relax_key"] = relax_key(atoms, model_id, model_fidelity or fidelity, used)
    if row["error"] is not None:
        row["wall_s"] = time.perf_counter() - start
        return row
    try:
        result = _ase_relax(atoms, calculator, settings)
    except Exception as exc:  # noqa: BLE001 - a failed structure is a row with its error
        result = RelaxResult(0, "failed", error=f"{type(exc).__name__}: {exc}")
        log.warning("relaxation of %s failed: %s", candidate_id, result.error)
    result.wall_s = time.perf_counter() - start
    return _fill(row, result)


def relax_many(
    items: Iterable[tuple[str, Structure | Atoms]],
    calculator: Calculator | Callable[[], Calculator],
    settings: RelaxSettings = DEFAULT_SETTINGS,
    *,
    model_id: str = "unknown",
    fidelity: str = "unknown",
    model_fidelity: str | None = None,
    role: str = "candidate",
    out: str | Path | None = None,
) -> pa.Table:
    """Relax every (id, structure), one row each in input order. ``model_fidelity``: the potential's fidelity
    head (default: ``fidelity``); it is part of the content key. With ``out`` (a dataset folder) rows already
    stored under the same content key are reused and new rows are written in batches."""
    calc = calculator() if callable(calculator) and not isinstance(calculator, Calculator) else calculator
    engine = resolve_engine(calc, settings)
    used = settings.result_settings(engine, model_dtype(calc))
    settings_json = json.dumps(used, sort_keys=True)
    mfid = model_fidelity or fidelity
    store = RelaxationStore(out) if out is not None else None
    rows: list[dict[str, Any]] = []
    todo: list[tuple[int, Atoms]] = []
    for cid, structure in items:
        row = _base_row(cid, structure, model_id=model_id, fidelity=fidelity, model_fidelity=model_fidelity,
                        role=role)
        atoms = _to_atoms(structure)
        row.update(relax_key=relax_key(atoms, model_id, mfid, used), settings=settings_json)
        stored = store.get(row["relax_key"]) if store is not None else None
        if stored is not None:
            rows.append({**stored, "candidate_id": row["candidate_id"], "role": role, "fidelity": fidelity})
            continue
        rows.append(row)
        if row["error"] is None:
            todo.append((len(rows) - 1, atoms))
        elif store is not None:
            store.add([row])
    run_settings = settings
    if engine == "batched" and todo:
        assert isinstance(calc, MFPotentialCalculator)
        run_settings, budget = resolve_budget([a for _, a in todo], calc.model, calc.fidelity_idx, settings)
        batch = budget.as_dict() if budget is not None else {
            "max_atoms": settings.max_atoms, "max_edges": settings.max_edges, "method": "given"}
        with_batch = json.dumps({**used, "batch": batch}, sort_keys=True)  # recorded, not part of the key
        for k, _ in todo:
            rows[k]["settings"] = with_batch
    bar = progress(total=len(todo), desc=f"relax ({engine})", unit="structure")
    try:
        if engine == "batched":
            assert isinstance(calc, MFPotentialCalculator)
            results = relax_batched([a for _, a in todo], calc.model, calc.fidelity_idx, run_settings,
                                    on_progress=bar.update)
            for result in results:
                k = todo[result.index][0]
                _fill(rows[k], result)
                if result.status == "failed":
                    log.warning("relaxation of %s failed: %s", rows[k]["candidate_id"], result.error)
                if store is not None:
                    store.add([rows[k]])
        else:
            for k, atoms in todo:
                rows[k] = relax_structure(rows[k]["candidate_id"], atoms, calc, settings, model_id=model_id,
                                          fidelity=fidelity, model_fidelity=model_fidelity, role=role)
                bar.update(1)
                if store is not None:
                    store.add([rows[k]])
    finally:
        bar.close()
        if store is not None:
            store.flush()
    return pa.Table.from_pylist(rows, schema=RELAXATIONS_SCHEMA)
