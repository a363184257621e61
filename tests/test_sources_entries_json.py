"""ComputedEntry JSON sets (emmet, reaction-network, matbench-discovery) -> entry rows, lossless round trip."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest
from monty.serialization import loadfn

from pipeline.entries import entries_table, row_to_entry
from pipeline.sources.files.entries_json import import_entries_json, read_entries_json

LI_FE_O = "emmet/Li-Fe-O.json.gz"
ELEMENTS = "matbench-discovery/2023-02-07-mp-elemental-reference-entries.json.gz"


def test_li_fe_o_parquet_roundtrip_is_lossless(mp_file, tmp_path):
    entries, result = read_entries_json(mp_file(LI_FE_O))
    assert (result.n_ok, result.n_rejected) == (375, 0)
    pq.write_table(entries_table(result.rows), tmp_path / "e.parquet")
    back = [row_to_entry(r) for r in pq.read_table(tmp_path / "e.parquet").to_pylist()]
    assert [b.as_dict() for b in back] == [e.as_dict() for e in entries]
    rows = {r["entry_id"]: r for r in result.rows}
    assert {r["thermo_type"] for r in result.rows} == {"GGA_GGA+U"}
    assert {r["fidelity"] for r in result.rows} == {"pbe"}
    assert {r["run_type"] for r in result.rows} == {"GGA", "GGA+U"}
    adjusted = [r for r in result.rows if r["correction"] != 0]
    assert adjusted and all("MP2020" in r["energy_adjustments"] for r in adjusted)
    assert rows["mp-1211097"]["material_id"] == "mp-1211097"


@pytest.mark.parametrize(
    "rel, n_total, limit",
    [
        ("reaction-network/Mn_O_entries.json.gz", 90, None),
        ("reaction-network/Mn_O_Y_entries.json.gz", 132, None),
        ("reaction-network/Cl_Mn_Na_O_Y_entries.json.gz", 333, 60),
        ("reaction-network/Fe_Li_O_P_entries.json.gz", 943, 60),
        (ELEMENTS, 89, None),
    ],
)
def test_shared_entry_sets_import(mp_file, rel, n_total, limit):
    entries, result = read_entries_json(mp_file(rel), limit=limit)
    assert (result.n_ok, result.n_rejected) == (limit or n_total, 0)
    table = entries_table(result.rows)
    assert set(table.column("thermo_type").to_pylist()) == {"GGA_GGA+U"}
    for row, entry in zip(result.rows[:10], entries, strict=False):
        assert row_to_entry(row).as_dict() == entry.as_dict()


def test_elemental_references_are_computed_entries(mp_file):
    rows = {r["entry_id"]: r for r in import_entries_json(mp_file(ELEMENTS)).rows}
    si = rows["mp-149-GGA"]
    assert si["entry_class"] == "ComputedEntry" and si["structure"] is None
    assert si["material_id"] == "mp-149" and si["formula"] == "Si"
    assert json.loads(si["meta"])["record"] == "Si"


def test_bad_records_are_rejected_and_the_rest_kept(mp_file, tmp_path):
    records = json.loads(gzip.decompress(mp_file(ELEMENTS).read_bytes()))
    good = [records["Si"], records["O"]]
    nan = json.loads(json.dumps(records["Fe"]))
    nan["energy"] = float("nan")
    unknown = json.loads(json.dumps(records["Cu"]))
    unknown["composition"] = {"Qq": 1.0}
    no_class = {k: v for k, v in records["Al"].items() if k != "@class"}
    r2scan = json.loads(json.dumps(records["Ni"]))
    r2scan["parameters"]["run_type"] = "R2SCAN"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good[0], nan, unknown, no_class, r2scan, good[1]]))
    result = import_entries_json(path)
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    assert result.n_ok == 2
    assert set(errors) == {"bad.json:1", "bad.json:2", "bad.json:3", "bad.json:4"}
    assert "NaN" in errors["bad.json:1"]
    assert "Qq" in errors["bad.json:2"]
    assert "@class" in errors["bad.json:3"]
    assert "does not belong to thermo_type GGA_GGA+U" in errors["bad.json:4"]
    assert import_entries_json(path, thermo_type="raw").n_ok == 3  # the R2SCAN one is fine as raw


def test_unreadable_file_is_one_reject(tmp_path):
    path = tmp_path / "broken.json.gz"
    path.write_bytes(gzip.compress(b"[{not json"))
    result = import_entries_json(path)
    assert result.n_ok == 0 and result.rejects[0]["record_id"] == "broken.json.gz"
    with pytest.raises(ValueError, match="unknown thermo_type"):
        import_entries_json(path, thermo_type="MP2020")


def test_per_record_decoding_equals_monty_loadfn(mp_file):
    path = mp_file("reaction-network/Mn_O_entries.json.gz")
    entries, _ = read_entries_json(path)
    assert [e.as_dict() for e in entries] == [e.as_dict() for e in loadfn(path)]
