"""A sum of potentials, each evaluated at its own fidelity, seen as one potential with one fidelity.

This is how the ``delta`` strategy predicts (a low-fidelity model + a model of high - low, Delta-learning): the
two networks are trained apart, so no single :class:`~pipeline.model.potential.MFPotential` holds them, yet a user
must be able to evaluate, relax and screen with the result. :class:`SumPotential` offers the parts of the
``MFPotential`` interface that evaluation, relaxation and screening use (``fidelities``, ``cutoff``, ``elements``,
``fidelity_index``, ``species_index``, ``predict``, ``forward``); energies, forces, stresses and atomic energies
are the terms' sums, so forces stay the exact gradient of the summed energy.

Its checkpoint (:func:`sum_checkpoint_dict`, format ``mfhull-sum``) embeds each term's full ``mfhull-potential``
checkpoint, so the file stands alone; :func:`pipeline.model.checkpoint.load_checkpoint` reads both formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from pipeline.graphs import Graph, fidelity_index
from pipeline.model.potential import MFPotential

__all__ = ["SUM_FORMAT", "SumPotential", "sum_checkpoint_dict"]

SUM_FORMAT = "mfhull-sum"


class SumPotential(nn.Module):
    """``terms``: (potential, fidelity) pairs summed at prediction time, exposed as the single fidelity ``name``.

    Every term must use the same cutoff (one neighbour list serves them all) and know the fidelity it is paired
    with; the elements are those every term knows."""

    def __init__(self, terms: Sequence[tuple[MFPotential, str]], name: str) -> None:
        super().__init__()
        if not terms:
            raise ValueError("SumPotential needs at least one (potential, fidelity) term")
        cutoffs = {float(m.cutoff) for m, _ in terms}
        if len(cutoffs) != 1:
            raise ValueError(f"SumPotential: the terms' cutoffs differ ({sorted(cutoffs)}); one neighbour list "
                             "must serve every term")
        for m, fid in terms:
            m.fidelity_index(fid)  # KeyError naming the known fidelities
        self.models = nn.ModuleList([m for m, _ in terms])
        self.term_fidelities = tuple(str(f).strip().lower() for _, f in terms)
        self.name = str(name).strip().lower()

    # --- the MFPotential interface that evaluation, relaxation and screening use -------------------------------
    @property
    def fidelities(self) -> tuple[str, ...]:
        return (self.name,)

    @property
    def cutoff(self) -> float:
        return float(self.models[0].cutoff)

    @property
    def elements(self) -> tuple[int, ...]:
        known = set(self.models[0].elements)
        for m in self.models[1:]:
            known &= set(m.elements)
        return tuple(z for z in self.models[0].elements if z in known)

    @property
    def shift(self) -> torch.Tensor:
        """The first term's shift table: callers read its dtype and device."""
        return self.models[0].shift

    def fidelity_index(self, fidelity: str) -> int:
        return fidelity_index(fidelity, self.fidelities)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Each term's species index check (UnknownElementError naming the element a term lacks)."""
        for m in self.models[1:]:
            m.species_index(numbers)
        return self.models[0].species_index(numbers)

    @property
    def terms(self) -> list[tuple[MFPotential, str]]:
        return list(zip(self.models, self.term_fidelities))

    def forward(self, graph: Graph, compute_forces: bool = True, compute_stress: bool = True,
                create_graph: bool | None = None) -> dict[str, torch.Tensor]:
        """Sum of the terms' outputs; the graph's fidelity index (0, the only one, or -1) is replaced by each
        term's own."""
        if bool((graph.fidelity > 0).any()):
            raise ValueError(f"SumPotential {self.name!r} has one fidelity (index 0); got {graph.fidelity.tolist()}")
        total: dict[str, torch.Tensor] = {}
        for m, fid in self.terms:
            out = m(graph.with_fidelity(m.fidelity_index(fid)), compute_forces=compute_forces,
                    compute_stress=compute_stress, create_graph=create_graph)
            for k, v in out.items():
                total[k] = v if k not in total else total[k] + v
        return total

    def predict(self, graph: Graph, fidelity: str | Sequence[str] | None = None,
                **kwargs: bool) -> dict[str, torch.Tensor]:
        if fidelity is not None:
            for f in [fidelity] if isinstance(fidelity, str) else fidelity:
                self.fidelity_index(f)
        return self(graph.with_fidelity(0), **kwargs)


def sum_checkpoint_dict(model: SumPotential, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checkpoint content: each term's full potential checkpoint and its fidelity (plain types only)."""
    from pipeline.model.checkpoint import CHECKPOINT_VERSION, checkpoint_dict

    return {"format": SUM_FORMAT, "version": CHECKPOINT_VERSION, "name": model.name,
            "fidelities": list(model.fidelities),
            "terms": [{"fidelity": f, "checkpoint": checkpoint_dict(m)} for m, f in model.terms],
            "extra": extra or {}}
