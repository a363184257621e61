"""Perturbed real structures for relaxation tests and benchmarks: rattled atoms and a random cell strain with a
fixed seed, so every path (ASE, batched, torch-sim) starts from the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from pymatgen.io.ase import AseAtomsAdaptor

__all__ = ["perturb", "perturbed_mp_structures"]


def perturb(atoms: Atoms, rng: np.random.Generator, rattle: float = 0.05, strain: float = 0.02) -> Atoms:
    """Copy of ``atoms`` with Gaussian displacements of std ``rattle`` (A) and a random symmetric strain whose
    components are uniform in [-strain, strain] (atoms move with the cell)."""
    out = atoms.copy()
    eps = rng.uniform(-strain, strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    out.set_cell(out.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    out.positions = out.positions + rng.normal(0.0, rattle, size=out.positions.shape)
    return out


def perturbed_mp_structures(res_tar: str | Path, n: int, *, max_atoms: int = 64, seed: int = 0,
                            run_type: str | None = None) -> list[tuple[str, Atoms]]:
    """``n`` perturbed structures (id, atoms) from an MP .res tar (``pipeline.sources.files.res``), one per material,
    sizes mixed: taken in turn from the small and the large end of the size-sorted list (at most ``max_atoms``).
    Cycles through the materials with new perturbations when ``n`` exceeds their number."""
    from pipeline.sources.files.res import read_res_entries

    entries, _ = read_res_entries(res_tar)
    seen: dict[str, Atoms] = {}
    for e in sorted(entries, key=lambda e: e.entry_id):
        if run_type is not None and e.parameters.get("run_type") != run_type:
            continue
        mid = e.data.get("material_id") or e.entry_id
        if len(e.structure) <= max_atoms and mid not in seen:
            seen[mid] = AseAtomsAdaptor.get_atoms(e.structure)
    if not seen:
        raise ValueError(f"no structures with <= {max_atoms} atoms in {res_tar}")
    by_size = sorted(seen.items(), key=lambda kv: (len(kv[1]), kv[0]))
    small, large = by_size[: (len(by_size) + 1) // 2], by_size[(len(by_size) + 1) // 2:][::-1]
    order = [x for pair in zip(small, large) for x in pair] + small[len(large):]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        mid, atoms = order[k % len(order)]
        out.append((f"{mid}-p{k}", perturb(atoms, rng)))
    return out
