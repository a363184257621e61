"""What :func:`pipeline.train.trainer.train` needs to train at scale: the streamed data path (a one-pass scan of a
frames dataset instead of loading it), the step loss normalisation that makes gradient accumulation and DDP
exact, mixed precision settings, and validation whose metrics are summed over ranks.

**Step loss normalisation.** One optimizer step sees ``accumulate`` micro-batches on each of ``W`` ranks. Its loss
is, for every term (energy per atom, force components, stress components), the (fidelity-weighted) mean over *all*
labelled items of the step, as if the step's frames were one batch: micro-batch ``i`` contributes
``sum_t c_t * mean_it * n_it / N_t`` (its own masked mean times its share ``n_it / N_t`` of the step's labelled
items; ``N_t`` summed over micro-batches and ranks with one all-reduce before the forward passes), times ``W``
because DDP averages gradients over ranks. So 2 micro-batches of B frames, or 2 ranks with B frames each, take the
same step as one batch of 2B frames, to floating-point rounding, whatever the batches' atom counts; with one
micro-batch on one rank the loss is exactly the plain batch loss. Counts come from the label masks (stress: only
periodic frames, as :func:`pipeline.train.losses.loss_terms` masks non-finite stress).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ase.units import GPa

from pipeline.graphs import Graph
from pipeline.hashing import structure_hash
from pipeline.io import ParquetDataset
from pipeline.schema import FRAMES_SCHEMA
from pipeline.train.data import Labels
from pipeline.train.losses import LossWeights, loss_terms

__all__ = ["PRECISIONS", "DatasetScan", "evaluate_stream", "frame_count", "precision_context", "read_frames",
           "scan_dataset", "term_counts"]

PRECISIONS = ("float32", "bf16", "tf32")


# --- mixed precision ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def precision_context(precision: str, model: torch.nn.Module) -> Iterator[None]:
    """Inside: ``bf16`` runs the model's network under bf16 autocast (``MFPotential.autocast_dtype``; the energy
    sum, forces and stress stay float32); ``tf32`` lets CUDA float32 matmuls and convolutions use TF32 tensor
    cores (no effect on CPU); ``float32``: nothing. Settings are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    old_matmul, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    old_autocast = getattr(model, "autocast_dtype", None)
    try:
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if precision == "bf16":
            model.autocast_dtype = torch.bfloat16
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_matmul, old_cudnn
        model.autocast_dtype = old_autocast


# --- step loss normalisation -------------------------------------------------------------------------------------

def term_counts(graph: Graph, labels: Labels, fidelity_weights: torch.Tensor | None, use_forces: bool,
                use_stress: bool) -> dict[str, torch.Tensor]:
    """Per loss term, the (fidelity-weighted) number of labelled items :func:`loss_terms` averages over
    (energy: frames; forces: atom components; stress: components of periodic frames), as float64 scalars."""
    ones_f = torch.ones(labels.energy.shape[0], dtype=torch.float64, device=labels.energy.device)
    w_frame = ones_f if fidelity_weights is None else fidelity_weights[labels.fidelity].to(torch.float64)
    out = {"energy": (w_frame * labels.has_energy).sum()}
    if use_forces:
        w_atom = torch.repeat_interleave(w_frame, labels.n_atoms)
        out["forces"] = 3.0 * (w_atom * labels.has_forces).sum()
    if use_stress:
        periodic = graph.pbc.all(dim=1) & (torch.linalg.det(graph.cell.to(torch.float64)).abs() > 0)
        out["stress"] = 9.0 * (w_frame * (labels.has_stress & periodic.to(labels.has_stress.device))).sum()
    return out


def scaled_loss(terms: Mapping[str, tuple[torch.Tensor, int]], weights: LossWeights, counts: Mapping[str, torch.Tensor],
                totals: Mapping[str, torch.Tensor], world_size: int) -> torch.Tensor:
    """This micro-batch's share of the step loss (see the module doc); ``totals``: the step's counts."""
    loss = None
    for k, (value, _) in terms.items():
        total = float(totals[k])
        share = float(counts[k]) / total if total > 0 else 0.0
        part = getattr(weights, k) * value * (share * world_size)
        loss = part if loss is None else loss + part
    return loss


# --- the streamed data path: one scan, the split, the reference sample -------------------------------------------

def _parts(path: str | Path) -> list[Path]:
    path = Path(path)
    parts = [path] if path.is_file() else ParquetDataset(path, FRAMES_SCHEMA).parts()
    if not parts:
        raise FileNotFoundError(f"no frames Parquet parts in {path}")
    return parts


