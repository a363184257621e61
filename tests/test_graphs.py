"""Neighbour lists and batched graphs (pipeline/graphs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import primitive_neighbor_list

from pipeline.frames import frame_row
from pipeline.graphs import atoms_to_graph, batch_graphs, fidelity_index, frame_rows_to_graph, neighbor_list


def _pairs(i, j, s):
    return sorted(zip(i.tolist(), j.tolist(), map(tuple, np.asarray(s).tolist())))


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False), (False, False, False)])
def test_neighbor_list_matches_ase(pbc):
    atoms = bulk("NaCl", "rocksalt", a=5.6) * (2, 2, 1)
    atoms.rattle(0.1, seed=3)
    atoms.pbc = pbc
    i, j, s = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 4.5)
    ri, rj, rs = primitive_neighbor_list("ijS", atoms.pbc, atoms.cell.array, atoms.positions, 4.5)
    assert len(i) > 0
    assert _pairs(i, j, s) == _pairs(ri, rj, rs)


def test_single_atom_cell_has_self_images():
    atoms = bulk("Cu", "fcc", a=3.6)
    i, j, s = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 3.0)
    assert len(i) == 12 and np.all(i == 0) and np.all(j == 0) and np.all(np.abs(s).sum(axis=1) > 0)


def test_graph_edge_vectors_and_batch():
    a = bulk("Si", "diamond", a=5.43)
    b = molecule("H2O")
    b.center(vacuum=4.0)
    b.pbc = False
    g = atoms_to_graph([a, b], cutoff=3.0, fidelity=[0, 1], dtype=torch.float64)
    assert g.num_graphs == 2 and g.num_atoms == 5
    assert g.batch.tolist() == [0, 0, 1, 1, 1]
    c, n = g.edge_index
    vec = g.positions[n] - g.positions[c] + torch.einsum("ei,eij->ej", g.edge_shift, g.cell[g.batch[c]])
    r = vec.norm(dim=1)
    assert torch.all((r > 0) & (r < 3.0))
    assert torch.all(g.batch[c] == g.batch[n])  # no edge crosses structures
    vol = g.volume()
    assert vol[0] == pytest.approx(a.get_volume()) and vol[1] == 0.0
    # the batch of two single graphs equals the graph of both
    g2 = batch_graphs([atoms_to_graph(a, 3.0, 0, torch.float64), atoms_to_graph(b, 3.0, 1, torch.float64)])
    assert torch.equal(g2.edge_index, g.edge_index) and torch.equal(g2.fidelity, g.fidelity)


def test_frame_rows_and_fidelity_errors():
    a = bulk("Si", "diamond", a=5.43)
    rows = [
        frame_row(frame_id=f"t:{k}", source="test", fidelity=fid, numbers=a.numbers, positions=a.positions,
                  cell=a.cell.array, energy=-10.0)
        for k, fid in enumerate(["pbe", "r2scan"])
    ]
    g = frame_rows_to_graph(rows, 4.0, fidelities=["r2scan", "pbe"])
    assert g.fidelity.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"frame 't:0'.*unknown fidelity 'pbe'.*r2scan"):
        frame_rows_to_graph(rows, 4.0, fidelities=["r2scan"])
    with pytest.raises(KeyError, match="knows: pbe, r2scan"):
        fidelity_index("scan", ["pbe", "r2scan"])


def test_bad_structure_is_named():
    bad = Atoms("H2", positions=[[0, 0, 0], [np.nan, 0, 0]], cell=np.eye(3) * 5, pbc=True)
    with pytest.raises(ValueError, match=r"structure 1 \(H2\).*NaN"):
        atoms_to_graph([bulk("Si"), bad], 4.0)


def test_avg_num_neighbors():
    g = atoms_to_graph(bulk("Cu", "fcc", a=3.6) * (2, 2, 2), cutoff=3.0)  # 12 nearest neighbours at 2.55 A
    assert g.avg_num_neighbors() == pytest.approx(12.0)
