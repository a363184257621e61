"""`mfhull train --config` (same as the flags), `--strategy`, and `mfhull evaluate` (per-frame Parquet)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.io import write_table_atomic


@pytest.fixture(scope="module")
def frames_dir(emt_frames, tmp_path_factory):
    path = tmp_path_factory.mktemp("frames") / "frames.parquet"
    write_table_atomic(emt_frames(8, hi_every=2), path)
    return path


def test_train_config_file_equals_flags(frames_dir, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"frames: {frames_dir}\nout: {tmp_path / 'a'}\nmax-steps: 2\nbatch_size: 4\n"
                   "val-fraction: 0.0\nema-decay: 0.5\nfidelity-weight: [hi=2]\n")
    assert main(["train", "--config", str(cfg), "--loss", "huber"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["train", "--frames", str(frames_dir), "--out", str(tmp_path / "b"), "--max-steps", "2",
                 "--batch-size", "4", "--val-fraction", "0", "--ema-decay", "0.5", "--fidelity-weight", "hi=2",
                 "--loss", "huber"]) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_file["steps"] == from_flags["steps"] == 2
    assert from_file["final"]["train_loss"] == pytest.approx(from_flags["final"]["train_loss"], rel=1e-6)
    cfg.write_text("frames: x\nbatchsize: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2  # one line on stderr, never a traceback
    assert "unknown options ['batchsize']" in capsys.readouterr().err


def test_strategy_and_evaluate(frames_dir, tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["train", "--frames", str(frames_dir), "--out", str(out), "--strategy", "transfer", "--high", "hi",
                 "--low", "lo", "--max-steps", "2", "--batch-size", "4", "--val-fraction", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and json.loads((out / "strategy.json").read_text())["strategy"] == "transfer"
    ckpt = summary["checkpoints"]["finetune"]
    errs = tmp_path / "errs.parquet"
    assert main(["evaluate", "--checkpoint", ckpt, "--frames", str(frames_dir), "--out", str(errs)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"hi/energy_mae_meV_atom", "lo/forces_mae_meV_A", "lo/stress_mae_GPa"} <= set(metrics)
    table = pq.read_table(errs)
    assert table.num_rows == 12 and set(table.column("fidelity").to_pylist()) == {"hi", "lo"}
    assert main(["evaluate", "--checkpoint", ckpt, "--frames", str(frames_dir), "--fidelity", "hi"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"hi/forces_mae_meV_A"}  # lo labels read at the hi head
    assert main(["evaluate", "--checkpoint", ckpt, "--frames", str(frames_dir), "--fidelity", "r2scan"]) == 2
    assert "unknown fidelity 'r2scan'" in capsys.readouterr().err


def test_fine_tuning_defaults_to_sevenn_fine_tuning_lr(frames_dir, tmp_path):
    """Without --lr, training from scratch uses 5e-3 and fine-tuning (--init-from, or --strategy finetune-mf0)
    SevenNet's fine-tuning rate; an explicit --lr always wins."""
    from pipeline.cli import build_parser, train_config_from_args
    from pipeline.train.finetune import FINETUNE_LR
    from pipeline.train.strategies import FINETUNE_STRATEGIES, STRATEGIES

    parser = build_parser()
    base = ["train", "--frames", str(frames_dir), "--out", str(tmp_path)]
    assert train_config_from_args(parser.parse_args(base)).lr == 5e-3
    assert train_config_from_args(parser.parse_args([*base, "--init-from", "c.pt"])).lr == FINETUNE_LR == 2e-4
    for s in FINETUNE_STRATEGIES:
        assert train_config_from_args(parser.parse_args([*base, "--strategy", s])).lr == FINETUNE_LR
    # every strategy of the harness can be asked for by name
    strategy = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions
                    if a.dest == "strategy")
    assert tuple(strategy.choices) == STRATEGIES
    assert train_config_from_args(parser.parse_args([*base, "--init-from", "c.pt", "--lr", "1e-3"])).lr == 1e-3
