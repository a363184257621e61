"""SevenNet-MF-0 imported into our model equals sevenn's own ASE calculator (external reference).

Real structures: Li-Ni-O from MP (.res dump, rattled so that forces are not ~0) and MPtrj frames. Our model
runs in float64, sevenn in its float32; tolerances of the issue: 1e-4 eV/atom, 1e-3 eV/A, 1e-3 GPa.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase.io import read
from ase.units import GPa

from pipeline.graphs import atoms_to_graph

sevenn_calculator = pytest.importorskip("sevenn.calculator", reason="sevenn not installed")

MODALS = {"PBE": "pbe", "R2SCAN": "r2scan"}


@pytest.fixture(scope="module")
def structures(mp_file):
    from pymatgen.io.ase import AseAtomsAdaptor

    from pipeline.sources.files.res import read_res_entries

    picked = []
    entries, _ = read_res_entries(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))
    by_size = [(len(e.structure), len(e.structure.composition.elements), e.entry_id, e.structure) for e in entries]
    by_size.sort(key=lambda t: (t[0], t[2]))
    binaries = [t for t in by_size if t[1] == 2 and t[0] >= 2][:1]
    ternaries = [t for t in by_size if t[1] == 3 and t[0] <= 12][:2]
    for k, (_, _, name, st) in enumerate(binaries + ternaries):
        atoms = AseAtomsAdaptor.get_atoms(st)
        atoms.rattle(0.05, seed=k)
        atoms.info["name"] = name
        picked.append(atoms)
    frames = read(mp_file("mattersim/mptrj-random-1k.xyz"), index=":4")
    for k in (0, 2):  # As4Na5 (9 atoms), La2P2Rh2 (6 atoms)
        atoms = frames[k].copy()
        atoms.info["name"] = frames[k].info.get("mptrj_snapshot_id", f"mptrj-{k}")
        picked.append(atoms)
    assert len(picked) == 5
    return picked


@pytest.fixture(scope="module")
def imported():
    from pipeline.model import import_sevenn

    return import_sevenn("7net-mf-0", dtype=torch.float64).eval()


def test_import_maps_config(imported):
    cfg = imported.config
    assert cfg.fidelities == ("r2scan", "pbe")
    assert (cfg.cutoff, cfg.channels, cfg.lmax, cfg.num_layers) == (5.0, 128, 2, 5)
    assert cfg.hidden_irreps == "128x0e+64x1e+32x2e" and cfg.cutoff_function == "xplor"
    assert len(cfg.elements) == 89
    from pipeline.model import preset

    mf0 = preset("sevennet-mf-0", elements=cfg.elements, fidelities=cfg.fidelities)
    assert mf0 == cfg  # the named preset IS the published architecture


@pytest.mark.parametrize("modal", list(MODALS))
def test_energy_forces_stress_equal_sevenn(structures, imported, modal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = sevenn_calculator.SevenNetCalculator("7net-mf-0", modal=modal, device="cpu")
    largest_force = 0.0
    for atoms in structures:
        a = atoms.copy()
        a.calc = calc
        e_ref, f_ref, s_ref = a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)
        graph = atoms_to_graph(atoms, imported.cutoff, dtype=torch.float64)
        out = {k: v.detach() for k, v in imported.predict(graph, MODALS[modal]).items()}
        n = len(atoms)
        name = atoms.info["name"]
        assert float(out["energy"][0]) / n == pytest.approx(e_ref / n, abs=1e-4), name
        assert np.abs(out["forces"].numpy() - f_ref).max() < 1e-3, name
        assert np.abs(out["stress"][0].numpy() - s_ref).max() / GPa < 1e-3, name
        largest_force = max(largest_force, float(np.abs(f_ref).max()))
    assert largest_force > 0.3  # a real force comparison, not 0 == 0


def test_single_fidelity_sevennet_0_import_equals_sevenn(structures):
    """The importer is not MF-0 specific: SevenNet-0 (one fidelity, config without conv_denominator)."""
    from pipeline.model import import_sevenn

    model = import_sevenn("7net-0", dtype=torch.float64, fidelity_name="pbe").eval()
    assert model.fidelities == ("pbe",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = sevenn_calculator.SevenNetCalculator("7net-0", device="cpu")
    atoms = structures[-1].copy()
    atoms.calc = calc
    out = {k: v.detach() for k, v in model.predict(atoms_to_graph(atoms, 5.0, dtype=torch.float64), "pbe").items()}
    n = len(atoms)
    assert float(out["energy"][0]) / n == pytest.approx(atoms.get_potential_energy() / n, abs=1e-4)
    assert np.abs(out["forces"].numpy() - atoms.get_forces()).max() < 1e-3
    assert np.abs(out["stress"][0].numpy() - atoms.get_stress(voigt=False)).max() / GPa < 1e-3
