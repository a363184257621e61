"""Integrity of the committed Si-Sn multi-fidelity set in data/sisn (no GPAW needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.label.demo_set import PBE, R2SCAN, read_part
from pipeline.label.sisn_readme import gap_stats
from pipeline.label.sisn_set import HELD_OUT, structure

SISN = Settings().data_dir / "sisn"
FIDELITIES = {PBE, R2SCAN}
RUN_TYPE = {PBE: "PBE", R2SCAN: "R2SCAN"}


@pytest.fixture(scope="module")
def sisn() -> dict:
    """Every part of the committed set, as lists of rows, plus the manifest."""
    parts = {p: read_part(SISN, p).to_pylist() for p in ("frames", "test_frames", "entries")}
    return {**parts, "manifest": json.loads((SISN / "manifest.json").read_text())}


def _meta(r: dict) -> dict:
    return json.loads(r["meta"])


def _check_labels(rows: list[dict]) -> None:
    for r in rows:
        assert r["source"] == "gpaw" and r["fidelity"] in FIDELITIES, r["frame_id"]
        assert r["has_energy"] and r["has_forces"] and r["has_stress"], r["frame_id"]
        assert r["run_type"] == RUN_TYPE[r["fidelity"]]
        n = len(r["numbers"])
        assert 1 <= n <= 8 and set(r["numbers"]) <= {14, 50}, r["frame_id"]
        forces, stress = np.asarray(r["forces"]), np.asarray(r["stress"])
        assert np.isfinite(r["energy"]) and forces.shape == (n, 3) and np.all(np.isfinite(forces))
        assert -25.0 < r["energy"] / n < 0.0, (r["frame_id"], r["energy"] / n)  # GPAW scale (Sn r2SCAN ~ -18)
        assert np.abs(forces.sum(axis=0)).max() < 0.02, (r["frame_id"], forces.sum(axis=0))  # Newton's third law
        assert np.all(np.isfinite(stress)) and np.allclose(stress, stress.T, atol=1e-6)
        m = _meta(r)
        assert m["settings"] and m["software"]["gpaw"] and m["seconds"] > 0  # provenance


def test_frames_are_complete_physical_and_reproducible(sisn):
    frames, test_frames = (sisn["frames"], sisn["test_frames"])
    _check_labels(frames + test_frames)
    ids = [r["frame_id"] for r in frames + test_frames]
    assert len(ids) == len(set(ids))
    for r in frames + test_frames:  # every single point is exactly structure(index) of the generator
        m = _meta(r)
        if "index" in m:
            sid, atoms, _ = structure(m["index"])
            assert r["frame_id"] == f"gpaw:{sid}:{r['fidelity']}" and r["material_id"] == f"sisn:{sid}"
            assert list(r["numbers"]) == list(atoms.numbers)
            assert np.allclose(np.asarray(r["positions"]), atoms.positions, atol=1e-8)


def test_one_settings_hash_per_fidelity(sisn):
    frames, test_frames, manifest = (sisn["frames"], sisn["test_frames"], sisn["manifest"])
    for r in frames + test_frames:
        assert _meta(r)["settings_hash"] == manifest["fidelities"][r["fidelity"]]["settings_hash"], r["frame_id"]


def test_test_split_holds_out_whole_prototypes(sisn):
    frames, test_frames = (sisn["frames"], sisn["test_frames"])
    assert test_frames, "the held-out test split is empty"
    assert {_meta(r)["prototype"] for r in test_frames} <= set(HELD_OUT)
    assert {_meta(r)["prototype"] for r in test_frames} == set(HELD_OUT)  # both held-out prototypes computed
    train_protos = {_meta(r).get("prototype") for r in frames}
    assert not train_protos & set(HELD_OUT)
    assert not {r["material_id"] for r in test_frames} & {r["material_id"] for r in frames}
    assert {_meta(r)["bonding"] for r in frames if "bonding" in _meta(r)} == {"covalent", "metallic"}


def test_both_fidelities_for_almost_every_structure(sisn):
    frames, test_frames = (sisn["frames"], sisn["test_frames"])
    for rows in (frames, test_frames):
        single = [r for r in rows if "index" in _meta(r)]
        by_id: dict[str, set[str]] = {}
        for r in single:
            by_id.setdefault(r["material_id"], set()).add(r["fidelity"])
        r2_only = [k for k, f in by_id.items() if f == {R2SCAN}]
        assert not r2_only, r2_only  # r2SCAN always follows its PBE label
        both = sum(f == FIDELITIES for f in by_id.values())
        assert both >= max(1, len(by_id) - 1)  # at most the structure cut by the deadline lacks r2SCAN


def test_reference_entries_make_a_hull_at_both_fidelities(sisn):
    entries, manifest = (sisn["entries"], sisn["manifest"])
    for r in entries:
        assert r["thermo_type"] == "raw" and r["correction"] == 0.0 and r["source"] == "gpaw"
        assert r["run_type"] == RUN_TYPE[r["fidelity"]]
    ids = {r["entry_id"] for r in entries}
    for fid in FIDELITIES:  # the elemental ground-state prototypes exist at both fidelities
        assert {f"sisn-Si-diamond-{fid}", f"sisn-Sn-diamond-{fid}"} <= ids
        assert f"sisn-Si-diamond-{fid}" in manifest["hull"][fid]


def test_manifest_matches_the_data(sisn):
    frames, test_frames, entries, manifest = (sisn["frames"], sisn["test_frames"], sisn["entries"], sisn["manifest"])
    counts = manifest["counts"]
    assert counts["frames"] == len(frames) and counts["test_frames"] == len(test_frames)
    assert counts["entries"] == len(entries)
    assert manifest["gap"] == json.loads(json.dumps(gap_stats(frames + test_frames)))
    assert (SISN / "README.md").is_file() and (SISN / "convergence.json").is_file()


def test_first_structures_is_the_set_as_it_was():
    """``first_structures(frames, n)``: the generated structures below index n plus every relaxation step; all
    of them at n past the last index (the benchmark's ``--structures`` reproduces tables of a smaller set)."""
    from pipeline.hashing import frames_hash
    from pipeline.label.sisn_set import first_structures

    frames = read_part(SISN, "frames")
    index = [_meta(r).get("index") for r in frames.to_pylist()]
    last = max(i for i in index if i is not None)
    assert frames_hash(first_structures(frames, last + 1)) == frames_hash(frames)
    assert first_structures(frames, None) is frames
    some = first_structures(frames, 20).to_pylist()
    assert {_meta(r).get("index") for r in some} - {None} == {i for i in index if i is not None and i < 20}
    assert sum(_meta(r).get("index") is None for r in some) == index.count(None) > 0  # relaxation steps kept
    assert all(_meta(r).get("index") is None for r in first_structures(frames, 0).to_pylist())
