"""Train the multi-fidelity potential on frames of several fidelities at once (SevenNet-MF style).

One model sees every fidelity; the fidelity one-hot conditions its linear layers and each fidelity has its own
element references (least-squares fit on the training split before training). Checkpoints: ``last.pt`` after
every epoch (a crashed run resumes from it), ``best.pt`` at the best validation loss; both load with
``torch.load(..., weights_only=True)``. ``metrics.json`` holds the per-epoch history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.io import write_json_atomic
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.config import ModelConfig
from pipeline.model.potential import MFPotential
from pipeline.model.references import ElementReferences, references_from_frames
from pipeline.train.data import FrameData, split_by_group
from pipeline.train.losses import LossWeights, loss_terms, total_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``label_policy`` maps a fidelity to the labels used from it (default: all)."""

    epochs: int = 100
    batch_size: int = 8
    lr: float = 5e-3
    lr_min_factor: float = 0.05
    weight_decay: float = 0.0
    weights: LossWeights = field(default_factory=LossWeights)
    val_fraction: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    max_grad_norm: float = 10.0
    label_policy: dict[str, tuple[str, ...]] | None = None
    use_stress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["label_policy"]:
            d["label_policy"] = {k: list(v) for k, v in d["label_policy"].items()}
        return d


@dataclass
class TrainResult:
    best: Path
    last: Path
    history: list[dict[str, Any]]
    model: MFPotential


def prepare_config(frames: pa.Table, config: ModelConfig) -> ModelConfig:
    """Model config with the fidelities and elements of the data (config's own order first, new ones sorted)."""
    data_fids = sorted(set(frames.column("fidelity").to_pylist()))
    fids = [f for f in config.fidelities if f in data_fids] + [f for f in data_fids if f not in config.fidelities]
    zs = sorted({z for nums in frames.column("numbers").to_pylist() for z in nums})
    return dataclasses.replace(config, fidelities=tuple(fids), elements=tuple(zs))


def evaluate(model: MFPotential, data: FrameData, indices: Sequence[int] | None = None, *, batch_size: int = 16,
             weights: LossWeights | None = None, use_stress: bool = True, device: str = "cpu") -> dict[str, float]:
    """Errors of ``model`` on frames: per fidelity, energy MAE/RMSE (meV/atom) and force MAE (meV/A), plus the
    mean loss (``val_loss``) when ``weights`` are given."""
    indices = list(range(len(data))) if indices is None else list(indices)
    if not indices:
        return {}
    dtype = model.shift.dtype
    was_training = model.training
    model.eval()
    e_errs: dict[str, list[float]] = {}
    f_errs: dict[str, list[float]] = {}
    loss_sum = 0.0
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        graph, labels = data.batch(idx)
        graph, labels = graph.to(device, dtype), labels.to(device, dtype)
        out = model(graph, compute_forces=True, compute_stress=use_stress, create_graph=False)
        if weights is not None:
            loss_sum += float(total_loss(loss_terms(out, labels), weights).detach()) * len(idx)
        e_err = ((out["energy"] - labels.energy) / labels.n_atoms).detach()
        f_err = (out["forces"] - labels.forces).detach().abs().mean(dim=1)
        for k, i in enumerate(idx):
            fid = data.fidelity_names[i]
            if labels.has_energy[k]:
                e_errs.setdefault(fid, []).append(1000 * float(e_err[k]))
            atoms = graph.batch == k
            if labels.has_forces[atoms].any():
                f_errs.setdefault(fid, []).extend((1000 * f_err[atoms]).tolist())
    model.train(was_training)
    metrics: dict[str, float] = {}
    for fid, errs in sorted(e_errs.items()):
        arr = np.asarray(errs)
        metrics[f"{fid}/energy_mae_meV_atom"] = float(np.abs(arr).mean())
        metrics[f"{fid}/energy_rmse_meV_atom"] = float(np.sqrt((arr**2).mean()))
    for fid, errs in sorted(f_errs.items()):
        metrics[f"{fid}/forces_mae_meV_A"] = float(np.mean(errs))
    if weights is not None:
        metrics["val_loss"] = loss_sum / len(indices)
    return metrics


