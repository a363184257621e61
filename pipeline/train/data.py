"""Training data: frames (FRAMES_SCHEMA rows) -> per-frame graphs and masked labels, collated into batches.

Graphs (neighbour lists) are built once per frame and re-batched every epoch. Labels that a frame lacks, or
that the label policy switches off for its fidelity (e.g. energies only at the high fidelity, as in Messerly et
al., arXiv 2505.01590), are masked out of the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.graphs import Graph, batch_graphs, frame_rows_to_graph
from pipeline.hashing import structure_hash

LABELS = ("energy", "forces", "stress")


@dataclass
class Labels:
    """Per-structure energy (B,) eV and stress (B, 3, 3) eV/A^3, per-atom forces (N, 3) eV/A, with masks."""

    energy: torch.Tensor
    has_energy: torch.Tensor
    forces: torch.Tensor
    has_forces: torch.Tensor  # (N,) per atom
    stress: torch.Tensor
    has_stress: torch.Tensor
    n_atoms: torch.Tensor
    fidelity: torch.Tensor
    #: paired-gap labels (:class:`FrameData` ``gap_pairs``): energy of this frame minus that of the same structure
    #: at ``gap_fidelity`` (B,) eV, where ``has_gap``; None when no pairs were asked for
    gap: torch.Tensor | None = None
    has_gap: torch.Tensor | None = None
    gap_fidelity: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Labels:
        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Labels(**{k: conv(v) for k, v in self.__dict__.items()})


def label_policy_mask(fidelity: str, policy: Mapping[str, Sequence[str]] | None, label: str) -> bool:
    """Whether ``label`` of a frame at ``fidelity`` is used (no policy or fidelity not listed: all labels)."""
    if not policy or fidelity not in policy:
        return True
    return label in policy[fidelity]


class FrameData:
    """Frames prepared for training a model with the given cutoff and fidelity order.

    ``gap_pairs`` ({high: low} fidelity names): every frame of ``high`` whose structure (:func:`structure_hash`)
    also has a ``low`` frame with an energy gets a paired-gap label, its energy minus the low frame's, for the
    trainer's ``gap_weight`` loss term."""

    def __init__(
        self,
        frames: pa.Table,
        cutoff: float,
        fidelities: Sequence[str],
        label_policy: Mapping[str, Sequence[str]] | None = None,
        gap_pairs: Mapping[str, str] | None = None,
    ) -> None:
        rows = frames.to_pylist()
        if not rows:
            raise ValueError("no frames to train on")
        unknown = {lab for labs in (label_policy or {}).values() for lab in labs} - set(LABELS)
        if unknown:
            raise ValueError(f"unknown labels in label policy: {sorted(unknown)}; known: {list(LABELS)}")
        self.frame_ids = [r["frame_id"] for r in rows]
        self.structure_keys = [structure_hash(r["numbers"], r["positions"], r["cell"], r["pbc"]) for r in rows]
        self.groups = structure_groups(self.structure_keys, [r.get("material_id") for r in rows])
        self.fidelity_names = [r["fidelity"] for r in rows]
        self.numbers = [r["numbers"] for r in rows]
        self.graphs: list[Graph] = [frame_rows_to_graph([r], cutoff, fidelities, torch.float64) for r in rows]
        self.energy, self.has_energy, self.stress, self.has_stress = [], [], [], []
        self.forces: list[np.ndarray] = []
        self.has_forces: list[bool] = []
        for r in rows:
            fid, n = r["fidelity"], len(r["numbers"])
            use_e = bool(r["has_energy"]) and label_policy_mask(fid, label_policy, "energy")
            use_f = bool(r["has_forces"]) and label_policy_mask(fid, label_policy, "forces")
            use_s = bool(r["has_stress"]) and label_policy_mask(fid, label_policy, "stress")
            self.energy.append(float(r["energy"]) if use_e else 0.0)
            self.has_energy.append(use_e)
            self.forces.append(np.asarray(r["forces"], dtype=float) if use_f else np.zeros((n, 3)))
            self.has_forces.append(use_f)
            self.stress.append(np.asarray(r["stress"], dtype=float) if use_s else np.zeros((3, 3)))
            self.has_stress.append(use_s)
        self.gap_pairs = dict(gap_pairs or {})
        self.gap: list[float] = [0.0] * len(rows)
        self.has_gap: list[bool] = [False] * len(rows)
        self.gap_fidelity: list[int] = [0] * len(rows)
        names = [str(f).lower() for f in fidelities]
        for high, low in self.gap_pairs.items():
            if high not in names or low not in names:
                raise ValueError(f"gap pair {high}={low}: both fidelities must be in the model ({', '.join(names)})")
            lows: dict[str, float] = {}
            for i, (key, fid) in enumerate(zip(self.structure_keys, self.fidelity_names)):
                if fid == low and self.has_energy[i]:
                    lows.setdefault(key, self.energy[i])
            for i, (key, fid) in enumerate(zip(self.structure_keys, self.fidelity_names)):
                if fid == high and self.has_energy[i] and key in lows:
                    self.gap[i], self.has_gap[i] = self.energy[i] - lows[key], True
                    self.gap_fidelity[i] = names.index(low)

    def __len__(self) -> int:
        return len(self.graphs)

    def avg_num_neighbors(self, indices: Sequence[int] | None = None) -> float:
        """Mean number of neighbours per atom over the given frames (SevenNet/NequIP normalisation)."""
        idx = range(len(self)) if indices is None else indices
        edges = sum(self.graphs[i].num_edges for i in idx)
        atoms = sum(self.graphs[i].num_atoms for i in idx)
        return max(edges / max(atoms, 1), 1.0)

    def batch(self, indices: Sequence[int]) -> tuple[Graph, Labels]:
        """Collated graph + labels of the given frames (float64; move with ``.to``)."""
        graph = batch_graphs([self.graphs[i] for i in indices])
        n_atoms = torch.tensor([self.graphs[i].num_atoms for i in indices])
        has_f_atoms = torch.repeat_interleave(torch.tensor([self.has_forces[i] for i in indices]), n_atoms)
        labels = Labels(
            energy=torch.tensor([self.energy[i] for i in indices], dtype=torch.float64),
            has_energy=torch.tensor([self.has_energy[i] for i in indices]),
            forces=torch.from_numpy(np.concatenate([self.forces[i] for i in indices])),
            has_forces=has_f_atoms,
            stress=torch.from_numpy(np.stack([self.stress[i] for i in indices])),
            has_stress=torch.tensor([self.has_stress[i] for i in indices]),
            n_atoms=n_atoms,
            fidelity=graph.fidelity.clone(),
        )
        if self.gap_pairs:
            labels.gap = torch.tensor([self.gap[i] for i in indices], dtype=torch.float64)
            labels.has_gap = torch.tensor([self.has_gap[i] for i in indices])
            labels.gap_fidelity = torch.tensor([self.gap_fidelity[i] for i in indices])
        return graph, labels