def frame_count(path: str | Path) -> int:
    """Rows of a frames Parquet file or dataset folder, from the Parquet footers only."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in _parts(path))


@dataclass
class DatasetScan:
    """What one pass over a frames dataset gives (index order = parts, row groups, rows, as
    :class:`~pipeline.train.stream.FrameIndex`): fidelity names (sorted), elements, the validation mask, a
    fingerprint of the data (frame ids + structure hashes + labels presence + file sizes)."""

    n_frames: int
    fidelities: tuple[str, ...]
    elements: tuple[int, ...]
    val: np.ndarray
    data_hash: str


def _unit(key: str, seed: int) -> float:
    """A number in [0, 1) from a group key and the seed (deterministic hash split)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def scan_dataset(path: str | Path, val_fraction: float, seed: int) -> DatasetScan:
    """One pass over the dataset, a row group at a time (memory: one row group plus a byte per frame).

    Split: a frame's group is its ``material_id`` when set, else its structure hash (so the PBE and r2SCAN copies
    of a structure, or all frames of a material, stay together); a group is validation when the hash of (seed,
    group) falls below ``val_fraction``: the validation share is ``val_fraction`` in expectation (not exact, as
    the in-memory split is), and the split needs no global table. Not joined: a structure stored once with and
    once without a material id (the in-memory split's union-find joins those)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cols = ["frame_id", "material_id", "fidelity", "numbers", "positions", "cell", "pbc", "has_energy",
            "has_forces", "has_stress"]
    h = hashlib.sha256()
    fids: set[str] = set()
    zs: set[int] = set()
    val: list[np.ndarray] = []
    n = 0
    for part in _parts(path):
        h.update(f"{part.name}:{part.stat().st_size}".encode())
        pf = pq.ParquetFile(part)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=cols)
            fid = pc.utf8_lower(pc.utf8_trim_whitespace(t.column("fidelity"))).to_pylist()
            fids.update(fid)
            d = t.to_pydict()
            mask = np.zeros(t.num_rows, dtype=bool)
            for i in range(t.num_rows):
                zs.update(d["numbers"][i])
                skey = structure_hash(d["numbers"][i], d["positions"][i], d["cell"][i], d["pbc"][i])
                group = f"m:{d['material_id'][i]}" if d["material_id"][i] else f"s:{skey}"
                mask[i] = val_fraction > 0 and _unit(group, seed) < val_fraction
                h.update(f"{d['frame_id'][i]}|{skey}|{fid[i]}|{d['has_energy'][i]:d}{d['has_forces'][i]:d}"
                         f"{d['has_stress'][i]:d}\n".encode())
            val.append(mask)
            n += t.num_rows
    if n == 0:
        raise ValueError(f"{path}: no frames to train on")
    mask = np.concatenate(val)
    if val_fraction > 0 and not mask.any() and n > 1:
        mask[np.argmin([_unit(str(k), seed) for k in range(n)])] = True  # as in-memory: at least one
    return DatasetScan(n, tuple(sorted(fids)), tuple(sorted(zs)), mask, h.hexdigest()[:16])


def read_frames(index, frames: np.ndarray) -> pa.Table:
    """The stored rows of the given frame numbers of a :class:`~pipeline.train.stream.FrameIndex` (all
    FRAMES_SCHEMA columns), in ascending frame order; reads only the row groups that hold them."""
    frames = np.sort(np.asarray(frames, dtype=np.int64))
    tables = []
    keys = index.part[frames].astype(np.int64) * 1_000_000 + index.row_group[frames]
    for key in np.unique(keys):
        sel = frames[keys == key]
        part, rg = int(index.part[sel[0]]), int(index.row_group[sel[0]])
        t = pq.ParquetFile(index.parts[part]).read_row_group(rg).select(FRAMES_SCHEMA.names).cast(FRAMES_SCHEMA)
        tables.append(t.take(pa.array(index.row[sel].astype(np.int64))))
    return pa.concat_tables(tables) if tables else FRAMES_SCHEMA.empty_table()


def sample_numbers(mask: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` frame numbers where ``mask`` is set, drawn without replacement (all when fewer)."""
    members = np.flatnonzero(mask)
    if len(members) <= limit:
        return members
    return np.sort(np.random.default_rng([seed, 7]).choice(members, size=limit, replace=False))


# --- validation summed over ranks --------------------------------------------------------------------------------

