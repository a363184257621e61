"""MP task documents, mp-api trajectories and raw VASP runs -> frames, on the real shared files."""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest

from pipeline.frames import RecordError, frames_table
from pipeline.sources.mp.taskdocs import (
    IncompleteRecord,
    decode_hex_gz_bundle,
    final_step_energy,
    import_task_docs,
    import_vasprun,
    load_task_docs,
    read_vasprun,
    sigma0_energy,
    task_doc_frames,
    task_doc_to_frames,
    trajectory_frames,
)
from pipeline.units import KBAR

LI_FE_V = "emmet/tasks_Li_Fe_V.json.gz"
SIC = "emmet/SiC_tasks.json.gz"
BASI = "emmet/mp-1201400_task_doc.json.gz"
LU = "emmet/r2scan_relax_Lu.json.gz"
SI_R2SCAN = "emmet/raw_vasp_Si_r2SCAN_relax/vasprun.xml.gz"


@pytest.fixture(scope="module")
def li_fe_v(mp_file):
    return load_task_docs(mp_file(LI_FE_V))


@pytest.fixture(scope="module")
def lu_vasprun(mp_file):
    return read_vasprun(decode_hex_gz_bundle(mp_file(LU))["vasprun.xml"])


def _last_frame(rows, task_id):
    mine = [r for r in rows if r["task_id"] == task_id]
    return max(mine, key=lambda r: (json.loads(r["meta"])["calc_index"], r["ionic_step"]))


def test_every_ionic_step_becomes_a_frame(mp_file):
    counts = {LI_FE_V: 100, SIC: 453, BASI: 20}
    for rel, n in counts.items():
        result = import_task_docs(mp_file(rel))
        assert result.n_rejected == 0, result.rejects[:3]
        assert result.n_ok == n
        assert {r["fidelity"] for r in result.rows} == {"pbe"}
        assert all(r["has_forces"] and r["has_stress"] and r["has_energy"] for r in result.rows)
        ids = [r["frame_id"] for r in result.rows]
        assert len(set(ids)) == len(ids)
        frames_table(result.rows)  # schema-valid


def test_final_step_energy_is_mp_output_energy(li_fe_v, mp_file):
    """The sigma->0 energy of the last ionic step equals MP's output.energy for every document."""
    for rel, docs in ((LI_FE_V, li_fe_v), (SIC, load_task_docs(mp_file(SIC)))):
        rows = import_task_docs(docs).rows
        for doc in docs:
            assert _last_frame(rows, doc["task_id"])["energy"] == pytest.approx(
                final_step_energy(doc), abs=1e-7
            ), rel


def test_vasp_e0_bug_is_repaired(li_fe_v):
    """mp-1018351 (VASP 5.4.1, smeared Li metal): ionic e_0_energy in vasprun is -0.0034 eV, the real one -5.709."""
    doc = next(d for d in li_fe_v if d["task_id"] == "mp-1018351")
    step = doc["calcs_reversed"][0]["output"]["ionic_steps"][-1]
    assert step["e_0_energy"] == pytest.approx(-0.00340069)
    (row,) = task_doc_to_frames(doc)
    assert row["energy"] == pytest.approx(-5.70897918, abs=1e-8)
    free = task_doc_to_frames(doc, energy="free")[0]
    assert free["energy"] == pytest.approx(-5.71011274, abs=1e-8)
    # without electronic steps the plausibility rule falls back to the ionic e_wo_entrp: same value, all 99 docs
    for d in li_fe_v:
        stripped = copy.deepcopy(d)
        for calc in stripped["calcs_reversed"]:
            for s in calc["output"]["ionic_steps"]:
                s.pop("electronic_steps", None)
        rows = task_doc_to_frames(stripped)
        assert rows[-1]["energy"] == pytest.approx(final_step_energy(d), abs=1e-7)


