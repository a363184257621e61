"""The potential: symmetries, finite differences, edge cases, fidelities, references, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, make_supercell
from e3nn import o3

from pipeline.graphs import atoms_to_graph, batch_graphs
from pipeline.model import (
    ElementReferences,
    MFPotential,
    UnknownElementError,
    load_checkpoint,
    preset,
    save_checkpoint,
)
from pipeline.model.checkpoint import CHECKPOINT_VERSION

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> MFPotential:
    torch.manual_seed(0)
    cfg = preset("small", elements=("Li", "Ni", "O"), fidelities=("pbe", "r2scan"), lmax=2)
    refs = ElementReferences(
        {"pbe": {"Li": -1.9, "Ni": -5.7, "O": -4.9}, "r2scan": {"Li": -2.3, "Ni": -8.1, "O": -6.2}},
        {"pbe": 0.8, "r2scan": 1.1},
    )
    m = MFPotential(cfg, refs).to(torch.float64)
    with torch.no_grad():  # make the per-fidelity linear weights visibly different from zero
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def lno(rattle: float = 0.05, seed: int = 1) -> Atoms:
    atoms = bulk("NiO", "rocksalt", a=4.17, cubic=True)
    atoms.symbols[0] = "Li"
    atoms.rattle(rattle, seed=seed)
    return atoms


def run(model: MFPotential, atoms, fidelity: int | list[int] = 0) -> dict[str, torch.Tensor]:
    g = atoms_to_graph(atoms, model.cutoff, fidelity=fidelity, dtype=torch.float64)
    return {k: v.detach() for k, v in model(g).items()}


def test_outputs_shapes_and_sum(model):
    atoms = lno()
    out = run(model, atoms)
    assert out["energy"].shape == (1,) and out["forces"].shape == (8, 3) and out["stress"].shape == (1, 3, 3)
    assert out["energy"][0] == pytest.approx(float(out["atomic_energies"].sum()), abs=1e-10)
    assert torch.allclose(out["stress"][0], out["stress"][0].T, atol=1e-10)
    assert out["forces"].abs().max() > 1e-3  # not trivially zero


def test_rotation_translation_invariance(model):
    atoms = lno()
    ref = run(model, atoms)
    torch.manual_seed(5)
    for _ in range(3):
        rot = o3.rand_matrix().double().numpy()
        moved = atoms.copy()
        moved.set_cell(atoms.cell.array @ rot.T, scale_atoms=False)
        moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.7, 2.2])
        out = run(model, moved)
        assert out["energy"][0] == pytest.approx(float(ref["energy"][0]), abs=1e-7)
        assert torch.allclose(out["forces"], ref["forces"] @ torch.from_numpy(rot).T, atol=1e-9)
        r = torch.from_numpy(rot)
        assert torch.allclose(out["stress"][0], r @ ref["stress"][0] @ r.T, atol=1e-9)


def test_permutation_invariance(model):
    atoms = lno()
    perm = np.random.default_rng(0).permutation(len(atoms))
    out = run(model, atoms[perm])
    ref = run(model, atoms)
    assert out["energy"][0] == pytest.approx(float(ref["energy"][0]), abs=1e-7)
    assert torch.allclose(out["forces"], ref["forces"][perm], atol=1e-9)


def test_cell_choice_and_supercell(model):
    atoms = lno()
    ref = run(model, atoms)
    # another basis of the same lattice (unimodular integer matrix) with positions wrapped into it
    other = make_supercell(atoms, [[1, 1, 0], [0, 1, 0], [0, 1, 1]], wrap=True)
    assert len(other) == len(atoms)
    out = run(model, other)
    assert out["energy"][0] == pytest.approx(float(ref["energy"][0]), abs=1e-7)
    assert torch.allclose(out["stress"], ref["stress"], atol=1e-9)
    sup = atoms * (2, 1, 2)
    out = run(model, sup)
    assert out["energy"][0] == pytest.approx(4 * float(ref["energy"][0]), abs=1e-8)
    assert torch.allclose(out["forces"][: len(atoms)], ref["forces"], atol=1e-9)
    assert torch.allclose(out["stress"], ref["stress"], atol=1e-9)


def _energy(model, atoms, fidelity=0) -> float:
    return float(run(model, atoms, fidelity)["energy"][0])


def test_forces_match_finite_differences(model):
    atoms = lno(0.1)
    forces = run(model, atoms)["forces"].numpy()
    h = 1e-4
    for a, k in [(0, 0), (3, 1), (6, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, k] += h
        minus.positions[a, k] -= h
        fd = -(_energy(model, plus) - _energy(model, minus)) / (2 * h)
        assert forces[a, k] == pytest.approx(fd, abs=1e-6)


def test_stress_matches_finite_differences(model):
    atoms = lno(0.1)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0], [0, 0.98, 0.02], [0, 0, 1.01]]), scale_atoms=True)
    stress = run(model, atoms, 1)["stress"][0].numpy()
    vol = atoms.get_volume()
    h = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        eps = np.zeros((3, 3))
        eps[i, j] = eps[j, i] = h / (2 if i != j else 1)
        energies = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
            energies.append(_energy(model, strained, 1))
        fd = (energies[0] - energies[1]) / (2 * h) / vol
        # with eps_ij = eps_ji = h/2 the derivative is the symmetric stress component itself
        assert stress[i, j] == pytest.approx(fd, abs=1e-7)


def test_isolated_atom_single_atom_cell_and_molecule(model):
    far = Atoms("LiO2", positions=[[0, 0, 0], [1.2, 0, 0], [8, 8, 8]], cell=np.eye(3) * 16, pbc=True)
    out = run(model, far)
    assert torch.isfinite(out["energy"]).all()
    assert torch.allclose(out["forces"][2], torch.zeros(3, dtype=torch.float64))
    single = Atoms("Ni", positions=[[0, 0, 0]], cell=[[0, 1.76, 1.76], [1.76, 0, 1.76], [1.76, 1.76, 0]], pbc=True)
    out = run(model, single)
    assert torch.isfinite(out["energy"]).all() and torch.allclose(out["forces"], torch.zeros(1, 3, dtype=torch.float64))
    ref = run(model, single * (2, 2, 2))
    assert float(ref["energy"][0]) == pytest.approx(8 * float(out["energy"][0]), abs=1e-8)
    lone = Atoms("Li", positions=[[0, 0, 0]], cell=np.eye(3) * 20, pbc=True)  # a graph without any edge
    out = run(model, lone)
    assert torch.isfinite(out["energy"]).all() and torch.count_nonzero(out["forces"]) == 0
    assert torch.count_nonzero(out["stress"]) == 0
    mol = Atoms("LiO", positions=[[0, 0, 0], [1.6, 0, 0]], pbc=False)
    out = run(model, mol)
    assert torch.isnan(out["stress"]).all()  # no volume: no stress
    assert torch.allclose(out["forces"].sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-10)


def test_large_cell_and_mixed_batch(model):
    big = lno(0.05) * (4, 4, 4)  # 512 atoms
    assert len(big) > 500
    small = lno(0.05, seed=7)
    single = Atoms("Ni", positions=[[0, 0, 0]], cell=np.eye(3) * 2.5, pbc=True)
    items, fids = [small, big, single], [0, 1, 1]
    batch = run(model, items, fids)
    nat = [len(a) for a in items]
    starts = np.concatenate([[0], np.cumsum(nat)])
    for k, (a, f) in enumerate(zip(items, fids)):
        alone = run(model, a, f)
        assert float(batch["energy"][k]) == pytest.approx(float(alone["energy"][0]), abs=1e-8)
        assert torch.allclose(batch["forces"][starts[k]:starts[k + 1]], alone["forces"], atol=1e-9)
        assert torch.allclose(batch["stress"][k], alone["stress"][0], atol=1e-10)
    # the same batch assembled from separately built graphs
    graphs = [atoms_to_graph(a, model.cutoff, f, torch.float64) for a, f in zip(items, fids)]
    again = model(batch_graphs(graphs))
    assert torch.allclose(again["energy"].detach(), batch["energy"], atol=1e-10)


def test_fidelity_is_explicit_and_conditions_the_output(model):
    atoms = lno()
    g = atoms_to_graph(atoms, model.cutoff, dtype=torch.float64)  # fidelity not set
    with pytest.raises(KeyError, match="0=pbe, 1=r2scan"):
        model(g)
    with pytest.raises(KeyError, match="unknown fidelity 'scan'; this model knows: pbe, r2scan"):
        model.predict(g, "scan")
    e_pbe = float(model.predict(g, "pbe")["energy"].detach()[0])
    e_r2 = float(model.predict(g, "R2SCAN")["energy"].detach()[0])
    assert abs(e_pbe - e_r2) > 1.0  # the references differ by eV/atom


def test_unknown_element_is_named(model):
    atoms = Atoms("LiFe", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=np.eye(3) * 3, pbc=True)
    with pytest.raises(UnknownElementError, match="Fe.*knows 3 elements: Li, Ni, O"):
        run(model, atoms)


def test_float32_default_and_float64_agree():
    torch.manual_seed(1)
    cfg = preset("small", elements=("Li", "Ni", "O"))
    m32 = MFPotential(cfg).eval()
    assert next(m32.parameters()).dtype == torch.float32
    atoms = lno()
    g = atoms_to_graph(atoms, cfg.cutoff, fidelity=0)
    e32 = m32(g)["energy"].detach()
    m64 = MFPotential(cfg).eval()
    m64.load_state_dict(m32.state_dict())
    m64 = m64.to(torch.float64)
    e64 = m64(g)["energy"].detach()
    assert e32.dtype == torch.float32 and e64.dtype == torch.float64
    assert float(e32[0]) == pytest.approx(float(e64[0]), abs=1e-4)


def test_training_mode_keeps_graph_for_force_loss(model):
    model.train()
    try:
        out = model(atoms_to_graph(lno(), model.cutoff, 0, torch.float64))
        loss = out["forces"].pow(2).sum() + out["stress"].pow(2).sum()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_checkpoint_round_trip(model, tmp_path):
    path = save_checkpoint(model, tmp_path / "m.pt", extra={"epoch": 3})
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == CHECKPOINT_VERSION and raw["fidelities"] == ["pbe", "r2scan"]
    assert raw["references"]["energies"]["r2scan"]["Ni"] == pytest.approx(-8.1)
    loaded = load_checkpoint(path)
    atoms = lno()
    a, b = run(model, atoms, 1), run(loaded, atoms, 1)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    raw["version"] = CHECKPOINT_VERSION + 1
    torch.save(raw, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="newer than supported"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mfhull potential checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_config_validation_and_presets():
    mf0 = preset("sevennet-mf-0")
    assert (mf0.cutoff, mf0.channels, mf0.lmax, mf0.num_layers) == (5.0, 128, 2, 5)
    bench = preset("mf-bench")
    assert (bench.channels, bench.lmax, bench.num_layers) == (32, 2, 3)
    with pytest.raises(KeyError, match="known: small, mf-bench, sevennet-mf-0"):
        preset("huge")
    with pytest.raises(ValueError, match="cutoff_on"):
        preset("sevennet-mf-0", cutoff_on=6.0)
    cfg = preset("small", elements=("O", "Li"))
    assert cfg.elements == (8, 3) and type(cfg).from_dict(cfg.to_dict()) == cfg


def test_edge_chunked_evaluation_equals_plain(model, monkeypatch):
    from pipeline.model.layers import Convolution

    atoms = lno(0.05) * (2, 2, 1)
    g = atoms_to_graph(atoms, model.cutoff, 1, torch.float64)
    plain = {k: v.detach() for k, v in model(g).items()}
    monkeypatch.setattr(Convolution, "edge_chunk", 37)  # many uneven chunks
    assert g.num_edges > 2 * 37
    chunked = {k: v.detach() for k, v in model(g).items()}
    # edges in any order (not grouped by center) give the same result too
    from dataclasses import replace

    perm = torch.randperm(g.num_edges, generator=torch.Generator().manual_seed(0))
    shuffled = replace(g, edge_index=g.edge_index[:, perm], edge_shift=g.edge_shift[perm])
    unsorted = {k: v.detach() for k, v in model(shuffled).items()}
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(plain[key], chunked[key], atol=1e-10)
        assert torch.allclose(plain[key], unsorted[key], atol=1e-10)


def test_o3_model_is_invariant_under_reflections():
    """parity=True builds an O(3) model (energy invariant under mirrors too); SevenNet-MF-0 is SO(3)."""
    torch.manual_seed(2)
    cfg = preset("small", elements=("Li", "Ni", "O"), parity=True, lmax=2)
    m = MFPotential(cfg).to(torch.float64).eval()
    assert "1o" in cfg.node_irreps and "1e" in cfg.node_irreps
    atoms = lno(0.1)
    ref = run(m, atoms)
    mirror = np.diag([1.0, -1.0, 1.0]) @ o3.rand_matrix().double().numpy()
    moved = atoms.copy()
    moved.set_cell(atoms.cell.array @ mirror.T, scale_atoms=False)
    moved.positions = atoms.positions @ mirror.T
    out = run(m, moved)
    assert out["energy"][0] == pytest.approx(float(ref["energy"][0]), abs=1e-7)
    assert torch.allclose(out["forces"], ref["forces"] @ torch.from_numpy(mirror).T, atol=1e-9)