def apply_label_policy(frames: pa.Table, policy: Mapping[str, Sequence[str]] | None) -> pa.Table:
    """``frames`` with ``has_energy`` / ``has_forces`` / ``has_stress`` switched off where the policy drops the
    label for the frame's fidelity (so that reference fits and training see the same labels)."""
    if not policy:
        return frames
    fids = frames.column("fidelity").to_pylist()
    for label in LABELS:
        col = f"has_{label}"
        keep = [bool(h) and label_policy_mask(f, policy, label) for h, f in zip(frames.column(col).to_pylist(), fids)]
        frames = frames.set_column(frames.schema.get_field_index(col), col, pa.array(keep, pa.bool_()))
    return frames


def borrow_forces(frames: pa.Table, pairs: Mapping[str, str] | None) -> pa.Table:
    """``frames`` plus, for every ``{high: low}`` pair, a force-only ``high`` copy of each ``low`` frame with
    forces whose structure (:func:`structure_hash`) has no ``high`` frame: the high fidelity is trained on the low
    fidelity's forces wherever it has no forces of its own (energy and stress stay unlabelled).

    Why: Messerly et al. (arXiv 2505.01590) find low-level forces + high-level energies enough for a high-level
    potential; with a few high-fidelity structures the high fidelity's conditioned weights otherwise see forces of
    those few only, and its forces on new structures fall behind a low-fidelity model's. No library offers it
    (MACE / SevenNet-MF take each frame's labels as they are). The copies share their structure's hash, so a
    split keeps them on their structure's side; their ``frame_id`` is ``<low frame_id>-forces-as-<high>``."""
    if not pairs:
        return frames
    rows = frames.to_pylist()
    keys = [structure_hash(r["numbers"], r["positions"], r["cell"], r["pbc"]) for r in rows]
    have_fids = {r["fidelity"] for r in rows}
    out = []
    for high, low in pairs.items():
        if high not in have_fids or low not in have_fids:
            raise ValueError(f"borrow forces {high}={low}: no frames of {high if high not in have_fids else low!r} "
                             f"(have {sorted(have_fids)})")
        covered = {k for k, r in zip(keys, rows) if r["fidelity"] == high}
        for key, r in zip(keys, rows):
            if r["fidelity"] == low and r["has_forces"] and key not in covered:
                covered.add(key)
                out.append(dict(r, fidelity=high, frame_id=_borrowed_id(r["frame_id"], high), has_energy=False,
                                energy=None, has_stress=False, stress=None))
    if not out:
        return frames
    return pa.concat_tables([frames, pa.Table.from_pylist(out, schema=frames.schema)])


def _borrowed_id(frame_id: str, fidelity: str) -> str:
    return f"{frame_id}-forces-as-{fidelity}"


def is_borrowed(frame_id: str, fidelity: str) -> bool:
    """Whether a frame of ``fidelity`` is a :func:`borrow_forces` copy (its labels are another fidelity's)."""
    return frame_id.endswith(_borrowed_id("", fidelity))


def structure_groups(structure_keys: Sequence[str], material_ids: Sequence[str | None]) -> list[str]:
    """Group label per frame: frames sharing a structure (any fidelity) or a material id are one group
    (union-find over both), so a split never puts the PBE and r2SCAN copies of one structure, or two
    structures of one material, on different sides, with or without ``material_id``."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for key, mid in zip(structure_keys, material_ids):
        a = find("s:" + key)
        if mid:
            b = find("m:" + str(mid))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find("s:" + key) for key in structure_keys]


def split_by_group(groups: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train/validation indices with whole groups (materials) on one side, so variants of one material never
    leak across; deterministic for a seed."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    unique = sorted(set(groups))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    n_val = round(val_fraction * len(unique))
    if val_fraction > 0 and n_val == 0 and len(unique) > 1:
        n_val = 1
    val_groups = {unique[k] for k in order[:n_val]}
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    val = [i for i, g in enumerate(groups) if g in val_groups]
    return train, val
