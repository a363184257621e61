"""ASE calculator for :class:`pipeline.model.MFPotential`: energy, free_energy, forces, stress.

The fidelity is explicit: ``MFPotentialCalculator(model, fidelity="r2scan")``; a fidelity the model does not
know is an error listing the known ones. Elements outside the model raise
:class:`pipeline.model.UnknownElementError` naming them.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from pipeline.graphs import atoms_to_graph
from pipeline.model.checkpoint import load_checkpoint
from pipeline.model.potential import MFPotential

__all__ = ["MFPotentialCalculator"]


class MFPotentialCalculator(Calculator):
    """ASE calculator; stress (eV/A^3, Voigt, ASE sign) only for structures periodic in all directions."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        model: MFPotential,
        fidelity: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if fidelity is None:
            raise ValueError(f"fidelity is required; this model knows: {', '.join(model.fidelities)}")
        self.fidelity = fidelity
        self.fidelity_idx = model.fidelity_index(fidelity)  # raises, listing the known fidelities
        self.model = model.to(device=device, dtype=dtype) if (dtype or device) else model
        self.model.eval()

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike[str], fidelity: str, dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu", **kwargs: Any,
    ) -> MFPotentialCalculator:
        """Calculator from a checkpoint written by :func:`pipeline.model.save_checkpoint`."""
        return cls(load_checkpoint(path, dtype=dtype, device=device), fidelity, **kwargs)

    def check_elements(self, atoms: Atoms) -> None:
        self.model.species_index(torch.as_tensor(atoms.numbers, dtype=torch.long))

    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.check_elements(atoms)
        properties = properties or ["energy"]
        want_stress = "stress" in properties
        if want_stress and not atoms.pbc.all():
            raise PropertyNotImplementedError("stress needs a structure periodic in all three directions")
        param = next(self.model.parameters())
        graph = atoms_to_graph(atoms, self.model.cutoff, fidelity=self.fidelity_idx, dtype=param.dtype)
        graph = graph.to(device=param.device)
        out = self.model(graph, compute_forces=True, compute_stress=bool(atoms.pbc.all()), create_graph=False)
        energy = float(out["energy"][0].detach().cpu())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": out["atomic_energies"].detach().cpu().numpy().astype(np.float64),
            "forces": out["forces"].detach().cpu().numpy().astype(np.float64),
        }
        if "stress" in out and atoms.pbc.all():
            s = out["stress"][0].detach().cpu().numpy().astype(np.float64)
            self.results["stress"] = full_3x3_to_voigt_6_stress(0.5 * (s + s.T))
