"""WBM benchmark records -> MP2020-corrected entries that must reproduce the file's corrected energies."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.entries import entries_table, row_to_entry
from pipeline.sources.files.wbm import import_wbm

WBM = "matcalc/wbm-random-pbe52-equilibrium-2025.1.json.gz"


def _records(path):
    return json.loads(gzip.decompress(path.read_bytes()))


def test_first_records_reproduce_the_corrected_energies(mp_file):
    path = mp_file(WBM)
    result = import_wbm(path, limit=120)
    assert (result.n_ok, result.n_rejected) == (120, 0)
    table = entries_table(result.rows)
    assert set(table.column("thermo_type").to_pylist()) == {"GGA_GGA+U"}
    assert set(table.column("fidelity").to_pylist()) == {"pbe"}
    by_id = {r["material_id"]: r for r in _records(path)}
    for row in result.rows:
        assert row["energy"] == pytest.approx(by_id[row["material_id"]]["corrected_energy"], abs=1e-4)
        assert row["uncorrected_energy"] == by_id[row["material_id"]]["energy"]
    corrected = [r for r in result.rows if r["correction"] != 0]
    assert corrected, "expected some MP2020-corrected (oxide / GGA+U) records among the first 120"
    entry = row_to_entry(corrected[0])
    assert entry.energy_adjustments and entry.correction == pytest.approx(corrected[0]["correction"])


def test_mismatching_and_corrupted_records_are_rejected(mp_file, tmp_path):
    records = {r["material_id"]: r for r in _records(mp_file(WBM))}
    silicide = records["wbm-2-45522"]  # file applied the Si anion correction; current pymatgen does not
    good = next(r for r in records.values() if r["material_id"] not in ("wbm-2-45522", "wbm-3-68551"))
    nan = {**good, "material_id": "bad-nan", "energy": float("nan")}
    no_structure = {k: v for k, v in good.items() if k != "structure"} | {"material_id": "bad-nostruct"}
    path = tmp_path / "wbm.json"
    path.write_text(json.dumps([good, silicide, nan, no_structure]))
    result = import_wbm(path)
    errors = {r["record_id"].split(":", 1)[1]: r["error"] for r in result.rejects}
    assert result.n_ok == 1
    assert "differs from the file's corrected_energy by -0.2840 eV" in errors["wbm-2-45522"]
    assert "NaN" in errors["bad-nan"]
    assert "missing field(s): structure" in errors["bad-nostruct"]
