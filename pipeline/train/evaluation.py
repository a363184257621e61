"""Errors of a potential on labelled frames: per-frame rows and per-fidelity summaries (energy per atom,
forces, stress), plus the validation loss per fidelity used to select ``best.pt``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ase.units import GPa

from pipeline.graphs import batch_graphs, frame_rows_to_graph
from pipeline.model.potential import MFPotential
from pipeline.train.data import FrameData
from pipeline.train.losses import LossWeights, loss_terms, total_loss

__all__ = ["FRAME_ERRORS_SCHEMA", "evaluate", "evaluate_frames", "frame_errors", "predict"]

FRAME_ERRORS_SCHEMA = pa.schema([
    pa.field("frame_id", pa.string(), nullable=False),
    pa.field("fidelity", pa.string(), nullable=False, metadata={"doc": "model fidelity the frame was predicted at"}),
    pa.field("n_atoms", pa.int32(), nullable=False),
    pa.field("energy_pred_eV_atom", pa.float64(), nullable=False),
    pa.field("energy_error_meV_atom", pa.float64(), metadata={"doc": "prediction - label; null: no label"}),
    pa.field("forces_mae_meV_A", pa.float64(), metadata={"doc": "mean |error| of force components"}),
    pa.field("stress_mae_GPa", pa.float64(), metadata={"doc": "mean |error| of stress components"}),
], metadata={"name": "frame_errors"})


def _predict(model: MFPotential, data: FrameData, indices: Sequence[int], batch_size: int, use_stress: bool,
             device: str, loss_kind: str, delta: float, weights: LossWeights | None):
    """Yield per-frame error rows and (fidelity, loss * n) per batch; batches hold one fidelity each."""
    dtype = model.shift.dtype
    by_fid: dict[str, list[int]] = {}
    for i in indices:
        by_fid.setdefault(data.fidelity_names[i], []).append(i)
    for fid, idx_all in sorted(by_fid.items()):
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start:start + batch_size]
            graph, labels = data.batch(idx)
            graph, labels = graph.to(device, dtype), labels.to(device, dtype)
            out = model(graph, compute_forces=True, compute_stress=use_stress, create_graph=False)
            if weights is not None:
                loss = float(total_loss(loss_terms(out, labels, kind=loss_kind, delta=delta), weights).detach())
                yield "loss", (fid, loss * len(idx))
            e_pred = (out["energy"] / labels.n_atoms).detach().double().cpu()
            e_err = e_pred - (labels.energy / labels.n_atoms).double().cpu()
            f_err = (out["forces"] - labels.forces).detach().abs().double().cpu()
            s_err = ((out["stress"] - labels.stress) / GPa).detach().abs().double().cpu() if use_stress else None
            batch = graph.batch.cpu()
            for k, i in enumerate(idx):
                atoms = batch == k
                row: dict[str, Any] = {
                    "frame_id": data.frame_ids[i], "fidelity": fid, "n_atoms": int(atoms.sum()),
                    "energy_pred_eV_atom": float(e_pred[k]),
                    "energy_error_meV_atom": 1000 * float(e_err[k]) if labels.has_energy[k] else None,
                    "forces_mae_meV_A": 1000 * float(f_err[atoms].mean()) if bool(labels.has_forces[atoms].any())
                    else None,
                    "stress_mae_GPa": float(s_err[k].mean()) if s_err is not None and bool(labels.has_stress[k])
                    and bool(torch.isfinite(s_err[k]).all()) else None,
                }
                yield "row", row


def frame_errors(model: MFPotential, data: FrameData, indices: Sequence[int] | None = None, *,
                 batch_size: int = 16, use_stress: bool = True, device: str = "cpu") -> list[dict[str, Any]]:
    """One row per frame (:data:`FRAME_ERRORS_SCHEMA`)."""
    indices = list(range(len(data))) if indices is None else list(indices)
    was_training = model.training
    model.eval()
    try:
        return [v for kind, v in _predict(model, data, indices, batch_size, use_stress, device, "mse", 0.01, None)
                if kind == "row"]
    finally:
        model.train(was_training)


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per fidelity: energy MAE/RMSE (meV/atom, over frames), force MAE (meV/A, over atoms), stress MAE (GPa)."""
    metrics: dict[str, float] = {}
    for fid in sorted({r["fidelity"] for r in rows}):
        mine = [r for r in rows if r["fidelity"] == fid]
        e = np.array([r["energy_error_meV_atom"] for r in mine if r["energy_error_meV_atom"] is not None])
        if e.size:
            metrics[f"{fid}/energy_mae_meV_atom"] = float(np.abs(e).mean())
            metrics[f"{fid}/energy_rmse_meV_atom"] = float(np.sqrt((e**2).mean()))
        f = [(r["forces_mae_meV_A"], r["n_atoms"]) for r in mine if r["forces_mae_meV_A"] is not None]
        if f:
            metrics[f"{fid}/forces_mae_meV_A"] = float(sum(v * n for v, n in f) / sum(n for _, n in f))
        s = [r["stress_mae_GPa"] for r in mine if r["stress_mae_GPa"] is not None]
        if s:
            metrics[f"{fid}/stress_mae_GPa"] = float(np.mean(s))
    return metrics


