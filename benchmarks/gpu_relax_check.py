"""GPU check of the batched relaxer with SevenNet-MF-0 (prepared here, run on a lent GPU machine; not a test, not CI).

Two steps:

1. Here (CPU, with ../shared and sevenn):  ``PYTHONPATH=. .venv/bin/python benchmarks/gpu_relax_check.py --prepare .gpu``
   writes ``.gpu/structures.extxyz`` (the benchmark's N perturbed real MP Li-Ni-O structures, 1-16 atoms, seed 0)
   and ``.gpu/mf0.pt`` (SevenNet-MF-0 imported into mfhull, r2SCAN head), so that the GPU machine needs neither
   pymatgen nor the shared data nor sevenn for our paths.
2. There: ``bash benchmarks/gpu_relax_check.sh`` (carry ``.gpu`` and ``.whl``), which runs this file with
   ``--data .gpu --out $OUT``, in <= 5 minutes:

   - the batch budget ``--batch-atoms auto`` measures on the GPU (bytes per atom, free memory);
   - the largest batch that fits: E+F+S calls on batches of the structures repeated to 1k, 2k, 4k, ... atoms
     until one runs out of memory, 90 % of the memory is reached or a call takes > 20 s; the peak of each vs the
     budget's linear prediction;
   - the ASE path (FIRE + FrechetCellFilter through MFPotentialCalculator, one structure at a time) on the first
     ``--ase-n`` structures, on the same GPU;
   - the batched relaxer on all N (``max_atoms='auto'``);
   - torch-sim's FIRE + Frechet filter through its SevenNet wrapper on sevenn's MF-0, when torch-sim and sevenn
     import (their wheels carried in ``.whl``); skipped with a line otherwise.

   It prints a table (structures/min, ms per atom-step, ratios, converged flags and max |dE| vs the ASE path) and
   writes every number to ``$OUT/gpu_relax_check.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def prepare(folder: Path, n: int, size_cap: int) -> None:
    from ase.io import write

    from pipeline.config import shared_data_dir
    from pipeline.model import import_sevenn, save_checkpoint
    from pipeline.relax.perturb import perturbed_mp_structures

    folder.mkdir(parents=True, exist_ok=True)
    items = perturbed_mp_structures(shared_data_dir() / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar", n, max_atoms=size_cap,
                                    seed=0)
    atoms = []
    for name, a in items:
        a = a.copy()
        a.info["name"] = name
        atoms.append(a)
    write(folder / "structures.extxyz", atoms)
    save_checkpoint(import_sevenn("7net-mf-0", fidelity_name="r2scan"), folder / "mf0.pt")
    print(f"wrote {folder}/structures.extxyz ({len(atoms)} structures, {sum(len(a) for a in atoms)} atoms) "
          f"and {folder}/mf0.pt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def largest_batch(model, structures, device, budget, start: int = 1024, limit_s: float = 20.0) -> list[dict]:
    """E+F+S on growing batches until one fails or nears the memory; peak and time of each."""
    from pipeline.graphs import atoms_to_graph

    rows = []
    size = start
    total = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    while True:
        batch, n = [], 0
        while n < size:
            a = structures[len(batch) % len(structures)]
            batch.append(a)
            n += len(a)
        row = {"atoms": n}
        try:
            graph = atoms_to_graph(batch, model.cutoff, fidelity=0, dtype=torch.float32).to(device=device)
            row["edges"] = graph.num_edges
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out = model(graph, compute_forces=True, compute_stress=True, create_graph=False)
            float(out["energy"].detach().sum())
            _sync(device)
            row["seconds"] = time.perf_counter() - t0
            del out, graph
            if device.type == "cuda":
                row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
            if budget.bytes_per_atom:
                row["predicted_gb"] = ((budget.intercept_bytes or 0) + budget.bytes_per_atom * n) / 1e9
            row["ok"] = True
        except torch.cuda.OutOfMemoryError as exc:
            row.update(ok=False, error=f"OutOfMemoryError: {str(exc).splitlines()[0]}")
        rows.append(row)
        print(f"  batch {n:7d} atoms: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in row.items() if k != "atoms"), flush=True)
        if not row["ok"] or row["seconds"] > limit_s or (total and row.get("peak_gb", 0) * 2e9 > 0.9 * total):
            return rows
        size *= 2


def ase_path(model, structures, fmax: float, steps: int) -> tuple[float, list[dict]]:
    from ase.filters import FrechetCellFilter
    from ase.optimize import FIRE

    from pipeline.relax.calculator import MFPotentialCalculator

    calc = MFPotentialCalculator(model, "r2scan")
    out = []
    t0 = time.perf_counter()
    for a in structures:
        a = a.copy()
        a.calc = calc
        opt = FIRE(FrechetCellFilter(a), logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=steps))
        out.append({"status": "converged" if converged else "not_converged", "n_steps": int(opt.nsteps),
                    "energy_per_atom": a.get_potential_energy() / len(a), "nsites": len(a)})
    return time.perf_counter() - t0, out


def batched_path(model, structures, fmax: float, steps: int) -> tuple[float, list[dict]]:
    from pipeline.relax.batched import relax_batched
    from pipeline.relax.settings import RelaxSettings

    t0 = time.perf_counter()
    results = sorted(relax_batched(structures, model, 0, RelaxSettings(fmax=fmax, steps=steps)),
                     key=lambda r: r.index)
    wall = time.perf_counter() - t0
    return wall, [{"status": r.status, "n_steps": r.n_steps or 0, "nsites": len(structures[r.index]),
                   "energy_per_atom": r.energy / len(structures[r.index]) if r.energy is not None else None,
                   "error": r.error} for r in results]


def torch_sim_path(structures, fmax: float, steps: int, max_atoms: int, device) -> tuple[float, np.ndarray]:
    import sevenn.calculator

    if not hasattr(sevenn.calculator, "torch_script_type"):  # torch-sim 0.3.0 on sevenn 0.13 (see relax_throughput)
        sevenn.calculator.torch_script_type = torch.jit._script.RecursiveScriptModule
    import torch_sim as ts
    from sevenn.calculator import SevenNetCalculator
    from torch_sim.autobatching import InFlightAutoBatcher
    from torch_sim.models.sevennet import SevenNetModel

    seven = SevenNetCalculator("7net-mf-0", modal="R2SCAN", device=str(device))
    model = SevenNetModel(model=seven.model, modal="R2SCAN", device=device, dtype=torch.float32)
    batcher = InFlightAutoBatcher(model=model, memory_scales_with="n_atoms", max_memory_scaler=float(max_atoms),
                                  max_iterations=steps)
    convergence = ts.generate_force_convergence_fn(force_tol=fmax, include_cell_forces=True)
    t0 = time.perf_counter()
    if hasattr(ts, "frechet_cell_fire"):  # 0.3.x API
        final = ts.optimize(system=list(structures), model=model, optimizer=ts.frechet_cell_fire, max_steps=steps,
                            convergence_fn=convergence, autobatcher=batcher, steps_between_swaps=1)
    else:  # newer API: one FIRE with a cell filter argument
        final = ts.optimize(system=list(structures), model=model, optimizer=ts.Optimizer.fire, max_steps=steps,
                            convergence_fn=convergence, autobatcher=batcher, steps_between_swaps=1,
                            init_kwargs={"cell_filter": ts.CellFilter.frechet})
    _sync(device)
    wall = time.perf_counter() - t0
    return wall, final.energy.detach().cpu().double().numpy() / np.array([len(a) for a in structures])


def check(args: argparse.Namespace) -> None:
    from ase.io import read

    from pipeline.model import load_checkpoint
    from pipeline.relax.autobatch import estimate_batch_budget

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "n": args.n, "ase_n": args.ase_n, "steps": args.steps,
                    "fmax": args.fmax}
    structures = read(Path(args.data) / "structures.extxyz", index=":")[: args.n]
    model = load_checkpoint(Path(args.data) / "mf0.pt", device=device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n_atoms = sum(len(a) for a in structures)
    print(f"{report['device']}, torch {torch.__version__}; {len(structures)} structures, {n_atoms} atoms; "
          f"fmax {args.fmax}, steps {args.steps}", flush=True)

    t0 = time.perf_counter()
    budget = estimate_batch_budget(structures, model, 0)
    report["budget"] = budget.as_dict() | {"seconds": time.perf_counter() - t0}
    print(f"batch budget (auto): {budget.max_atoms} atoms, {budget.max_edges} edges; {budget.method}, "
          f"{(budget.bytes_per_atom or 0) / 1e6:.3f} MB/atom, intercept {(budget.intercept_bytes or 0) / 1e9:.2f} GB, "
          f"{(budget.free_bytes or 0) / 1e9:.1f} GB free x {budget.fraction}", flush=True)
    print("largest batch (E+F+S):", flush=True)
    report["largest_batch"] = largest_batch(model, structures, device, budget, args.batch_start, args.batch_limit_s)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # after a possible out-of-memory probe
    fit = [r for r in report["largest_batch"] if r["ok"]]
    print(f"largest batch that ran: {max(r['atoms'] for r in fit) if fit else 0} atoms", flush=True)

    # warm-up (CUDA kernels, allocator) so that neither path pays it
    ase_path(model, structures[:1], args.fmax, 2)
    t_ase, ase = ase_path(model, structures[: args.ase_n], args.fmax, args.steps)
    t_bat, bat = batched_path(model, structures, args.fmax, args.steps)
    steps_ase = sum(r["nsites"] * r["n_steps"] for r in ase)
    steps_bat = sum(r["nsites"] * r["n_steps"] for r in bat)
    k = len(ase)
    e_ase = np.array([r["energy_per_atom"] for r in ase], dtype=float)
    e_bat = np.array([r["energy_per_atom"] if r["energy_per_atom"] is not None else np.nan for r in bat], dtype=float)
    rate_ase, rate_bat = 1000 * t_ase / max(steps_ase, 1), 1000 * t_bat / max(steps_bat, 1)
    rows = [("ASE path (same GPU)", k, t_ase, 60 * k / t_ase, rate_ase),
            ("batched (auto budget)", len(bat), t_bat, 60 * len(bat) / t_bat, rate_bat)]
    report["ase"] = {"structures": k, "wall_s": t_ase, "atom_steps": steps_ase, "rows": ase}
    report["batched"] = {"structures": len(bat), "wall_s": t_bat, "atom_steps": steps_bat, "rows": bat}
    report["batched_vs_ase"] = {
        "per_atom_step": rate_ase / rate_bat, "structures_per_min": (len(bat) / t_bat) / (k / t_ase),
        "same_flags": sum(a["status"] == b["status"] for a, b in zip(ase, bat)),
        "max_abs_dE_meV_per_atom": float(np.nanmax(np.abs(e_ase - e_bat[:k])) * 1000)}
    try:
        t_ts, e_ts = torch_sim_path(structures, args.fmax, args.steps, budget.max_atoms, device)
        rows.append(("torch-sim", len(structures), t_ts, 60 * len(structures) / t_ts, float("nan")))
        report["torch_sim"] = {"wall_s": t_ts, "batched_speedup": t_ts / t_bat,
                               "max_abs_dE_vs_batched_meV_per_atom": float(np.nanmax(np.abs(e_ts - e_bat)) * 1000),
                               "median_abs_dE_vs_batched_meV_per_atom": float(np.nanmedian(np.abs(e_ts - e_bat))
                                                                              * 1000)}
    except Exception as exc:  # noqa: BLE001 - optional peer: say why it did not run
        report["torch_sim"] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    print("\n| path | structures | wall s | structures/min | ms/atom-step |\n|---|---|---|---|---|")
    for name, n, wall, per_min, rate in rows:
        print(f"| {name} | {n} | {wall:.1f} | {per_min:.1f} | {rate:.2f} |")
    v = report["batched_vs_ase"]
    print(f"\nbatched / ASE path: {v['per_atom_step']:.1f}x per atom-step, {v['structures_per_min']:.1f}x "
          f"structures/min (ASE on the first {k}); same flags {v['same_flags']}/{k}; max |dE| "
          f"{v['max_abs_dE_meV_per_atom']:.2e} meV/atom")
    ts_report = report["torch_sim"]
    if "skipped" in ts_report:
        print(f"torch-sim: skipped ({ts_report['skipped']})")
    else:
        print(f"batched / torch-sim: {ts_report['batched_speedup']:.2f}x; max |dE| torch-sim vs batched "
              f"{ts_report['max_abs_dE_vs_batched_meV_per_atom']:.2e} meV/atom")
    (out_dir / "gpu_relax_check.json").write_text(json.dumps(report, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", default=None, help="write structures and checkpoint into this folder, then stop")
    parser.add_argument("--data", default=".gpu", help="folder written by --prepare")
    parser.add_argument("--out", default="reports/gpu-relax-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--size-cap", type=int, default=16)
    parser.add_argument("--ase-n", type=int, default=16, help="structures the ASE path relaxes (the first ones)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--batch-start", type=int, default=1024, help="first size (atoms) of the largest-batch search")
    parser.add_argument("--batch-limit-s", type=float, default=20.0, help="stop the search after a call this long")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.n, args.size_cap)
    else:
        check(args)


if __name__ == "__main__":
    main()
