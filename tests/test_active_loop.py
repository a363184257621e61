"""The active-learning loop on an EMT pool: labels through the label stage (EMT standing in for DFT), rounds
kept in folders, and resume after a stop at any step equal to an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from pymatgen.io.ase import AseAtomsAdaptor

from pipeline.active.loop import Loop, LoopConfig, LoopInterrupted, initial_set
from pipeline.active.pool import Candidate, LabellerOracle, LookupOracle, Pool, structure_frame
from pipeline.frames import frames_table
from pipeline.io import read_table
from pipeline.label.dft import Labeller
from pipeline.label.store import LabelStore, ase_fidelity


class HighEMT(EMT):
    """A stand-in 'high fidelity': EMT scaled and shifted per atom (a gap that depends on the structure)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        super().calculate(atoms, properties, system_changes or [])
        n = len(self.atoms)
        self.results["energy"] = 1.1 * self.results["energy"] + 0.3 * n + 0.05 * (self.atoms.numbers == 29).sum()
        self.results["free_energy"] = self.results["energy"]
        if "forces" in self.results:
            self.results["forces"] = 1.1 * self.results["forces"]


def _pool() -> Pool:
    """Al, Cu and 10 decorated 4-atom Al-Cu fcc cells (some strained); low fidelity = EMT."""
    rng = np.random.default_rng(3)
    cells = [("Al", bulk("Al", "fcc", a=4.05, cubic=True)), ("Cu", bulk("Cu", "fcc", a=3.61, cubic=True))]
    for k in range(10):
        a = bulk("Al", "fcc", a=3.85, cubic=True)
        a.numbers[rng.permutation(4)[: 1 + k % 3]] = 29
        a.set_cell(a.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        cells.append((f"AlCu-{k}", a))
    cands, rows = [], []
    for name, atoms in cells:
        atoms.calc = EMT()
        e = float(atoms.get_potential_energy())
        s = AseAtomsAdaptor.get_structure(atoms)
        cands.append(Candidate(name, s, e))
        rows.append(structure_frame(s, frame_id=f"emt:{name}", fidelity="lo", energy=e, source="emt"))
    return Pool(cands, frames_table(rows), low="lo", high="hi", source="emt-test")


CFG = {"rounds": 1, "budget": 2, "ensemble": 2, "steps": 2, "base_steps": 4, "batch_size": 4, "val_fraction": 0.25}


def _run(pool, oracle, cfg, out, stop_after=None):
    return Loop(pool, oracle, cfg, out).run(stop_after=stop_after)


def _final(out):
    return (json.loads((out / "curve.json").read_text()),
            json.loads((out / "round-00" / "picks.json").read_text())["picks"],
            read_table(out / "round-01" / "report.parquet").to_pylist())


def _truth(pool) -> dict[str, float]:
    """The stand-in high-fidelity energy of every candidate of ``pool`` (HighEMT)."""
    truth = {}
    for c in pool.candidates:
        atoms = AseAtomsAdaptor.get_atoms(c.structure)
        atoms.calc = HighEMT()
        truth[c.candidate_id] = float(atoms.get_potential_energy())
    return truth


def test_loop_labels_through_the_label_stage_and_resumes(tmp_path):
    pool = _pool()
    cfg = LoopConfig(**CFG, initial=tuple(initial_set(pool, 2, 0)))
    assert cfg.initial[:2] == ("Al", "Cu")
    labeller = Labeller({"hi": ase_fidelity("hi", lambda a: HighEMT())}, source="emt-hi")

    def oracle(root):
        return LabellerOracle(LabelStore(root, source="emt-hi"), labeller, "hi")

    a = tmp_path / "a"
    res = _run(pool, oracle(tmp_path / "labels-a"), cfg, a)
    assert [r["n_labelled"] for r in res.rounds] == [4, 6]
    for r in range(2):
        d = a / f"round-{r:02d}"
        assert (d / "report.parquet").exists() and (d / "summary.json").exists()
        assert (d / "models" / "m0" / "last.pt").exists() and (d / "models" / "m1" / "last.pt").exists()
    assert not (a / "round-01" / "picks.json").exists()  # the last round does not pick
    store = LabelStore(tmp_path / "labels-a", source="emt-hi")
    assert store.counts()["frames"] == 6 and store.counts()["entries"] == 6
    rep = read_table(a / "round-01" / "report.parquet").to_pylist()
    assert sum(r["labelled"] for r in rep) == 6
    assert all(np.isfinite(r["e_hull_mean"]) and r["e_hull_sigma"] >= 0 for r in rep)
    picked = set(json.loads((a / "round-00" / "picks.json").read_text())["picks"])
    assert picked.isdisjoint(cfg.initial) and len(picked) == 2
    # held-out pairs exist from round 1 on (round 0's picks, predicted before their labels); they update the
    # scale against the prior of the gap GP fitted on the round's 6 labels (6 - 2 elements = 4 observations)
    cal = json.loads((a / "round-01" / "summary.json").read_text())["calibration"]
    assert cal["n"] == 2 and cal["fitted"] and cal["prior_dof"] == 4
    assert (a / "round-01" / "coverage.png").read_bytes()[:4] == b"\x89PNG"

    # stop after a step in every phase, resume each time with a fresh Loop: same result as uninterrupted
    b = tmp_path / "b"
    for stop in ((0, "train"), (0, "pick"), (1, "label")):
        with pytest.raises(LoopInterrupted):
            _run(pool, oracle(tmp_path / "labels-b"), cfg, b, stop_after=stop)
        state = json.loads((b / "state.json").read_text())
        assert state["last"]["round"] == stop[0] and state["last"]["step"] == stop[1]
    _run(pool, oracle(tmp_path / "labels-b"), cfg, b)
    assert _final(b) == _final(a)

    # another config in the same folder is refused, naming the folder
    with pytest.raises(ValueError, match="other settings"):
        _run(pool, oracle(tmp_path / "labels-b"), LoopConfig(**{**CFG, "budget": 3}, initial=cfg.initial), b)


def test_loop_random_strategy_and_failed_labels(tmp_path):
    pool = _pool()
    truth = _truth(pool)
    from pipeline.active.pool import Label

    labels = {i: Label(i, pool.by_id()[i].structure, e) for i, e in truth.items() if i != "AlCu-3"}
    oracle = LookupOracle(labels, "hi")
    cfg = LoopConfig(**{**CFG, "strategy": "random", "budget": 10},
                     initial=("Al", "Cu", "AlCu-0"))
    res = Loop(pool, oracle, cfg, tmp_path / "r", truth=labels).run()
    errs = json.loads((tmp_path / "r" / "round-01" / "label_errors.json").read_text())
    assert errs == {"AlCu-3": "no precomputed hi label for AlCu-3"}  # a failed label is a row, the rest carry on
    assert res.rounds[1]["n_labelled"] == 3 + 8  # 9 eligible picked, one of them failed
    rep = {r["candidate_id"]: r for r in read_table(tmp_path / "r" / "round-01" / "report.parquet").to_pylist()}
    assert not rep["AlCu-3"]["labelled"] and "no precomputed" in rep["AlCu-3"]["error"]
    assert 0 <= res.rounds[1]["F1"] <= 1 and np.isfinite(res.rounds[1]["MAE"])
    assert 0 <= res.rounds[0]["coverage_e_hull_unlabelled"] <= 1 and res.rounds[0]["n_unlabelled"] == 11 - 3


def test_loop_lookahead_strategy_picks_from_the_screens_samples(tmp_path):
    pool = _pool()
    from pipeline.active.pool import Label

    labels = {i: Label(i, pool.by_id()[i].structure, e) for i, e in _truth(pool).items()}
    cfg = LoopConfig(**{**CFG, "strategy": "lookahead", "budget": 3, "samples": 8}, initial=("Al", "Cu", "AlCu-0"))
    res = Loop(pool, LookupOracle(labels, "hi"), cfg, tmp_path / "l", truth=labels).run()
    assert res.rounds[1]["n_labelled"] == 6
    d = tmp_path / "l" / "round-00"
    with np.load(d / "samples.npz") as z:
        assert z["e_hull"].shape == z["energy"].shape == (2 * 8, 12)
        assert z["ids"].tolist() == [c.candidate_id for c in pool.candidates]
    picks = json.loads((d / "picks.json").read_text())
    assert picks["strategy"] == "lookahead" and len(picks["picks"]) == 3
    assert set(picks["picks"]).isdisjoint(cfg.initial)
    after = [picks["expected_misclassified"]["after"][i] for i in picks["picks"]]
    assert after == sorted(after, reverse=True) and after[0] <= picks["expected_misclassified"]["before"]
    # killed between the screen (which wrote the samples) and the pick: the resumed run picks the same
    with pytest.raises(LoopInterrupted):
        Loop(pool, LookupOracle(labels, "hi"), cfg, tmp_path / "k", truth=labels).run(stop_after=(0, "screen"))
    Loop(pool, LookupOracle(labels, "hi"), cfg, tmp_path / "k", truth=labels).run()
    assert json.loads((tmp_path / "k" / "round-00" / "picks.json").read_text()) == picks
    with pytest.raises(ValueError, match="lookahead needs >= 2 joint samples"):
        LoopConfig(**{**CFG, "strategy": "lookahead", "ensemble": 1, "residual": "shift"})


def test_cli_loop_on_the_real_pool(mp_file, tmp_path, capsys):
    from pipeline.cli import main

    pool = str(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))
    out = tmp_path / "loop"
    args = ["loop", "--pool", pool, "--out", str(out), "--rounds", "0", "--ensemble", "1", "--base-steps", "1",
            "--initial-random", "1", "--score"]
    assert main(args) == 0
    rounds = json.loads(capsys.readouterr().out)
    assert rounds[0]["round"] == 0 and rounds[0]["n_labelled"] == 4  # Li, Ni, O2 ground states + 1
    rep = read_table(out / "round-00" / "report.parquet").to_pylist()
    assert len(rep) == 51 and all(r["e_hull_true"] is not None for r in rep)
    assert json.loads((out / "state.json").read_text())["done"] == [[0, s] for s in ("label", "train", "screen")]
    # bad input: one line naming the item, exit 2
    assert main(["loop", "--pool", pool, "--out", str(tmp_path / "bad"), "--initial", "mp-23", "mp-nope"]) == 2
    assert "initial candidates not in the pool: ['mp-nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_loop_flow_runs_steps_as_tasks(mp_file, tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.loop import loop_flow

    with prefect_test_harness():
        rounds = loop_flow(str(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar")), str(tmp_path / "f"), rounds=1, budget=2,
                           ensemble=1, steps=1, base_steps=1, initial_random=1, score=True)
    assert [r["n_labelled"] for r in rounds] == [4, 6]


@pytest.mark.parametrize("finetune_from", ["base", "previous"])
def test_rounds_fine_tune_from_the_round0_members_and_round0_is_calibrated(tmp_path, monkeypatch, finetune_from):
    from pipeline.train import trainer

    pool = _pool()
    truth = _truth(pool)
    from pipeline.active.pool import Label

    labels = {i: Label(i, pool.by_id()[i].structure, e) for i, e in truth.items()}
    starts: list[tuple[str, str | None]] = []
    real_train = trainer.train

    def recording_train(frames, model_config, cfg, out_dir, **kw):
        starts.append((str(out_dir), cfg.init_from))
        return real_train(frames, model_config, cfg, out_dir, **kw)

    monkeypatch.setattr(trainer, "train", recording_train)
    cfg = LoopConfig(**{**CFG, "rounds": 2, "ensemble": 1, "samples": 8, "finetune_from": finetune_from},
                     initial=("Al", "Cu", "AlCu-0", "AlCu-1", "AlCu-2"))
    out = tmp_path / finetune_from
    res = Loop(pool, LookupOracle(labels, "hi"), cfg, out, truth=labels).run()
    inits = {d.split("/")[-3]: i for d, i in starts}
    assert inits["round-00"] is None  # round 0 trains from scratch (no init_from given)
    assert inits["round-01"] == str(out / "round-00" / "models" / "m0" / "last.pt")
    expect = "round-00" if finetune_from == "base" else "round-01"
    assert inits["round-02"] == str(out / expect / "models" / "m0" / "last.pt")
    # round 0: 5 labels over 2 elements -> the gap GP is fitted on them, every unlabelled candidate gets a finite
    # positive sigma from it (one member: the ensemble alone would give 0)
    s0 = res.rounds[0]
    assert s0["gap_gp"]["fitted"] and s0["gap_gp"]["n"] == 5
    rep = read_table(out / "round-00" / "report.parquet").to_pylist()
    free = [r for r in rep if not r["labelled"]]
    assert len(free) == 7
    assert all(np.isfinite(r["e_hull_sigma"]) and r["e_hull_sigma"] > 0 for r in free)
    assert all(r["e_hull_std_ensemble"] == 0 for r in free)
    assert all(r["energy_pred"] == pytest.approx(r["energy_dft"], abs=1e-6) for r in rep if r["labelled"])
    # round 2 is calibrated on the picks of rounds 0 and 1 (predicted before their labels), with the GP's prior
    cal = res.rounds[2]["calibration"]
    assert cal["n"] == 4 and cal["fitted"] and cal["prior_dof"] == 9 - 2 and cal["s_ens"] > 0
