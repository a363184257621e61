"""Candidate structures: user files (bad ones rejected, the rest kept) and prototype substitution."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from ase import Atoms
from ase.io import write as ase_write
from monty.serialization import dumpfn, loadfn
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure
from pymatgen.core.entries import ComputedStructureEntry

from pipeline.hull.candidates import (
    candidates_table,
    element_mappings,
    read_candidate_files,
    row_structure,
    substitute_prototypes,
)
from pipeline.sources.files.res import read_res_entries


def _rocksalt(a: str = "Li", b: str = "F", lat: float = 4.0) -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(lat), [a, b], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_read_files_keeps_good_and_reports_bad(tmp_path):
    _rocksalt().to(filename=str(tmp_path / "LiF.cif"))
    _rocksalt("Na", "Cl", 5.6).to(filename=str(tmp_path / "POSCAR"), fmt="poscar")
    frames = [Atoms("Si2", scaled_positions=[[0, 0, 0], [0.25, 0.25, 0.25]], cell=np.eye(3) * 5.4, pbc=True),
              Atoms("Al", positions=[[0, 0, 0]], cell=np.eye(3) * 4.0, pbc=True)]
    frames[0].info["material_id"] = "si-x"
    ase_write(tmp_path / "many.extxyz", frames, format="extxyz")
    entry = ComputedStructureEntry(_rocksalt("K", "Br", 6.6), -10.0, entry_id="kbr-1")
    dumpfn([entry, _rocksalt("Mg", "O", 4.2)], tmp_path / "structs.json")
    (tmp_path / "garbage.cif").write_text("data_x\n_this is not a cif\n")
    clash = Structure(Lattice.cubic(4.0), ["Li", "F"], [[0, 0, 0], [0.01, 0, 0]])
    clash.to(filename=str(tmp_path / "clash.vasp"), fmt="poscar")
    ase_write(tmp_path / "molecule.xyz", Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), format="extxyz")

    result = read_candidate_files([tmp_path])
    ids = {r["candidate_id"]: r for r in result.rows}
    assert set(ids) == {"LiF.cif", "POSCAR", "si-x", "many.extxyz:1", "kbr-1", "structs.json:1"}
    assert ids["LiF.cif"]["formula"] == "LiF" and ids["LiF.cif"]["source"] == "file"
    assert ids["si-x"]["nsites"] == 2 and ids["structs.json:1"]["chemsys"] == "Mg-O"
    assert row_structure(ids["POSCAR"]).composition.reduced_formula == "NaCl"
    rejected = {r["record_id"].split("/")[-1]: r["error"] for r in result.rejects}
    assert set(rejected) == {"garbage.cif", "clash.vasp", "molecule.xyz"}
    assert "closer than" in rejected["clash.vasp"] and "periodic" in rejected["molecule.xyz"]
    assert candidates_table(result.rows).num_rows == 6


def test_duplicate_ids_and_missing_files_are_rejects(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        _rocksalt().to(filename=str(tmp_path / d / "x.cif"))
    result = read_candidate_files([tmp_path / "a" / "x.cif", tmp_path / "b" / "x.cif", tmp_path / "none.cif"])
    assert [r["candidate_id"] for r in result.rows] == ["x.cif"]
    errors = " ".join(r["error"] for r in result.rejects)
    assert "duplicate candidate_id" in errors and len(result.rejects) == 2


def test_element_mappings():
    assert element_mappings(["Fe", "Li", "O"], ["Li", "Ni", "O"]) == [{"Li": "Li", "Fe": "Ni", "O": "O"}]
    allmaps = element_mappings(["Fe", "O"], ["Mn", "O"], mode="all")
    assert {json.dumps(m, sort_keys=True) for m in allmaps} == {
        json.dumps({"Fe": "Mn", "O": "O"}, sort_keys=True), json.dumps({"Fe": "O", "O": "Mn"}, sort_keys=True)}
    assert element_mappings(["Fe", "O"], ["Li", "Ni", "O"]) == []
    with pytest.raises(ValueError, match="mapping mode"):
        element_mappings(["Fe"], ["Ni"], mode="nope")


@pytest.fixture(scope="module")
def li_fe_o_small(mp_file):
    """Li-Fe-O MP entries with at most 14 sites (keeps the StructureMatcher work small)."""
    return [e for e in loadfn(mp_file("emmet/Li-Fe-O.json.gz")) if len(e.structure) <= 14]


@pytest.mark.shared_data
def test_substitution_into_li_ni_o_is_unique_and_correct(li_fe_o_small):
    result = substitute_prototypes(li_fe_o_small, "Li-Ni-O")
    rows = result.rows
    assert len(rows) > 10 and not result.rejects
    protos = {e.entry_id: e.structure for e in li_fe_o_small}
    for r in rows:
        assert r["chemsys"] == "Li-Ni-O" and r["source"] == "substitution"
        assert json.loads(r["substitution"]) == {"Fe": "Ni", "Li": "Li", "O": "O"}
        assert r["candidate_id"] == f"{r['origin']}:Fe>Ni"
        proto = protos[r["origin"]]
        assert proto.composition.reduced_formula.replace("Fe", "Ni") == r["formula"]
        assert np.allclose(row_structure(r).lattice.matrix, proto.lattice.matrix)
    assert len({r["candidate_id"] for r in rows}) == len(rows)
    matcher = StructureMatcher()
    structures = [row_structure(r) for r in rows]
    for a, b in itertools.combinations(range(len(rows)), 2):
        if rows[a]["formula"] == rows[b]["formula"]:
            assert not matcher.fit(structures[a], structures[b]), (rows[a]["candidate_id"], rows[b]["candidate_id"])
    # the prototype set does hold duplicates after substitution (so the deduplication did something)
    n_ternary = sum(1 for e in li_fe_o_small if len(e.composition.elements) == 3)
    assert len(rows) < n_ternary


@pytest.mark.shared_data
def test_substitution_cap_and_seed(li_fe_o_small):
    fe_o = [e for e in li_fe_o_small if e.composition.chemical_system == "Fe-O"]
    runs = {seed: [r["candidate_id"] for r in substitute_prototypes(fe_o, "Mn-O", max_candidates=5, seed=seed).rows]
            for seed in (0, 1, 2)}
    assert all(len(ids) == 5 for ids in runs.values())
    again = [r["candidate_id"] for r in substitute_prototypes(fe_o, "Mn-O", max_candidates=5, seed=0).rows]
    assert again == runs[0]
    assert len({tuple(v) for v in runs.values()}) > 1
    rows = substitute_prototypes(fe_o, "Mn-O", max_candidates=5, seed=1).rows
    assert all(r["chemsys"] == "Mn-O" for r in rows)
    structures = [row_structure(r) for r in rows]
    matcher = StructureMatcher()
    assert not any(matcher.fit(a, b) for a, b in itertools.combinations(structures, 2)
                   if a.composition.reduced_formula == b.composition.reduced_formula)


@pytest.mark.shared_data
def test_substitution_skips_known_structures(li_fe_o_small, mp_file):
    known_entries, _ = read_res_entries(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))
    known = [e.structure for e in known_entries if e.composition.reduced_formula in ("LiNiO2", "Li5NiO4")]
    protos = [e for e in li_fe_o_small if e.composition.reduced_formula in ("LiFeO2", "Li5FeO4")]
    everything = substitute_prototypes(protos, "Li-Ni-O").rows
    new_only = substitute_prototypes(protos, "Li-Ni-O", known=known).rows
    assert 0 < len(new_only) < len(everything)
    matcher = StructureMatcher()
    for r in new_only:
        s = row_structure(r)
        assert not any(matcher.fit(s, k) for k in known if k.composition.reduced_formula == r["formula"])


@pytest.mark.shared_data
def test_substitution_for_target_formulas_only(li_fe_o_small):
    rows = substitute_prototypes(li_fe_o_small, "Li-Ni-O", target_formulas=["LiNiO2", "Li2NiO3"]).rows
    assert rows and {r["formula"] for r in rows} <= {"LiNiO2", "Li2NiO3"}
    assert all(not row_structure(r).site_properties for r in rows)  # no Fe magmoms left on Ni
    protos = {e.entry_id: e for e in li_fe_o_small}
    assert {protos[r["origin"]].composition.reduced_formula for r in rows} <= {"LiFeO2", "Li2FeO3"}