def evaluate(model: MFPotential, data: FrameData, indices: Sequence[int] | None = None, *, batch_size: int = 16,
             weights: LossWeights | None = None, use_stress: bool = True, device: str = "cpu",
             loss_kind: str = "mse", huber_delta: float = 0.01) -> dict[str, float]:
    """:func:`summarize` of the frames' errors, plus, when ``weights`` are given, the mean loss overall
    (``val_loss``) and per fidelity (``<fidelity>/val_loss``)."""
    indices = list(range(len(data))) if indices is None else list(indices)
    if not indices:
        return {}
    was_training = model.training
    model.eval()
    rows, losses = [], {}
    try:
        for kind, v in _predict(model, data, indices, batch_size, use_stress, device, loss_kind, huber_delta,
                                weights):
            if kind == "row":
                rows.append(v)
            else:
                acc = losses.setdefault(v[0], [0.0, 0])
                acc[0] += v[1]
    finally:
        model.train(was_training)
    metrics = summarize(rows)
    if weights is not None:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["fidelity"]] = counts.get(r["fidelity"], 0) + 1
        for fid, (total, _) in losses.items():
            metrics[f"{fid}/val_loss"] = total / counts[fid]
        metrics["val_loss"] = sum(t for t, _ in losses.values()) / len(indices)
    return metrics


def evaluate_frames(model: MFPotential, frames: pa.Table, fidelity: str | None = None,
                    **kwargs: Any) -> dict[str, float]:
    """:func:`evaluate` on a frames table (fidelities must be known to the model; ``fidelity``: predict every
    frame at this model fidelity, e.g. 'r2scan' for frames labelled 'gpaw-r2scan')."""
    return evaluate(model, frame_data_for(model, frames, fidelity), **kwargs)


def frame_data_for(model: MFPotential, frames: pa.Table, fidelity: str | None = None) -> FrameData:
    """Frames prepared for ``model`` (optionally all relabelled to model fidelity ``fidelity``)."""
    if fidelity is not None:
        model.fidelity_index(fidelity)  # unknown names: KeyError listing the known ones
        fid = str(fidelity).strip().lower()
        frames = frames.set_column(frames.schema.get_field_index("fidelity"), "fidelity",
                                   pa.array([fid] * frames.num_rows, pa.string()))
    unknown = sorted(set(frames.column("fidelity").to_pylist()) - set(model.fidelities))
    if unknown:
        raise KeyError(f"frame fidelities {unknown} are not in the model ({', '.join(model.fidelities)}); "
                       "pass the model fidelity to predict them at")
    return FrameData(frames, model.cutoff, model.fidelities)


def predict(terms: Sequence[tuple[MFPotential, str]], frames: pa.Table, batch_size: int = 16,
            device: str = "cpu") -> list[dict[str, Any]]:
    """Per frame: predicted energy (eV), forces (n, 3) eV/A, summed over the (model, fidelity) terms."""
    rows = frames.to_pylist()
    preds: list[dict[str, Any]] = [{"energy": 0.0, "forces": 0.0} for _ in rows]
    for model, fid in terms:
        model.eval()
        model.fidelity_index(fid)  # unknown names: KeyError listing the known ones
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            graph = batch_graphs([frame_rows_to_graph([dict(r, fidelity=fid)], model.cutoff, model.fidelities,
                                                      model.shift.dtype) for r in chunk]).to(device)
            out = model(graph, compute_forces=True, compute_stress=False, create_graph=False)
            e = out["energy"].detach().double().cpu().numpy()
            f = out["forces"].detach().double().cpu().numpy()
            sizes = np.cumsum([0] + [len(r["numbers"]) for r in chunk])
            for k in range(len(chunk)):
                p = preds[start + k]
                p["energy"] = p["energy"] + e[k]
                p["forces"] = p["forces"] + f[sizes[k]:sizes[k + 1]]
    return preds
