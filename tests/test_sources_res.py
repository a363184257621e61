"""AIRSS .res dumps of MP Li-Ni-O (GGA, GGA+U and R2SCAN for the same materials)."""

from __future__ import annotations

import tarfile
from collections import Counter

from pipeline.entries import entries_table, row_to_entry
from pipeline.sources.files.res import import_res, read_res_entries, res_to_entry

TAR = "mp-res_Li-Ni-O/Li-Ni-O.res.tar"


def test_li_ni_o_imports_all(mp_file):
    entries, result = read_res_entries(mp_file(TAR))
    assert result.n_rejected == 0
    assert Counter(e.parameters["run_type"] for e in entries) == {"GGA": 60, "GGA+U": 176, "R2SCAN": 51}
    assert {r["fidelity"] for r in result.rows} == {"pbe", "r2scan"}
    gga_u = next(e for e in entries if e.parameters["run_type"] == "GGA+U")
    assert gga_u.parameters["hubbards"] == {"Ni": 6.2}
    r2 = {e.data["material_id"] for e in entries if e.parameters["run_type"] == "R2SCAN"}
    gga = {e.data["material_id"] for e in entries if e.parameters["run_type"] != "R2SCAN"}
    assert r2 <= gga  # README: every R2SCAN material also has a GGA(+U) entry


def test_li_ni_o_parquet_roundtrip_is_lossless(mp_file, tmp_path):
    entries, result = read_res_entries(mp_file(TAR))
    table = entries_table(result.rows)
    path = tmp_path / "e.parquet"
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    back = [row_to_entry(r) for r in pq.read_table(path).to_pylist()]
    assert [b.as_dict() for b in back] == [e.as_dict() for e in entries]


def test_known_energy(mp_file, tmp_path):
    with tarfile.open(mp_file(TAR)) as tar:
        text = tar.extractfile("mp-754083-R2SCAN.res").read().decode()
    entry = res_to_entry(text, "mp-754083-R2SCAN.res")
    assert entry.uncorrected_energy == -125.77339491
    assert entry.entry_id == "mp-754083-R2SCAN" and entry.data["task_id"] == "mp-2767542"
    assert entry.structure.site_properties["magmom"][2] == 1.48


def test_bad_files_are_rejected_and_the_rest_kept(mp_file, tmp_path):
    with tarfile.open(mp_file(TAR)) as tar:
        good = tar.extractfile("mp-754083-R2SCAN.res").read().decode()
    (tmp_path / "a-good.res").write_text(good)
    (tmp_path / "b-noenergy.res").write_text(good.replace("Energy (Uncorrected)", "Energy (Other)"))
    (tmp_path / "c-badrun.res").write_text(good.replace("R2SCAN", "HSE06"))
    (tmp_path / "d-garbage.res").write_text("TITL nothing\nEND\n")
    result = import_res(tmp_path)
    assert result.n_ok == 1
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    assert set(errors) == {"b-noenergy.res", "c-badrun.res", "d-garbage.res"}
    assert "Energy (Uncorrected)" in errors["b-noenergy.res"]
    assert "HSE06" in errors["c-badrun.res"]
