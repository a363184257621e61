"""Relaxation throughput: the ASE path one by one vs the batched relaxer vs torch-sim, same structures, same run.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/relax_throughput.py \
        [--n 32 128] [--models small mf0] [--steps 500] [--fmax 0.05] [--size-cap 16] [--threads 1] [--torch-sim]
        [--max-atoms auto|N] [--ase-subset K] [--memory]

Run it with ``PYTHONPATH=.`` (or ``python -m``-style from the checkout): a script's own folder comes first on
sys.path, so without it ``import pipeline`` may pick up another installed copy.

Structures: N perturbed real MP Li-Ni-O structures (../shared/data/mp/mp-res_Li-Ni-O/Li-Ni-O.res.tar; rattle
0.05 A, random symmetric strain up to 2 %, seed 0), mixed sizes of 1..``--size-cap`` atoms
(:func:`pipeline.relax.perturb.perturbed_mp_structures`). FIRE + Frechet cell filter, fmax and step cap as given
(defaults: matbench-discovery's 0.05 eV/A, 500 steps).

Models: ``small`` is the demo's architecture (preset 'small': 16 channels, lmax 1, 2 layers) built for Li, Ni, O
with seeded random weights and an energy scale of 8 eV (the demo checkpoint knows only Li and Al), so that
relaxations take tens of steps; ``mf0`` is SevenNet-MF-0 imported into mfhull (r2SCAN head, float32).
torch-sim (``pip install torch-sim-atomistic``, 0.3.0 here) runs its ``frechet_cell_fire`` (ASE flavour) through
its SevenNet wrapper on sevenn's own MF-0 (modal R2SCAN), in-flight autobatching by atom count with the same
budget, convergence checked every step with cell forces included. Its 0.3.0 wrapper imports
``sevenn.calculator.torch_script_type``, gone in sevenn 0.13: the shim below restores that name.

Printed per model and N: the batch budget (``--max-atoms auto``: what :mod:`pipeline.relax.autobatch` measured on
this device for these structures, with its bytes per atom; torch-sim gets the same atom budget), wall time,
structures per minute, ms per atom-step (our two paths; atom-steps counted from each row's steps), the ratios,
and how far the answers are apart (max |dE| per atom, converged flags). ``--ase-subset K``: the ASE path relaxes
only the first K structures (its rate in ms/atom-step is then compared, and its answers on those K); the
structures/min of the ASE path are then those of the subset.
Memory (mf0): peak resident-set growth of one E+F+S call per atom (NiO supercells of 512 and 1000 atoms, fresh
processes; VmHWM reset through /proc/self/clear_refs just before the call, minus the resident set then; the
difference of the two peaks over the difference in atoms, so imports and weights cancel), with the model's weights
requiring grad (as after training) and without (what the batched relaxer does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from pipeline.config import shared_data_dir
from pipeline.model import ElementReferences, MFPotential, import_sevenn, preset
from pipeline.relax.batched import resolve_budget
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.relax.perturb import perturbed_mp_structures
from pipeline.relax.relaxer import RelaxSettings, relax_many


def small_model() -> MFPotential:
    torch.manual_seed(3)
    cfg = preset("small", elements=("Li", "Ni", "O"), fidelities=("r2scan",))
    refs = ElementReferences({"r2scan": {"Li": -2.3, "Ni": -8.1, "O": -6.2}}, {"r2scan": 8.0})
    return MFPotential(cfg, refs).eval()


def load_model(name: str) -> MFPotential:
    return small_model() if name == "small" else import_sevenn("7net-mf-0", fidelity_name="r2scan").eval()


def run_ours(items, model: MFPotential, settings: RelaxSettings) -> tuple[float, list[dict]]:
    calc = MFPotentialCalculator(model, "r2scan")
    t0 = time.perf_counter()
    rows = relax_many(items, calc, settings).to_pylist()
    return time.perf_counter() - t0, rows


def run_torch_sim(items, settings: RelaxSettings) -> tuple[float, np.ndarray]:
    import sevenn.calculator

    sevenn.calculator.torch_script_type = torch.jit._script.RecursiveScriptModule  # shim for torch-sim 0.3.0
    import torch_sim as ts
    from sevenn.calculator import SevenNetCalculator
    from torch_sim.autobatching import InFlightAutoBatcher
    from torch_sim.models.sevennet import SevenNetModel

    seven = SevenNetCalculator("7net-mf-0", modal="R2SCAN", device="cpu")
    model = SevenNetModel(model=seven.model, modal="R2SCAN", device="cpu", dtype=torch.float32)
    batcher = InFlightAutoBatcher(model=model, memory_scales_with="n_atoms",
                                  max_memory_scaler=float(settings.max_atoms), max_iterations=settings.steps)
    atoms = [a for _, a in items]
    t0 = time.perf_counter()
    final = ts.optimize(
        system=atoms, model=model, optimizer=ts.frechet_cell_fire, max_steps=settings.steps,
        convergence_fn=ts.generate_force_convergence_fn(force_tol=settings.fmax, include_cell_forces=True),
        autobatcher=batcher, steps_between_swaps=1,
    )
    wall = time.perf_counter() - t0
    energy = final.energy.detach().cpu().double().numpy()
    n_atoms = np.array([len(a) for a in atoms])
    return wall, energy / n_atoms


def memory_probe(name: str, n_cells: int, weights_grad: bool) -> None:
    """Child process: print the peak RSS growth (MB) of one E+F+S call on a NiO supercell."""
    from ase.build import bulk

    from pipeline.graphs import atoms_to_graph
    from pipeline.relax.autobatch import _cpu_peak

    torch.set_num_threads(1)
    model = load_model(name)
    for p in model.parameters():
        p.requires_grad_(weights_grad)
    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.symbols[::8] = "Li"
    graph = atoms_to_graph(atoms, model.cutoff, fidelity=0, dtype=torch.float32)
    peak = _cpu_peak(model, graph)
    print(json.dumps({"atoms": len(atoms), "peak_mb": peak / 2**20}))


def memory_per_atom(name: str, weights_grad: bool) -> tuple[float, dict[int, float]]:
    peaks = {}
    for cells in (4, 5):
        cmd = [sys.executable, __file__, "--memory-probe", name, str(cells), str(int(weights_grad))]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        peaks[res["atoms"]] = res["peak_mb"]
    (n1, m1), (n2, m2) = sorted(peaks.items())
    return (m2 - m1) / (n2 - n1), peaks


def atom_steps(rows: list[dict]) -> int:
    return sum(r["nsites"] * (r["n_steps"] or 0) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[32, 128], help="set sizes (0: no relaxations)")
    parser.add_argument("--models", nargs="+", default=["small", "mf0"], choices=["small", "mf0"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--fmax", type=float, default=0.05)
    parser.add_argument("--size-cap", type=int, default=16, help="largest structure (atoms) in the set")
    parser.add_argument("--max-atoms", default="auto",
                        help="batch budget (atoms) of both batched relaxers, or 'auto' (measured, default)")
    parser.add_argument("--ase-subset", type=int, default=None,
                        help="run the ASE path on the first K structures only (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-sim", action="store_true", help="also run torch-sim (mf0 only)")
    parser.add_argument("--memory", action="store_true", help="also measure E+F+S memory per atom")
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe[0], int(args.memory_probe[1]), bool(int(args.memory_probe[2])))
        return
    if args.max_atoms != "auto":
        args.max_atoms = int(args.max_atoms)
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"fmax {args.fmax}, steps {args.steps}, sizes 1..{args.size_cap} atoms, batch budget {args.max_atoms} atoms")
    tar = shared_data_dir() / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar"
    for name in args.models:
        model = load_model(name)
        for n in args.n:
            if n == 0:  # memory only
                continue
            items = perturbed_mp_structures(tar, n, max_atoms=args.size_cap, seed=0)
            n_atoms = sum(len(a) for _, a in items)
            common = {"fmax": args.fmax, "steps": args.steps, "max_atoms": args.max_atoms}
            t0 = time.perf_counter()
            resolved, budget = resolve_budget([a for _, a in items], model, 0, RelaxSettings(engine="batched",
                                                                                           **common))
            t_budget = time.perf_counter() - t0
            print(f"\n[{name}] N={n} structures, {n_atoms} atoms; batch budget {resolved.max_atoms} atoms, "
                  f"{resolved.max_edges} edges" + (
                      f" (measured in {t_budget:.1f} s: {budget.method}, {(budget.bytes_per_atom or 0) / 1e6:.3f} MB/atom, "
                      f"{budget.free_bytes / 1e9:.1f} GB free x {budget.fraction}, limited by {budget.limited_by})"
                      if budget is not None else " (given)"))
            common.update(max_atoms=resolved.max_atoms, max_edges=resolved.max_edges)
            k = n if args.ase_subset is None else min(args.ase_subset, n)
            t_ase, ase = run_ours(items[:k], model, RelaxSettings(engine="ase", **common))
            t_bat, bat = run_ours(items, model, RelaxSettings(engine="batched", **common))
            e_ase = np.array([r["energy_per_atom"] if r["energy_per_atom"] is not None else np.nan for r in ase])
            e_bat = np.array([r["energy_per_atom"] if r["energy_per_atom"] is not None else np.nan for r in bat])
            same_flags = sum(a["status"] == b["status"] for a, b in zip(ase, bat))
            print(f"  statuses (batched): "
                  f"{ {s: sum(r['status'] == s for r in bat) for s in ('converged', 'not_converged', 'failed')} }; "
                  f"ASE path on {k} of {n} structures ({sum(len(a) for _, a in items[:k])} atoms)")
            for label, wall, rows in (("ASE one by one", t_ase, ase), ("batched", t_bat, bat)):
                steps = atom_steps(rows)
                print(f"  {label:16s} wall {wall:8.1f} s  {60 * len(rows) / wall:8.2f} structures/min  "
                      f"{1000 * wall / max(steps, 1):7.2f} ms/atom-step  ({steps} atom-steps, {len(rows)} structures)")
            rate_ase = t_ase / max(atom_steps(ase), 1)
            rate_bat = t_bat / max(atom_steps(bat), 1)
            speed = (f"{t_ase / t_bat:.2f}x (structures/min)" if k == n else
                     f"{rate_ase / rate_bat:.2f}x (ms/atom-step; ASE on a subset)")
            print(f"  batched / ASE speed: {speed}; per atom-step {rate_ase / rate_bat:.2f}x; same flags "
                  f"{same_flags}/{k}; max |dE| {np.nanmax(np.abs(e_ase - e_bat[:k])) * 1000:.2e} meV/atom")
            if args.torch_sim and name == "mf0":
                t_ts, e_ts = run_torch_sim(items, RelaxSettings(**common))
                print(f"  {'torch-sim':16s} wall {t_ts:8.1f} s  {60 * n / t_ts:8.2f} structures/min")
                print(f"  batched / torch-sim speed: {t_ts / t_bat:.2f}x; max |dE| torch-sim vs batched "
                      f"{np.nanmax(np.abs(e_ts - e_bat)) * 1000:.2e} meV/atom, median "
                      f"{np.nanmedian(np.abs(e_ts - e_bat)) * 1000:.2e}")
        if args.memory and name == "mf0":
            for grad in (True, False):
                per_atom, peaks = memory_per_atom(name, grad)
                print(f"  [{name}] E+F+S peak RSS growth, weights requires_grad={grad}: {per_atom:.3f} MB/atom "
                      f"(peaks {', '.join(f'{k} atoms {v:.0f} MB' for k, v in peaks.items())})")


if __name__ == "__main__":
    main()
