"""ASE db importer on the orb-models MPtrj databases: metadata, stress sign by energy balance, bad rows."""

from __future__ import annotations

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db import connect

from pipeline.frames import frames_table
from pipeline.sources.files.asedb import import_ase_db, iter_ase_db
from pipeline.sources.files.stress_check import mptrj_step_pairs, stress_sign_verdict

THIN = "orb-models/10_thin_mp_traj_systems.db"
PLAIN = "orb-models/10_mptraj_systems.db"


def test_thin_db_keeps_mptrj_metadata(mp_file):
    result = import_ase_db(mp_file(THIN))
    assert (result.n_ok, result.n_rejected) == (11, 0)
    frames_table(result.rows)
    row = next(r for r in result.rows if r["frame_id"] == "mptrj:mp-1095441-1-16")
    assert (row["material_id"], row["task_id"], row["ionic_step"], row["fidelity"]) == (
        "mp-1020019",
        "mp-1095441",
        16,
        "pbe",
    )
    assert row["energy"] == -77.61401605
    assert row["run_type"] == "GGA"  # Li-N-O-P: no U element
    with connect(mp_file(THIN)) as db:
        ref = next(db.select(id=3))
    np.testing.assert_array_equal(np.asarray(row["stress"]), ref.data["stress"])


def test_stress_sign_is_ase_by_energy_balance(mp_file):
    pairs = mptrj_step_pairs(import_ase_db(mp_file(THIN)).rows)
    verdict = stress_sign_verdict(pairs)
    assert verdict.n_pairs == 5
    # measured: 0.0004 eV as stored vs 0.038 eV flipped
    assert verdict.median_error_as_labelled < 0.002
    assert verdict.median_error_if_flipped > 0.02


def test_plain_db_needs_fidelity(mp_file):
    without = import_ase_db(mp_file(PLAIN))
    assert without.n_ok == 0 and without.n_rejected == 10
    assert "pass fidelity" in without.rejects[0]["error"]
    result = import_ase_db(mp_file(PLAIN), fidelity="pbe")
    assert (result.n_ok, result.n_rejected) == (10, 0)
    table = frames_table(result.rows)
    assert len(set(table.column("frame_id").to_pylist())) == 10
    assert [r["frame_id"] for r in import_ase_db(mp_file(PLAIN), fidelity="pbe").rows] == table.column(
        "frame_id"
    ).to_pylist()  # content ids are stable


def test_bad_rows_are_rejected_and_the_rest_kept(mp_file, tmp_path):
    with connect(mp_file(PLAIN)) as src:
        atoms = [row.toatoms() for row in src.select(limit=4)]
    path = tmp_path / "bad.db"
    with connect(path) as db:
        db.metadata = {"fidelity": "pbe"}
        db.write(atoms[0])
        nan = atoms[1].copy()  # ASE db stores a NaN energy as NULL, so corrupt the forces
        forces = atoms[1].get_forces()
        forces[0, 0] = np.nan
        nan.calc = SinglePointCalculator(nan, energy=atoms[1].get_potential_energy(), forces=forces)
        db.write(nan)
        flat = atoms[2].copy()
        flat.cell[2] = flat.cell[0]
        flat.calc = SinglePointCalculator(flat, **atoms[2].calc.results)
        db.write(flat)
        db.write(atoms[3].copy())  # no calculator: no labels
    result = import_ase_db(path)
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    assert result.n_ok == 1 and result.rows[0]["fidelity"] == "pbe"  # fidelity from the db metadata
    assert set(errors) == {"bad.db:2", "bad.db:3", "bad.db:4"}
    assert "forces contains NaN" in errors["bad.db:2"]
    assert "zero volume" in errors["bad.db:3"]
    assert "no labels" in errors["bad.db:4"]


def test_unreadable_file_is_one_reject(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("not a database")
    result = import_ase_db(path)
    assert result.n_ok == 0 and result.rejects[0]["record_id"] == "junk.db"


def test_streaming_pages_equal_the_whole_import(mp_file):
    parts = list(iter_ase_db(mp_file(THIN), batch_size=4))
    assert [p.n_ok for p in parts] == [4, 4, 3]
    assert [r for p in parts for r in p.rows] == import_ase_db(mp_file(THIN)).rows
    assert [p.n_ok for p in iter_ase_db(mp_file(THIN), batch_size=4, limit=6)] == [4, 2]
