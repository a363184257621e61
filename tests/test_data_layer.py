"""Schema, atomic Parquet datasets, frame/entry converters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.core.entries import ComputedStructureEntry, ConstantEnergyAdjustment

from pipeline.entries import entries_table, entry_to_row, fidelity_from_run_type, row_to_entry
from pipeline.frames import RecordError, atoms_to_frame_row, frame_row, frames_table, row_to_atoms
from pipeline.io import ParquetDataset, read_table, write_table_atomic
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, describe
from pipeline.units import vasp_kbar_to_ase_stress


def _row(i: int = 0, **kw):
    base = {
        "frame_id": f"t:{i}", "source": "test", "fidelity": "PBE", "numbers": [3, 8], "positions": [[0, 0, 0], [1.0, 1, 1]],
        "cell": np.eye(3) * 3, "energy": -5.0 - i, "forces": [[0.1, 0, 0], [-0.1, 0, 0]], "stress": [1, 2, 3, 0, 0, 0],
    }
    base.update(kw)
    return frame_row(**base)


def test_every_field_is_documented():
    for schema in (FRAMES_SCHEMA, ENTRIES_SCHEMA):
        for field in schema:
            assert field.metadata and field.metadata[b"doc"], field.name
        assert "| `" in describe(schema)


def test_frame_row_normalises_and_masks():
    row = _row(stress=None)
    assert row["fidelity"] == "pbe"
    assert row["has_energy"] and row["has_forces"] and not row["has_stress"]
    voigt = _row()["stress"]
    assert voigt == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"energy": float("nan")}, "energy is NaN"),
        ({"cell": np.zeros((3, 3))}, "zero volume"),
        ({"numbers": [3, 200]}, "unknown element"),
        ({"forces": [[0, 0, 0]]}, "forces shape"),
        ({"energy": None, "forces": None, "stress": None}, "no labels"),
    ],
)
def test_frame_row_rejects_bad_records(kw, msg):
    with pytest.raises(RecordError, match=msg):
        _row(**kw)


def test_atoms_roundtrip():
    row = _row()
    atoms = row_to_atoms(row)
    again = atoms_to_frame_row(atoms, frame_id=row["frame_id"], source="test", fidelity="pbe")
    for key in ("numbers", "positions", "cell", "energy", "forces", "stress"):
        assert again[key] == row[key], key


def test_vasp_stress_sign():
    # VASP prints +kBar for a compressed cell; ASE convention gives a negative stress.
    s = vasp_kbar_to_ase_stress(np.eye(3) * 10.0)
    assert s[0, 0] < 0 and abs(s[0, 0] + 10 * 0.1 / 160.21766208) < 1e-9


def test_dataset_append_dedups_and_is_resumable(tmp_path):
    ds = ParquetDataset(tmp_path / "frames", FRAMES_SCHEMA, KEYS["frames"])
    assert ds.append(frames_table([_row(0), _row(1), _row(1)])) == 2
    assert ds.append(frames_table([_row(1), _row(2)])) == 1
    assert ds.append(frames_table([_row(2)])) == 0
    table = ds.read()
    assert sorted(table["frame_id"].to_pylist()) == ["t:0", "t:1", "t:2"]
    ds.compact()
    assert len(ds.parts()) == 1 and read_table(ds.path).num_rows == 3
    assert not list(ds.path.glob(".*tmp"))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.parquet"
    write_table_atomic(pa.table({"a": [1]}), path)

    with pytest.raises((TypeError, AttributeError)):
        write_table_atomic(object(), path)  # type: ignore[arg-type]
    assert read_table(path)["a"].to_pylist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]


def test_entry_roundtrip_with_adjustments():
    s = Structure(Lattice.cubic(4.2), ["Li", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    entry = ComputedStructureEntry(
        s, -10.0, energy_adjustments=[ConstantEnergyAdjustment(-0.7, name="MP2020 anion correction (oxide)")],
        parameters={"run_type": "GGA", "hubbards": {}}, data={"task_id": "mp-1"}, entry_id="mp-1-GGA",
    )
    row = entry_to_row(entry, source="test", thermo_type="GGA_GGA+U")
    assert row["material_id"] == "mp-1" and row["fidelity"] == "pbe"
    table = entries_table([row])
    back = row_to_entry(table.to_pylist()[0])
    assert back.as_dict() == entry.as_dict()
    assert entry_to_row(back, source="test", thermo_type="GGA_GGA+U") == row


def test_fidelity_from_run_type():
    assert fidelity_from_run_type("r2SCAN") == "r2scan"
    assert fidelity_from_run_type("GGA+U") == "pbe"
    with pytest.raises(RecordError, match="unknown run_type"):
        fidelity_from_run_type("HF")


def test_readme_schema_section_is_in_sync():
    from pipeline.config import PROJECT_ROOT
    from pipeline.schema import markdown

    text = (PROJECT_ROOT / "README.md").read_text()
    section = text.split("<!-- schema:begin -->\n", 1)[1].split("<!-- schema:end -->", 1)[0]
    assert section.strip() == markdown().strip(), "README schema section is stale: run python -m pipeline.schema"
