"""Integrity of the committed multi-fidelity demo set in data/demo (no GPAW needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase.io import read as ase_read
from pymatgen.analysis.phase_diagram import PhaseDiagram

from pipeline.config import Settings
from pipeline.entries import table_to_entries
from pipeline.label.demo_set import CANDIDATE_PHASES, PBE, R2SCAN, REFERENCE_PHASES, read_part
from pipeline.schema import ENTRIES_SCHEMA

DEMO = Settings().demo_dir
FIDELITIES = {PBE, R2SCAN}
KINDS = {"reference", "relax-step", "rattled", "strained", "decorated"}


def _rows(name: str) -> list[dict]:
    return read_part(DEMO, name).to_pylist()


@pytest.fixture(scope="module")
def frames() -> list[dict]:
    return _rows("frames")


@pytest.fixture(scope="module")
def test_frames() -> list[dict]:
    return _rows("test_frames")


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    return _rows("entries")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((DEMO / "manifest.json").read_text())


def _check_labels(rows: list[dict]) -> None:
    for r in rows:
        assert r["source"] == "gpaw" and r["fidelity"] in FIDELITIES, r["frame_id"]
        assert r["has_energy"] and r["has_forces"], r["frame_id"]
        assert r["run_type"] == {PBE: "PBE", R2SCAN: "R2SCAN"}[r["fidelity"]]
        n = len(r["numbers"])
        assert 1 <= n <= 8 and set(r["numbers"]) <= {3, 13}, r["frame_id"]
        energy, forces = r["energy"], np.asarray(r["forces"])
        assert np.isfinite(energy) and forces.shape == (n, 3) and np.all(np.isfinite(forces))
        assert -8.0 < energy / n < -1.0, (r["frame_id"], energy / n)  # GPAW scale, Li/Al
        # plane-wave DFT forces obey Newton's third law: the net force on the cell is ~0
        assert np.abs(forces.sum(axis=0)).max() < 0.02, (r["frame_id"], forces.sum(axis=0))
        if r["has_stress"]:
            stress = np.asarray(r["stress"])
            assert np.all(np.isfinite(stress)) and np.allclose(stress, stress.T, atol=1e-6)


def test_training_frames_are_complete_and_physical(frames):
    _check_labels(frames)
    ids = [r["frame_id"] for r in frames]
    assert len(ids) == len(set(ids))
    kinds = {json.loads(r["meta"])["kind"] for r in frames}
    assert kinds <= KINDS and {"reference", "relax-step"} <= kinds
    assert {r["fidelity"] for r in frames} == FIDELITIES


def test_one_settings_hash_per_fidelity(frames, test_frames, manifest):
    hashes: dict[str, set[str]] = {}
    for r in frames + test_frames:
        hashes.setdefault(r["fidelity"], set()).add(json.loads(r["meta"])["settings_hash"])
    for fid, found in hashes.items():
        assert found == {manifest["fidelities"][fid]["settings_hash"]}, fid


def test_held_out_test_set_is_r2scan_only_and_disjoint(frames, test_frames):
    assert test_frames, "the held-out r2SCAN test set is empty"
    _check_labels(test_frames)
    assert {r["fidelity"] for r in test_frames} == {R2SCAN}
    assert not {r["frame_id"] for r in test_frames} & {r["frame_id"] for r in frames}

    def fingerprint(r: dict) -> tuple:
        return (tuple(r["numbers"]), tuple(np.round(np.asarray(r["positions"]).ravel(), 4)),
                tuple(np.round(np.asarray(r["cell"]).ravel(), 4)))

    assert not {fingerprint(r) for r in test_frames} & {fingerprint(r) for r in frames}


def test_r2scan_subset_of_variants(frames):
    variants = [r for r in frames if json.loads(r["meta"])["kind"] in {"rattled", "strained", "decorated"}]
    pbe = [r for r in variants if r["fidelity"] == PBE]
    r2 = [r for r in variants if r["fidelity"] == R2SCAN]
    assert pbe and r2
    assert 0.1 <= len(r2) / len(pbe) <= 0.35
    assert len({json.loads(r["meta"])["kind"] for r in r2}) >= 2  # not only one kind of variant
    # every r2SCAN variant also has its PBE label (same structure, both fidelities)
    pbe_ids = {r["frame_id"].rsplit(":", 1)[0] for r in pbe}
    assert {r["frame_id"].rsplit(":", 1)[0] for r in r2} <= pbe_ids


def test_reference_phases_present_at_both_fidelities(entries, frames):
    ids = {r["entry_id"] for r in entries}
    for phase in REFERENCE_PHASES:
        for fid in FIDELITIES:
            assert f"demo-{phase.name}-{fid}" in ids
    for r in entries:
        assert r["thermo_type"] == "raw" and r["correction"] == 0.0 and r["source"] == "gpaw"
        assert r["run_type"] == {PBE: "PBE", R2SCAN: "R2SCAN"}[r["fidelity"]]
    relaxed = [r for r in frames if json.loads(r["meta"])["kind"] == "reference"]
    assert {(json.loads(r["meta"])["parent"], r["fidelity"]) for r in relaxed} == {
        (p.name, f) for p in REFERENCE_PHASES for f in FIDELITIES}
    energies = {r["entry_id"]: r["uncorrected_energy"] for r in entries}
    for r in relaxed:  # relaxed: small forces, and the same energy as the entry
        assert np.abs(np.asarray(r["forces"])).max() < 0.05, r["frame_id"]
        parent = json.loads(r["meta"])["parent"]
        assert r["energy"] == pytest.approx(energies[f"demo-{parent}-{r['fidelity']}"], abs=1e-8)


@pytest.mark.parametrize("fidelity", sorted(FIDELITIES))
def test_reference_hull_is_sensible(entries, fidelity):
    """LiAl (B32) is a stable compound at both levels of theory; the elements sit at zero."""
    chosen = [e for e, r in zip(table_to_entries(_table(entries)), entries, strict=True) if r["fidelity"] == fidelity]
    pd = PhaseDiagram(chosen)
    by_id = {e.entry_id: e for e in chosen}
    lial = by_id[f"demo-LiAl-B32-{fidelity}"]
    assert -0.4 < pd.get_form_energy_per_atom(lial) < -0.05
    assert pd.get_e_above_hull(lial) < 1e-6
    for el in ("Li-bcc", "Al-fcc"):
        assert abs(pd.get_form_energy_per_atom(by_id[f"demo-{el}-{fidelity}"])) < 1e-9


def _table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=ENTRIES_SCHEMA)


def test_candidates_ground_truth_and_starting_structures(entries):
    cands = _rows("candidates")
    ids = {r["entry_id"] for r in cands}
    assert not ids & {r["entry_id"] for r in entries}
    images = ase_read(Path(DEMO / "candidates.extxyz"), index=":")
    stems = {a.info["candidate_id"] for a in images}
    assert stems == {f"demo-{p.name}" for p in CANDIDATE_PHASES}
    for stem in stems:
        assert f"{stem}-{R2SCAN}" in ids, stem
    for r in cands:
        assert r["thermo_type"] == "raw" and r["fidelity"] in FIDELITIES and np.isfinite(r["energy_per_atom"])


def test_manifest_counts_match_the_data(frames, test_frames, entries, manifest):
    counts = manifest["counts"]
    assert counts["frames"] == len(frames)
    assert counts["test_frames"] == len(test_frames)
    assert counts["entries"] == len(entries)
    assert manifest["software"]["gpaw"]
    assert (DEMO / "README.md").is_file()