def evaluate_frames(model: MFPotential, frames: pa.Table, **kwargs: Any) -> dict[str, float]:
    """:func:`evaluate` on a frames table (fidelities must be known to the model)."""
    data = FrameData(frames, model.cutoff, model.fidelities)
    return evaluate(model, data, **kwargs)


def train(
    frames: pa.Table,
    model_config: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    references: ElementReferences | None = None,
    reference_overrides: Mapping[str, Mapping[str, float]] | None = None,
    resume: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on ``frames`` (FRAMES_SCHEMA); write checkpoints and metrics under ``out_dir``; resume if asked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    config = prepare_config(frames, model_config)
    data = FrameData(frames, config.cutoff, config.fidelities, cfg.label_policy)
    train_idx, val_idx = split_by_group(data.groups, cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise ValueError("training split is empty: lower val_fraction or add frames")
    config = dataclasses.replace(config, avg_num_neighbors=data.avg_num_neighbors(train_idx))
    if references is None:
        references = references_from_frames(frames.take(pa.array(train_idx)))
    for fid, energies in (reference_overrides or {}).items():
        references = references.override(fid, energies)

    model = MFPotential(config, references).to(device=cfg.device, dtype=dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * cfg.lr_min_factor
    )
    last, best = out_dir / "last.pt", out_dir / "best.pt"
    history: list[dict[str, Any]] = []
    start_epoch, best_loss = 0, math.inf
    run_key = {"train_config": cfg.to_dict(), "model_config": config.to_dict(), "frames": len(frames)}
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        extra = state.get("extra", {})
        if extra.get("run_key") != json.loads(json.dumps(run_key)):
            raise ValueError(f"{last} belongs to a different run (config or data changed); use a new out_dir "
                             "or resume=False")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(extra["optimizer"])
        scheduler.load_state_dict(extra["scheduler"])
        history = list(extra["history"])
        start_epoch, best_loss = int(extra["epoch"]) + 1, float(extra["best_loss"])
        log.info("resuming from %s at epoch %d", last, start_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = [train_idx[k] for k in torch.randperm(len(train_idx), generator=gen).tolist()]
        sums = {"loss": 0.0, "energy": 0.0, "forces": 0.0, "stress": 0.0}
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            graph, labels = data.batch(idx)
            graph, labels = graph.to(cfg.device, dtype), labels.to(cfg.device, dtype)
            out = model(graph, compute_forces=True, compute_stress=cfg.use_stress, create_graph=True)
            terms = loss_terms(out, labels)
            loss = total_loss(terms, cfg.weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            sums["loss"] += float(loss.detach()) * len(idx)
            for k, (v, _) in terms.items():
                sums[k] += float(v.detach()) * len(idx)
        scheduler.step()
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update({f"train_{k}": v / len(order) for k, v in sums.items()})
        row.update(evaluate(model, data, val_idx, batch_size=cfg.batch_size, weights=cfg.weights,
                            use_stress=cfg.use_stress, device=cfg.device))
        row["wall_s"] = time.perf_counter() - t0
        score = row.get("val_loss", row["train_loss"])
        history.append(row)
        extra = {"run_key": run_key, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "history": history, "epoch": epoch, "best_loss": min(best_loss, score),
                 "n_train": len(train_idx), "n_val": len(val_idx)}
        if score < best_loss:
            best_loss = score
            save_checkpoint(model, best, extra={"epoch": epoch, "metrics": row, "train_config": cfg.to_dict()})
        save_checkpoint(model, last, extra=extra)
        write_json_atomic(out_dir / "metrics.json", {"history": history, "n_train": len(train_idx),
                                                      "n_val": len(val_idx), "fidelities": list(config.fidelities)})
        if progress:
            progress(row)
        log.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
    if not best.exists():  # resumed a finished run
        save_checkpoint(model, best)
    return TrainResult(best=best, last=last, history=history, model=model)
