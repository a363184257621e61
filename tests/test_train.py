"""Trainer: multi-fidelity fit on real MPtrj frames, masked labels, crash + resume, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.frames import atoms_to_frame_row, frames_table
from pipeline.model import load_checkpoint, preset
from pipeline.relax.calculator import MFPotentialCalculator
from pipeline.train import FrameData, TrainConfig, split_by_group, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def frames():
    """Rattled/strained Al-Cu cells labelled by ASE's EMT ('lo': energy, forces, stress) and a second,
    systematically different level ('hi' = 1.1 E_EMT + 0.3 eV/atom, energies only, every third structure)."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(30):
        atoms = bulk("Al", "fcc", a=4.05, cubic=True)
        atoms.numbers[rng.choice(4, size=k % 3, replace=False)] = 29
        atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal()), scale_atoms=True)
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        e = atoms.get_potential_energy()
        rows.append(atoms_to_frame_row(atoms, frame_id=f"emt:{k}", source="test", fidelity="lo",
                                       material_id=f"m{k}"))
        if k % 3 == 0:
            rows.append(atoms_to_frame_row(atoms, frame_id=f"hi:{k}", source="test", fidelity="hi",
                                           energy=1.1 * e + 0.3 * len(atoms), forces=None, stress=None,
                                           material_id=f"m{k}"))
    return frames_table(rows)


def _cfg(**kw):
    base = {"epochs": 4, "batch_size": 8, "lr": 5e-3, "val_fraction": 0.0, "seed": 3}
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases_and_checkpoint_works(frames, tmp_path):
    res = train(frames, preset("small"), _cfg(epochs=10), tmp_path, resume=False)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.7 * losses[0], losses
    model = load_checkpoint(res.best)
    assert model.fidelities == ("hi", "lo")  # from the data
    row = frames.to_pylist()[0]
    from pipeline.frames import row_to_atoms

    atoms = row_to_atoms(row)
    atoms.calc = MFPotentialCalculator(model, fidelity="lo")
    e_lo = atoms.get_potential_energy()
    atoms.calc = MFPotentialCalculator(model, fidelity="hi")
    assert atoms.get_potential_energy() != pytest.approx(e_lo, abs=1e-6)  # fidelity conditions the model
    with pytest.raises(KeyError, match="hi, lo"):
        MFPotentialCalculator(model, fidelity="pbe")


def test_crash_and_resume_is_identical(frames, tmp_path):
    full = train(frames, preset("small"), _cfg(), tmp_path / "full", resume=False)

    def crash(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(frames, preset("small"), _cfg(), tmp_path / "cut", resume=False, progress=crash)
    resumed = train(frames, preset("small"), _cfg(), tmp_path / "cut", resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="different run"):
        train(frames, preset("small"), _cfg(lr=0.5), tmp_path / "cut", resume=True)


def test_label_policy_masks_labels(frames):
    data = FrameData(frames, 4.5, ["hi", "lo"], label_policy={"lo": ("energy",)})
    assert not any(data.has_forces) and not any(data.has_stress)  # 'hi' has none, 'lo' switched off
    assert all(data.has_energy)
    full = FrameData(frames, 4.5, ["hi", "lo"])
    assert sum(full.has_forces) == sum(f == "lo" for f in full.fidelity_names)
    with pytest.raises(ValueError, match="unknown labels"):
        FrameData(frames, 4.5, ["hi", "lo"], label_policy={"lo": ("charges",)})


def test_split_keeps_groups_together():
    groups = ["a", "a", "b", "c", "c", "d"]
    train_idx, val_idx = split_by_group(groups, 0.5, seed=0)
    assert not {groups[i] for i in train_idx} & {groups[i] for i in val_idx}
    assert sorted(train_idx + val_idx) == list(range(6))
    assert split_by_group(groups, 0.5, seed=0) == (train_idx, val_idx)


def test_references_fitted_per_fidelity(frames, tmp_path):
    res = train(frames, preset("small"), _cfg(epochs=1), tmp_path, resume=False)
    refs = res.model.references().energies
    assert set(refs) == {"hi", "lo"}
    # 'hi' = 1.1 * lo + 0.3 eV/atom, so its fitted references follow (up to the fit of the subset it covers)
    for el in ("Al", "Cu"):
        assert refs["hi"][el] == pytest.approx(1.1 * refs["lo"][el] + 0.3, abs=0.05)


def test_evaluate_frames_reports_per_fidelity(frames, tmp_path):
    from pipeline.train import evaluate_frames

    res = train(frames, preset("small"), _cfg(epochs=1), tmp_path, resume=False)
    metrics = evaluate_frames(load_checkpoint(res.best), frames)
    assert set(metrics) == {"hi/energy_mae_meV_atom", "hi/energy_rmse_meV_atom", "lo/energy_mae_meV_atom",
                            "lo/energy_rmse_meV_atom", "lo/forces_mae_meV_A"}
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
