"""One smoke run per training strategy (matched step budget, same frames) and the delta-frame builder."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.model import preset
from pipeline.train import TrainConfig, train
from pipeline.train.strategies import (
    FINETUNE_STRATEGIES,
    STRATEGIES,
    delta_frames,
    errors,
    predict,
    run_strategy,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def frames(emt_frames):
    return emt_frames(12, hi_every=2, hi_forces=True)


def test_delta_frames_pair_structures(frames):
    d = delta_frames(frames, "hi", "lo")
    assert d.num_rows == 6 and set(d.column("fidelity").to_pylist()) == {"delta"}
    r = d.to_pylist()[0]
    lo = frames.to_pylist()[0]
    assert r["energy"] == pytest.approx(0.1 * lo["energy"] + 0.3 * 4)
    assert not r["has_stress"] and r["has_forces"]
    with pytest.raises(ValueError, match="no structure is labelled at both"):
        delta_frames(frames, "hi", "nope")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_smoke(strategy, frames, tmp_path):
    cfg = TrainConfig(batch_size=4, lr=5e-3, val_fraction=0.0, seed=1)
    init = None
    if strategy in FINETUNE_STRATEGIES:  # a stand-in for the imported SevenNet-MF-0: fidelities pbe + r2scan
        fid = ["pbe" if f == "lo" else "r2scan" for f in frames.column("fidelity").to_pylist()]
        named = frames.set_column(frames.schema.get_field_index("fidelity"), "fidelity", pa.array(fid))
        init = str(train(named, preset("small"), TrainConfig(max_steps=1, val_fraction=0.0), tmp_path / "mf0",
                         resume=False).last)
    res = run_strategy(strategy, frames, preset("small"), cfg, tmp_path / strategy, high="hi", low="lo", steps=4,
                       init_from=init, inner_steps=3)
    assert res.steps == 4, res.to_dict()  # matched steps, counted over all stages
    test = frames.filter(__import__("pyarrow.compute", fromlist=["x"]).equal(frames.column("fidelity"), "hi"))
    err = errors(predict(res.terms, test), test)
    assert np.isfinite(err["energy_mae_meV_atom"]) and np.isfinite(err["forces_mae_meV_A"])
    assert all(p.exists() for p in res.checkpoints.values())
    if strategy in FINETUNE_STRATEGIES:
        assert res.terms[0][0].fidelities == ("pbe", "r2scan", "lo", "hi")
    if "-gap" in strategy:  # the paired-gap loss trained (mf-gap*, finetune-mf0-gap*)
        history = json.loads((res.checkpoint.parent / "metrics.json").read_text())["history"]
        assert "train_gap" in history[-1], history[-1]
    # the one checkpoint a user evaluates predicts what the harness scored (delta: low model + delta model)
    from pipeline.model import load_checkpoint
    from pipeline.train.evaluation import evaluate_frames

    model = load_checkpoint(res.checkpoint, dtype=torch.float64)
    assert evaluate_frames(model, test, fidelity="hi")["hi/energy_mae_meV_atom"] == pytest.approx(
        err["energy_mae_meV_atom"], rel=1e-4)
    if strategy == "delta":
        assert model.fidelities == ("hi",) and [f for _, f in model.terms] == ["lo", "delta"]


def test_sum_potential_is_the_sum_of_its_terms(frames, tmp_path):
    from pipeline.graphs import frame_rows_to_graph
    from pipeline.model import SumPotential, load_checkpoint, save_checkpoint

    a = train(frames, preset("small"), TrainConfig(max_steps=1, val_fraction=0.0, seed=2), tmp_path / "a",
              resume=False).model.double()
    b = train(frames, preset("small"), TrainConfig(max_steps=1, val_fraction=0.0, seed=3), tmp_path / "b",
              resume=False).model.double()
    s = SumPotential([(a, "lo"), (b, "hi")], "both")
    rows = frames.to_pylist()[:3]
    g = frame_rows_to_graph([dict(r, fidelity="both") for r in rows], s.cutoff, s.fidelities, torch.float64)
    out = s(g, create_graph=False)
    ref = [m.predict(g, f, create_graph=False) for m, f in ((a, "lo"), (b, "hi"))]
    for k in ("energy", "forces", "stress"):
        torch.testing.assert_close(out[k], ref[0][k] + ref[1][k])
    back = load_checkpoint(save_checkpoint(s, tmp_path / "sum.pt"))
    torch.testing.assert_close(back(g, create_graph=False)["energy"], out["energy"])
    with pytest.raises(KeyError, match="this model knows: both"):
        back.fidelity_index("lo")
    with pytest.raises(KeyError):
        SumPotential([(a, "nope")], "x")
