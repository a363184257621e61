"""ASE relaxation driver: convergence, failures as rows, resumable output (EMT as a cheap real calculator)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ase import Atoms
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


def _b2_cual():
    return Atoms("CuAl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=[2.95] * 3, pbc=True)


def _l12_cu3al():
    return Atoms("AlCu3", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
                 cell=[3.7] * 3, pbc=True)


def test_changed_structure_under_the_same_id_is_recomputed(tmp_path):
    """The issue's first defect: a different structure saved under an old file name reused the old energy."""
    out = tmp_path / "relax"
    settings = RelaxSettings(steps=30)
    first = relax_many([("cand", _l12_cu3al())], EMT(), settings, model_id="m", fidelity="f", out=out)
    second = relax_many([("cand", _b2_cual())], EMT(), settings, model_id="m", fidelity="f", out=out)
    assert first["formula"][0].as_py() == "AlCu3" and second["formula"][0].as_py() == "AlCu"
    assert first["relax_key"][0].as_py() != second["relax_key"][0].as_py()
    assert second["energy_per_atom"][0].as_py() != pytest.approx(first["energy_per_atom"][0].as_py(), abs=1e-3)
    assert read_table(out).num_rows == 2


def test_new_settings_or_model_fidelity_recompute(tmp_path):
    """The issue's second defect: a --steps 2 run followed by --steps 300 kept 'not_converged'."""
    out = tmp_path / "relax"
    items = [("al", _strained_al())]
    short = relax_many(items, EMT(), RelaxSettings(steps=2), model_id="m", fidelity="f", out=out)
    long = relax_many(items, EMT(), RelaxSettings(steps=300), model_id="m", fidelity="f", out=out)
    assert short["status"][0].as_py() == "not_converged" and long["status"][0].as_py() == "converged"
    settings = json.loads(long["settings"][0].as_py())
    assert settings["steps"] == 300 and settings["engine"] == "ase" and settings["fmax"] == 0.05
    # same settings, other model fidelity: recomputed (the failing calculator proves it)
    other = relax_many(items, Exploding(), RelaxSettings(steps=300), model_id="m", fidelity="f",
                       model_fidelity="r2scan", out=out)
    assert other["status"][0].as_py() == "failed" and other["model_fidelity"][0].as_py() == "r2scan"


def test_rows_are_written_in_batches_and_legacy_parts_set_aside(tmp_path):
    out = tmp_path / "relax"
    out.mkdir()
    legacy = pa.table({"candidate_id": ["old"], "model_id": ["m"], "fidelity": ["f"]})
    pq.write_table(legacy, out / "part-00000-legacy.parquet")
    items = [(f"s{k}", bulk("Cu", "fcc", a=3.6 + 0.02 * k)) for k in range(3)]
    rows = relax_many(items, EMT(), RelaxSettings(steps=5), model_id="m", fidelity="f", out=out)
    assert rows.num_rows == 3
    assert len(list(out.glob("part-*.parquet"))) == 1 and len(list(out.glob("legacy-*.parquet"))) == 1
    assert sorted(read_table(out)["candidate_id"].to_pylist()) == ["s0", "s1", "s2"]


def test_converged_flag_agrees_with_reported_fmax():
    """The row's fmax is the optimizer's own measure (atoms + Frechet cell forces), so the flag agrees with it."""
    for fmax in (0.05, 0.01):
        row = relax_structure("al", _strained_al(), EMT(), RelaxSettings(fmax=fmax, steps=300))
        assert row["status"] == "converged" and row["fmax"] < fmax
