"""Building blocks of the potential: radial basis, smooth cutoffs, fidelity-conditioned linears, the e3nn
tensor-product convolution and the NequIP-style interaction block.

All equivariant algebra is e3nn's (``o3.Linear``, ``o3.TensorProduct``, ``o3.SphericalHarmonics``,
``nn.Gate``, ``nn.FullyConnectedNet``). Written by hand here only what e3nn does not ship: the Bessel basis,
the two cutoff envelopes and the per-edge message passing (gather, tensor product, scatter-sum).
The layer layout (irreps order, instruction order, where the fidelity one-hot enters) is the one of
SevenNet-MF so that its published weights map one to one (see :mod:`pipeline.model.sevenn_import`).
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from e3nn import nn as e3nn_nn
from e3nn import o3
from torch import nn

__all__ = [
    "BesselBasis",
    "Convolution",
    "FidelityLinear",
    "FusedUVUTensorProduct",
    "InteractionBlock",
    "PolynomialCutoff",
    "XPLORCutoff",
]


class BesselBasis(nn.Module):
    """``(2 / r_c) sin(n pi r / r_c) / r`` for n = 1..num_basis (frequencies trainable or fixed).

    Hand-written: a three-line formula not exposed by e3nn (e3nn's ``soft_one_hot_linspace`` 'bessel' has no
    trainable frequencies)."""

    def __init__(self, cutoff: float, num_basis: int = 8, trainable: bool = True) -> None:
        super().__init__()
        self.prefactor = 2.0 / cutoff
        freq = torch.tensor([n * math.pi / cutoff for n in range(1, num_basis + 1)])
        self.freq = nn.Parameter(freq, requires_grad=trainable)
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return self.prefactor * torch.sin(self.freq * r) / r


class XPLORCutoff(nn.Module):
    """XPLOR switching function: 1 below ``r_on``, a smooth polynomial to 0 at ``r_cut`` (C1 at both ends)."""

    def __init__(self, cutoff: float, cutoff_on: float) -> None:
        super().__init__()
        self.r_on = float(cutoff_on)
        self.r_cut = float(cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r2 = r * r
        on2, cut2 = self.r_on**2, self.r_cut**2
        switch = (cut2 - r2) ** 2 * (cut2 + 2 * r2 - 3 * on2) / (cut2 - on2) ** 3
        return torch.where(r < self.r_on, torch.ones_like(r), switch)


class PolynomialCutoff(nn.Module):
    """DimeNet polynomial envelope of order ``p`` (arXiv 2003.03123): 1 at r=0, smooth 0 at the cutoff."""

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = r / self.cutoff
        p = self.p
        return (
            1.0
            - (p + 1.0) * (p + 2.0) / 2.0 * x**p
            + p * (p + 2.0) * x ** (p + 1.0)
            - p * (p + 1.0) / 2.0 * x ** (p + 2.0)
        )


class FidelityLinear(nn.Module):
    """e3nn ``Linear`` whose input is the node features with the fidelity one-hot appended as scalars.

    With ``num_fidelities`` = 0 it is a plain equivariant linear. The one-hot gives every fidelity its own
    learned bias on the scalar outputs (SevenNet-MF)."""

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, num_fidelities: int = 0) -> None:
        super().__init__()
        self.num_fidelities = num_fidelities
        full_in = o3.Irreps(irreps_in) + o3.Irreps(f"{num_fidelities}x0e") if num_fidelities else o3.Irreps(irreps_in)
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.linear = o3.Linear(full_in, self.irreps_out, biases=False)

    def forward(self, x: torch.Tensor, fidelity_onehot: torch.Tensor | None) -> torch.Tensor:
        if self.num_fidelities:
            x = torch.cat([x, fidelity_onehot.to(x.dtype)], dim=1)
        return self.linear(x)


def conv_irreps_mid(
    irreps_in: o3.Irreps, irreps_sh: o3.Irreps, allowed: o3.Irreps
) -> tuple[o3.Irreps, list[tuple[int, int, int, str, bool]], list[tuple[int, int, int, str, bool]]]:
    """Output irreps and 'uvu' instructions of the convolution tensor product, in SevenNet's order: one path per
    (input irrep, filter irrep, product irrep in ``allowed``), multiplicity of the input, sorted by irrep.

    Returns (irreps_mid, instructions sorted by output, the same instructions in creation order); checkpoints of
    SevenNet < 0.11 store the radial-MLP output columns in creation order."""
    allowed_set = {ir for _, ir in o3.Irreps(allowed)}
    mid, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in):
        for j, (_, ir_sh) in enumerate(irreps_sh):
            for ir_out in ir_in * ir_sh:
                if ir_out in allowed_set:
                    instructions.append((i, j, len(mid), "uvu", True))
                    mid.append((mul, ir_out))
    irreps_mid, perm, _ = o3.Irreps(mid).sort()
    created = [(a, b, perm[k], m, t) for a, b, k, m, t in instructions]
    return irreps_mid, sorted(created, key=lambda ins: ins[2]), created


class FusedUVUTensorProduct(nn.Module):
    """The convolution tensor product of e3nn (``o3.TensorProduct`` with 'uvu' instructions, per-edge weights,
    component/element normalisation), regrouped for speed on CPU.

    Hand-written because e3nn evaluates one small einsum per path (about 20 per layer here) and its backward
    allocates a full-size zero tensor for every sliced path. Here, for every input irrep, the filter (spherical
    harmonics) is first contracted with a stacked (Wigner-3j x path-normalisation) matrix of all its paths,
    giving a small (d1 x cols) matrix per edge, and ONE batched matmul with the (u x d1) features follows.
    Results are produced in "grouped" column order; :attr:`weight_index` maps each column to its weight and
    :attr:`to_mid` reorders columns to e3nn's ``irreps_out`` order (applied after the edge sum, on nodes).
    Equality with ``o3.TensorProduct`` (values and gradients) is tested in tests/test_model_layers.py.
    """

    def __init__(self, irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_out: o3.Irreps,
                 instructions: list[tuple[int, int, int, str, bool]]) -> None:
        super().__init__()
        self.irreps_in1, self.irreps_in2, self.irreps_out = (o3.Irreps(irreps_in1), o3.Irreps(irreps_in2),
                                                             o3.Irreps(irreps_out))
        if any(mode != "uvu" for _, _, _, mode, _ in instructions):
            raise ValueError("only 'uvu' instructions are supported")
        if any(mul != 1 for mul, _ in self.irreps_in2):
            raise ValueError("the filter irreps must have multiplicity 1")
        d2_all = self.irreps_in2.dim
        out_slices = self.irreps_out.slices()
        in2_slices = self.irreps_in2.slices()
        paths_per_out = {}
        for ins in instructions:
            paths_per_out[ins[2]] = paths_per_out.get(ins[2], 0) + 1
        weight_start, start = [], 0
        for i1, _, _, _, _ in instructions:
            weight_start.append(start)
            start += self.irreps_in1[i1].mul
        self.weight_numel = start
        self.blocks: list[tuple[int, int, int, int, int, int]] = []  # (i1, start, stop, mul, d1, cols)
        self._cg_master: dict[int, torch.Tensor] = {}
        self._cg_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        weight_index: list[int] = []
        mid_column: list[int] = []  # for each grouped column, its column in irreps_out order
        for i1, (mul, ir1) in enumerate(self.irreps_in1):
            paths = [(k, ins) for k, ins in enumerate(instructions) if ins[0] == i1]
            if not paths:
                continue
            d1 = ir1.dim
            cols = sum(self.irreps_out[ins[2]].ir.dim for _, ins in paths)
            mat = torch.zeros(d1, d2_all, cols, dtype=torch.float64)
            col = 0
            col_path = []
            for k, (_, i2, io, _, _) in paths:
                ir2, ir3 = self.irreps_in2[i2].ir, self.irreps_out[io].ir
                alpha = math.sqrt(ir3.dim / paths_per_out[io])
                w3j = o3.wigner_3j(ir1.l, ir2.l, ir3.l, dtype=torch.float64)
                mat[:, in2_slices[i2], col:col + ir3.dim] = alpha * w3j
                col_path.append((k, io, col, ir3.dim))
                col += ir3.dim
            # stored as (filter dim, d1 * cols): contracting the filter first leaves a small per-edge matrix.
            # Kept in float64 outside the buffers (model.to(float32) then float64 would lose digits) and cast
            # per dtype/device on use.
            self._cg_master[i1] = mat.permute(1, 0, 2).reshape(d2_all, d1 * cols).contiguous()
            sl = self.irreps_in1.slices()[i1]
            self.blocks.append((i1, sl.start, sl.stop, mul, d1, cols))
            # grouped layout of this block: (u, cols); output layout of path k: (u, d3) at out_slices[io]
            for u in range(mul):
                for k, io, c0, d3 in col_path:
                    for m in range(d3):
                        weight_index.append(weight_start[k] + u)
                        mid_column.append(out_slices[io].start + u * d3 + m)
        if sorted(mid_column) != list(range(len(mid_column))) or len(mid_column) != self.irreps_out.dim:
            raise ValueError("instructions do not cover irreps_out exactly once")
        self.register_buffer("weight_index", torch.tensor(weight_index, dtype=torch.long), persistent=False)
        to_mid = torch.empty(len(mid_column), dtype=torch.long)
        to_mid[torch.tensor(mid_column)] = torch.arange(len(mid_column))
        self.register_buffer("to_mid", to_mid, persistent=False)

    def _cg(self, i1: int, like: torch.Tensor) -> torch.Tensor:
        key = (i1, like.dtype, like.device)
        if key not in self._cg_cache:
            self._cg_cache[key] = self._cg_master[i1].to(dtype=like.dtype, device=like.device)
        return self._cg_cache[key]

    def grouped(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-edge products in grouped column order (multiply-by-weight included)."""
        n = x1.shape[0]
        parts = []
        for i1, start, stop, mul, d1, cols in self.blocks:
            a = x1[:, start:stop].reshape(n, mul, d1)
            filt = torch.matmul(x2, self._cg(i1, x2)).reshape(n, d1, cols)
            parts.append(torch.bmm(a, filt).reshape(n, mul * cols))
        grouped = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return grouped * weight.index_select(1, self.weight_index)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Same output as ``o3.TensorProduct(...)(x1, x2, weight)`` (columns in ``irreps_out`` order)."""
        return self.grouped(x1, x2, weight).index_select(1, self.to_mid)


class Convolution(nn.Module):
    """Message passing: m_i = sum_j TP(x_j, Y(r_ij); MLP(radial(r_ij))) / avg_num_neighbors."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_sh: o3.Irreps,
        allowed_out: o3.Irreps,
        radial_layers: list[int],
        avg_num_neighbors: float,
    ) -> None:
        super().__init__()
        self.irreps_mid, self.instructions, self.instructions_created = conv_irreps_mid(
            irreps_in, irreps_sh, allowed_out
        )
        self.tp = FusedUVUTensorProduct(irreps_in, irreps_sh, self.irreps_mid, self.instructions)
        self.radial_mlp = e3nn_nn.FullyConnectedNet(radial_layers + [self.tp.weight_numel], torch.nn.functional.silu)
        self.avg_num_neighbors = float(avg_num_neighbors)

    #: in eval mode, edges are processed in chunks of this many, with activation checkpointing (their
    #: intermediates are recomputed in the backward pass): memory stays bounded (a 4096-atom cell needs a few GB
    #: instead of tens of GB) and, measured on CPU, it is also faster than one pass over huge per-edge tensors
    #: (SevenNet-MF-0, one thread, E+F+stress: 64 atoms 1.15 s plain vs 0.77 s in 1024-edge chunks; 512 atoms
    #: 11.2 s vs 6.3 s). Training (create_graph) always takes the plain path.
    edge_chunk: int = 1024

    def _messages(self, x: torch.Tensor, edge_sh: torch.Tensor, edge_radial: torch.Tensor, center: torch.Tensor,
                  neighbor: torch.Tensor, num_nodes: int) -> torch.Tensor:
        weight = self.radial_mlp(edge_radial)
        message = self.tp.grouped(x[neighbor], edge_sh, weight)
        out = torch.zeros(num_nodes, message.shape[1], dtype=message.dtype, device=message.device)
        return out.index_add_(0, center, message)

    def forward(
        self, x: torch.Tensor, edge_sh: torch.Tensor, edge_radial: torch.Tensor, center: torch.Tensor,
        neighbor: torch.Tensor,
    ) -> torch.Tensor:
        n_edges, step = center.shape[0], max(1, int(self.edge_chunk))
        if self.training or n_edges <= step:
            out = self._messages(x, edge_sh, edge_radial, center, neighbor, x.shape[0])
        else:
            # each chunk sums onto the rows of its own centers only (a few rows when edges are sorted by
            # center, as pipeline.graphs builds them) and is added in place into one (nodes, width) tensor at
            # once, so only one node-sized copy of the messages exists (not the chunks, their concatenation and
            # the sum); index_add_ keeps only the row index for the backward pass
            out = torch.zeros(x.shape[0], self.tp.to_mid.numel(), dtype=x.dtype, device=x.device)
            for start in range(0, n_edges, step):
                sl = slice(start, start + step)
                c = center[sl]
                lo, hi = int(c.min()), int(c.max()) + 1
                part = torch.utils.checkpoint.checkpoint(
                    self._messages, x, edge_sh[sl], edge_radial[sl], c - lo, neighbor[sl], hi - lo,
                    use_reentrant=False,
                )
                out[lo:hi] += part
        # reorder columns on nodes (cheaper than on edges), then normalise in place (neither needs its output
        # for the backward pass)
        return out.index_select(1, self.tp.to_mid).div_(self.avg_num_neighbors)


