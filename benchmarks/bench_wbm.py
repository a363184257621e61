"""Out-of-distribution check of a PBE head: WBM structures (not in MPtrj) relaxed with the model, energy per atom
and formation energy vs the WBM DFT values.

    python -m pipeline.cli import-sevenn --out reports/mf0.pt
    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_wbm.py --checkpoint reports/mf0.pt \
        [--limit 100] [--fidelity pbe] [--out reports/bench-wbm]

Data: ``../shared/data/mp/matcalc/wbm-random-pbe52-equilibrium-2025.1.json.gz`` (972 random WBM structures at their
PBE equilibrium, raw and MP2020-corrected energies), read by :func:`pipeline.sources.files.wbm.import_wbm` (970 pass its
MP2020 check). A seeded shuffle (seed 0) orders them, so ``--limit 50`` is a prefix of ``--limit 100``.

Per structure: a single point of the model on the DFT structure (``static``) and a full relaxation (ASE FIRE +
FrechetCellFilter, ``pipeline.relax.relaxer``; resumable: rows are stored under ``--out`` as they finish).
Formation energies use matbench-discovery's MP elemental references (``2023-02-07-mp-elemental-reference-
entries.json.gz``, raw GGA energies) for model and DFT alike. Columns:

* ``E/atom``: raw energy per atom, model vs WBM DFT;
* ``E_form raw``: formation energy per atom from raw energies. With the same elemental references on both sides
  its error equals the E/atom error (the references cancel); it is printed so that the number matches the way
  matbench-discovery reports formation energies;
* ``E_form MP2020``: both sides MP2020-corrected (the model's relaxed structure through pymatgen's
  MaterialsProject2020Compatibility with MP's U values, the DFT side the file's ``corrected_energy``): differs from
  the raw column only where the relaxed structure changes the correction (e.g. oxide vs peroxide).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.config import shared_data_dir
from pipeline.entries import row_to_entry
from pipeline.hull.ehull import prediction_entry
from pipeline.hull.thermo import GGA_GGA_U, correct_like_reference
from pipeline.io import write_json_atomic, write_table_atomic
from pipeline.progress import progress
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.relaxer import RelaxSettings, relax_many
from pipeline.sources.files.wbm import import_wbm

WBM = "matcalc/wbm-random-pbe52-equilibrium-2025.1.json.gz"
MP_REFS = "matbench-discovery/2023-02-07-mp-elemental-reference-entries.json.gz"


def elemental_references(path: Path) -> dict[str, float]:
    """{element: energy per atom (eV)} from matbench-discovery's MP elemental reference entries."""
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    return {el: float(d["energy"]) / sum(d["composition"].values()) for el, d in data.items()}


def e_form(energy_per_atom: float, structure: Structure, mu: dict[str, float]) -> float:
    comp = structure.composition
    return energy_per_atom - sum(n * mu[el.symbol] for el, n in comp.items()) / comp.num_atoms


