"""The DFT labeller: error handling with small ASE calculators, and one tiny real GPAW calculation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from pipeline.frames import frames_table, row_to_atoms
from pipeline.label.dft import R2SCAN_XC, Fidelity, GpawSettings, LabelError, Labeller, gpaw_fidelities


class Exploding(Calculator):
    """A calculator whose SCF 'does not converge' for cells with more than ``max_atoms`` atoms."""

    implemented_properties = ("energy", "forces", "stress")

    def __init__(self, max_atoms: int = 1, **kw):
        super().__init__(**kw)
        self.max_atoms = max_atoms

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) > self.max_atoms:
            raise RuntimeError("SCF did not converge in 333 iterations")
        self.results = {"energy": -1.0 * len(self.atoms), "forces": np.zeros((len(self.atoms), 3)),
                        "stress": np.zeros(6)}


class NoStress(Calculator):
    """Energies and forces only (like a meta-GGA code without stress)."""

    implemented_properties = ("energy", "forces")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": -2.0, "forces": np.zeros((len(self.atoms), 3))}


class NaNEnergy(NoStress):
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["energy"] = float("nan")


def _labeller(**factories) -> Labeller:
    return Labeller({name: Fidelity(name, f, run_type="PBE", settings={"k": 1}, settings_hash="abc")
                     for name, f in factories.items()}, source="test")


def test_failed_calculation_is_recorded_and_batch_carries_on():
    lab = _labeller(toy=lambda atoms: Exploding(max_atoms=1))
    al1, al2, li1 = bulk("Al", "fcc", a=4.0), bulk("Al", "fcc", a=4.0).repeat((2, 1, 1)), bulk("Li", "bcc", a=3.4)
    seen = []
    result = lab.label_many([("a", al1, {"kind": "x"}), ("b", al2, None), ("c", li1, None)], "toy", on_row=seen.append)
    assert [r["frame_id"] for r in result.rows] == ["a", "c"] == [r["frame_id"] for r in seen]
    assert result.n_rejected == 1
    reject = result.rejects[0]
    assert reject["record_id"] == "b"
    assert "SCF did not converge" in reject["error"] and "LabelError" in reject["error"]
    assert result.rejects_table().num_rows == 1
    meta = json.loads(result.rows[0]["meta"])
    assert meta["kind"] == "x" and meta["settings_hash"] == "abc" and meta["seconds"] >= 0


def test_missing_stress_is_recorded_as_missing():
    row = _labeller(toy=lambda atoms: NoStress()).label(bulk("Al", "fcc", a=4.0), "toy", "f1")
    assert row["has_energy"] and row["has_forces"] and not row["has_stress"]
    assert row["stress"] is None and row["fidelity"] == "toy" and row["source"] == "test"
    assert frames_table([row]).num_rows == 1


def test_non_finite_energy_and_unknown_fidelity_raise_label_error():
    lab = _labeller(toy=lambda atoms: NaNEnergy())
    with pytest.raises(LabelError, match="non-finite"):
        lab.label(bulk("Al", "fcc", a=4.0), "toy", "f1")
    with pytest.raises(LabelError, match="unknown fidelity 'pbe'"):
        lab.label(bulk("Al", "fcc", a=4.0), "pbe", "f1")
    with pytest.raises(ValueError):
        Labeller({})


def test_label_does_not_touch_the_input_atoms():
    atoms = bulk("Al", "fcc", a=4.0)
    _labeller(emt=lambda a: EMT()).label(atoms, "emt", "f1")
    assert atoms.calc is None


def test_relax_with_any_ase_calculator_records_every_ionic_step():
    """EMT stands in for VASP/GPAW: the relaxation and its frames need nothing code-specific."""
    lab = _labeller(emt=lambda atoms: EMT())
    start = bulk("Al", "fcc", a=4.2, cubic=True)
    relaxed, rows = lab.relax(start, "emt", "gpaw:Al:emt:relax", fmax=0.01, steps=60)
    assert len(rows) >= 2
    assert [r["ionic_step"] for r in rows] == list(range(len(rows)))
    assert rows[0]["frame_id"] == "gpaw:Al:emt:relax:0"
    assert rows[-1]["energy"] < rows[0]["energy"]
    assert abs(relaxed.get_volume() / 4 - 4.05**3 / 4) < 1.0  # EMT Al lattice ~4.05 A
    assert np.allclose(row_to_atoms(rows[-1]).get_potential_energy(), relaxed.get_potential_energy())
    assert all(json.loads(r["meta"])["kind"] == "relax-step" for r in rows)


def test_relax_that_does_not_converge_raises():
    lab = _labeller(emt=lambda atoms: EMT())
    with pytest.raises(LabelError, match="not converged"):
        lab.relax(bulk("Al", "fcc", a=4.6, cubic=True), "emt", "x", fmax=1e-4, steps=2)


def test_gpaw_settings_hash_separates_energy_scales():
    pbe = GpawSettings()
    assert pbe.settings_hash() == GpawSettings().settings_hash()
    assert pbe.settings_hash() != GpawSettings(xc=R2SCAN_XC).settings_hash()
    assert pbe.settings_hash() != GpawSettings(ecut=400).settings_hash()
    fids = gpaw_fidelities(pbe)
    assert set(fids) == {"gpaw-pbe", "gpaw-r2scan"}
    assert fids["gpaw-r2scan"].settings["xc"] == R2SCAN_XC
    assert fids["gpaw-r2scan"].settings["ecut"] == pbe.ecut
    assert fids["gpaw-pbe"].run_type == "PBE" and fids["gpaw-r2scan"].run_type == "R2SCAN"


def test_gpaw_tiny_real_calculation():
    pytest.importorskip("gpaw", reason="GPAW not installed (optional extra 'dft': scripts/install_dft.sh)")
    cheap = GpawSettings(ecut=200, kpoint_density=1.5)
    lab = Labeller(gpaw_fidelities(cheap))
    atoms = bulk("Al", "fcc", a=4.05).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=1)
    row = lab.label(atoms, "gpaw-pbe", "gpaw:test:Al2")
    assert row["fidelity"] == "gpaw-pbe" and row["run_type"] == "PBE" and row["source"] == "gpaw"
    assert row["has_energy"] and row["has_forces"] and row["has_stress"]
    assert -4.5 < row["energy"] / 2 < -3.0  # GPAW PBE Al: about -3.7 eV/atom on its reference scale
    forces = np.asarray(row["forces"])
    assert np.abs(forces).max() > 1e-3  # rattled: non-zero forces
    assert np.allclose(forces.sum(axis=0), 0.0, atol=1e-3)
    meta = json.loads(row["meta"])
    assert meta["software"]["gpaw"] and meta["settings"]["ecut"] == 200


# ------------------------------------------------------------------ the demo-set generator, with a cheap calculator


def _lj_labeller():
    from ase.calculators.lj import LennardJones

    def factory(atoms):
        return LennardJones(sigma=2.4, epsilon=0.02, rc=6.0, smooth=True)

    return Labeller({f: Fidelity(f, factory, run_type=rt, settings={"lj": 1}, settings_hash=f"h-{f}")
                     for f, rt in (("gpaw-pbe", "PBE"), ("gpaw-r2scan", "R2SCAN"))}, source="gpaw")


def test_variants_are_deterministic_small_and_varied():
    from pipeline.label.demo_set import REFERENCE_PHASES, variant_structures

    refs = {p.name: p.build() for p in REFERENCE_PHASES}
    a = list(variant_structures(refs, seed=3, count=25))
    b = list(variant_structures(refs, seed=3, count=25))
    assert [v[0] for v in a] == [v[0] for v in b]
    assert all(np.allclose(x[1].positions, y[1].positions) for x, y in zip(a, b, strict=True))
    assert {m["kind"] for *_, m in a} == {"decorated", "rattled", "strained"}
    assert all(1 <= len(atoms) <= 8 for _, atoms, _ in a)
    assert len({v[0] for v in a}) == len(a)


def test_r2scan_subset_covers_every_kind():
    from pipeline.label.demo_set import R2SCAN_EVERY, REFERENCE_PHASES, gets_r2scan, variant_structures

    refs = {p.name: p.build() for p in REFERENCE_PHASES}
    chosen = [m["kind"] for i, (*_, m) in enumerate(variant_structures(refs, seed=1, count=50)) if gets_r2scan(i)]
    assert len(chosen) == 50 // R2SCAN_EVERY
    assert set(chosen) == {"decorated", "rattled", "strained"}


def test_demo_generator_is_resumable_and_keeps_test_set_apart(tmp_path):
    from pipeline.label.demo_set import REFERENCE_PHASES, DemoSet

    demo = DemoSet(tmp_path, _lj_labeller())
    refs = {p.name: p.build() for p in REFERENCE_PHASES}
    demo.label_variants(refs, count=6, seed=1)
    first = demo.frames.read()
    assert first.num_rows == 6 + 1  # PBE for all, r2SCAN for variant 0 (the next one is variant 6)
    demo.label_variants(refs, count=6, seed=1)  # re-run: nothing new
    assert demo.frames.read().num_rows == first.num_rows
    demo.label_variants(refs, count=8, seed=1)  # continue: only the new ones
    assert demo.frames.read().num_rows == 8 + 2
    demo.label_variants(refs, count=3, seed=9, test=True)
    test = demo.test_frames.read().to_pylist()
    assert len(test) == 3 and {r["fidelity"] for r in test} == {"gpaw-r2scan"}
    assert not {r["frame_id"] for r in test} & set(demo.frames.read().column("frame_id").to_pylist())
    demo.deadline = 0.0  # past deadline: starts nothing
    demo.label_variants(refs, count=12, seed=1)
    assert demo.frames.read().num_rows == 10


def test_demo_generator_records_failed_calculations(tmp_path):
    from pipeline.label.demo_set import CANDIDATE_PHASES, DemoSet

    lab = Labeller({f: Fidelity(f, lambda atoms: Exploding(max_atoms=2), run_type="PBE")
                    for f in ("gpaw-pbe", "gpaw-r2scan")}, source="gpaw")
    demo = DemoSet(tmp_path, lab)
    demo.relax_phases(CANDIDATE_PHASES, demo.candidates, "candidate")
    rejects = {r["record_id"]: r["error"] for r in demo.rejects.read().to_pylist()}
    # B2 (2 atoms) relaxes with the toy calculator; C11b (3) and L1_2 (4) fail and are kept with their error
    assert set(rejects) == {"demo-Li2Al-C11b-gpaw-pbe", "demo-Li3Al-L12-gpaw-pbe"}
    assert all("SCF did not converge" in e for e in rejects.values())
    ids = set(demo.candidates.read().column("entry_id").to_pylist())
    assert ids == {"demo-LiAl-B2-gpaw-pbe", "demo-LiAl-B2-gpaw-r2scan"}
    demo.relax_phases(CANDIDATE_PHASES, demo.candidates, "candidate")  # re-run skips rejected ones
    assert demo.rejects.read().num_rows == 2
