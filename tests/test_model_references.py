"""Per-fidelity element references: least-squares fit, overrides, use in the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.data import chemical_symbols

from pipeline.frames import frame_row, frames_table
from pipeline.graphs import atoms_to_graph
from pipeline.model import (
    ElementReferences,
    MFPotential,
    fit_element_references,
    preset,
    references_from_frames,
)


def test_fit_recovers_synthetic_references():
    rng = np.random.default_rng(0)
    true = {"pbe": {1: -3.4, 8: -4.9, 28: -5.6}, "r2scan": {1: -4.1, 8: -6.3, 28: -8.9}}
    numbers, energies, fids = [], [], []
    for fid, ref in true.items():
        for _ in range(30):
            z = rng.choice([1, 8, 28], size=rng.integers(1, 9)).tolist()
            numbers.append(z)
            energies.append(sum(ref[k] for k in z) + rng.normal(0, 1e-3) * len(z))
            fids.append(fid.upper() if len(numbers) % 2 else fid)  # case does not matter
    energies.append(float("nan"))  # an unlabelled structure is ignored
    numbers.append([1])
    fids.append("pbe")
    refs = fit_element_references(numbers, energies, fids)
    assert sorted(refs.energies) == ["pbe", "r2scan"]
    for fid, ref in true.items():
        for z, value in ref.items():
            assert refs.energies[fid][chemical_symbols[z]] == pytest.approx(value, abs=5e-3)
        assert 0 < refs.scales[fid] < 0.01  # no forces: RMS of per-atom residuals (the noise)
    with pytest.raises(ValueError, match="lengths differ"):
        fit_element_references(numbers[:-1], energies, fids)


def _res_entries(path):
    from pipeline.sources.files.res import read_res_entries

    entries, _ = read_res_entries(path)
    numbers = [[site.specie.Z for site in e.structure] for e in entries]
    energies = np.array([e.uncorrected_energy for e in entries])
    return numbers, energies, [e.parameters["run_type"] for e in entries]


def test_fit_on_real_li_ni_o_separates_fidelities(mp_file):
    """MP Li-Ni-O: GGA, GGA+U and r2SCAN raw energies need their own references (eV/atom apart)."""
    numbers, energies, fids = _res_entries(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))
    refs = fit_element_references(numbers, energies, fids)
    assert sorted(refs.energies) == ["gga", "gga+u", "r2scan"]
    fids_l = np.array([f.lower() for f in fids])
    natoms = np.array([len(z) for z in numbers])

    def rms(data_fid: str, ref_fid: str) -> float:
        idx = np.flatnonzero(fids_l == data_fid)
        pred = np.array([sum(refs.energies[ref_fid][chemical_symbols[z]] for z in numbers[k]) for k in idx])
        return float(np.sqrt(np.mean(((pred - energies[idx]) / natoms[idx]) ** 2)))

    for fid in ("gga+u", "r2scan"):
        own = rms(fid, fid)
        assert own < 1.0
        other = "r2scan" if fid == "gga+u" else "gga+u"
        assert rms(fid, other) > own + 2.0  # the wrong fidelity's references are off by eV/atom
    assert refs.energies["r2scan"]["Ni"] < refs.energies["gga+u"]["Ni"] - 3.0


def test_references_from_frames_uses_masks():
    a = bulk("Si", "diamond", a=5.43)
    rows = [
        frame_row(frame_id="a", source="t", fidelity="pbe", numbers=a.numbers, positions=a.positions,
                  cell=a.cell.array, energy=-10.8, forces=np.full((2, 3), 0.5)),
        frame_row(frame_id="b", source="t", fidelity="r2scan", numbers=a.numbers, positions=a.positions,
                  cell=a.cell.array, energy=-17.4),
        frame_row(frame_id="c", source="t", fidelity="r2scan", numbers=a.numbers, positions=a.positions,
                  cell=a.cell.array, forces=np.zeros((2, 3))),  # no energy: not in the shift fit
    ]
    refs = references_from_frames(frames_table(rows))
    assert refs.energies["pbe"]["Si"] == pytest.approx(-5.4)
    assert refs.energies["r2scan"]["Si"] == pytest.approx(-8.7)
    assert refs.scales["pbe"] == pytest.approx(0.5)


def test_override_and_model_shift():
    refs = ElementReferences({"pbe": {"Li": -1.9, "O": -4.9}, "r2scan": {"O": -6.1}}, {"pbe": 0.5})
    user = refs.override("R2SCAN", {"Li": -2.4}, scale=0.7)
    assert user.energies["r2scan"] == {"O": -6.1, "Li": -2.4} and refs.energies["r2scan"] == {"O": -6.1}
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        refs.override("pbe", {"Xx": 1.0})
    with pytest.raises(ValueError, match="positive"):
        refs.override("pbe", scale=-1.0)
    # Li missing in r2scan: estimated from pbe + the median pbe->r2scan offset of shared elements (O: -1.2)
    shift = refs.shift_matrix(["pbe", "r2scan"], [3, 8])
    np.testing.assert_allclose(shift, [[-1.9, -4.9], [-1.9 - 1.2, -6.1]])
    model = MFPotential(preset("small", elements=("Li", "O")), user).to(torch.float64)
    got = model.references()
    assert got.energies["r2scan"]["Li"] == pytest.approx(-2.4) and got.scales["r2scan"] == pytest.approx(0.7)
    # with a negligible scale the energy of a lone atom is exactly its fidelity's reference
    from ase import Atoms

    tiny = user.override("pbe", scale=1e-9).override("r2scan", scale=1e-9)
    model.set_references(tiny)
    lone = Atoms("Li", positions=[[0, 0, 0]], cell=np.eye(3) * 20, pbc=True)
    g = atoms_to_graph(lone, model.cutoff, dtype=torch.float64)
    assert float(model.predict(g, "pbe")["energy"].detach()[0]) == pytest.approx(-1.9, abs=1e-6)
    assert float(model.predict(g, "r2scan")["energy"].detach()[0]) == pytest.approx(-2.4, abs=1e-6)
