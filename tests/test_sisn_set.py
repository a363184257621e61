"""The Si-Sn set generator (pipeline.label.sisn_set) with cheap ASE calculators: structures, splits, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.lj import LennardJones

from pipeline.label.demo_set import PBE, R2SCAN, DeadlineReached
from pipeline.label.dft import Fidelity, GpawSettings, Labeller
from pipeline.label.sisn_readme import gap_stats, readme
from pipeline.label.sisn_set import (
    HELD_OUT,
    PROTOTYPE_CYCLE,
    PROTOTYPES,
    REFERENCE_PHASES,
    SiSnSet,
    structure,
)


class ShiftedLJ(Calculator):
    """Lennard-Jones + a per-element constant (and optionally + a per-atom term for 'metallic' cells), so the
    two toy fidelities differ like r2SCAN and PBE do: by a per-element shift, or by more."""

    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, shift: dict[int, float], **kw):
        super().__init__(**kw)
        self.shift = shift

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        lj = LennardJones(sigma=2.2, epsilon=0.05, rc=5.0, smooth=True)
        work = self.atoms.copy()
        work.calc = lj
        self.results = {"energy": work.get_potential_energy() + sum(self.shift.get(z, 0.0) for z in work.numbers),
                        "forces": work.get_forces(), "stress": work.get_stress()}


def _labeller() -> Labeller:
    shifts = {PBE: {}, R2SCAN: {14: -3.0, 50: -14.0}}
    return Labeller({f: Fidelity(f, lambda atoms, s=shifts[f]: ShiftedLJ(s), run_type=rt, settings={**GpawSettings().as_dict(), "toy": f},
                                 settings_hash=f"h-{f}") for f, rt in ((PBE, "PBE"), (R2SCAN, "R2SCAN"))},
                    source="gpaw")


def test_structures_are_deterministic_per_index_small_and_cover_the_grid():
    a = [structure(i) for i in range(36)]
    b = [structure(i) for i in reversed(range(36))][::-1]  # any order: each index has its own random stream
    assert [x[0] for x in a] == [x[0] for x in b]
    assert all(np.allclose(x[1].positions, y[1].positions) for x, y in zip(a, b, strict=True))
    assert len({x[0] for x in a}) == 36
    assert {(m["prototype"], m["kind"]) for _, _, m in a} == {
        (p, k) for p in PROTOTYPE_CYCLE for k in ("strained", "rattled", "decorated")}
    for _, atoms, meta in a:
        assert 1 <= len(atoms) <= 8 and set(atoms.get_chemical_symbols()) <= {"Si", "Sn"}
        assert meta["held_out"] == (meta["prototype"] in HELD_OUT)
        if meta["kind"] == "decorated" and len(atoms) > 1:
            assert set(atoms.get_chemical_symbols()) == {"Si", "Sn"}
        d = atoms.get_all_distances(mic=True)
        assert len(atoms) == 1 or d[d > 0].min() > 1.5  # no overlapping atoms
    assert {p.bonding for p in PROTOTYPES.values() if p.held_out} == {"covalent", "metallic"}


def test_generator_interleaves_fidelities_holds_out_prototypes_and_resumes(tmp_path):
    data = SiSnSet(tmp_path, _labeller())
    data.label_structures(0, 9)
    train, test = data.frames.read().to_pylist(), data.test_frames.read().to_pylist()
    held = [i for i in range(9) if PROTOTYPE_CYCLE[i % 9] in HELD_OUT]
    assert len(test) == 2 * len(held) and len(train) == 2 * (9 - len(held))
    assert all(json.loads(r["meta"])["prototype"] in HELD_OUT for r in test)
    assert not any(json.loads(r["meta"])["prototype"] in HELD_OUT for r in train)
    by_material: dict[str, set[str]] = {}
    for r in train + test:  # both fidelities of one structure share its material_id (a split keeps them together)
        by_material.setdefault(r["material_id"], set()).add(r["fidelity"])
    assert all(f == {PBE, R2SCAN} for f in by_material.values())
    meta = json.loads(train[0]["meta"])
    assert meta["settings"] and meta["settings_hash"] and "seconds" in meta  # provenance
    data.label_structures(0, 9)  # re-run: nothing new
    assert data.frames.read().num_rows == len(train)
    data.deadline = 0.0  # past the deadline: starts nothing, and says so (run() stops every later stage)
    with pytest.raises(DeadlineReached):
        data.label_structures(0, 20)
    assert data.frames.read().num_rows == len(train)


def test_reference_relaxation_and_manifest(tmp_path):
    data = SiSnSet(tmp_path, _labeller())
    data.relax_each(REFERENCE_PHASES[:1], data.entries, "reference")
    data.label_structures(0, 6)
    ids = set(data.entries.read().column("entry_id").to_pylist())
    rejected = {r["record_id"] for r in data.rejects.read().to_pylist()} if data.rejects.exists() else set()
    assert ids | rejected == {f"sisn-{p.name}-{f}" for p in REFERENCE_PHASES[:1] for f in (PBE, R2SCAN)}
    assert ids  # at least one relaxation converged with the toy calculator
    for row in data.entries.read().to_pylist():  # provenance: settings, their hash, software; relaxation time
        params = json.loads(row["parameters"])
        assert params["settings"]["ecut"] and params["settings_hash"] == f"h-{row['fidelity']}"
        assert "software" in params and json.loads(row["data"])["relax_seconds"] >= 0
    manifest = data.write_manifest()
    assert manifest["counts"]["frames"] == data.frames.read().num_rows
    assert manifest["gap"]["n"] == 6
    text = readme(manifest)
    assert "python -m pipeline.label.sisn_set" in text and "## Counts" in text


def _pair(numbers, gap, kind="x"):
    base = {"numbers": numbers, "forces": np.zeros((len(numbers), 3)), "meta": json.dumps({"prototype": kind})}
    return [{**base, "frame_id": f"s{len(numbers)}{gap}:{PBE}", "fidelity": PBE, "energy": 0.0},
            {**base, "frame_id": f"s{len(numbers)}{gap}:{R2SCAN}", "fidelity": R2SCAN, "energy": gap}]


def test_gap_stats_separates_a_per_element_shift_from_structure_dependence():
    comps = [[14, 14], [50, 50], [14, 50], [14, 14, 14, 50], [50]]
    shift_only = [r for c in comps for r in _pair(c, -3.0 * c.count(14) - 14.0 * c.count(50))]
    s = gap_stats(shift_only)
    assert s["shift_eV_per_atom"] == {"Si": pytest.approx(-3.0), "Sn": pytest.approx(-14.0)}
    assert s["residual_rms_meV_per_atom"] == pytest.approx(0.0, abs=0.1)
    # + 50 meV/atom for 'metallic' structures only: a per-element shift cannot absorb it
    extra = [r for i, c in enumerate(comps) for r in _pair(
        c, -3.0 * c.count(14) - 14.0 * c.count(50) + (0.05 * len(c) if i % 2 else 0.0), "metal" if i % 2 else "cov")]
    s2 = gap_stats(extra)
    assert s2["residual_rms_meV_per_atom"] > 10
    by = s2["by_prototype_mean_residual_meV_per_atom"]
    assert by["metal"]["mean"] > by["cov"]["mean"]
