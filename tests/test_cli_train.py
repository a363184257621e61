"""`mfhull train --config` (same as the flags), `--strategy`, and `mfhull evaluate` (per-frame Parquet)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.cli import main
from pipeline.frames import atoms_to_frame_row, frames_table
from pipeline.io import write_table_atomic


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(8):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.numbers[rng.choice(4, size=k % 3, replace=False)] = 29
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        e = atoms.get_potential_energy()
        rows.append(atoms_to_frame_row(atoms, frame_id=f"lo:{k}", source="t", fidelity="lo"))
        if k % 2 == 0:
            rows.append(atoms_to_frame_row(atoms, frame_id=f"hi:{k}", source="t", fidelity="hi",
                                           energy=1.1 * e + 0.3 * len(atoms), forces=None, stress=None))
    path = tmp_path_factory.mktemp("frames") / "frames.parquet"
    write_table_atomic(frames_table(rows), path)
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
    with pytest.raises(SystemExit, match="unknown options \\['batchsize'\\]"):
        main(["train", "--config", str(cfg)])


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
