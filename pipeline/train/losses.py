"""Masked multi-task loss: energy per atom, forces, stress; labels a frame lacks do not count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ase.units import GPa

from pipeline.train.data import Labels


@dataclass(frozen=True)
class LossWeights:
    """Weights of the mean squared errors: energy per atom (eV/atom), forces (eV/A), stress (GPa)."""

    energy: float = 1.0
    forces: float = 1.0
    stress: float = 0.01


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = int(mask.sum())
    if n == 0:
        return pred.sum() * 0.0, 0
    diff = (pred[mask] - target[mask]) ** 2
    return diff.mean(), n


def loss_terms(out: dict[str, torch.Tensor], labels: Labels) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-term (mse, count): energy per atom, force components, stress components in GPa."""
    n = labels.n_atoms.to(out["energy"].dtype)
    terms = {"energy": _masked_mse(out["energy"] / n, labels.energy / n, labels.has_energy)}
    if "forces" in out:
        terms["forces"] = _masked_mse(out["forces"], labels.forces, labels.has_forces)
    if "stress" in out:
        mask = labels.has_stress & torch.isfinite(out["stress"]).all(dim=(1, 2))
        terms["stress"] = _masked_mse(out["stress"] / GPa, labels.stress / GPa, mask)
    return terms


def total_loss(terms: dict[str, tuple[torch.Tensor, int]], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, k) * v for k, (v, _) in terms.items())
