"""Peak memory of one training epoch streamed from Parquet, as the data set grows 10x; and (``--speed``) the
training-step throughput of our trainer vs sevenn's own trainer (prints measured numbers).

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_scale.py [--frames 10000 100000]
    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_scale.py --speed [--batch 4 --repeats 6]

``--speed``: SevenNet-MF-0 (the same pretrained weights in both: sevenn's checkpoint, and ours imported from it),
float32, one thread, the same batches of real MPtrj frames (mptrj-random-1k, at most ``--size-cap`` atoms),
alternately labelled as the two fidelities (sevenn modalities PBE and R2SCAN: sevenn 0.13 crashes with
``use_modality`` and a single modality), Huber loss on energy per atom, forces and stress (weights 1, 1, 0.01),
Adam. A step = collate the batch's prebuilt graphs + forward (energy, forces, stress with create_graph) + loss +
backward + optimizer step: ours as ``pipeline.train.trainer`` does it (FrameData batch, loss_terms, clip_grad_norm_),
sevenn's through ``sevenn.train.trainer.Trainer.run_one_epoch`` on a one-batch loader (torch_geometric Batch).
The two alternate step by step in one process (after one warm-up step each), each step on new frames; prints
the median CPU time per step (``time.process_time``: one thread, so it is the step's compute and not the time
spent waiting for a core on a shared machine; the wall time is printed too), structures per CPU second and the
ratios (of the medians, and per batch: the same frames back to back).

Data: the 2000 real MPtrj frames of ../shared/data/mp/mattersim (mptrj-random-1k + mptrj-highest-stress-1k),
repeated until each set has ``--frames`` frames; every copy after the first has its positions perturbed by
N(0, 0.01 A) and a new frame id; every 10th real frame is relabelled 'r2scan' (its labels stay PBE: this only
gives the sampler two fidelities to weight, r2scan x3). Sets are written as Parquet parts of 5000 rows.

Each variant runs in a fresh Python process (peak RSS = that process's ``ru_maxrss``), small preset, float64:

* floor N: the stream stopped after its ``--train-steps`` training batches (imports, model, optimizer, index,
  the training steps' autograd peak; no epoch): what the whole epoch adds is stream N - floor N;
* stream N: :class:`pipeline.train.stream.FrameStream`, one whole epoch (every batch read from Parquet and its
  graph built), of which the first ``--train-steps`` batches also take an Adam step (a step costs seconds on
  this CPU; the data pass is what grows with N);
* in-memory N (baseline, 10 k only by default): today's path, ``read_table`` + :class:`FrameData` (every graph
  in RAM), then the same ``--train-steps`` steps.

Prints peak RSS per variant, the stream's growth ratio RSS(largest)/RSS(smallest) (target <= 1.2), the highest
RSS between batches of the data pass, and what the epoch adds above its floor. The training steps' autograd peak
depends on which batches come first (the plans differ with N); ``--train-steps 0`` measures the data path alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import shared_data_dir

FILES = ("mattersim/mptrj-random-1k.xyz", "mattersim/mptrj-highest-stress-1k.xyz")
PART_ROWS = 5000
FIDELITIES = ("pbe", "r2scan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident set size now (Linux /proc; the benchmark's peak numbers are Linux ru_maxrss too)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def write_frames(out: Path, n_frames: int, seed: int = 0) -> Path:
    """A frames dataset of ``n_frames`` repeated/perturbed real MPtrj frames (see module doc)."""
    from pipeline.frames import frames_table
    from pipeline.io import ParquetDataset
    from pipeline.schema import FRAMES_SCHEMA, KEYS
    from pipeline.sources.files import import_path

    base = []
    for rel in FILES:
        result = import_path(shared_data_dir() / rel)
        if result.n_rejected:
            raise SystemExit(f"{rel}: {result.n_rejected} frames rejected: {result.rejects[0]['error']}")
        base.extend(result.rows)
    for i, row in enumerate(base):
        if i % 10 == 0:
            row["fidelity"] = "r2scan"
    dataset = ParquetDataset(out, FRAMES_SCHEMA, KEYS["frames"])
    rng = np.random.default_rng(seed)
    chunk = []
    for k in range(n_frames):
        copy, row = divmod(k, len(base))
        src = base[row]
        if copy:
            pos = np.asarray(src["positions"]) + rng.normal(0.0, 0.01, (len(src["numbers"]), 3))
            src = {**src, "frame_id": f"{src['frame_id']}#copy{copy}", "positions": pos.tolist()}
        chunk.append(src)
        if len(chunk) == PART_ROWS or k == n_frames - 1:
            dataset.append(frames_table(chunk))
            chunk = []
    return out


def _model_and_opt(elements: list[int]):
    import torch

    from pipeline.model import MFPotential, preset

    torch.manual_seed(0)
    model = MFPotential(preset("small", elements=tuple(elements), fidelities=FIDELITIES)).to(torch.float64)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _step(model, opt, graph, labels) -> float:
    import torch

    from pipeline.train.losses import LossWeights, loss_terms, total_loss

    opt.zero_grad()
    out = model(graph.to(dtype=torch.float64))
    loss = total_loss(loss_terms(out, labels.to("cpu", torch.float64)), LossWeights())
    loss.backward()
    opt.step()
    return float(loss.detach())


ELEMENTS = list(range(1, 95))


def speed(batch: int, repeats: int, size_cap: int, threads: int) -> None:
    """Training-step throughput, ours vs sevenn's trainer (module doc)."""
    import statistics

    import torch
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from pipeline.frames import frames_table
    from pipeline.model import import_sevenn
    from pipeline.sources.files import import_path
    from pipeline.train.data import FrameData
    from pipeline.train.losses import LossWeights, loss_terms, total_loss

    torch.set_num_threads(threads)
    n_frames = batch * repeats
    rows = [r for r in import_path(shared_data_dir() / FILES[0], limit=2000).rows
            if len(r["numbers"]) <= size_cap][:n_frames]
    if len(rows) < n_frames:
        raise SystemExit(f"only {len(rows)} frames with <= {size_cap} atoms")
    for i, row in enumerate(rows):
        row["fidelity"] = "r2scan" if i % 2 else "pbe"

    # ours: the pretrained weights imported into MFPotential, the trainer's step
    ours = import_sevenn().float().train()
    data = FrameData(frames_table(rows), ours.cutoff, ours.fidelities)
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    weights = LossWeights(1.0, 1.0, 0.01)

    def ours_step(k: int) -> None:
        graph, labels = data.batch(list(range(k * batch, (k + 1) * batch)))
        graph, labels = graph.to("cpu", torch.float32), labels.to("cpu", torch.float32)
        out = ours(graph, compute_forces=True, compute_stress=True, create_graph=True)
        loss = total_loss(loss_terms(out, labels, kind="huber", delta=0.01), weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 10.0)
        opt.step()

    # sevenn: its own model, trainer and graphs
    import sevenn._keys as KEY
    from sevenn.atom_graph_data import AtomGraphData
    from sevenn.train.dataload import atoms_to_graph
    from sevenn.train.loss import get_loss_functions_from_config
    from sevenn.train.trainer import Trainer
    from sevenn.util import load_checkpoint
    from torch_geometric.data import Batch

    cp = load_checkpoint("7net-mf-0")
    trainer = Trainer(cp.build_model(), get_loss_functions_from_config(cp.config), torch.optim.Adam,
                      {"lr": 1e-4}, device="cpu")
    graphs = []
    for row in rows:
        atoms = Atoms(numbers=row["numbers"], positions=row["positions"], cell=row["cell"], pbc=row["pbc"])
        stress = np.asarray(row["stress"], dtype=float)
        atoms.calc = SinglePointCalculator(atoms, energy=row["energy"], forces=np.asarray(row["forces"]),
                                           stress=stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
        g = AtomGraphData.from_numpy_dict(atoms_to_graph(atoms, cp.config[KEY.CUTOFF], y_from_calc=True))
        g[KEY.DATA_MODALITY] = "R2SCAN" if row["fidelity"] == "r2scan" else "PBE"
        g[KEY.DATA_WEIGHT] = {"energy": 1.0, "force": 1.0, "stress": 1.0}  # as sevenn's graph dataset sets it
        graphs.append(g)

    def sevenn_step(k: int) -> None:
        trainer.run_one_epoch([Batch.from_data_list(graphs[k * batch:(k + 1) * batch])], is_train=True)

    times: dict[str, list[float]] = {"ours": [], "sevenn": []}
    walls: dict[str, list[float]] = {"ours": [], "sevenn": []}
    ours_step(0)
    sevenn_step(0)
    for k in range(repeats):
        for name, fn in (("ours", ours_step), ("sevenn", sevenn_step)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(k)
            times[name].append(time.process_time() - c0)  # CPU seconds: robust to waiting for a shared core
            walls[name].append(time.perf_counter() - t0)
    atoms = [len(r["numbers"]) for r in rows]
    print(f"SevenNet-MF-0 training step, float32, {threads} thread(s), batch {batch} structures "
          f"({min(atoms)}-{max(atoms)} atoms, {sum(atoms) / len(rows):.1f} mean), fidelities PBE/R2SCAN "
          f"alternating, {repeats} interleaved steps each after 1 warm-up")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, v in times.items():
        print(f"  {name:>6}: median {med[name]:.3f} CPU s/step (min {min(v):.3f}, max {max(v):.3f}) = "
              f"{batch / med[name]:.2f} structures per CPU second; wall median {statistics.median(walls[name]):.3f} s")
    ratios = [b / a for a, b in zip(times["ours"], times["sevenn"])]  # same batch, adjacent in time
    print(f"  ours / sevenn throughput: {med['sevenn'] / med['ours']:.2f}x from the medians; per batch (same "
          f"frames, back to back) median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x "
          "(target >= 1.5x on CPU)")


def child(mode: str, path: str, train_steps: int, max_atoms: int, workers: int) -> dict:
    """One variant in this (fresh) process; returns its numbers."""
    import torch

    torch.set_num_threads(1)
    model, opt = _model_and_opt(ELEMENTS)
    t0 = time.perf_counter()
    steps = batches = frames = 0
    ratios: list[float] = []  # real / estimated edges per batch
    pass_rss = 0.0  # highest RSS seen between batches after the training steps (the data pass alone)
    if mode in ("stream", "floor"):
        from pipeline.train.stream import BatchBudget, FrameStream

        stream = FrameStream(path, cutoff=model.cutoff, fidelities=FIDELITIES, budget=BatchBudget(max_atoms=max_atoms),
                             weights={"r2scan": 3.0}, seed=0, buffer_rows=PART_ROWS)
        planned = stream.global_plan(0)[0]
        for item in stream.iter_epoch(num_workers=workers):
            ratios.append(item.graph.num_edges / max(int(stream.index.edges[planned[item.position]].sum()), 1))
            if steps < train_steps:
                _step(model, opt, item.graph, item.labels)
                steps += 1
            elif mode == "floor":
                break
            else:
                pass_rss = max(pass_rss, current_rss_mib())
            batches += 1
            frames += item.graph.num_graphs
    elif mode == "memory":
        from pipeline.io import read_table
        from pipeline.schema import FRAMES_SCHEMA
        from pipeline.train.data import FrameData

        data = FrameData(read_table(path, FRAMES_SCHEMA), model.cutoff, FIDELITIES)
        frames = len(data)
        order = np.random.default_rng(0).permutation(len(data))
        start = 0
        while steps < train_steps:  # batches of about max_atoms atoms, as the stream makes them
            idx, atoms = [], 0
            while start < len(order) and (not idx or atoms + data.graphs[order[start]].num_atoms <= max_atoms):
                idx.append(int(order[start]))
                atoms += data.graphs[order[start]].num_atoms
                start += 1
            _step(model, opt, *data.batch(idx))
            steps += 1
            batches += 1
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    own = peak_rss_mib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"mode": mode, "peak_rss_mib": own, "worker_peak_rss_mib": kids, "pass_rss_mib": pass_rss,
            "seconds": time.perf_counter() - t0, "steps": steps, "batches": batches, "frames": frames,
            "edge_ratio": [min(ratios), float(np.mean(ratios)), max(ratios)] if ratios else None}


def run_child(mode: str, path: Path | str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--path", str(path), "--train-steps", str(args.train_steps),
           "--max-atoms", str(args.max_atoms), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {path}: child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--memory-frames", type=int, nargs="*", default=[10_000],
                        help="sizes at which to also measure the in-memory FrameData baseline")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--max-atoms", type=int, default=400, help="atom budget of a batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the stream")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data sets (default: a temp dir)")
    parser.add_argument("--speed", action="store_true", help="training-step throughput, ours vs sevenn's trainer")
    parser.add_argument("--batch", type=int, default=4, help="--speed: structures per step")
    parser.add_argument("--repeats", type=int, default=6, help="--speed: timed steps of each")
    parser.add_argument("--size-cap", type=int, default=16, help="--speed: largest frame (atoms)")
    parser.add_argument("--threads", type=int, default=1, help="--speed: torch threads")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed:
        speed(args.batch, args.repeats, args.size_cap, args.threads)
        return
    if args.child:
        print(json.dumps(child(args.child, args.path, args.train_steps, args.max_atoms, args.workers)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rows = []
        for n in sorted(set(args.frames) | set(args.memory_frames)):
            t0 = time.perf_counter()
            path = write_frames(Path(tmp) / f"frames-{n}", n)
            print(f"wrote {n} frames in {time.perf_counter() - t0:.0f} s")
            variants = ["floor", "stream"] * (n in args.frames) + ["memory"] * (n in args.memory_frames)
            for mode in variants:
                r = run_child(mode, path, args)
                rows.append((n, r))
                print(f"{mode:>6} {n:>7} frames: peak RSS {r['peak_rss_mib']:7.0f} MiB (workers "
                      f"{r['worker_peak_rss_mib']:.0f}; data pass {r['pass_rss_mib']:.0f}), {r['batches']} batches, "
                      f"{r['frames']} frames, {r['steps']} train steps, {r['seconds']:.0f} s")
                if r["edge_ratio"] and r["batches"] > 1:
                    print("        real/estimated edges per batch: min {:.3f} mean {:.3f} max {:.3f}".format(
                        *r["edge_ratio"]))
        by = {(r["mode"], n): r for n, r in rows}
        sizes = sorted(n for m, n in by if m == "stream")
        if len(sizes) >= 2:
            a, b = by["stream", sizes[0]], by["stream", sizes[-1]]
            print(f"stream peak RSS growth {sizes[0]} -> {sizes[-1]} frames: "
                  f"{b['peak_rss_mib'] / a['peak_rss_mib']:.3f}x (target <= 1.2x)")
            if a["pass_rss_mib"]:
                print(f"highest RSS during the data pass (after the training steps): {a['pass_rss_mib']:.0f} -> "
                      f"{b['pass_rss_mib']:.0f} MiB ({b['pass_rss_mib'] / a['pass_rss_mib']:.3f}x)")
            for n in (sizes[0], sizes[-1]):
                extra = by["stream", n]["peak_rss_mib"] - by["floor", n]["peak_rss_mib"]
                print(f"  {n} frames: the whole epoch adds {extra:.0f} MiB to the peak of its first "
                      f"{by['floor', n]['steps']} training batches")
        for (mode, n), r in sorted(by.items()):
            if mode == "memory" and ("stream", n) in by:
                print(f"in-memory FrameData at {n} frames: {r['peak_rss_mib']:.0f} MiB = "
                      f"{r['peak_rss_mib'] / by['stream', n]['peak_rss_mib']:.2f}x the stream's")

if __name__ == "__main__":
    main()
