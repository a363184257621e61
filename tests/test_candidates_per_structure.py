"""One row per structure in multi-structure files (defect 7) and reasons in words (defect 6)."""

from __future__ import annotations

from pymatgen.core import Lattice, Structure

from pipeline.hull.candidates import read_candidate_files

B2 = Structure(Lattice.cubic(3.2), ["Li", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
FRAME = ('2\nLattice="3.2 0 0 0 3.2 0 0 0 3.2" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
         "Li 0 0 0\nAl 1.6 1.6 1.6\n")


def test_extxyz_with_one_truncated_frame_keeps_the_other_two(tmp_path):
    path = tmp_path / "three.xyz"
    path.write_text(FRAME + FRAME.replace("Al 1.6 1.6 1.6\n", "") + FRAME)
    result = read_candidate_files([path])
    assert result.n_ok == 2 and result.n_rejected == 1
    assert result.rejects[0]["record_id"] == f"{path}:1" and "announces 2 atoms" in result.rejects[0]["error"]


def test_cif_with_a_bad_second_block_keeps_the_first(tmp_path):
    path = tmp_path / "two.cif"
    path.write_text(B2.to(fmt="cif") + "\ndata_broken\n_cell_length_a 3\n")
    result = read_candidate_files([path])
    assert result.n_ok == 1 and result.n_rejected == 1
    assert "CIF block 'broken'" in result.rejects[0]["error"]


def test_bad_files_are_explained_in_words(tmp_path):
    overlap = tmp_path / "overlap.cif"
    overlap.write_text(Structure(Lattice.cubic(3.2), ["Li", "Al"], [[0, 0, 0], [0.001, 0, 0]]).to(fmt="cif"))
    poscar = tmp_path / "POSCAR"
    poscar.write_text("junk\n1.0\n3 0 0\n")
    result = read_candidate_files([overlap, poscar, tmp_path / "missing.cif"])
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    assert set(errors) == {str(overlap), str(poscar), str(tmp_path / "missing.cif")}
    assert "no such file" in errors[str(tmp_path / "missing.cif")]
    assert "not a readable structure file" in errors[str(poscar)]
    for err in errors.values():
        assert not err.startswith(("IndexError", "ZeroDivisionError")), err
    assert errors[str(overlap)] != "RecordError: Invalid CIF file with no structures!", errors[str(overlap)]