def mae(a: list[float | None], b: list[float | None]) -> tuple[float, int]:
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return float("nan"), 0
    err = np.array([x - y for x, y in pairs])
    return float(np.mean(np.abs(err))), len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="mfhull checkpoint (python -m pipeline.cli import-sevenn)")
    p.add_argument("--fidelity", default="pbe", help="model head to use (default pbe)")
    p.add_argument("--limit", type=int, default=100, help="number of WBM structures (default 100; 970 = all)")
    p.add_argument("--out", default="reports/bench-wbm")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Failed to guess oxidation states")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    t0 = time.perf_counter()

    imported = import_wbm(shared_data_dir() / WBM)
    entries = [row_to_entry(r) for r in imported.rows]
    random.Random(0).shuffle(entries)
    entries = entries[: args.limit]
    mu = elemental_references(shared_data_dir() / MP_REFS)
    calc = MFPotentialCalculator.from_checkpoint(args.checkpoint, args.fidelity)

    static: dict[str, float] = {}
    for e in progress(entries, desc="single points"):
        atoms = AseAtomsAdaptor.get_atoms(e.structure)
        atoms.calc = calc
        static[str(e.entry_id)] = float(atoms.get_potential_energy()) / len(atoms)
    t_static = time.perf_counter() - t0
    settings = RelaxSettings(fmax=args.fmax, steps=args.steps)
    relaxed = relax_many(progress([(str(e.entry_id), e.structure) for e in entries], desc="relaxations"), calc,
                         settings, model_id=Path(args.checkpoint).stem, fidelity=args.fidelity, role="benchmark",
                         out=out / "relaxations")
    by_id = {r["candidate_id"]: r for r in relaxed.to_pylist()}

    rows = []
    for e in entries:
        cid, s, n = str(e.entry_id), e.structure, len(e.structure)
        rel = by_id[cid]
        dft_raw = e.uncorrected_energy / n
        row = {"material_id": cid, "formula": s.composition.reduced_formula, "n_sites": n,
               "dft_energy_per_atom": dft_raw, "static_energy_per_atom": static[cid],
               "relaxed_energy_per_atom": rel["energy_per_atom"], "relax_status": rel["status"],
               "relax_steps": rel["n_steps"], "relax_wall_s": rel["wall_s"],
               "dft_e_form": e_form(dft_raw, s, mu), "dft_e_form_file": (e.data or {}).get("formation_energy_per_atom"),
               "pred_e_form": None, "dft_e_form_mp2020": e_form(e.energy / n, s, mu), "pred_e_form_mp2020": None,
               "error": rel["error"]}
        if rel["energy"] is not None:
            structure = Structure.from_dict(json.loads(rel["structure"]))
            row["pred_e_form"] = e_form(rel["energy_per_atom"], structure, mu)
            try:
                corrected = correct_like_reference(prediction_entry(cid, structure, energy=rel["energy"]), GGA_GGA_U)
                row["pred_e_form_mp2020"] = e_form(corrected.energy_per_atom, structure, mu)
            except Exception as exc:  # noqa: BLE001 - a refused correction is a row with its error
                row["error"] = f"MP2020: {exc}"
        rows.append(row)
    wall = time.perf_counter() - t0

    col = lambda k: [r[k] for r in rows]
    results = {
        "n": len(rows), "limit": args.limit, "checkpoint": str(args.checkpoint), "fidelity": args.fidelity,
        "relax": {"fmax": args.fmax, "steps": args.steps, "optimizer": settings.optimizer},
        "relax_status": dict(Counter(col("relax_status"))),
        "wall_s": wall, "static_wall_s": t_static,
        "mae_energy_per_atom_static": mae(col("static_energy_per_atom"), col("dft_energy_per_atom")),
        "mae_energy_per_atom_relaxed": mae(col("relaxed_energy_per_atom"), col("dft_energy_per_atom")),
        "mae_e_form_raw": mae(col("pred_e_form"), col("dft_e_form")),
        "mae_e_form_mp2020": mae(col("pred_e_form_mp2020"), col("dft_e_form_mp2020")),
        "mean_abs_dft_e_form_minus_file": mae(col("dft_e_form"), col("dft_e_form_file")),
    }
    write_table_atomic(pa.Table.from_pylist(rows), out / "wbm_results.parquet")
    write_json_atomic(out / "wbm_summary.json", results)
    print(f"WBM (random 2025.1) n={len(rows)}, {args.fidelity} head of {args.checkpoint}, "
          f"relax fmax {args.fmax} steps {args.steps}: {dict(Counter(col('relax_status')))}")
    print("| quantity | MAE (eV/atom) | n |\n|---|---|---|")
    for key, label in [("mae_energy_per_atom_static", "E/atom, single point on the DFT structure"),
                       ("mae_energy_per_atom_relaxed", "E/atom, relaxed"),
                       ("mae_e_form_raw", "E_form raw (MP elemental refs), relaxed"),
                       ("mae_e_form_mp2020", "E_form MP2020-corrected, relaxed")]:
        m, n = results[key]
        print(f"| {label} | {m:.4f} | {n} |")
    print(f"wall {wall:.0f} s (single points {t_static:.0f} s); DFT E_form with these refs vs the file's: "
          f"mean |diff| {results['mean_abs_dft_e_form_minus_file'][0]:.4f} eV/atom")


if __name__ == "__main__":
    main()
