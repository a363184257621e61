"""extxyz importer on the mattersim MPtrj / Alexandria files: ids, fidelities, units, stress sign, bad frames."""

from __future__ import annotations

import gzip

import ase.io
import numpy as np
import pytest

from pipeline.frames import frames_table, row_to_atoms
from pipeline.sources.files.extxyz import import_extxyz, iter_extxyz, split_frames
from pipeline.sources.files.stress_check import mptrj_step_pairs, stress_sign_verdict

RANDOM = "mattersim/mptrj-random-1k.xyz"
HIGH = "mattersim/mptrj-highest-stress-1k.xyz"
ALEX = "mattersim/alexandria-random-1k.xyz"


@pytest.fixture(scope="module")
def imported(mp_file):
    """Import each whole file once per module (about 2 s each)."""
    cache = {}

    def get(rel):
        if rel not in cache:
            cache[rel] = import_extxyz(mp_file(rel))
        return cache[rel]

    return get


@pytest.mark.parametrize(
    "rel, fidelity, source",
    [
        (RANDOM, "pbe", "mptrj-extxyz"),
        (HIGH, "pbe", "mptrj-extxyz"),
        (ALEX, "alexandria-pbe", "alexandria-extxyz"),
    ],
)
def test_whole_file_imports_and_matches_ase(mp_file, imported, rel, fidelity, source):
    path = mp_file(rel)
    result = imported(rel)
    assert (result.n_ok, result.n_rejected) == (1000, 0)
    table = frames_table(result.rows)
    assert set(table.column("fidelity").to_pylist()) == {fidelity}
    assert set(table.column("source").to_pylist()) == {source}
    assert len(set(table.column("frame_id").to_pylist())) == 1000
    ref = ase.io.read(path, index=":")
    for i in (0, 517, 999):
        back = row_to_atoms(result.rows[i])
        assert back.get_potential_energy() == ref[i].get_potential_energy()
        np.testing.assert_array_equal(back.get_forces(), ref[i].get_forces())
        np.testing.assert_array_equal(back.get_stress(), ref[i].get_stress())  # no sign flip, no unit change
        np.testing.assert_array_equal(back.numbers, ref[i].numbers)


def test_mptrj_ids_and_run_type(mp_file):
    rows = {r["frame_id"]: r for r in import_extxyz(mp_file(HIGH), limit=5).rows}
    row = rows["mptrj:mp-1768415-0-0"]  # first frame: Eu compound of traj mp-1178357
    assert (row["material_id"], row["task_id"], row["ionic_step"]) == ("mp-1178357", "mp-1768415", 0)
    assert row["energy"] == -243.04360191
    symbols = set(row_to_atoms(row).get_chemical_symbols())
    expected = (
        "GGA+U"
        if symbols & {"Co", "Cr", "Fe", "Mn", "Mo", "Ni", "V", "W"} and symbols & {"O", "F"}
        else "GGA"
    )
    assert row["run_type"] == expected


def test_limit_and_same_frame_in_two_files_gets_one_id(mp_file, imported):
    random_ids = {r["frame_id"] for r in imported(RANDOM).rows}
    high_ids = {r["frame_id"] for r in imported(HIGH).rows}
    assert len(random_ids & high_ids) == 1  # measured: one snapshot is in both mattersim sets
    assert import_extxyz(mp_file(RANDOM), limit=7).n_ok == 7


def test_stress_sign_is_ase_by_energy_balance(imported):
    """Consecutive ionic steps: dE ~ V stress:strain - F.u explains the energies better with the stored sign."""
    verdict = stress_sign_verdict(mptrj_step_pairs(imported(HIGH).rows))
    assert verdict.n_pairs == 10
    assert verdict.n_labelled_better >= 9
    assert verdict.median_error_as_labelled < verdict.median_error_if_flipped


def test_flip_stress_negates(mp_file):
    plain = import_extxyz(mp_file(ALEX), limit=3).rows
    flipped = import_extxyz(mp_file(ALEX), limit=3, flip_stress=True).rows
    for a, b in zip(plain, flipped):
        np.testing.assert_array_equal(np.asarray(a["stress"]), -np.asarray(b["stress"]))


def _frames_text(path, n):
    chunks = [c for _, c in split_frames(path.read_text().splitlines(keepends=True))][:n]
    assert all(isinstance(c, str) for c in chunks)
    return chunks


