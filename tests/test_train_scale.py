"""train() at scale: DDP under a 2-process gloo launch equals one process, gradient accumulation equals a bigger
batch, the streamed path resumes mid-epoch after a kill, bf16 autocast keeps the reductions in float32.

Data: 28 real MPtrj frames of 1-8 atoms (unequal sizes on purpose: the step loss normalisation makes DDP and
accumulation exact for any batch sizes), every 3rd relabelled 'r2scan', as 2 Parquet parts."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.frames import frames_table
from pipeline.graphs import batch_graphs, frame_rows_to_graph
from pipeline.io import ParquetDataset
from pipeline.model import MFPotential, preset
from pipeline.schema import FRAMES_SCHEMA, KEYS
from pipeline.sources.files import import_path
from pipeline.train import TrainConfig, train
from pipeline.train.scale import precision_context

N_FRAMES = 28


@pytest.fixture(scope="module")
def small_frames(mp_file, tmp_path_factory):
    rows = [r for r in import_path(mp_file("mattersim/mptrj-random-1k.xyz"), limit=300).rows
            if len(r["numbers"]) <= 8][:N_FRAMES]
    assert len(rows) == N_FRAMES and len({len(r["numbers"]) for r in rows}) > 2
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["fidelity"] = "r2scan"
    out = tmp_path_factory.mktemp("scale") / "frames"
    dataset = ParquetDataset(out, FRAMES_SCHEMA, KEYS["frames"])
    dataset.append(frames_table(rows[:14]))
    dataset.append(frames_table(rows[14:]))
    return out, frames_table(rows)


def _cfg(**kw):
    base = {"max_steps": 3, "lr": 5e-3, "val_fraction": 0.25, "seed": 1, "dtype": "float64", "ema_decay": 0.5,
            "warmup_steps": 1}
    return TrainConfig(**{**base, **kw})


def _raw(path):
    return torch.load(path, weights_only=True)["extra"]["raw_state"]


METRIC_KEYS = ("train_loss", "train_energy", "train_forces", "val_loss", "step", "pbe/energy_mae_meV_atom",
        "r2scan/energy_mae_meV_atom", "pbe/forces_mae_meV_A")


def _assert_same_run(a_dir, b_dir, rtol=1e-9, keys=METRIC_KEYS):
    ha = json.loads((a_dir / "metrics.json").read_text())["history"]
    hb = json.loads((b_dir / "metrics.json").read_text())["history"]
    assert len(ha) == len(hb) >= 1
    for ra, rb in zip(ha, hb):
        for key in keys:
            if key in ra or key in rb:
                np.testing.assert_allclose(rb[key], ra[key], rtol=rtol, atol=0, err_msg=key)
    raw_a, raw_b = _raw(a_dir / "last.pt"), _raw(b_dir / "last.pt")
    for k in raw_a:
        torch.testing.assert_close(raw_b[k], raw_a[k], rtol=1e-8, atol=1e-11, msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, port, data, out):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    # 2 ranks x 2 micro-batches of 1 frame = a global batch of 4 frames per optimizer step
    res = train(data, preset("small"), _cfg(stream=True, batch_size=1, accumulate=2), out, resume=False)
    assert res.steps == 3
    assert not torch.distributed.is_initialized()  # train() joined the group, so it left it again


def test_ddp_two_gloo_processes_equal_one_process(small_frames, tmp_path):
    data, _ = small_frames
    ctx = mp.start_processes(_rank_main, args=(_free_port(), str(data), str(tmp_path / "ddp")), nprocs=2,
                             join=True, start_method="spawn")
    assert ctx is None or ctx.join()
    single = train(data, preset("small"), _cfg(stream=True, batch_size=4), tmp_path / "one", resume=False)
    assert single.steps == 3
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["streamed"] and metrics["n_val"] > 0
    start = _raw(tmp_path / "one" / "last.pt")
    _assert_same_run(tmp_path / "one", tmp_path / "ddp")
    first = json.loads((tmp_path / "one" / "metrics.json").read_text())["history"][0]
    assert {"r2scan/val_loss", "pbe/val_loss", "pbe/forces_mae_meV_A"} <= set(first)
    fresh = MFPotential(preset("small")).state_dict()
    assert any(not torch.equal(start[k], v.to(start[k].dtype)) for k, v in fresh.items() if k in start)


def test_accumulation_equals_one_bigger_batch(small_frames, tmp_path):
    _, table = small_frames
    big = train(table, preset("small"), _cfg(batch_size=6), tmp_path / "big", resume=False)
    acc = train(table, preset("small"), _cfg(batch_size=3, accumulate=2), tmp_path / "acc", resume=False)
    assert big.steps == acc.steps == 3
    # the in-memory val_loss is a mean of per-batch losses (evaluation batches of batch_size): per-frame metrics only
    _assert_same_run(tmp_path / "big", tmp_path / "acc", keys=[k for k in METRIC_KEYS if k != "val_loss"])
    # without the step-wide normalisation (mean of the two micro-batch means) the step would differ
    plain = train(table, preset("small"), _cfg(batch_size=3), tmp_path / "plain", resume=False)
    assert plain.history[0]["train_loss"] != pytest.approx(big.history[0]["train_loss"], rel=1e-6)


def test_streamed_kill_and_resume_mid_epoch(small_frames, tmp_path):
    data, _ = small_frames
    cfg = _cfg(stream=True, batch_size=3, max_steps=None, epochs=2, checkpoint_every=2)
    full = train(data, preset("small"), cfg, tmp_path / "full", resume=False)
    per_epoch = full.steps // 2
    assert per_epoch >= 4

    saved_at = per_epoch + 2 - per_epoch % 2  # the first mid-epoch last.pt of epoch 1 (every 2 steps)

    def kill(step):
        if step == saved_at + 1:  # one step after it: that step is lost and done again after the resume
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(data, preset("small"), cfg, tmp_path / "cut", resume=False, on_step=kill)
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["extra"]
    assert saved["step"] == saved_at and saved["partial"]["stream"]["epoch"] == 1
    steps_after = []
    resumed = train(data, preset("small"), cfg, tmp_path / "cut", resume=True, on_step=steps_after.append)
    assert steps_after[0] == saved_at + 1 and resumed.steps == full.steps
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):  # EMA weights
        torch.testing.assert_close(a, b)


def test_bf16_autocast_keeps_reductions_in_float32(small_frames):
    _, table = small_frames
    rows = table.to_pylist()[:6]
    torch.manual_seed(0)
    cfg = preset("small", elements=tuple(sorted({z for r in rows for z in r["numbers"]})),
                 fidelities=("pbe", "r2scan"))
    model = MFPotential(cfg).float()
    graph = batch_graphs([frame_rows_to_graph([r], cfg.cutoff, cfg.fidelities) for r in rows]).to(dtype=torch.float32)
    ref = model(graph, create_graph=False)
    seen = []
    hook = model.blocks[0].conv.radial_mlp[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with precision_context("bf16", model):
        low = model(graph, create_graph=False)
    hook.remove()
    assert model.autocast_dtype is None  # restored
    assert seen == [torch.bfloat16]  # the per-edge network did run in bf16
    for key in ("energy", "forces", "stress", "atomic_energies"):
        assert low[key].dtype == torch.float32, key
    n = graph.n_atoms.to(torch.float32)
    scale = float(ref["atomic_energies"].detach().abs().max()) + 1e-3
    # only the per-edge radial MLP and tensor product run in bf16 (8 mantissa bits); measured on these random
    # weights: 9e-5 (energy per atom) and 0.7 % (forces) of the largest magnitudes
    assert float(((low["energy"] - ref["energy"]).detach() / n).abs().max()) < 5e-3 * scale
    assert float((low["forces"] - ref["forces"]).detach().abs().max()) < 0.03 * (float(ref["forces"].detach().abs().max()) + 1e-3)
    assert not torch.equal(low["energy"], ref["energy"])


def test_bf16_training_runs_and_bad_precision_is_refused(small_frames, tmp_path):
    _, table = small_frames
    res = train(table, preset("small"), TrainConfig(max_steps=2, batch_size=4, val_fraction=0.25, precision="bf16"),
                tmp_path / "bf16", resume=False)
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in res.history)
    assert res.model.autocast_dtype is None  # checkpoints and evaluation run in float32
    with pytest.raises(ValueError, match="needs dtype float32"):
        TrainConfig(precision="bf16", dtype="float64")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="pass its path"):
        train(table, preset("small"), TrainConfig(stream=True), tmp_path / "x")
    assert isinstance(table, pa.Table)


def test_cli_stream_options_and_devices_command(small_frames, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.train.launch import torchrun_command

    data, _ = small_frames
    out = tmp_path / "cli"
    code = main(["train", "--frames", str(data), "--out", str(out), "--max-atoms", "40", "--sampling-weight",
                 "r2scan=2", "--accumulate", "2", "--max-steps", "2", "--checkpoint-every", "1"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["streamed"] and metrics["steps"] == 2
    key = torch.load(out / "last.pt", weights_only=True)["extra"]["run_key"]["train_config"]
    assert key["max_atoms"] == 40 and key["sampling_weights"] == {"r2scan": 2.0} and "num_workers" not in key
    capsys.readouterr()
    assert main(["train", "--frames", str(data), "--out", str(tmp_path / "s"), "--devices", "2",
                 "--strategy", "single"]) == 2
    assert "--strategy runs in one process" in capsys.readouterr().err
    cmd = torchrun_command(2, ["train", "--frames", "f", "--devices", "2"])
    assert cmd[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert cmd[7:] == ["pipeline.cli", "train", "--frames", "f", "--devices", "2"]


@pytest.mark.slow
def test_cli_devices_two_launches_torchrun(small_frames, tmp_path):
    import subprocess
    import sys

    data, _ = small_frames
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--frames", str(data), "--out",
                           str(tmp_path / "run"), "--devices", "2", "--max-steps", "2", "--batch-size", "2"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["steps"] == 2  # rank 0 alone prints
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2


def test_train_task_launches_torchrun_with_the_same_config(monkeypatch, tmp_path):
    """flows.tasks.train with devices=2 hands torchrun an `mfhull train` command line that rebuilds its config."""
    from flows import tasks
    from pipeline.cli import build_parser, train_config_from_args
    from pipeline.train import launch as launch_mod

    calls = []
    monkeypatch.setattr(launch_mod, "launch", lambda n, argv, **kw: calls.append((n, argv)) or 0)
    (tmp_path / "frames").mkdir()
    best = tasks.train.fn(str(tmp_path / "frames"), str(tmp_path), preset="sevennet-mf-0", epochs=3, device="cpu",
                          devices=2, stream=True, max_atoms=512, sampling_weights={"r2scan": 3.0}, accumulate=2,
                          precision="tf32", workers=2, checkpoint_every=50, label_policy={"r2scan": ["energy"]})
    assert best == str(tmp_path / "best.pt")
    (n, argv), = calls
    assert n == 2 and argv[:2] == ["train", "--frames"]
    args = build_parser().parse_args(argv)
    assert (args.devices, args.preset) == (2, "sevennet-mf-0")
    expected = TrainConfig(epochs=3, stream=True, max_atoms=512, sampling_weights={"r2scan": 3.0}, accumulate=2,
                           precision="tf32", num_workers=2, checkpoint_every=50, label_policy={"r2scan": ("energy",)})
    assert train_config_from_args(args) == expected
