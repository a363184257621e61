"""Loaded/idle slowdown of training steps: this project's thread settings vs torch's defaults, same run.

Workload: training steps (energy + forces with ``create_graph``, backward, Adam) of the ``small`` preset on a
batch of 8 Li-Al cells of 16 atoms - the size of the demo's training. Each setting runs in a fresh subprocess
(OpenMP reads ``OMP_WAIT_POLICY`` once, at start-up):

* ``torch default``: no OMP_WAIT_POLICY, ``torch.get_num_threads()`` threads (all CPUs);
* ``mfhull``: ``pipeline.threads`` (passive waiting, threads from affinity and load, one for small models).

Conditions: ``idle`` (nothing started by the benchmark), ``loaded`` (``--busy`` extra processes spinning on a
CPU each). Prints s/step per cell, the loaded/idle ratio of each setting, and mfhull vs default under load.
Other users' load on a shared machine is not controlled: the 1-minute load average is printed with each cell.

    OMP_NUM_THREADS= python benchmarks/bench_threads.py [--steps 20] [--busy 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time
import numpy as np
mode, steps = sys.argv[1], int(sys.argv[2])
import torch
from ase import Atoms
from pipeline.graphs import atoms_to_graph
from pipeline.model import MFPotential, preset
torch.manual_seed(0)
model = MFPotential(preset("small", elements=("Li", "Al"), fidelities=("f",)))
if mode == "mfhull":
    from pipeline.threads import configure_torch_threads
    configure_torch_threads(sum(p.numel() for p in model.parameters()))
rng = np.random.default_rng(0)
cells = []
for _ in range(8):
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.9
    pos = np.concatenate([grid, grid + 1.45]) + rng.normal(0, 0.05, (16, 3))
    cells.append(Atoms(numbers=[3] * 8 + [13] * 8, positions=pos, cell=np.eye(3) * 5.8, pbc=True))
graph = atoms_to_graph(cells, model.config.cutoff, fidelity=0)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
def step():
    out = model(graph, compute_stress=False)
    loss = (out["energy"] ** 2).mean() + (out["forces"] ** 2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"s_per_step": (time.perf_counter() - t) / steps, "threads": torch.get_num_threads()}))
"""


def _spin(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_child(mode: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MFHULL_THREADS")}
    if mode == "mfhull":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps)], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the loaded condition")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    args = parser.parse_args()
    print(f"CPUs available: {len(os.sched_getaffinity(0))}; torch default threads = that; "
          f"steps {args.steps}, busy {args.busy}, repeats {args.repeats}")
    results: dict[tuple[str, str], list[float]] = {}
    threads: dict[str, int] = {}
    for r in range(args.repeats):
        for condition in ("idle", "loaded"):
            spinners = []
            if condition == "loaded":
                stop = time.time() + 600
                spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
                for p in spinners:
                    p.start()
            try:
                for mode in ("default", "mfhull"):
                    out = run_child(mode, args.steps)
                    results.setdefault((mode, condition), []).append(out["s_per_step"])
                    threads[mode] = out["threads"]
                    print(f"repeat {r} {condition:6s} {mode:7s} threads {out['threads']} "
                          f"{out['s_per_step']:.4f} s/step (load avg {os.getloadavg()[0]:.1f})", flush=True)
            finally:
                for p in spinners:
                    p.terminate()
                    p.join()
    med = {k: statistics.median(v) for k, v in results.items()}
    print("\nmedian s/step      idle     loaded   loaded/idle")
    for mode in ("default", "mfhull"):
        print(f"{mode:8s} ({threads[mode]} thr) {med[(mode, 'idle')]:.4f}   {med[(mode, 'loaded')]:.4f}   "
              f"{med[(mode, 'loaded')] / med[(mode, 'idle')]:.2f}x")
    print(f"under load, default/mfhull time: {med[('default', 'loaded')] / med[('mfhull', 'loaded')]:.2f}x")


if __name__ == "__main__":
    main()