def test_sigma0_rules():
    assert sigma0_energy(-10.0, -10.01, -10.02, None, 2) == (-10.01, "e_0_energy")
    assert sigma0_energy(-10.0, -0.003, -10.02, None, 2) == (-10.02, "e_wo_entrp")
    assert sigma0_energy(-10.0, None, None, None, 2) == (-10.0, "e_fr_energy")
    assert sigma0_energy(-10.0, 0.0, 0.0, {"e_0_energy": -9.5, "e_fr_energy": -9.6}, 2)[0] == pytest.approx(
        -9.9
    )


def test_stress_units_and_sign(li_fe_v):
    doc = li_fe_v[0]
    (row,) = task_doc_to_frames(doc)
    vasp = np.array(doc["calcs_reversed"][0]["output"]["ionic_steps"][0]["stress"])
    np.testing.assert_allclose(row["stress"], -vasp * KBAR)
    assert KBAR == pytest.approx(1e8 / 1.602176634e-19 * 1e-30, rel=1e-6)  # 0.1 GPa in eV/A^3


@pytest.mark.parametrize("which", ["lu", "si"])
def test_stress_sign_physics_on_relaxations(which, lu_vasprun, mp_file):
    """Every step of a relaxation goes downhill, and its cell part must too with the stored stress.

    With the ASE convention stress = (1/V) dE/d(strain), the first-order energy change of a cell step is
    V * stress : strain; relaxation steps lower the energy, so it must be negative at every step. With VASP's
    sign (compression positive) left in, it would be positive. Checked on the r2SCAN relaxations of Lu
    (6 steps, anisotropic) and Si (3 steps).
    """
    from pipeline.sources.mp.taskdocs import vasprun_to_task_doc

    source = lu_vasprun if which == "lu" else read_vasprun(mp_file(SI_R2SCAN))
    rows, rejects = task_doc_frames(vasprun_to_task_doc(source, f"{which}-relax"))
    assert not rejects and len(rows) == (6 if which == "lu" else 3)
    assert {r["fidelity"] for r in rows} == {"r2scan"}
    for a, b in itertools.pairwise(rows):
        cell_a, cell_b = np.asarray(a["cell"]), np.asarray(b["cell"])
        deformation = np.linalg.solve(
            cell_a, cell_b
        )  # rows are lattice vectors: cell_b = cell_a @ deformation
        strain = 0.5 * (deformation + deformation.T) - np.eye(3)
        work = abs(np.linalg.det(cell_a)) * np.sum(np.asarray(a["stress"]) * strain)
        assert b["energy"] < a["energy"]
        assert work < 0, (a["frame_id"], work)
    if which == "lu":  # the first step: strongly compressed cell (VASP +45.7 kBar xx) expands by 8 A^3
        assert np.trace(rows[0]["stress"]) < 0
        assert abs(np.linalg.det(rows[1]["cell"])) - abs(np.linalg.det(rows[0]["cell"])) > 7


def test_stress_sign_physics_on_a_gga_task_doc(mp_file):
    """BaSi(S2O7)3 GGA relaxation (MP task document, 20 steps, cell and atoms both move).

    The first-order energy change of a step is V stress:strain (cell, ASE sign) - F.dr (atoms, non-affine part).
    With the stored sign it tracks the DFT energy change step by step (correlation 0.98); with the stress sign
    flipped it does not (-0.23). Steps that cross calculations (a restart) are skipped.
    """
    rows = task_doc_to_frames(load_task_docs(mp_file(BASI))[0])
    d_e, cell_work, atom_work = [], [], []
    for a, b in itertools.pairwise(rows):
        if json.loads(a["meta"])["calc_index"] != json.loads(b["meta"])["calc_index"]:
            continue
        cell_a, cell_b = np.asarray(a["cell"]), np.asarray(b["cell"])
        deformation = np.linalg.solve(cell_a, cell_b)
        strain = 0.5 * (deformation + deformation.T) - np.eye(3)
        cell_work.append(abs(np.linalg.det(cell_a)) * np.sum(np.asarray(a["stress"]) * strain))
        frac_a = np.linalg.solve(cell_a.T, np.asarray(a["positions"]).T).T
        frac_b = np.linalg.solve(cell_b.T, np.asarray(b["positions"]).T).T
        d_frac = frac_b - frac_a
        d_frac -= np.round(d_frac)
        atom_work.append(-np.sum(np.asarray(a["forces"]) * (d_frac @ cell_a)))
        d_e.append(b["energy"] - a["energy"])
    d_e, cell_work, atom_work = map(np.asarray, (d_e, cell_work, atom_work))
    assert len(d_e) >= 15
    assert np.corrcoef(d_e, cell_work + atom_work)[0, 1] > 0.9
    assert np.corrcoef(d_e, -cell_work + atom_work)[0, 1] < 0.5
    assert cell_work.sum() < 0 and d_e.sum() < 0