def test_corrupted_frames_are_rejected_and_the_rest_imported(mp_file, tmp_path):
    good = _frames_text(mp_file(RANDOM), 6)
    nan_energy = good[1].replace("energy=-", "energy=nan #", 1)
    lines = good[2].splitlines()
    lines[1] = lines[1].replace('Lattice="', 'Lattice="0 0 0 0 0 0 0 0 0" oldLattice="', 1)
    zero_cell = "\n".join(lines) + "\n"
    lines = good[3].splitlines()
    lines[2] = "Xx" + lines[2][2:]
    unknown_element = "\n".join(lines) + "\n"
    lines = good[4].splitlines()
    truncated = "\n".join([lines[0], lines[1], lines[2]]) + "\n"  # announces more atoms than it has
    bad_unit = good[5].replace("energy_unit=eV", "energy_unit=Ry", 1)
    path = tmp_path / "mixed.xyz"
    path.write_text(good[0] + nan_energy + zero_cell + unknown_element + truncated + bad_unit + good[0])
    result = import_extxyz(path)
    errors = {r["record_id"]: r["error"] for r in result.rejects}
    assert result.n_ok == 2  # the good frame, twice (first and last)
    assert set(errors) == {f"mixed.xyz:{i}" for i in range(1, 6)}
    assert "energy is NaN" in errors["mixed.xyz:1"]
    assert "zero volume" in errors["mixed.xyz:2"]
    assert "Xx" in errors["mixed.xyz:3"] or "unparseable" in errors["mixed.xyz:3"]
    assert "but has 1 atom lines" in errors["mixed.xyz:4"]
    assert "energy_unit='Ry'" in errors["mixed.xyz:5"]


def test_unknown_source_needs_fidelity(mp_file, tmp_path):
    text = _frames_text(mp_file(ALEX), 1)[0].replace("source=Alexandria", "source=MyCode", 1)
    path = tmp_path / "mine.xyz"
    path.write_text(text)
    result = import_extxyz(path)
    assert result.n_ok == 0 and "pass fidelity" in result.rejects[0]["error"]
    rows = import_extxyz(path, fidelity="gpaw-pbe").rows
    assert rows[0]["fidelity"] == "gpaw-pbe" and rows[0]["frame_id"].startswith("extxyz:")
    assert rows[0]["frame_id"] == import_extxyz(path, fidelity="gpaw-pbe").rows[0]["frame_id"]  # stable hash


@pytest.mark.slow
def test_stress_sign_matches_sevenn_model(imported):
    """SevenNet-0's stress is the strain derivative of its energy (ASE sign): stored MPtrj stresses follow it."""
    pytest.importorskip("sevenn")
    import torch
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(1)
    calc = SevenNetCalculator("7net-0", device="cpu")
    labels, model = [], []
    for row in [r for r in imported(RANDOM).rows if len(r["numbers"]) <= 20][:30]:
        atoms = row_to_atoms(row)
        labels.append(atoms.get_stress())
        atoms.calc = calc
        model.append(atoms.get_stress())
    corr = np.corrcoef(np.ravel(labels), np.ravel(model))[0, 1]
    assert corr > 0.9  # measured 0.983 on 120 frames; a flipped sign would give a negative correlation


def test_labels_under_other_names(mp_file, tmp_path):
    """MACE-style files keep labels as REF_energy / REF_forces / REF_stress: label_keys maps them back."""
    text = _frames_text(mp_file(ALEX), 1)[0]
    renamed = (
        text.replace(" energy=", " REF_energy=", 1)
        .replace(" stress=", " REF_stress=", 1)
        .replace(":forces:R:3", ":REF_forces:R:3", 1)
    )
    path = tmp_path / "ref.xyz"
    path.write_text(renamed)
    assert "no labels" in import_extxyz(path).rejects[0]["error"]
    keys = {"energy": "REF_energy", "forces": "REF_forces", "stress": "REF_stress"}
    row = import_extxyz(path, label_keys=keys).rows[0]
    original = import_extxyz(mp_file(ALEX), limit=1).rows[0]
    for key in ("frame_id", "energy", "forces", "stress"):
        assert row[key] == original[key]
    with pytest.raises(ValueError, match="label_keys"):
        import_extxyz(path, label_keys={"dipole": "REF_dipole"})


def test_gzipped_file_and_missing_file(mp_file, tmp_path):
    path = tmp_path / "three.xyz.gz"
    path.write_bytes(gzip.compress("".join(_frames_text(mp_file(RANDOM), 3)).encode()))
    assert import_extxyz(path).n_ok == 3
    missing = import_extxyz(tmp_path / "none.xyz")
    assert missing.n_ok == 0 and "unreadable extxyz file" in missing.rejects[0]["error"]


def test_streaming_batches_equal_the_whole_import(mp_file, imported):
    parts = list(iter_extxyz(mp_file(RANDOM), batch_size=300))
    assert [p.n_ok for p in parts] == [300, 300, 300, 100]
    assert [r for p in parts for r in p.rows] == imported(RANDOM).rows


def test_file_breaking_off_mid_way_keeps_the_frames_before(mp_file, tmp_path):
    data = gzip.compress("".join(_frames_text(mp_file(RANDOM), 200)).encode())
    path = tmp_path / "cut.xyz.gz"
    path.write_bytes(data[: len(data) // 2])  # a download cut short
    result = import_extxyz(path)
    assert 0 < result.n_ok < 200
    assert result.rejects[-1]["record_id"] == "cut.xyz.gz"
    assert "unreadable extxyz file" in result.rejects[-1]["error"]
