"""Importer timings on the shared real files, and the stress-sign evidence quoted in the importer docstrings.

    .venv/bin/python benchmarks/bench_import.py [--repeat 3]
    .venv/bin/python benchmarks/bench_import.py --stress-evidence [--frames 120]   # needs sevenn
    .venv/bin/python benchmarks/bench_import.py --memory [--copies 10]

Timings (best of ``--repeat``), each against a baseline measured in the same run:

* extxyz: ``ase.io.read(path, ":")`` (baseline) vs :func:`import_extxyz` (frame-by-frame parse + validated
  rows) vs import + Arrow table + ``write_import`` to a temporary folder;
* entry JSON: ``monty.serialization.loadfn`` (baseline) vs :func:`import_entries_json` (+ Arrow table).

``--memory`` writes a synthetic extxyz of ``--copies`` x the three mattersim files (frame ids made unique), then
imports it into a temporary dataset in a fresh process per variant and prints wall time and peak RSS:
``import_path`` + ``write_import`` (whole file in memory, baseline) vs ``import_to_dataset`` (streamed batches).

``--stress-evidence`` prints, per mattersim file, how the stored stresses compare with SevenNet-0's (an ASE
calculator: its stress is the strain derivative of its own energy, so it has the ASE sign), and the
energy-balance verdict of :mod:`pipeline.sources.files.stress_check` on consecutive MPtrj ionic steps.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import ase.io
import numpy as np
from monty.serialization import loadfn

from pipeline.config import shared_data_dir
from pipeline.entries import entries_table
from pipeline.frames import row_to_atoms
from pipeline.sources.files import write_import
from pipeline.sources.files.asedb import import_ase_db
from pipeline.sources.files.entries_json import import_entries_json
from pipeline.sources.files.extxyz import import_extxyz
from pipeline.sources.files.stress_check import mptrj_step_pairs, stress_sign_verdict

XYZ = ("mptrj-random-1k", "mptrj-highest-stress-1k", "alexandria-random-1k")
STRONG = 0.006  # eV/A^3: pressures above the model's typical stress error


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def timings(data: Path, repeat: int) -> None:
    print(f"# extxyz import, 1000 frames per file, best of {repeat}")
    for name in XYZ:
        path = data / "mattersim" / f"{name}.xyz"
        base = best_of(lambda path=path: ase.io.read(path, index=":"), repeat)
        imp = best_of(lambda path=path: import_extxyz(path), repeat)

        def full(path: Path = path) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                write_import(import_extxyz(path), tmp)

        both = best_of(full, repeat)
        print(
            f"{name:26s} ase.io.read {base:6.2f} s   import {imp:6.2f} s ({imp / base:4.2f}x)   "
            f"import+write {both:6.2f} s ({both / base:4.2f}x)   {1000 / both:6.0f} frames/s end to end"
        )

    print(f"# entry JSON import, best of {repeat}")
    for rel in ("emmet/Li-Fe-O.json.gz", "reaction-network/Mn_O_entries.json.gz"):
        path = data / rel
        loadfn(path)  # first call pays the one-off pymatgen import of the entry classes
        base = best_of(lambda path=path: loadfn(path), repeat)
        imp = best_of(lambda path=path: entries_table(import_entries_json(path).rows), repeat)
        n = len(loadfn(path))
        print(
            f"{rel:40s} loadfn {base:6.2f} s   import+table {imp:6.2f} s ({imp / base:4.2f}x)   "
            f"{n / imp:6.0f} entries/s"
        )


def _pressure(stress: np.ndarray) -> float:
    return float(-np.trace(stress) / 3)


def _compare_with_model(name: str, rows: list[dict], calc: object) -> None:
    labels, model = [], []
    for row in rows:
        atoms = row_to_atoms(row)
        labels.append(atoms.get_stress(voigt=False))
        atoms.calc = calc
        model.append(atoms.get_stress(voigt=False))
    lab, mod = np.array(labels), np.array(model)
    pl = np.array([_pressure(s) for s in lab])
    pm = np.array([_pressure(s) for s in mod])
    corr = np.corrcoef(lab.ravel(), mod.ravel())[0, 1]
    slope = float(np.sum(pl * pm) / np.sum(pm * pm))
    strong = np.abs(pl) > STRONG
    agree = int(np.sum(np.sign(pl[strong]) == np.sign(pm[strong])))
    print(
        f"{name:34s} n {len(rows):4d}   corr(components) {corr:+.3f}   pressure corr "
        f"{np.corrcoef(pl, pm)[0, 1]:+.3f}   slope label/model {slope:+.3f}   "
        f"same sign where |p|>{STRONG} eV/A^3: {agree}/{int(strong.sum())}"
    )


def stress_evidence(data: Path, n_frames: int) -> None:
    import torch
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(1)
    calc = SevenNetCalculator("7net-0", device="cpu")
    print(f"# stored stress vs SevenNet-0 stress (ASE sign), first {n_frames} frames with <= 40 atoms")
    rows_of = {name: import_extxyz(data / "mattersim" / f"{name}.xyz").rows for name in XYZ}
    for name, rows in rows_of.items():
        _compare_with_model(name, [r for r in rows if len(r["numbers"]) <= 40][:n_frames], calc)
    print(
        f"# Alexandria is nearly stress-free: all its frames with |pressure| > {STRONG} eV/A^3 and <= 60 atoms"
    )
    strong = [
        r
        for r in rows_of["alexandria-random-1k"]
        if len(r["numbers"]) <= 60 and abs(_pressure(np.asarray(r["stress"]))) > STRONG
    ]
    _compare_with_model("alexandria-random-1k (strong)", strong, calc)
    print("# orb-models ASE databases, all frames")
    for name in ("10_mptraj_systems", "10_thin_mp_traj_systems"):
        _compare_with_model(
            name, import_ase_db(data / "orb-models" / f"{name}.db", fidelity="pbe").rows, calc
        )

    print("# energy balance of consecutive ionic steps (pipeline.sources.files.stress_check)")
    _print_verdict("mptrj-highest-stress-1k", mptrj_step_pairs(rows_of["mptrj-highest-stress-1k"]))
    rows = import_ase_db(data / "orb-models" / "10_thin_mp_traj_systems.db").rows
    _print_verdict("orb 10_thin_mp_traj_systems", mptrj_step_pairs(rows))


def _print_verdict(name: str, pairs: list) -> None:
    v = stress_sign_verdict(pairs)
    print(
        f"{name:28s} pairs {v.n_pairs:3d}   stored sign better in {v.n_labelled_better}   median |error| "
        f"stored {v.median_error_as_labelled:.4f} eV, flipped {v.median_error_if_flipped:.4f} eV   "
        f"median |stress work| {v.median_abs_stress_work:.4f} eV"
    )


_MEMORY_RUN = """
import logging, resource, sys, tempfile, time
logging.disable(logging.WARNING)
from pipeline.sources.files import import_path, import_to_dataset, write_import
path, variant, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as out:
    if variant == "whole":
        counts = write_import(import_path(path), out)
    else:
        counts = import_to_dataset(path, out, batch_size=batch)
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, counts["frames_written"])
"""


def memory(data: Path, copies: int, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.xyz"
        n = 0
        with open(big, "w") as out:
            for copy in range(copies):
                for name in XYZ:
                    text = (data / "mattersim" / f"{name}.xyz").read_text()
                    # unique ids per copy, so that every frame is written
                    out.write(
                        text.replace("mptrj_snapshot_id=", f"mptrj_snapshot_id=c{copy}x").replace(
                            "alexandria_id=", f"alexandria_id=c{copy}x"
                        )
                    )
                    n += 1000
        size = big.stat().st_size / 2**20
        print(f"# synthetic extxyz: {n} frames, {size:.0f} MiB; fresh process per variant")
        base = None
        for variant in ("whole", "streamed"):
            cmd = [sys.executable, "-c", _MEMORY_RUN, str(big), variant, str(batch)]
            wall, rss, written = (float(x) for x in subprocess.check_output(cmd, text=True).split())
            base = base or (wall, rss)
            label = (
                "import_path + write_import" if variant == "whole" else f"import_to_dataset (batch {batch})"
            )
            print(
                f"{label:36s} {wall:7.1f} s ({wall / base[0]:4.2f}x)   peak RSS {rss:7.0f} MiB "
                f"({rss / base[1]:4.2f}x)   {int(written)} frames written"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stress-evidence", action="store_true")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    data = shared_data_dir()
    if args.stress_evidence:
        stress_evidence(data, args.frames)
    elif args.memory:
        memory(data, args.copies, args.batch)
    else:
        timings(data, args.repeat)


if __name__ == "__main__":
    main()
