"""ASE relaxation driver: convergence, failures as rows, resumable output (EMT as a cheap real calculator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from pymatgen.core import Structure

from pipeline.io import read_table
from pipeline.relax.relaxer import RelaxSettings, relax_many, relax_structure


class Exploding(Calculator):
    implemented_properties = ("energy", "forces", "stress")

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        raise RuntimeError("SCF did not converge")


def _strained_al():
    atoms = bulk("Al", "fcc", a=4.3, cubic=True)
    atoms.rattle(0.05, seed=1)
    return atoms


def test_relax_converges_cell_and_positions():
    row = relax_structure("al", _strained_al(), EMT(), RelaxSettings(fmax=0.01, steps=200, optimizer="BFGS"))
    assert row["status"] == "converged", row
    assert row["fmax"] < 0.01
    atoms = _strained_al()
    atoms.calc = EMT()
    assert row["energy"] < atoms.get_potential_energy()
    a = Structure.from_dict(json.loads(row["structure"])).lattice.a
    assert 3.95 < a < 4.1  # EMT Al lattice constant ~4.05 A


def test_step_limit_is_not_converged():
    row = relax_structure("al", _strained_al(), EMT(), RelaxSettings(fmax=1e-6, steps=3))
    assert row["status"] == "not_converged" and row["n_steps"] == 3


def test_failures_become_rows_and_batch_carries_on(tmp_path):
    items = [("a", _strained_al()), ("b", bulk("Cu", "fcc", a=3.7))]
    bad = relax_many(items, Exploding(), model_id="m", fidelity="f")
    assert bad["status"].to_pylist() == ["failed", "failed"]
    assert "SCF did not converge" in bad["error"][0].as_py()
    good = relax_many(items, EMT, RelaxSettings(steps=20), model_id="m", fidelity="f", out=tmp_path / "r")
    assert set(good["status"].to_pylist()) <= {"converged", "not_converged"}


def test_resume_skips_stored(tmp_path):
    out = tmp_path / "relax"
    items = [("a", _strained_al())]
    first = relax_many(items, EMT(), RelaxSettings(steps=20), model_id="m", fidelity="f", out=out)
    # a calculator that would fail proves the stored row is reused, not recomputed
    again = relax_many(items + [("b", bulk("Cu"))], Exploding(), RelaxSettings(steps=20), model_id="m", fidelity="f",
                       out=out)
    assert again["energy"][0].as_py() == pytest.approx(first["energy"][0].as_py())
    assert again["status"].to_pylist()[1] == "failed"
    stored = read_table(out)
    assert sorted(stored["candidate_id"].to_pylist()) == ["a", "b"]
    assert np.isfinite(stored["wall_s"].to_numpy()).all()


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        RelaxSettings(optimizer="SD")
