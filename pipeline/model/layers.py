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
        x = x.to(self.linear.weight.dtype)  # under bf16 autocast the input may be bf16; o3.Linear needs its own dtype
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
        # (i1, mul, d1, cols, groups); a group = paths of one output dimension d3 within the block, its columns
        # consecutive: (first column, n_paths, d3, number of its weights = mul * n_paths)
        self.blocks: list[tuple[int, int, int, int, list[tuple[int, int, int, int]]]] = []
        self.split_in1: list[int] = [ir.dim * mul for mul, ir in self.irreps_in1]
        self._cg_master: dict[int, torch.Tensor] = {}
        self._cg_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        mid_column: list[int] = []  # for each grouped column, its column in irreps_out order
        weight_perm: list[int] = []  # weights in group order: each group's (u, path) weights consecutive
        for i1, (mul, ir1) in enumerate(self.irreps_in1):
            paths = [(k, ins) for k, ins in enumerate(instructions) if ins[0] == i1]
            if not paths:
                self.blocks.append((i1, mul, ir1.dim, 0, []))
                continue
            # paths grouped by output dimension: a group's weights multiply a (u, path, m) view by broadcasting
            paths.sort(key=lambda kp: self.irreps_out[kp[1][2]].ir.dim)
            d1 = ir1.dim
            cols = sum(self.irreps_out[ins[2]].ir.dim for _, ins in paths)
            mat = torch.zeros(d1, d2_all, cols, dtype=torch.float64)
            col = 0
            groups: list[tuple[int, int, int, str]] = []
            for d3 in sorted({self.irreps_out[ins[2]].ir.dim for _, ins in paths}):
                members = [(k, ins) for k, ins in paths if self.irreps_out[ins[2]].ir.dim == d3]
                first = col
                for k, (_, i2, io, _, _) in members:
                    ir2, ir3 = self.irreps_in2[i2].ir, self.irreps_out[io].ir
                    alpha = math.sqrt(ir3.dim / paths_per_out[io])
                    w3j = o3.wigner_3j(ir1.l, ir2.l, ir3.l, dtype=torch.float64)
                    mat[:, in2_slices[i2], col:col + d3] = alpha * w3j
                    col += d3
                weight_perm += [weight_start[k] + u for u in range(mul) for k, _ in members]
                groups.append((first, len(members), d3, mul * len(members)))
                # grouped layout of this group: (u, path, m); output layout of path k: (u, d3) at out_slices[io]
                for u in range(mul):
                    for _, ins in members:
                        for m in range(d3):
                            mid_column.append(out_slices[ins[2]].start + u * d3 + m)
            # stored as (filter dim, d1 * cols): contracting the filter first leaves a small per-edge matrix.
            # Kept in float64 outside the buffers (model.to(float32) then float64 would lose digits) and cast
            # per dtype/device on use.
            self._cg_master[i1] = mat.permute(1, 0, 2).reshape(d2_all, d1 * cols).contiguous()
            self.blocks.append((i1, mul, d1, cols, groups))
        if sorted(mid_column) != list(range(len(mid_column))) or len(mid_column) != self.irreps_out.dim:
            raise ValueError("instructions do not cover irreps_out exactly once")
        self.register_buffer("weight_perm", torch.tensor(weight_perm, dtype=torch.long), persistent=False)
        self.weight_split = [g[3] for *_, groups in self.blocks for g in groups]
        to_mid = torch.empty(len(mid_column), dtype=torch.long)
        to_mid[torch.tensor(mid_column)] = torch.arange(len(mid_column))
        self.register_buffer("to_mid", to_mid, persistent=False)

    def _cg(self, i1: int, like: torch.Tensor) -> torch.Tensor:
        key = (i1, like.dtype, like.device)
        if key not in self._cg_cache:
            self._cg_cache[key] = self._cg_master[i1].to(dtype=like.dtype, device=like.device)
        return self._cg_cache[key]

    def grouped(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-edge products in grouped column order (multiply-by-weight included; ``weight`` in e3nn's order)."""
        parts = self.grouped_parts(x1, x2, weight.index_select(1, self.weight_perm))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def grouped_parts(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`grouped` as its column blocks (concatenated, they are :meth:`grouped`), so that a caller can sum
        each over edges before concatenating on nodes: a ``cat`` of per-edge tensors costs a zero-filled
        full-size tensor per block in the double backward of force training. ``weight``: already in group order
        (columns ``weight_perm`` of e3nn's order; :class:`Convolution` permutes the radial MLP's last layer
        instead of the per-edge weights).

        Per input irrep: one bmm of the (u x d1) features with the filter contracted with all its paths, then
        each group of paths of one output dimension is multiplied by its (u, path) weights broadcast over m (no
        per-column copy of the weights). ``split`` rather than slicing: their backward is one ``cat`` instead of
        a zero-filled full-size gradient per slice."""
        n = x1.shape[0]
        parts = []
        weights = iter(weight.split(self.weight_split, dim=1) if len(self.weight_split) > 1 else (weight,))
        for (i1, mul, d1, cols, groups), a in zip(self.blocks, x1.split(self.split_in1, dim=1)):
            if not groups:
                continue
            filt = torch.matmul(x2, self._cg(i1, x2)).reshape(n, d1, cols)
            sizes = [g[1] * g[2] for g in groups]
            if d1 == 1:
                # scalar inputs: out[u, (p, m)] = (a[u] w[u, p]) f[p, m]: weight the (u, path) scalars first, then
                # one broadcast product per group (half the per-edge elementwise work of product-then-weight)
                a1 = a.reshape(n, mul, 1)
                f_chunks = filt.split(sizes, dim=2) if len(groups) > 1 else (filt,)
                for (_, n_g, d3, _), f in zip(groups, f_chunks):
                    aw = (a1 * next(weights).view(n, mul, n_g)).unsqueeze(-1)  # (n, u, paths, 1)
                    parts.append((aw * f.reshape(n, 1, n_g, d3)).reshape(n, mul * n_g * d3))
                continue
            prod = torch.bmm(a.reshape(n, mul, d1), filt)  # (n, u, cols)
            chunks = prod.split(sizes, dim=2) if len(groups) > 1 else (prod,)
            for (_, n_g, d3, _), chunk in zip(groups, chunks):
                w = next(weights).view(n, mul, n_g, 1)
                parts.append((chunk.reshape(n, mul, n_g, d3) * w).reshape(n, mul * n_g * d3))
        return parts

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
        if list(self.radial_mlp)[-1].act is not None:  # _radial_weights re-implements a linear last layer
            raise ValueError("the radial MLP's last layer must be linear")
        self.avg_num_neighbors = float(avg_num_neighbors)

    #: in eval mode, edges are processed in chunks of this many, with activation checkpointing (their
    #: intermediates are recomputed in the backward pass): memory stays bounded (a 4096-atom cell needs a few GB
    #: instead of tens of GB) and, measured on CPU, it is also faster than one pass over huge per-edge tensors
    #: (SevenNet-MF-0, one thread, E+F+stress: 64 atoms 1.15 s plain vs 0.77 s in 1024-edge chunks; 512 atoms
    #: 11.2 s vs 6.3 s). Training (create_graph) always takes the plain path.
    edge_chunk: int = 1024

    def _radial_weights(self, edge_radial: torch.Tensor) -> torch.Tensor:
        """The radial MLP's output with its columns in the tensor product's group order (``weight_perm``): the
        last layer's weight matrix is permuted (a small gather) instead of the per-edge output (a gather and, in
        the backward, a zero-filled scatter of edges x weights). Same computation as e3nn's ``_Layer``."""
        layers = list(self.radial_mlp)
        h = edge_radial
        for layer in layers[:-1]:
            h = layer(h)
        last = layers[-1]
        w = last.weight.index_select(1, self.tp.weight_perm) / (last.h_in * last.var_in / last.var_out) ** 0.5
        return h @ w

    #: set by MFPotential (e.g. torch.bfloat16): the radial MLP and the tensor product run under autocast
    autocast_dtype: torch.dtype | None = None

    def _messages(self, x: torch.Tensor, edge_sh: torch.Tensor, edge_radial: torch.Tensor, center: torch.Tensor,
                  neighbor: torch.Tensor, num_nodes: int) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            weight = self._radial_weights(edge_radial)
            messages = self.tp.grouped_parts(x[neighbor], edge_sh, weight)
        sums = []
        for message in messages:
            # the neighbour sum in the edge geometry's dtype (float32/64), also when autocast made messages bf16
            message = message.to(edge_sh.dtype)
            out = torch.zeros(num_nodes, message.shape[1], dtype=message.dtype, device=message.device)
            sums.append(out.index_add_(0, center, message))
        return sums[0] if len(sums) == 1 else torch.cat(sums, dim=1)

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