def _gate(irreps_out: o3.Irreps) -> e3nn_nn.Gate:
    """Gate for ``irreps_out``: scalars through SiLU (even) / tanh (odd), l > 0 gated by extra scalars."""
    acts = {1: torch.nn.functional.silu, -1: torch.tanh}
    scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
    gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
    gate_parity = 1 if o3.Irrep("0e") in [ir for _, ir in scalars] else -1
    gates = o3.Irreps([(mul, (0, gate_parity)) for mul, _ in gated])
    return e3nn_nn.Gate(
        scalars, [acts[ir.p] for _, ir in scalars], gates, [acts[ir.p] for _, ir in gates], gated
    )


class InteractionBlock(nn.Module):
    """NequIP/SevenNet interaction: sc = SC(x); x = Lin_pre([x, fid]); x = Conv(x); x = Lin_post([x, fid]) + sc;
    x = Gate(x)."""

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        irreps_sh: o3.Irreps,
        num_species: int,
        num_fidelities: int,
        radial_layers: list[int],
        avg_num_neighbors: float,
        self_connection: str,
        fidelity_pre: bool,
        fidelity_post: bool,
        last: bool,
    ) -> None:
        super().__init__()
        irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.gate = _gate(irreps_out)
        gate_in = self.gate.irreps_in
        if self_connection == "linear":
            self.self_connection: nn.Module = o3.Linear(irreps_in, gate_in, biases=False)
        else:
            self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, o3.Irreps(f"{num_species}x0e"), gate_in)
        self.self_connection_kind = self_connection
        self.pre = FidelityLinear(irreps_in, irreps_in, num_fidelities if fidelity_pre else 0)
        # which product irreps the convolution keeps: l <= lmax of the output (scalars only in the last layer)
        full = o3.FullTensorProduct(irreps_in, irreps_sh).irreps_out.simplify()
        lmax_out = irreps_out.lmax
        allowed = [
            (mul, ir) for mul, ir in full
            if ir.l <= lmax_out and (not last or (ir.l == 0 and ir.p == 1))
        ]
        self.conv = Convolution(irreps_in, irreps_sh, o3.Irreps(allowed), radial_layers, avg_num_neighbors)
        self.post = FidelityLinear(self.conv.irreps_mid, gate_in, num_fidelities if fidelity_post else 0)
        self.irreps_in, self.irreps_out = irreps_in, self.gate.irreps_out

    def forward(
        self,
        x: torch.Tensor,
        species_onehot: torch.Tensor,
        fidelity_onehot: torch.Tensor | None,
        edge_sh: torch.Tensor,
        edge_radial: torch.Tensor,
        center: torch.Tensor,
        neighbor: torch.Tensor,
    ) -> torch.Tensor:
        if self.self_connection_kind == "linear":
            sc = self.self_connection(x)
        else:
            sc = self.self_connection(x, species_onehot)
        x = self.pre(x, fidelity_onehot)
        x = self.conv(x, edge_sh, edge_radial, center, neighbor)
        x = self.post(x, fidelity_onehot) + sc
        return self.gate(x)
