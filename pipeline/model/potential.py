"""The multi-fidelity E(3)-equivariant potential: batched graph in, per-structure energy, forces and stress out.

Forces are ``-dE/dpositions``; stress is ``(1/V) dE/d(strain)`` (ASE sign: tensile positive, eV/A^3) from
autograd through a symmetric strain applied to positions and cell. Energies are
``sum_atoms (scale[fidelity] * e_atom + shift[fidelity, element])``.

Use from a trainer::

    refs = references_from_frames(frames)                      # per-fidelity element shifts + scales
    graph = frame_rows_to_graph(rows, cfg.cutoff, cfg.fidelities)
    cfg = replace(cfg, avg_num_neighbors=graph.avg_num_neighbors())   # from the training set
    model = MFPotential(cfg, refs).train()
    out = model(graph)            # energy (B,), forces (N, 3), stress (B, 3, 3); create_graph=True in train mode
    # losses: mask each structure by its has_energy / has_forces / has_stress labels
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ase.data import chemical_symbols
from e3nn import o3
from torch import nn

from pipeline.graphs import Graph, fidelity_index
from pipeline.model.config import ModelConfig
from pipeline.model.layers import BesselBasis, FidelityLinear, InteractionBlock, PolynomialCutoff, XPLORCutoff
from pipeline.model.references import ElementReferences

__all__ = ["MFPotential", "UnknownElementError"]


class UnknownElementError(ValueError):
    """A structure contains an element the model was not built for."""


class MFPotential(nn.Module):
    """SevenNet-MF style multi-fidelity potential (see :mod:`pipeline.model.config` for the layout).

    ``autocast_dtype``: None (default) runs everything in the parameters' dtype; ``torch.bfloat16`` runs the
    per-edge message computation (radial MLP and tensor product) under :func:`torch.autocast` (mixed precision
    training on CUDA; also works on CPU) while node-wise layers, neighbour sums, per-atom energies, the energy sum,
    forces and stress stay in the parameters' dtype. Not saved in checkpoints.
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(self, config: ModelConfig, references: ElementReferences | None = None) -> None:
        super().__init__()
        self.config = config
        num_species, num_fid = len(config.elements), len(config.fidelities)
        fid_in = set(config.fidelity_in)

        self.radial_basis = BesselBasis(config.cutoff, config.num_radial_basis, config.trainable_radial_basis)
        self.envelope: nn.Module = (
            XPLORCutoff(config.cutoff, config.cutoff_on)
            if config.cutoff_function == "xplor"
            else PolynomialCutoff(config.cutoff, config.poly_p)
        )
        sh_parity = -1 if config.parity else 1
        self.irreps_sh = o3.Irreps.spherical_harmonics(config.lmax, sh_parity)
        self.spherical_harmonics = o3.SphericalHarmonics(
            self.irreps_sh, normalize=True, normalization="component", irreps_in=o3.Irreps(f"1x1{'o' if config.parity else 'e'}")
        )
        scalars = o3.Irreps(f"{config.channels}x0e")
        self.embedding = FidelityLinear(
            o3.Irreps(f"{num_species}x0e"), scalars, num_fid if "embedding" in fid_in else 0
        )
        radial_layers = [config.num_radial_basis, *config.radial_hidden]
        hidden = o3.Irreps(config.node_irreps)
        irreps = scalars
        blocks = []
        for t in range(config.num_layers):
            last = t == config.num_layers - 1
            block = InteractionBlock(
                irreps_in=irreps,
                irreps_out=scalars if last else hidden,
                irreps_sh=self.irreps_sh,
                num_species=num_species,
                num_fidelities=num_fid,
                radial_layers=radial_layers,
                avg_num_neighbors=config.avg_num_neighbors,
                self_connection=config.self_connection,
                fidelity_pre="pre_conv" in fid_in,
                fidelity_post="post_conv" in fid_in,
                last=last,
            )
            blocks.append(block)
            irreps = block.irreps_out
        self.blocks = nn.ModuleList(blocks)
        readout_hidden = config.readout_hidden or irreps.dim // 2
        self.readout_hidden = FidelityLinear(
            irreps, o3.Irreps(f"{readout_hidden}x0e"), num_fid if "readout" in fid_in else 0
        )
        self.readout_out = FidelityLinear(o3.Irreps(f"{readout_hidden}x0e"), o3.Irreps("1x0e"), 0)

        z_to_index = torch.full((len(chemical_symbols),), -1, dtype=torch.long)
        z_to_index[torch.tensor(config.elements)] = torch.arange(num_species)
        self.register_buffer("z_to_index", z_to_index)
        self.register_buffer("shift", torch.zeros(num_fid, num_species))
        self.register_buffer("scale", torch.ones(num_fid, num_species))
        if references is not None:
            self.set_references(references)

    # ----------------------------------------------------------------- references / metadata
    @property
    def fidelities(self) -> tuple[str, ...]:
        return self.config.fidelities

    @property
    def elements(self) -> tuple[int, ...]:
        return self.config.elements

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    def fidelity_index(self, fidelity: str) -> int:
        """Index of a fidelity name; unknown names raise ``KeyError`` listing the known ones."""
        return fidelity_index(fidelity, self.config.fidelities)

    def set_references(self, references: ElementReferences) -> None:
        """Load per-fidelity element shifts and scales (missing fidelities: see ``ElementReferences``)."""
        shift = references.shift_matrix(self.config.fidelities, self.config.elements)
        scale = references.scale_vector(self.config.fidelities)
        with torch.no_grad():
            self.shift.copy_(torch.as_tensor(shift, dtype=self.shift.dtype))
            self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype)[:, None].expand_as(self.scale))

    def references(self) -> ElementReferences:
        """Current shifts/scales as an :class:`ElementReferences` (scale: first element's value per fidelity)."""
        symbols = [chemical_symbols[z] for z in self.config.elements]
        energies = {f: dict(zip(symbols, self.shift[a].tolist())) for a, f in enumerate(self.config.fidelities)}
        scales = {f: float(self.scale[a, 0]) for a, f in enumerate(self.config.fidelities)}
        return ElementReferences(energies, scales)

    def species_index(self, numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to one-hot indices; unknown elements raise :class:`UnknownElementError`."""
        if numbers.numel() and (numbers.min() < 1 or numbers.max() >= self.z_to_index.numel()):
            raise UnknownElementError(f"atomic numbers out of range: {sorted(set(numbers.tolist()))}")
        idx = self.z_to_index[numbers]
        if (idx < 0).any():
            bad = sorted({chemical_symbols[z] for z in numbers[idx < 0].tolist()})
            raise UnknownElementError(
                f"elements not in this model: {', '.join(bad)} (model knows {len(self.config.elements)} elements: "
                f"{', '.join(self.config.element_symbols)})"
            )
        return idx

    def check_fidelity(self, fidelity: torch.Tensor) -> None:
        nf = len(self.config.fidelities)
        if fidelity.numel() and (fidelity.min() < 0 or fidelity.max() >= nf):
            raise KeyError(
                f"fidelity index missing or out of range ({sorted(set(fidelity.tolist()))}); set it explicitly to one "
                f"of: {', '.join(f'{k}={f}' for k, f in enumerate(self.config.fidelities))}"
            )

    # ----------------------------------------------------------------- forward
    def atomic_energies(self, graph: Graph, positions: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Per-atom energies (eV) for given (possibly strained) positions and cells."""
        species = self.species_index(graph.numbers)
        self.check_fidelity(graph.fidelity)
        center, neighbor = graph.edge_index[0], graph.edge_index[1]
        dtype = positions.dtype
        edge_cell = cell[graph.batch[center]]
        edge_vec = positions[neighbor] - positions[center] + torch.bmm(graph.edge_shift.unsqueeze(1), edge_cell).squeeze(1)
        r = torch.linalg.norm(edge_vec, dim=-1)
        edge_radial = self.radial_basis(r) * self.envelope(r).unsqueeze(-1)
        edge_sh = self.spherical_harmonics(edge_vec)

        num_species, num_fid = len(self.config.elements), len(self.config.fidelities)
        species_onehot = torch.nn.functional.one_hot(species, num_species).to(dtype)
        fid_atom = graph.fidelity[graph.batch]
        fid_onehot = torch.nn.functional.one_hot(fid_atom, num_fid).to(dtype)

        # mixed precision (``autocast_dtype``, e.g. bf16): only the per-edge message computation (radial MLP and
        # tensor product, most of the work) runs under autocast, in pipeline.model.layers.Convolution; the node-wise
        # linears, gates, neighbour sums, readout, per-atom energies, their scale/shift and sum, and so forces and
        # stress, stay in the model's dtype (autocasting whole blocks cost ~10 meV/atom on MF-0's weights)
        x = self.embedding(species_onehot, fid_onehot)
        for block in self.blocks:
            block.conv.autocast_dtype = self.autocast_dtype
            x = block(x, species_onehot, fid_onehot, edge_sh, edge_radial, center, neighbor)
        e = self.readout_out(self.readout_hidden(x, fid_onehot), None).squeeze(-1)
        return e * self.scale[fid_atom, species] + self.shift[fid_atom, species]

    def forward(
        self,
        graph: Graph,
        compute_forces: bool = True,
        compute_stress: bool = True,
        create_graph: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Energies (B,) eV, forces (N, 3) eV/A, stress (B, 3, 3) eV/A^3 (NaN for non-periodic structures),
        atomic_energies (N,). ``create_graph`` (default: ``self.training``) keeps the graph of forces/stress for
        force/stress losses."""
        if create_graph is None:
            create_graph = self.training
        if graph.dtype != self.shift.dtype or graph.positions.device != self.shift.device:
            graph = graph.to(device=self.shift.device, dtype=self.shift.dtype)
        positions, cell = graph.positions, graph.cell
        inputs = []
        if compute_forces:
            positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        strain = None
        if compute_stress:
            strain = torch.zeros_like(cell, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos_in = positions + torch.bmm(positions.unsqueeze(1), sym[graph.batch]).squeeze(1)
            cell_in = cell + torch.bmm(cell, sym)
            inputs.append(strain)
        else:
            pos_in, cell_in = positions, cell
        atomic = self.atomic_energies(graph, pos_in, cell_in)
        energy = torch.zeros(graph.num_graphs, dtype=atomic.dtype, device=atomic.device)
        energy = energy.index_add(0, graph.batch, atomic)
        out = {"energy": energy, "atomic_energies": atomic}
        if inputs:
            grads = torch.autograd.grad(
                energy.sum(), inputs, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
            k = 0
            if compute_forces:
                out["forces"] = -grads[0]
                k = 1
            if compute_stress:
                vol = graph.volume().to(atomic.dtype)
                safe = torch.where(vol > 0, vol, torch.ones_like(vol))
                stress = grads[k] / safe[:, None, None]
                out["stress"] = torch.where((vol > 0)[:, None, None], stress, torch.full_like(stress, float("nan")))
        return out

    def predict(
        self, graph: Graph, fidelity: str | Sequence[str] | None = None, **kwargs: bool
    ) -> dict[str, torch.Tensor]:
        """Forward with the fidelity given by name (one for all structures or one per structure)."""
        if fidelity is not None:
            names = [fidelity] if isinstance(fidelity, str) else list(fidelity)
            idx = [self.fidelity_index(f) for f in names]
            graph = graph.with_fidelity(idx[0] if isinstance(fidelity, str) else idx)
        return self(graph, **kwargs)
