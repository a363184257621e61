"""Label stage with EMT standing in for DFT: any ASE calculator, provenance, idempotent by structure hash."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from pipeline.label.dft import Labeller
from pipeline.label.store import LabelStore, ase_fidelity, energies_of, provenance


class CountingEMT(EMT):
    calls = 0

    def calculate(self, *args, **kwargs):
        type(self).calls += 1
        super().calculate(*args, **kwargs)


def _labeller() -> Labeller:
    return Labeller({"emt": ase_fidelity("emt", lambda a: CountingEMT(), run_type="EMT", settings={"note": "test"})},
                    source="emt")


def _structures():
    al = bulk("Al", "fcc", a=4.05, cubic=True)
    cu = bulk("Cu", "fcc", a=3.6)
    alcu = al.copy()
    alcu.numbers[0] = 29
    return {"Al4": al, "Cu": cu, "Al3Cu": alcu}


def test_label_store_appends_frames_and_entries_with_provenance(tmp_path):
    store = LabelStore(tmp_path / "lab", source="emt")
    structs = _structures()
    res = store.label(_labeller(), structs, "emt")
    assert sorted(res.computed) == sorted(structs) and not res.errors
    assert store.counts() == {"frames": 3, "entries": 3, "rejects": 0}
    # energies are EMT's own
    for name, atoms in structs.items():
        ref = atoms.copy()
        ref.calc = EMT()
        assert energies_of(res)[name] == pytest.approx(ref.get_potential_energy() / len(ref), abs=1e-10)
    row = res.rows["Al3Cu"]
    meta = provenance(row)
    assert meta["code"]["calculator"].endswith("CountingEMT") and "ase" in meta["code"]
    assert meta["settings"]["calculator"] == "CountingEMT" and meta["settings"]["note"] == "test"
    assert meta["seconds"] >= 0 and meta["name"] == "Al3Cu" and len(meta["structure_hash"]) == 16
    assert row["frame_id"] == f"emt:{meta['structure_hash']}:emt" and row["has_forces"]
    entries = store.entries.read().to_pylist()
    e = next(x for x in entries if x["material_id"] == "Al3Cu")
    assert e["thermo_type"] == "raw" and e["fidelity"] == "emt" and e["run_type"] == "EMT"
    assert e["uncorrected_energy"] == pytest.approx(row["energy"])
    assert json.loads(e["data"])["wall_s"] >= 0 and json.loads(e["parameters"])["settings_hash"]


def test_label_store_is_idempotent_and_resumes(tmp_path):
    store = LabelStore(tmp_path / "lab", source="emt")
    structs = _structures()
    store.label(_labeller(), {"Al4": structs["Al4"]}, "emt")  # a batch killed after its first structure
    CountingEMT.calls = 0
    res = store.label(_labeller(), structs, "emt")
    assert res.skipped == ["Al4"] and sorted(res.computed) == ["Al3Cu", "Cu"]
    calls = CountingEMT.calls
    again = store.label(_labeller(), structs, "emt")  # same batch again: nothing computed
    assert again.computed == [] and sorted(again.skipped) == sorted(structs) and CountingEMT.calls == calls
    assert store.counts()["frames"] == 3 and store.counts()["entries"] == 3
    # the same structure under another name (translated by a lattice vector) is recognised by its hash
    moved = structs["Cu"].copy()
    moved.positions += moved.cell[0]
    res = store.label(_labeller(), {"Cu-again": moved}, "emt")
    assert res.skipped == ["Cu-again"] and np.isclose(res.rows["Cu-again"]["energy"], again.rows["Cu"]["energy"])


def test_label_store_failures_are_rows_and_the_batch_carries_on(tmp_path):
    store = LabelStore(tmp_path / "lab", source="emt")
    structs = _structures()
    bad = Atoms("Xe", cell=[3, 3, 3], pbc=True)  # EMT has no parameters for Xe
    res = store.label(_labeller(), {"bad": bad, **structs, "junk": "not a structure"}, "emt")
    assert sorted(res.computed) == sorted(structs)
    assert set(res.errors) == {"bad", "junk"}
    assert res.errors["bad"].startswith("bad: ") and "\n" not in res.errors["bad"]
    assert "junk: unusable structure" in res.errors["junk"]
    assert store.counts()["rejects"] == 1
    again = store.label(_labeller(), {"bad": bad}, "emt")  # stored failure: skipped, not rerun
    assert again.computed == [] and "stored failure" in again.errors["bad"]
