"""GPU checks of the training path (run by benchmarks/gpu_train_check.sh on a machine with CUDA; not a test).

    python benchmarks/gpu_train_check.py parity     # SevenNet-MF-0 imported, on CUDA, vs sevenn's calculator (CPU)
    python benchmarks/gpu_train_check.py precision  # MF-0 training step: float32 vs tf32 vs bf16, speed + accuracy

Data: data/demo/frames (in the repository; ../shared is not needed). Prints one line per result and exits 1 when
a check fails its tolerance (parity: 1e-4 eV/atom, 1e-3 eV/A, 1e-3 GPa, as tests/test_sevenn_parity.py; bf16:
energies within 3 meV/atom and forces within 10 meV/A of float32 on the pretrained weights; a CPU dry run of this
script, bf16 autocast on CPU, 4 demo frames, measured 0.98 meV/atom and 1.9 meV/A).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
#: a dry run of the script's logic on CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_FRAMES=4 (numbers then mean nothing)
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
N_FRAMES = int(os.environ.get("GPU_CHECK_FRAMES", "64"))


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _frames(n: int):
    from pipeline.io import read_table
    from pipeline.schema import FRAMES_SCHEMA

    table = read_table(ROOT / "data/demo/frames", FRAMES_SCHEMA)
    picks = np.unique(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(int))
    return table.take(picks)  # spread over the set (its first frames are single atoms)


def parity() -> bool:
    from ase import Atoms
    from ase.units import GPa
    from sevenn.calculator import SevenNetCalculator

    from pipeline.graphs import atoms_to_graph
    from pipeline.model import import_sevenn

    ours = import_sevenn("7net-mf-0", dtype=torch.float64).eval().to(DEVICE)
    ok = True
    for modal, fid in (("PBE", "pbe"), ("R2SCAN", "r2scan")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calc = SevenNetCalculator("7net-mf-0", modal=modal, device="cpu")
        worst = [0.0, 0.0, 0.0]
        for row in _frames(6).to_pylist():
            atoms = Atoms(numbers=row["numbers"], positions=row["positions"], cell=row["cell"], pbc=row["pbc"])
            atoms.rattle(0.05, seed=1)
            atoms.calc = calc
            e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
            graph = atoms_to_graph(atoms, ours.cutoff, dtype=torch.float64).to(DEVICE)
            out = {k: v.detach().cpu().numpy() for k, v in ours.predict(graph, fid).items()}
            n = len(atoms)
            worst = [max(worst[0], abs(out["energy"][0] / n - e / n)), max(worst[1], np.abs(out["forces"] - f).max()),
                     max(worst[2], np.abs(out["stress"][0] - s).max() / GPa)]
        good = worst[0] < 1e-4 and worst[1] < 1e-3 and worst[2] < 1e-3
        ok &= good
        print(f"parity {modal}: max |dE| {worst[0]:.2e} eV/atom, |dF| {worst[1]:.2e} eV/A, |dS| {worst[2]:.2e} GPa "
              f"(ours float64 on {DEVICE} vs sevenn float32 on CPU) {'OK' if good else 'FAIL'}")
    return ok


def precision() -> bool:
    from pipeline.model import import_sevenn
    from pipeline.train.data import FrameData
    from pipeline.train.losses import LossWeights, loss_terms, total_loss
    from pipeline.train.scale import precision_context

    table = _frames(N_FRAMES)
    model = import_sevenn("7net-mf-0").float().to(DEVICE).train()
    rows = table.to_pylist()
    for r in rows:  # demo fidelities -> MF-0 heads
        r["fidelity"] = "r2scan" if "r2scan" in r["fidelity"] else "pbe"
    from pipeline.frames import frames_table

    data = FrameData(frames_table(rows), model.cutoff, model.fidelities)
    graph, labels = data.batch(range(len(data)))
    graph, labels = graph.to(DEVICE, torch.float32), labels.to(DEVICE, torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: the weights stay the pretrained ones
    n = graph.n_atoms.to(torch.float32)
    ref = None
    ok = True
    for mode in ("float32", "tf32", "bf16"):
        def step(mode: str = mode):
            with precision_context(mode, model):
                out = model(graph, compute_forces=True, compute_stress=True, create_graph=True)
            loss = total_loss(loss_terms(out, labels, kind="huber"), LossWeights(1, 1, 0.01))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return out

        step()
        _sync()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            out = step()
            _sync()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        if ref is None:
            ref = {k: v.detach() for k, v in out.items()}
        de = float(((out["energy"].detach() - ref["energy"]) / n).abs().max()) * 1000
        df = float((out["forces"].detach() - ref["forces"]).abs().max()) * 1000
        good = mode == "float32" or (de < 3.0 and df < 10.0)
        ok &= good
        print(f"{mode:>7}: {med * 1000:8.1f} ms/step ({len(data)} structures, {graph.num_atoms} atoms) = "
              f"{len(data) / med:7.1f} structures/s; vs float32 max |dE| {de:.3f} meV/atom, |dF| {df:.3f} meV/A; "
              f"dtypes E {out['energy'].dtype}, F {out['forces'].dtype} {'OK' if good else 'FAIL'}")
    return ok


if __name__ == "__main__":
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script is for a GPU machine")
    checks = {"parity": parity, "precision": precision}
    names = sys.argv[1:] or list(checks)
    results = [checks[name]() for name in names]
    sys.exit(0 if all(results) else 1)
