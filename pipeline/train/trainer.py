"""Train the multi-fidelity potential on frames of several fidelities at once (SevenNet-MF style).

One model sees every fidelity; the fidelity one-hot conditions its linear layers and each fidelity has its own
element references (joint fit on the training split, :mod:`pipeline.model.references`). Or fine-tune:
``init_from`` a checkpoint (ours or the imported SevenNet-MF-0), new elements appended, new fidelities started
from a named one (:mod:`pipeline.train.finetune`).

Per optimizer step: masked loss (MSE or Huber, per-fidelity weights), gradient clipping, Adam, LR schedule
(linear warm-up, then cosine, plateau or constant), EMA of the weights (``torch.optim.swa_utils``; evaluation
and checkpoints use the EMA weights). Per epoch: validation errors per fidelity; ``best.pt`` at the best
validation loss of ``target_fidelity`` (all fidelities when unset); early stopping after ``patience`` epochs
without improvement. ``last.pt`` after every epoch carries the optimizer, scheduler, raw and EMA weights and a
resume key (train + model config and a content hash of the frames) so a crashed run resumes exactly; every
checkpoint records the training-data hash. ``metrics.json`` holds the per-epoch history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.hashing import frames_hash
from pipeline.io import write_json_atomic
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.model.config import ModelConfig
from pipeline.model.potential import MFPotential
from pipeline.model.references import ElementReferences, references_from_frames
from pipeline.progress import progress as progress_bar
from pipeline.train.data import FrameData, apply_label_policy, split_by_group
from pipeline.train.evaluation import evaluate
from pipeline.train.finetune import (
    FREEZE_MODES,
    expand_model,
    freeze,
    fidelity_gap_penalty,
    parse_new_fidelities,
    source_offsets,
    tie_fidelity_rows,
)
from pipeline.train.losses import LOSS_KINDS, LossWeights, loss_terms, total_loss

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "plateau", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``label_policy`` maps a fidelity to the labels used from it (default: all).

    ``max_steps``: optimizer steps in all (overrides ``epochs``; the strategies compare at matched steps).
    ``fidelity_weights``: loss weight per fidelity (default 1). ``ema_decay``: 0 = no EMA.
    ``patience``: early stopping after this many epochs without a better selection score (None: never).
    ``target_fidelity``: the fidelity whose validation loss selects ``best.pt``. ``init_from``: checkpoint to
    fine-tune; ``new_fidelities``: {new: source} fidelities added to it; ``freeze``: see
    :data:`pipeline.train.finetune.FREEZE_MODES`. ``tie_fidelities``: a fresh model starts with every fidelity's
    conditioned weights equal to the first fidelity's (all fidelities start as one function, up to their
    references and scales), so that a scarce fidelity learns a difference instead of a random head.
    ``fidelity_prior``: weight of :func:`pipeline.train.finetune.fidelity_gap_penalty` in the loss (0: off), a
    prior that the fidelities' conditioned weights stay close, so a scarce fidelity departs from the plentiful one
    only as far as its labels support."""

    epochs: int = 100
    max_steps: int | None = None
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
    loss: str = "mse"
    huber_delta: float = 0.01
    fidelity_weights: dict[str, float] | None = None
    ema_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    patience: int | None = None
    target_fidelity: str | None = None
    init_from: str | None = None
    new_fidelities: dict[str, str] | None = None
    freeze: str = "none"
    tie_fidelities: bool = True
    fidelity_prior: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        if not (self.fidelity_prior >= 0 and math.isfinite(self.fidelity_prior)):
            raise ValueError(f"fidelity_prior must be a finite number >= 0, got {self.fidelity_prior}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.epochs < 0 or self.warmup_steps < 0:
            raise ValueError("batch_size must be >= 1, epochs and warmup_steps >= 0")
        if self.target_fidelity:
            object.__setattr__(self, "target_fidelity", self.target_fidelity.strip().lower())
        if self.new_fidelities:
            object.__setattr__(self, "new_fidelities", parse_new_fidelities(self.new_fidelities))
        if self.fidelity_weights:
            object.__setattr__(self, "fidelity_weights",
                               {str(k).strip().lower(): float(v) for k, v in self.fidelity_weights.items()})

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
    steps: int = 0
    data_hash: str = ""


def prepare_config(frames: pa.Table, config: ModelConfig) -> ModelConfig:
    """Model config with the fidelities and elements of the data (config's own order first, new ones sorted)."""
    data_fids = sorted(set(frames.column("fidelity").to_pylist()))
    fids = [f for f in config.fidelities if f in data_fids] + [f for f in data_fids if f not in config.fidelities]
    zs = sorted({z for nums in frames.column("numbers").to_pylist() for z in nums})
    return dataclasses.replace(config, fidelities=tuple(fids), elements=tuple(zs))


def build_model(frames: pa.Table, model_config: ModelConfig, cfg: TrainConfig,
                 references: ElementReferences | None,
                 reference_overrides: Mapping[str, Mapping[str, float]] | None):
    """(model, data, train_idx, val_idx): fresh, or expanded from ``cfg.init_from``."""
    source = load_checkpoint(cfg.init_from) if cfg.init_from else None
    new_fids = dict(cfg.new_fidelities or {})
    if source is not None:
        data_fids = sorted(set(frames.column("fidelity").to_pylist()))
        unknown = sorted(set(data_fids) - set(source.fidelities) - set(new_fids))
        if unknown:
            raise ValueError(f"{cfg.init_from}: data fidelities {unknown} are not in the checkpoint "
                             f"({', '.join(source.fidelities)}); add --new-fidelity {unknown[0]}=SOURCE")
        fidelities = (*source.fidelities, *new_fids)
        cutoff = source.cutoff
    else:
        config = prepare_config(frames, model_config)
        fidelities, cutoff = config.fidelities, config.cutoff
    data = FrameData(frames, cutoff, fidelities)
    train_idx, val_idx = split_by_group(data.groups, cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise ValueError("training split is empty: lower val_fraction or add frames")
    if references is None:
        references = references_from_frames(frames.take(pa.array(train_idx)))
    for fid, energies in (reference_overrides or {}).items():
        references = references.override(fid, energies)
    if source is not None:
        zs = sorted({z for nums in frames.column("numbers").to_pylist() for z in nums})
        # a new fidelity starts as its source + a per-element shift fitted on its own training energies
        offsets = source_offsets(source, frames.take(pa.array(train_idx)), new_fids)
        model = expand_model(source, zs, new_fids, references, offsets)
    else:
        config = dataclasses.replace(config, avg_num_neighbors=data.avg_num_neighbors(train_idx))
        model = MFPotential(config, references)
        if cfg.tie_fidelities:
            tie_fidelity_rows(model)
    if cfg.target_fidelity and cfg.target_fidelity not in model.fidelities:
        raise ValueError(f"target fidelity {cfg.target_fidelity!r} is not one of {', '.join(model.fidelities)}")
    return model, data, train_idx, val_idx


def _schedulers(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """(per-step scheduler or None, per-epoch plateau scheduler or None)."""
    sched = torch.optim.lr_scheduler
    warm = (sched.LinearLR(optimizer, start_factor=1e-2, end_factor=1.0, total_iters=cfg.warmup_steps)
            if cfg.warmup_steps else None)
    if cfg.scheduler == "cosine":
        cos = sched.CosineAnnealingLR(optimizer, T_max=max(total_steps - cfg.warmup_steps, 1),
                                      eta_min=cfg.lr * cfg.lr_min_factor)
        step = sched.SequentialLR(optimizer, [warm, cos], milestones=[cfg.warmup_steps]) if warm else cos
        return step, None
    plateau = (sched.ReduceLROnPlateau(optimizer, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                                       min_lr=cfg.lr * cfg.lr_min_factor) if cfg.scheduler == "plateau" else None)
    return warm, plateau


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
    frames = apply_label_policy(frames, cfg.label_policy)
    data_hash = frames_hash(frames)
    model, data, train_idx, val_idx = build_model(frames, model_config, cfg, references, reference_overrides)
    model = model.to(device=cfg.device, dtype=dtype)
    config = model.config
    trained = freeze(model, cfg.freeze)
    fid_w = torch.tensor([(cfg.fidelity_weights or {}).get(f, 1.0) for f in config.fidelities],
                         dtype=dtype, device=cfg.device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    step_sched, plateau = _schedulers(optimizer, cfg, total_steps)
    # buffers are not averaged: shift/scale are constant and integer index buffers must stay as they are
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
           if cfg.ema_decay else None)
    eval_model = ema.module if ema is not None else model

    last, best = out_dir / "last.pt", out_dir / "best.pt"
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, step = 0, math.inf, -1, 0
    run_key = {"train_config": cfg.to_dict(), "model_config": config.to_dict(), "data_hash": data_hash}
    score_key = f"{cfg.target_fidelity}/val_loss" if cfg.target_fidelity else "val_loss"

    def write_metrics(stopped_early: bool = False) -> None:
        write_json_atomic(out_dir / "metrics.json", {
            "history": history, "n_train": len(train_idx), "n_val": len(val_idx),
            "fidelities": list(config.fidelities), "data_hash": data_hash, "selection": score_key,
            "best_epoch": best_epoch, "steps": step, "stopped_early": stopped_early, "trained": len(trained)})

    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        extra = state.get("extra", {})
        if extra.get("run_key") != json.loads(json.dumps(run_key)):
            raise ValueError(f"{last} belongs to a different run (config or data changed); use a new out_dir "
                             "or resume=False")
        model.load_state_dict(extra["raw_state"])
        if ema is not None:
            ema.load_state_dict(extra["ema_state"])
        optimizer.load_state_dict(extra["optimizer"])
        if step_sched is not None:
            step_sched.load_state_dict(extra["scheduler"])
        if plateau is not None:
            plateau.load_state_dict(extra["plateau"])
        history = list(extra["history"])
        start_epoch, best_score = int(extra["epoch"]) + 1, float(extra["best_score"])
        best_epoch, step = int(extra["best_epoch"]), int(extra["step"])
        write_metrics(bool(extra.get("stopped_early")))  # a crash may have left a newer, stale metrics.json
        log.info("resuming from %s at epoch %d", last, start_epoch)
        if extra.get("stopped_early"):
            start_epoch = n_epochs

    warned = False
    bar = progress_bar(total=total_steps, initial=step, desc="train", unit="step")
    try:
        for epoch in range(start_epoch, n_epochs):
            t0 = time.perf_counter()
            model.train()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            order = [train_idx[k] for k in torch.randperm(len(train_idx), generator=gen).tolist()]
            sums = {"loss": 0.0, "energy": 0.0, "forces": 0.0, "stress": 0.0}
            seen = 0
            for start in range(0, len(order), cfg.batch_size):
                if step >= total_steps:
                    break
                idx = order[start:start + cfg.batch_size]
                graph, labels = data.batch(idx)
                graph, labels = graph.to(cfg.device, dtype), labels.to(cfg.device, dtype)
                out = model(graph, compute_forces=True, compute_stress=cfg.use_stress, create_graph=True)
                terms = loss_terms(out, labels, kind=cfg.loss, delta=cfg.huber_delta, fidelity_weights=fid_w)
                loss = total_loss(terms, cfg.weights)
                if cfg.fidelity_prior:
                    loss = loss + cfg.fidelity_prior * fidelity_gap_penalty(model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                step += 1
                if ema is not None:
                    ema.update_parameters(model)
                if step_sched is not None and (cfg.scheduler == "cosine" or step <= cfg.warmup_steps):
                    step_sched.step()
                seen += len(idx)
                sums["loss"] += float(loss.detach()) * len(idx)
                for k, (v, _) in terms.items():
                    sums[k] += float(v.detach()) * len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4g}")
            row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            row.update(evaluate(eval_model, data, val_idx, batch_size=cfg.batch_size, weights=cfg.weights,
                                use_stress=cfg.use_stress, device=cfg.device, loss_kind=cfg.loss,
                                huber_delta=cfg.huber_delta))
            row["wall_s"] = time.perf_counter() - t0
            score = row.get(score_key)
            if score is None:
                if val_idx and cfg.target_fidelity and not warned:
                    log.warning("no validation frames of target fidelity %s: selecting on the training loss",
                                cfg.target_fidelity)
                    warned = True
                score = row["train_loss"]
            row["score"] = score
            history.append(row)
            if plateau is not None and step > cfg.warmup_steps:
                plateau.step(score)
            improved = score < best_score
            if improved:
                best_score, best_epoch = score, epoch
                save_checkpoint(eval_model, best, extra={"epoch": epoch, "metrics": row, "selection": score_key,
                                                         "train_config": cfg.to_dict(), "data_hash": data_hash})
            stop = cfg.patience is not None and epoch - best_epoch >= cfg.patience
            extra = {"run_key": run_key, "optimizer": optimizer.state_dict(), "history": history, "epoch": epoch,
                     "best_score": best_score, "best_epoch": best_epoch, "step": step, "data_hash": data_hash,
                     "raw_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                     "n_train": len(train_idx), "n_val": len(val_idx), "stopped_early": stop}
            if ema is not None:
                extra["ema_state"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
            if step_sched is not None:
                extra["scheduler"] = step_sched.state_dict()
            if plateau is not None:
                extra["plateau"] = plateau.state_dict()
            save_checkpoint(eval_model, last, extra=extra)
            write_metrics(stop)
            if progress:
                progress(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
            if stop:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    finally:
        bar.close()
    if not best.exists():  # resumed a finished run, or no epoch ran
        save_checkpoint(eval_model, best, extra={"data_hash": data_hash, "selection": score_key})
    return TrainResult(best=best, last=last, history=history, model=eval_model, steps=step, data_hash=data_hash)
