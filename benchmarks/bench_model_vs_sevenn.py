"""Throughput of energy + forces + stress: this project's model vs sevenn's own calculator, SAME weights.

SevenNet-MF-0 (r2SCAN head) is imported into :class:`pipeline.model.MFPotential`; both calculators evaluate the
same supercells of a real MP Li-Ni-O structure (64, 512, 4096 atoms by default), interleaved, in one run.
Each timed call includes the neighbour list (vesin for ours, matscipy/ASE for sevenn) and E + F + stress.
Prints atoms/s for both and the ratio ours/sevenn (> 1: ours is faster); a calculator that exceeds the
address-space limit (--max-gb) prints OOM instead of a number.

    .venv/bin/python benchmarks/bench_model_vs_sevenn.py [--sizes 64 512 4096] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
import warnings

import numpy as np
import torch
from ase import Atoms
from ase.build import make_supercell
from ase.calculators.calculator import all_changes

from pipeline.config import shared_data_dir
from pipeline.model import import_sevenn
from pipeline.relax.calculator import MFPotentialCalculator


def base_structure() -> Atoms:
    """An 8-atom cell of MP Li-Ni-O (LiNiO2 family) from the shared .res dump, else a Li-substituted NiO cell."""
    path = shared_data_dir() / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar"
    if path.is_file():
        from pymatgen.io.ase import AseAtomsAdaptor

        from pipeline.sources.files.res import read_res_entries

        for entry in read_res_entries(path)[0]:
            st = entry.structure
            if len(st) == 8 and len(st.composition.elements) == 3:
                atoms = AseAtomsAdaptor.get_atoms(st)
                atoms.info["name"] = entry.entry_id
                return atoms
    from ase.build import bulk

    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    atoms.symbols[0] = "Li"
    atoms.info["name"] = "Li-substituted NiO (fallback)"
    return atoms


def supercell(atoms: Atoms, n_atoms: int) -> Atoms:
    reps = n_atoms // len(atoms)
    k = round(reps ** (1 / 3))
    if k**3 != reps:
        raise ValueError(f"{n_atoms} atoms is not a cubic multiple of {len(atoms)}")
    sc = make_supercell(atoms, np.eye(3, dtype=int) * k)
    sc.rattle(0.03, seed=0)
    return sc


def time_calc(calc, atoms: Atoms, repeats: int) -> tuple[float, float]:
    """Best wall time (s) of one E+F+stress evaluation, and the energy; (nan, nan) when out of memory."""
    best = float("inf")
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
            best = min(best, time.perf_counter() - start)
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        gc.collect()
        return float("nan"), float("nan")
    return best, float(calc.results["energy"])


def _fmt(value: float, spec: str) -> str:
    return "OOM" if np.isnan(value) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--max-gb", type=float, default=16.0,
                        help="address-space limit of this process: a calculator that needs more prints OOM")
    args = parser.parse_args()
    limit = int(args.max_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from sevenn.calculator import SevenNetCalculator

    ours = MFPotentialCalculator(import_sevenn("7net-mf-0"), fidelity="r2scan")
    theirs = SevenNetCalculator("7net-mf-0", modal="R2SCAN", device="cpu")
    base = base_structure()
    print(f"structure: {base.info['name']} ({base.get_chemical_formula()}), torch threads: {args.threads}, "
          f"float32, best of {args.repeats}")
    print(f"{'atoms':>6} {'ours atoms/s':>13} {'sevenn atoms/s':>15} {'ratio':>6} {'|dE|/atom eV':>13}")
    for n in args.sizes:
        atoms = supercell(base, n)
        if n <= 1000:  # warm-up (large cells: the first call is representative)
            time_calc(ours, atoms, 1)
            time_calc(theirs, atoms, 1)
        t_ours, e_ours = time_calc(ours, atoms, args.repeats)
        t_theirs, e_theirs = time_calc(theirs, atoms, args.repeats)
        print(f"{len(atoms):>6} {_fmt(len(atoms) / t_ours, '13.1f'):>13} {_fmt(len(atoms) / t_theirs, '15.1f'):>15} "
              f"{_fmt(t_theirs / t_ours, '6.2f'):>6} {_fmt(abs(e_ours - e_theirs) / len(atoms), '13.2e'):>13}",
              flush=True)


if __name__ == "__main__":
    main()
