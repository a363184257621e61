"""ASE calculator over the potential (pipeline/relax/calculator.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from pipeline.graphs import atoms_to_graph
from pipeline.model import ElementReferences, MFPotential, UnknownElementError, preset, save_checkpoint
from pipeline.relax.calculator import MFPotentialCalculator

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> MFPotential:
    torch.manual_seed(3)
    cfg = preset("small", elements=("Li", "Ni", "O"))
    refs = ElementReferences({"pbe": {"Li": -1.9, "Ni": -5.7, "O": -4.9}, "r2scan": {"Li": -2.3, "Ni": -8.1, "O": -6.2}})
    return MFPotential(cfg, refs).to(torch.float64).eval()


def lno() -> Atoms:
    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    atoms.symbols[0] = "Li"
    atoms.rattle(0.08, seed=2)
    return atoms


def test_results_equal_model(model):
    atoms = lno()
    atoms.calc = MFPotentialCalculator(model, fidelity="r2scan")
    out = model.predict(atoms_to_graph(atoms, model.cutoff, dtype=torch.float64), "r2scan")
    assert atoms.get_potential_energy() == pytest.approx(float(out["energy"].detach()[0]), abs=1e-10)
    assert atoms.get_potential_energy() == atoms.get_potential_energy(force_consistent=True)
    np.testing.assert_allclose(atoms.get_forces(), out["forces"].detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), out["stress"][0].detach().numpy(), atol=1e-10)
    assert atoms.get_stress().shape == (6,)


def test_short_relaxation_with_cell_filter(model):
    atoms = lno()
    atoms.calc = MFPotentialCalculator(model, fidelity="pbe")
    e0 = atoms.get_potential_energy()
    cell0, pos0 = atoms.cell.array.copy(), atoms.positions.copy()
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    opt.run(fmax=1e-3, steps=8)
    # an untrained model has no physical minimum nearby: check that cell and atoms moved downhill
    assert opt.nsteps == 8 and atoms.get_potential_energy() < e0 - 1e-3
    assert np.abs(atoms.cell.array - cell0).max() > 1e-4 and np.abs(atoms.positions - pos0).max() > 1e-3


def test_errors_are_clear(model, tmp_path):
    with pytest.raises(KeyError, match="this model knows: pbe, r2scan"):
        MFPotentialCalculator(model, fidelity="hse06")
    with pytest.raises(ValueError, match="fidelity is required"):
        MFPotentialCalculator(model, fidelity=None)  # type: ignore[arg-type]
    atoms = Atoms("LiCo", positions=[[0, 0, 0], [1.4, 1.4, 1.4]], cell=np.eye(3) * 2.8, pbc=True)
    atoms.calc = MFPotentialCalculator(model, fidelity="pbe")
    with pytest.raises(UnknownElementError, match="Co"):
        atoms.get_potential_energy()
    mol = Atoms("LiO", positions=[[0, 0, 0], [1.7, 0, 0]])
    mol.calc = MFPotentialCalculator(model, fidelity="pbe")
    assert np.isfinite(mol.get_potential_energy()) and mol.get_forces().shape == (2, 3)
    with pytest.raises(PropertyNotImplementedError):
        mol.get_stress()


def test_from_checkpoint(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.pt")
    calc = MFPotentialCalculator.from_checkpoint(path, fidelity="r2scan")
    atoms = lno()
    atoms.calc = calc
    ref = lno()
    ref.calc = MFPotentialCalculator(model, fidelity="r2scan")
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)


def test_mf0_relaxes_silicon_to_its_lattice_constant():
    """Imported SevenNet-MF-0 (r2SCAN head) relaxes a strained, rattled Si cell to a ~ 5.44 A."""
    pytest.importorskip("sevenn")
    from pipeline.model import import_sevenn

    atoms = bulk("Si", "diamond", a=5.6)
    atoms.rattle(0.05, seed=0)
    atoms.calc = MFPotentialCalculator(import_sevenn(), fidelity="r2scan")
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.01, steps=60)
    a_conv = atoms.cell.lengths().mean() * np.sqrt(2)
    assert a_conv == pytest.approx(5.44, abs=0.03)
    assert np.abs(atoms.get_forces()).max() < 0.01
