"""Dispatcher (kind detection) and writer (frames / entries / rejects datasets) on the shared real files."""

from __future__ import annotations

import shutil

import pytest

from pipeline.io import ParquetDataset
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, REJECTS_SCHEMA
from pipeline.sources.files import detect_kind, import_path, import_to_dataset, write_import

KINDS = {
    "mattersim/mptrj-random-1k.xyz": "extxyz",
    "mattersim/alexandria-random-1k.xyz": "extxyz",
    "orb-models/10_thin_mp_traj_systems.db": "ase-db",
    "orb-models/10_mptraj_systems.db": "ase-db",
    "mp-res_Li-Ni-O/Li-Ni-O_eah0.res.tar": "res",
    "emmet/Li-Fe-O.json.gz": "entries-json",
    "reaction-network/Mn_O_entries.json.gz": "entries-json",
    "matbench-discovery/2023-02-07-mp-elemental-reference-entries.json.gz": "entries-json",
    "matcalc/MatPES-PBE-Element-Refs.json.gz": "matpes",
    "matcalc/MatPES-r2SCAN-Element-Refs.json.gz": "matpes",
    "matcalc/MP-PBE-Element-Refs.json.gz": "mp-element-refs",
    "emmet/test_si_tasks.json.gz": "task-docs",
    "emmet/mp-1201400_task_doc.json.gz": "task-docs",
    "emmet/raw_vasp_Si_r2SCAN_relax": "vasprun",
    "emmet/raw_vasp_Si_r2SCAN_relax/vasprun.xml.gz": "vasprun",
    "emmet/r2scan_relax_Lu.json.gz": "vasp-bundle",
    "matcalc/wbm-random-pbe52-equilibrium-2025.1.json.gz": "wbm",
}


@pytest.mark.parametrize("rel, kind", sorted(KINDS.items()))
def test_detect_kind_of_shared_files(mp_file, rel, kind):
    assert detect_kind(mp_file(rel)) == kind


def test_unknown_and_missing_files_become_rejects(mp_file, tmp_path):
    csv = import_path(mp_file("pymatviz/2024-10-30-MatPES-atomic-energies.csv"))
    assert csv.n_ok == 0 and "cannot tell the kind" in csv.rejects[0]["error"]
    missing = import_path(tmp_path / "nothing.xyz")
    assert missing.n_ok == 0 and missing.n_rejected == 1
    with pytest.raises(ValueError, match="unknown kind"):
        import_path(tmp_path / "x", kind="cif")


def _read(out, name, schema):
    return ParquetDataset(out / name, schema).read()


def test_write_import_frames_entries_and_rejects_then_rerun_adds_nothing(mp_file, tmp_path):
    out = tmp_path / "out"
    matpes = import_path(mp_file("matcalc/MatPES-r2SCAN-Element-Refs.json.gz"))
    counts = write_import(matpes, out)
    assert {k: counts[k] for k in ("frames_read", "entries_read", "rejects_read", "frames_written",
                                   "entries_written", "rejects_written", "already_stored", "conflicts")} == {
        "frames_read": 89,
        "entries_read": 89,
        "rejects_read": 0,
        "frames_written": 89,
        "entries_written": 89,
        "rejects_written": 0,
        "already_stored": 0,
        "conflicts": 0,
    }
    xyz = import_path(mp_file("mattersim/mptrj-random-1k.xyz"), limit=50)
    assert write_import(xyz, out)["frames_written"] == 50
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\nnot an extxyz comment line\n")
    rejected = import_path(bad, fidelity="pbe")
    assert write_import(rejected, out)["rejects_written"] == 1
    frames = _read(out, "frames", FRAMES_SCHEMA)
    assert frames.num_rows == 139
    assert set(frames.column("fidelity").to_pylist()) == {"matpes-r2scan", "pbe"}
    assert _read(out, "entries", ENTRIES_SCHEMA).num_rows == 89
    assert _read(out, "rejects", REJECTS_SCHEMA).column("record_id").to_pylist() == ["bad.xyz:0"]
    again = write_import(matpes, out)
    assert again["frames_written"] == again["entries_written"] == 0
    assert write_import(rejected, out)["rejects_written"] == 0


def test_folder_is_imported_file_by_file(mp_file, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(mp_file("orb-models/10_thin_mp_traj_systems.db"), folder / "thin.db")
    shutil.copy(
        mp_file("matbench-discovery/2023-02-07-mp-elemental-reference-entries.json.gz"),
        folder / "refs.json.gz",
    )
    (folder / "notes.txt").write_text("not data")
    result = import_path(folder)
    counts = write_import(result, tmp_path / "out")
    assert (counts["frames_written"], counts["entries_written"], counts["rejects_written"]) == (11, 89, 1)
    assert result.rejects[0]["record_id"] == str(folder / "notes.txt")


def test_explicit_kind_and_options_reach_the_importer(mp_file):
    result = import_path(mp_file("orb-models/10_mptraj_systems.db"), kind="ase-db", fidelity="pbe")
    assert (result.n_ok, result.n_rejected) == (10, 0)
    res = import_path(mp_file("mp-res_Li-Ni-O/Li-Ni-O_eah0.res.tar"))
    assert (res.n_ok, res.n_rejected) == (25, 0)


def test_task_docs_go_through_the_taskdocs_importer(mp_file):
    pytest.importorskip("pipeline.sources.mp.taskdocs")
    result = import_path(mp_file("emmet/test_si_tasks.json.gz"))
    assert result.n_ok > 0
    assert all("frame_id" in r for r in result.rows)


@pytest.mark.parametrize(
    "rel, n_steps, frame_id",
    [
        ("emmet/raw_vasp_Si_r2SCAN_relax", 3, "mp-task:raw_vasp_Si_r2SCAN_relax:0:0"),
        ("emmet/r2scan_relax_Lu.json.gz", 6, "mp-task:r2scan_relax_Lu:0:0"),
    ],
)
def test_raw_vasp_runs_go_through_the_vasprun_reader(mp_file, rel, n_steps, frame_id):
    """README: the Si r2SCAN relaxation has 3 ionic steps, the Lu one 6."""
    pytest.importorskip("pipeline.sources.mp.taskdocs")
    result = import_path(mp_file(rel))
    assert (result.n_ok, result.n_rejected) == (n_steps, 0)
    assert result.rows[0]["frame_id"] == frame_id
    assert {r["fidelity"] for r in result.rows} == {"r2scan"}


def test_import_to_dataset_streams_in_batches(mp_file, tmp_path):
    out = tmp_path / "out"
    counts = import_to_dataset(mp_file("mattersim/mptrj-random-1k.xyz"), out, batch_size=250)
    assert (counts["frames_read"], counts["frames_written"]) == (1000, 1000)
    assert len(ParquetDataset(out / "frames", FRAMES_SCHEMA).parts()) == 4  # one part per batch
    assert (
        import_to_dataset(mp_file("mattersim/mptrj-random-1k.xyz"), out, batch_size=250)["frames_written"]
        == 0
    )
    db = import_to_dataset(mp_file("orb-models/10_thin_mp_traj_systems.db"), out, batch_size=5)
    assert db["frames_written"] == 11
    entries = import_to_dataset(mp_file("matcalc/MatPES-PBE-Element-Refs.json.gz"), out)  # not streamed
    assert (entries["frames_written"], entries["entries_written"]) == (89, 89)
    assert ParquetDataset(out / "frames", FRAMES_SCHEMA).read().num_rows == 1100