def test_vasprun_and_its_mp_trajectory_give_the_same_frames(lu_vasprun, mp_file):
    """mp-api serves emmet RelaxTrajectory dumps; built from the same vasprun they must give the same labels."""
    from emmet.core.trajectory import RelaxTrajectory

    direct = import_vasprun(decode_hex_gz_bundle(mp_file(LU))["vasprun.xml"], "mp-lu")
    assert direct.n_rejected == 0
    assert direct.rows[-1]["energy"] == pytest.approx(lu_vasprun.final_energy, abs=1e-8)
    traj = RelaxTrajectory.from_vasprun(
        lu_vasprun, identifier="mp-lu", run_type=lu_vasprun.run_type
    ).model_dump()
    rows, rejects = trajectory_frames(traj)
    assert not rejects and [r["frame_id"] for r in rows] == [f"mp-traj:mp-lu:{i}" for i in range(6)]
    for a, b in zip(rows, direct.rows, strict=True):
        assert a["energy"] == pytest.approx(b["energy"], abs=1e-8)
        np.testing.assert_allclose(a["forces"], b["forces"])
        np.testing.assert_allclose(a["stress"], b["stress"])
        np.testing.assert_allclose(a["positions"], b["positions"], atol=1e-8)
    cut = copy.deepcopy(traj)
    cut["forces"] = cut["forces"][:4]
    with pytest.raises(RecordError, match="forces has 4 steps"):
        trajectory_frames(cut)


def test_emmet_taskdoc_objects_give_the_same_frames(mp_file):
    from emmet.core.tasks import TaskDoc

    doc = load_task_docs(mp_file(SIC))[0]
    rows_dict = task_doc_to_frames(doc)
    rows_obj = task_doc_to_frames(TaskDoc.model_validate(doc))
    assert len(rows_dict) == len(rows_obj) == 10
    for a, b in zip(rows_dict, rows_obj, strict=True):
        assert a["frame_id"] == b["frame_id"] and a["energy"] == b["energy"]
        np.testing.assert_allclose(a["stress"], b["stress"])


def test_frame_ids_are_chronological_and_stable(mp_file):
    doc = load_task_docs(mp_file(BASI))[0]
    rows = task_doc_to_frames(doc)
    n_calcs = len(doc["calcs_reversed"])
    first_calc = doc["calcs_reversed"][-1]["output"]["ionic_steps"]
    assert rows[0]["frame_id"] == "mp-task:mp-1201400:0:0"
    assert len([r for r in rows if r["frame_id"].startswith("mp-task:mp-1201400:0:")]) == len(first_calc)
    assert rows[-1]["frame_id"].startswith(f"mp-task:mp-1201400:{n_calcs - 1}:")
    assert [r["frame_id"] for r in task_doc_to_frames(doc)] == [r["frame_id"] for r in rows]
    assert rows[0]["run_type"] == "GGA" and rows[-1]["calc_type"] == "GGA Structure Optimization"


