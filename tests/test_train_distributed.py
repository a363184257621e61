"""2-process gloo DDP equals 1 process with the same global batch (fixed-size batches, equal-sized real frames).

Each rank streams batches of 2 frames (rank r takes global batches r, r + 2, ...); the single process streams
batches of 4 frames, which are exactly the union of the two ranks' batches of a step. All frames have the same
atom count, so the mean of the per-rank losses is the global loss and DDP's averaged gradient is the global
gradient: loss curves and final weights agree to float64 rounding."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.frames import frames_table
from pipeline.io import ParquetDataset
from pipeline.model import MFPotential, load_checkpoint, preset, save_checkpoint
from pipeline.schema import FRAMES_SCHEMA, KEYS
from pipeline.sources.files import import_path
from pipeline.train.distributed import (
    all_reduce_mean,
    distributed,
    init_from_env,
    on_rank0,
    unwrap,
    wrap_model,
)
from pipeline.train.losses import LossWeights, loss_terms, total_loss
from pipeline.train.stream import BatchBudget, FrameStream

STEPS = 3
PER_RANK = 2
N_ATOMS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(elements):
    torch.manual_seed(0)
    cfg = preset("small", elements=tuple(elements), fidelities=("pbe", "r2scan"))
    return MFPotential(cfg).to(torch.float64)


def _train(model, stream):
    """The test's own tiny loop: Adam on the masked loss; returns the loss of each step (mean over ranks)."""
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    weights = LossWeights(energy=1.0, forces=1.0, stress=0.1)
    losses = []
    for step, item in enumerate(stream.iter_epoch()):
        if step == STEPS:
            break
        opt.zero_grad()
        out = model(item.graph.to(dtype=torch.float64))
        loss = total_loss(loss_terms(out, item.labels.to("cpu", torch.float64)), weights)
        loss.backward()
        opt.step()
        losses.append(float(all_reduce_mean(loss)))
    return losses


def _rank_main(rank, port, data, elements, out_dir):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    with distributed(device="cpu", timeout_s=120) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, 2, "gloo")
        model = wrap_model(_model(elements), ctx)
        stream = FrameStream(data, cutoff=4.5, fidelities=("pbe", "r2scan"),
                             budget=BatchBudget(max_structures=PER_RANK), buffer_rows=8, seed=5)
        assert (stream.rank, stream.world_size) == (rank, 2)  # taken from the process group
        losses = _train(model, stream)
        written = on_rank0(save_checkpoint, unwrap(model), os.path.join(out_dir, "ddp.pt"))
        assert (written is None) == (rank != 0)
        if rank == 0:
            with open(os.path.join(out_dir, "losses.json"), "w") as fh:
                json.dump(losses, fh)


@pytest.fixture(scope="module")
def equal_size_frames(mp_file, tmp_path_factory):
    rows = [r for r in import_path(mp_file("mattersim/mptrj-random-1k.xyz"), limit=200).rows
            if len(r["numbers"]) == N_ATOMS][: 2 * PER_RANK * STEPS]
    assert len(rows) == 2 * PER_RANK * STEPS
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["fidelity"] = "r2scan"  # both heads take part
    out = tmp_path_factory.mktemp("ddp") / "frames"
    ParquetDataset(out, FRAMES_SCHEMA, KEYS["frames"]).append(frames_table(rows))
    return out, sorted({z for r in rows for z in r["numbers"]})


def test_two_process_gloo_ddp_matches_one_process(equal_size_frames, tmp_path):
    data, elements = equal_size_frames
    ctx = mp.start_processes(_rank_main, args=(_free_port(), data, elements, str(tmp_path)), nprocs=2,
                             join=True, start_method="spawn")  # fork is unsafe once the suite has started threads (Prefect, Dask)
    assert ctx is None or ctx.join()
    ddp_losses = json.loads((tmp_path / "losses.json").read_text())

    single = FrameStream(data, cutoff=4.5, fidelities=("pbe", "r2scan"),
                         budget=BatchBudget(max_structures=2 * PER_RANK), buffer_rows=8, seed=5, world_size=1, rank=0)
    model = _model(elements)
    losses = _train(model, single)
    assert len(losses) == len(ddp_losses) == STEPS
    start = _model(elements).state_dict()
    moved = max(float((v - start[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point() and v.numel())
    assert moved > 1e-4  # the optimizer did move the weights: the comparison below is not of two untouched models
    np.testing.assert_allclose(ddp_losses, losses, rtol=1e-9, atol=0)
    ddp_model = load_checkpoint(tmp_path / "ddp.pt")
    for (name, a), b in zip(model.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(b.to(a.dtype), a, rtol=1e-8, atol=1e-10, msg=name)


def test_single_process_without_torchrun(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ctx = init_from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_distributed) == (0, 1, False)
    model = torch.nn.Linear(2, 1)
    assert wrap_model(model, ctx) is model and unwrap(model) is model
    assert on_rank0(lambda: 7) == 7
    assert float(all_reduce_mean(3.0)) == 3.0


def test_half_set_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, .*MASTER_ADDR, MASTER_PORT not set: launch with torchrun"):
        init_from_env(device="cpu")


@pytest.mark.slow
def test_readme_torchrun_example_runs(mp_file, tmp_path):
    """The README's "Training at scale" example, as written, under torchrun with 2 gloo processes."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    code = text[text.index("## Training at scale"):].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "train_ddp.py").write_text(code)
    rows = import_path(mp_file("mattersim/mptrj-random-1k.xyz"), limit=60).rows
    ParquetDataset(tmp_path / "data/mine/frames", FRAMES_SCHEMA, KEYS["frames"]).append(frames_table(rows))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train_ddp.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert {int(rank) for rank, _, _ in lines} == {0, 1}
    losses = {}
    for rank, position, loss in lines:  # both ranks print the same all-reduced loss for a step
        losses.setdefault(int(position) // 2, set()).add(round(float(loss), 9))
    assert all(len(v) == 1 for v in losses.values())
    assert load_checkpoint(tmp_path / "models/ddp.pt").cutoff == 4.5