def evaluate_stream(model, items: Iterator, fidelities: Sequence[str], *, weights: LossWeights, use_stress: bool,
                    device: torch.device | str, dtype: torch.dtype, loss_kind: str, huber_delta: float,
                    reduce=None) -> dict[str, float]:
    """Validation metrics over streamed batches (this rank's share), summed over ranks by ``reduce`` (a function
    that all-reduces a float64 tensor with SUM; None: single process), so every rank gets the metrics of the
    whole validation set whatever the world size.

    Keys as :func:`pipeline.train.evaluation.evaluate`: per fidelity ``energy_mae_meV_atom``,
    ``energy_rmse_meV_atom``, ``forces_mae_meV_A`` (over atoms), ``stress_mae_GPa``, ``val_loss`` (the weighted sum
    of the fidelity's per-term mean losses over all its validation items), and ``val_loss`` overall (the same
    over all items)."""
    nf = len(fidelities)
    # per fidelity (+ one row for all): [e_abs, e_sq, n_e, f_abs, n_f_atoms, s_abs, n_s] and per-term loss sums
    stats = torch.zeros(nf + 1, 7, dtype=torch.float64)
    loss_sums = torch.zeros(nf + 1, 3, 2, dtype=torch.float64)  # [term][sum, count]
    was_training = model.training
    model.eval()
    try:
        for item in items:
            graph, labels = item.graph.to(device, dtype), item.labels.to(device, dtype)
            out = model(graph, compute_forces=True, compute_stress=use_stress, create_graph=False)
            fid = labels.fidelity.cpu()
            n = labels.n_atoms.to(torch.float64).cpu()
            e_err = ((out["energy"].detach().double().cpu() - labels.energy.double().cpu()) / n)
            has_e = labels.has_energy.cpu()
            f_err = (out["forces"].detach() - labels.forces).abs().double().cpu()
            has_f = labels.has_forces.cpu()
            atom_fid = torch.repeat_interleave(fid, labels.n_atoms.cpu())
            if use_stress:
                s_err = ((out["stress"].detach() - labels.stress) / GPa).abs().double().cpu()
                has_s = labels.has_stress.cpu() & torch.isfinite(s_err).all(dim=(1, 2))
            for k in range(nf):
                sel_f = (fid == k)
                rows = [k, nf]
                e_sel = sel_f & has_e
                a_sel = (atom_fid == k) & has_f
                vals = [e_err[e_sel].abs().sum(), (e_err[e_sel] ** 2).sum(), e_sel.sum(),
                        f_err[a_sel].mean(dim=1).sum() if a_sel.any() else 0.0, a_sel.sum()]
                if use_stress:
                    s_sel = sel_f & has_s
                    vals += [s_err[s_sel].mean(dim=(1, 2)).sum() if s_sel.any() else 0.0, s_sel.sum()]
                else:
                    vals += [0.0, 0.0]
                row = torch.tensor([float(v) for v in vals], dtype=torch.float64)
                for r in rows:
                    stats[r] += row
                if not sel_f.any():
                    continue
                # per-fidelity loss terms: the mean of each term over this fidelity's items, times its count
                one_hot = torch.zeros(nf, dtype=dtype, device=labels.energy.device)
                one_hot[k] = 1.0
                terms = loss_terms(out, labels, kind=loss_kind, delta=huber_delta, fidelity_weights=one_hot)
                for j, name in enumerate(("energy", "forces", "stress")):
                    if name not in terms:
                        continue
                    value, _ = terms[name]
                    count = {"energy": float(e_sel.sum()), "forces": 3.0 * float(a_sel.sum()),
                             "stress": 9.0 * float((sel_f & has_s).sum()) if use_stress else 0.0}[name]
                    for r in rows:
                        loss_sums[r, j] += torch.tensor([float(value.detach()) * count, count], dtype=torch.float64)
    finally:
        model.train(was_training)
    if reduce is not None:
        flat = torch.cat([stats.flatten(), loss_sums.flatten()])
        flat = reduce(flat)
        stats = flat[: stats.numel()].reshape(stats.shape)
        loss_sums = flat[stats.numel():].reshape(loss_sums.shape)
    metrics: dict[str, float] = {}
    term_w = (weights.energy, weights.forces, weights.stress)
    for k, name in enumerate([*fidelities, None]):
        e_abs, e_sq, n_e, f_abs, n_f, s_abs, n_s = stats[k].tolist()
        if name is not None:
            if n_e:
                metrics[f"{name}/energy_mae_meV_atom"] = 1000 * e_abs / n_e
                metrics[f"{name}/energy_rmse_meV_atom"] = 1000 * math.sqrt(e_sq / n_e)
            if n_f:
                metrics[f"{name}/forces_mae_meV_A"] = 1000 * f_abs / n_f
            if n_s:
                metrics[f"{name}/stress_mae_GPa"] = s_abs / n_s
        sums = loss_sums[k]
        if float(sums[:, 1].sum()) == 0 and not n_e and not n_f:
            continue
        loss = sum(w * float(sums[j, 0]) / float(sums[j, 1]) for j, w in enumerate(term_w) if float(sums[j, 1]) > 0)
        metrics["val_loss" if name is None else f"{name}/val_loss"] = loss
    return metrics
