"""Masked multi-task loss: energy per atom, forces, stress; labels a frame lacks do not count.

Each term is a mean over the labelled items of the squared error (``mse``) or of torch's Huber loss
(``huber``, quadratic below ``delta`` and linear above, robust to a few bad labels, as MACE/SevenNet offer),
optionally weighted per item by its fidelity's weight (``fidelity_weights``, e.g. to up-weight scarce r2SCAN)."""

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


LOSS_KINDS = ("mse", "huber")


def _masked(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None,
            kind: str, delta: float) -> tuple[torch.Tensor, int]:
    n = int(mask.sum())
    if n == 0:
        return pred.sum() * 0.0, 0
    if kind == "huber":
        err = torch.nn.functional.huber_loss(pred[mask], target[mask], reduction="none", delta=delta)
    else:
        err = (pred[mask] - target[mask]) ** 2
    if weight is None:
        return err.mean(), n
    w = weight[mask].to(err.dtype)
    w = w.reshape(w.shape + (1,) * (err.dim() - w.dim()))
    return (err * w).sum() / (w.expand_as(err).sum()).clamp_min(1e-12), n


def loss_terms(out: dict[str, torch.Tensor], labels: Labels, *, kind: str = "mse", delta: float = 0.01,
               fidelity_weights: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-term (loss, count): energy per atom, force components, stress components in GPa.

    ``fidelity_weights``: (n_fidelities,) weight of each fidelity's items (None: all 1)."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {LOSS_KINDS}, got {kind!r}")
    n = labels.n_atoms.to(out["energy"].dtype)
    w_frame = w_atom = None
    if fidelity_weights is not None:
        w_frame = fidelity_weights[labels.fidelity]
        w_atom = torch.repeat_interleave(w_frame, labels.n_atoms)
    terms = {"energy": _masked(out["energy"] / n, labels.energy / n, labels.has_energy, w_frame, kind, delta)}
    if "forces" in out:
        terms["forces"] = _masked(out["forces"], labels.forces, labels.has_forces, w_atom, kind, delta)
    if "stress" in out:
        mask = labels.has_stress & torch.isfinite(out["stress"]).all(dim=(1, 2))
        terms["stress"] = _masked(out["stress"] / GPa, labels.stress / GPa, mask, w_frame, kind, delta)
    return terms


def total_loss(terms: dict[str, tuple[torch.Tensor, int]], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, k) * v for k, (v, _) in terms.items())


def gap_loss(energy: torch.Tensor, energy_other: torch.Tensor, labels: Labels, *, kind: str = "mse",
             delta: float = 0.01) -> tuple[torch.Tensor, int]:
    """Paired-gap term: the predicted energy difference between a frame's fidelity and its paired fidelity on
    the same structure (``energy - energy_other``, per atom) against the labelled difference (``labels.gap``),
    over the frames with ``labels.has_gap``.

    Why: with a few high-fidelity structures the joint model's high-fidelity energy error is dominated by the
    absolute energy of each structure, which the plentiful low fidelity already pins down; the difference of two
    labels of one structure is the small, smooth signal a Delta model learns from. This term gives the joint model
    the same target without a second model (no library offers it: SevenNet-MF and MACE fit each fidelity's
    energies on their own)."""
    if labels.gap is None or labels.has_gap is None:
        return energy.sum() * 0.0, 0
    n = labels.n_atoms.to(energy.dtype)
    return _masked((energy - energy_other) / n, labels.gap / n, labels.has_gap, None, kind, delta)