def test_task_ids_are_canonical():
    from pipeline.sources.mp.taskdocs import canonical_task_id

    assert canonical_task_id("mp-aaaffhdk") == canonical_task_id("mp-ffhdk") == "mp-ffhdk"
    assert canonical_task_id("mp-1201400") == "mp-1201400"
    assert canonical_task_id({"value": "mp-aaaa"}) == "mp-a"


def test_bad_steps_and_docs_are_rejected_and_the_rest_kept(li_fe_v, mp_file):
    good = load_task_docs(mp_file(SIC))[0]  # 2 calcs, 10 steps
    bad_steps = copy.deepcopy(good)
    steps = bad_steps["calcs_reversed"][0]["output"]["ionic_steps"]
    steps[0]["forces"] = steps[0]["forces"][:-1]
    steps[1]["e_fr_energy"] = math.nan
    steps[1]["electronic_steps"] = []
    steps[1]["e_0_energy"] = steps[1]["e_wo_entrp"] = None
    no_id = copy.deepcopy(good)
    del no_id["task_id"]
    no_calcs = copy.deepcopy(li_fe_v[0])
    no_calcs["calcs_reversed"] = []
    bad_run = copy.deepcopy(li_fe_v[1])
    bad_run["calcs_reversed"][0]["run_type"] = "HSE06"
    result = import_task_docs([bad_steps, no_id, no_calcs, bad_run, li_fe_v[2]])
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    n_last = len(steps)
    tid = good["task_id"]
    assert set(errors) == {
        f"mp-task:{tid}:1:0",
        f"mp-task:{tid}:1:1",
        "docs:1",
        li_fe_v[0]["task_id"],
        f"mp-task:{li_fe_v[1]['task_id']}:0:0",
    }
    assert "forces shape" in errors[f"mp-task:{tid}:1:0"]
    assert "energy is NaN" in errors[f"mp-task:{tid}:1:1"]
    assert "task_id" in errors["docs:1"] and "calcs_reversed" in errors[li_fe_v[0]["task_id"]]
    assert "HSE06" in errors[f"mp-task:{li_fe_v[1]['task_id']}:0:0"]
    assert result.n_ok == 10 - 2 + 1
    assert Counter(r["task_id"] for r in result.rows) == {tid: 10 - 2, li_fe_v[2]["task_id"]: 1}
    with pytest.raises(RecordError, match=f"mp-task:{tid}:1:0"):
        task_doc_to_frames(bad_steps)
    assert n_last == 3


def test_bad_file_is_one_reject(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        '[{"task_id": "mp-1", "calcs_reversed": [{"output": {"ionic_steps": [{"structure": 5}]}}]}]'
    )
    result = import_task_docs(path)
    assert result.n_ok == 0 and [r["record_id"] for r in result.rejects] == ["mp-task:mp-1:0:0"]
    assert (
        task_doc_frames({"task_id": "mp-2", "calcs_reversed": [{"output": {}}]})[1][0][0] == "mp-task:mp-2:0"
    )


def test_trajectory_with_one_constant_lattice(lu_vasprun):
    """emmet stores a single lattice when the cell is fixed (e.g. elastic deformations): every frame gets it."""
    from emmet.core.trajectory import RelaxTrajectory

    traj = RelaxTrajectory.from_vasprun(lu_vasprun, identifier="mp-lu", run_type="r2SCAN").model_dump()
    traj["lattice"] = traj["lattice"][:1]
    rows, rejects = trajectory_frames(traj, material_id="mp-x")
    assert not rejects and len(rows) == 6
    assert all(np.allclose(r["cell"], traj["lattice"][0]) for r in rows)
    assert {r["material_id"] for r in rows} == {"mp-x"} and rows[0]["task_id"] == "mp-lu"
    traj["lattice"] = traj["lattice"] * 2
    with pytest.raises(IncompleteRecord, match="lattices"):
        trajectory_frames(traj)
