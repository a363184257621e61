"""Shared fixtures. Real MP data is read in place from ../shared/data/mp (never copied into the repo)."""

from __future__ import annotations

import os

# Small-matrix BLAS calls (ASE cell filters, pymatgen) slow down 30x when OpenBLAS threads fight other processes
# for 2 cores; set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path

import pytest

from pipeline.config import shared_data_dir

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: shared data must be present)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mp_data() -> Path:
    """Folder of the real Materials Project files; skip (or fail under CI) when it is missing."""
    root = shared_data_dir()
    if not root.is_dir():
        _missing(f"shared MP data not found at {root}")
    return root


@pytest.fixture(scope="session")
def mp_file(mp_data: Path):
    """Return a function giving the path of one shared file, skipping (failing under CI) if it is absent."""

    def get(rel: str) -> Path:
        path = mp_data / rel
        if not path.exists():
            _missing(f"shared MP file not found: {path}")
        return path

    return get


@pytest.fixture(scope="session")
def emt_frames():
    """Return a function making a two-fidelity frames table from EMT (no DFT needed): rattled Al-Cu fcc cells,
    'lo' = EMT energy, forces, stress for all; 'hi' = 1.1 E + 0.3 eV/atom (and ``hi_forces`` x 1.1 F) for
    every ``hi_every``-th structure."""

    def make(n: int, hi_every: int = 2, hi_forces: bool = False):
        import numpy as np
        from ase.build import bulk
        from ase.calculators.emt import EMT

        from pipeline.frames import atoms_to_frame_row, frames_table

        rng = np.random.default_rng(0)
        rows = []
        for k in range(n):
            atoms = bulk("Al", "fcc", a=4.05, cubic=True)
            atoms.numbers[rng.choice(4, size=k % 3, replace=False)] = 29
            atoms.rattle(0.05, seed=k)
            atoms.calc = EMT()
            e, f = atoms.get_potential_energy(), atoms.get_forces()
            rows.append(atoms_to_frame_row(atoms, frame_id=f"lo:{k}", source="t", fidelity="lo"))
            if k % hi_every == 0:
                rows.append(atoms_to_frame_row(atoms, frame_id=f"hi:{k}", source="t", fidelity="hi",
                                               energy=1.1 * e + 0.3 * len(atoms),
                                               forces=1.1 * f if hi_forces else None, stress=None))
        return frames_table(rows)

    return make
