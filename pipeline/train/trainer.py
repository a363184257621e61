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

At scale (:mod:`pipeline.train.scale`): ``frames`` may be a dataset folder that is streamed
(:class:`~pipeline.train.stream.FrameStream`: batches by atom/edge budget, per-fidelity sampling weights,
graphs built in DataLoader workers) instead of loaded (``stream=True``, or automatically above
:data:`STREAM_ABOVE_FRAMES` frames or under ``torchrun``); under ``torchrun`` the model is wrapped in DDP, each
rank streams its share of every epoch, validation metrics are summed over ranks, and rank 0 alone writes.
``accumulate`` micro-batches make one optimizer step (loss normalised over the step's labelled items, see
:mod:`pipeline.train.scale`); ``precision`` ``bf16`` / ``tf32`` for CUDA; ``checkpoint_every`` writes ``last.pt``
mid-epoch too, and a resumed run continues from that position (stream state, EMA, optimizer, scheduler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from pipeline.hashing import frames_hash
from pipeline.io import read_table, write_json_atomic
from pipeline.model.checkpoint import load_checkpoint, save_checkpoint
from pipeline.model.config import ModelConfig
from pipeline.model.potential import MFPotential
from pipeline.model.references import ElementReferences, references_from_frames
from pipeline.progress import progress as progress_bar
from pipeline.schema import FRAMES_SCHEMA
from pipeline.train import distributed as dist_util
from pipeline.train.data import FrameData, apply_label_policy, borrow_forces, is_borrowed, split_by_group
from pipeline.train.evaluation import evaluate
from pipeline.train.finetune import (
    FREEZE_MODES,
    expand_model,
    fidelity_gap_penalty,
    freeze,
    parse_new_fidelities,
    source_offsets,
    tie_fidelity_rows,
)
from pipeline.train.losses import LOSS_KINDS, LossWeights, gap_loss, loss_terms, total_loss
from pipeline.train.scale import (
    PRECISIONS,
    evaluate_stream,
    frame_count,
    precision_context,
    read_frames,
    sample_numbers,
    scaled_loss,
    scan_dataset,
    term_counts,
)

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "plateau", "constant")
#: ``stream=None`` streams a dataset folder with more frames than this (and always under torchrun)
STREAM_ABOVE_FRAMES = 200_000
#: options that do not change what a run computes (left out of the resume key): worker processes, how often
#: last.pt is written
_NOT_IN_RUN_KEY = ("num_workers", "checkpoint_every")
#: options added with the streamed path: in the resume key only when not at their default (so that a last.pt
#: written before they existed still resumes)
_NEW_DEFAULTS = {"fidelity_prior": 0.0, "stream": None, "max_atoms": None, "max_edges": None,
                 "sampling_weights": None, "accumulate": 1, "precision": "float32", "buffer_rows": 10_000,
                 "reference_frames": 20_000, "gap_pairs": None, "gap_weight": 0.0,
                 "borrow_forces": None}


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
    only as far as its labels support.
    ``gap_pairs`` ({high: low}) and ``gap_weight``: a loss term (:func:`pipeline.train.losses.gap_loss`, weight
    ``gap_weight`` like ``weights.energy``) on the predicted ``high - low`` energy of every training structure
    labelled at both, so the joint model learns the difference of the fidelities directly (in-memory path only).
    ``borrow_forces`` ({high: low}): the high fidelity also trains on the low fidelity's forces of every structure
    it has no label for (:func:`pipeline.train.data.borrow_forces`; in-memory path only)."""

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
    stream: bool | None = None
    max_atoms: int | None = None
    max_edges: int | None = None
    sampling_weights: dict[str, float] | None = None
    accumulate: int = 1
    precision: str = "float32"
    num_workers: int = 0
    checkpoint_every: int = 0
    buffer_rows: int = 10_000
    reference_frames: int = 20_000
    gap_pairs: dict[str, str] | None = None
    gap_weight: float = 0.0
    borrow_forces: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        if not (self.fidelity_prior >= 0 and math.isfinite(self.fidelity_prior)):
            raise ValueError(f"fidelity_prior must be a finite number >= 0, got {self.fidelity_prior}")
        if not (self.gap_weight >= 0 and math.isfinite(self.gap_weight)):
            raise ValueError(f"gap_weight must be a finite number >= 0, got {self.gap_weight}")
        for name, what in (("gap_pairs", "a gap pair needs"), ("borrow_forces", "borrow_forces needs")):
            if getattr(self, name):
                pairs = {str(k).strip().lower(): str(v).strip().lower() for k, v in getattr(self, name).items()}
                if any(k == v for k, v in pairs.items()):
                    raise ValueError(f"{what} two different fidelities per pair, got {pairs}")
                object.__setattr__(self, name, pairs)
        if self.gap_weight and not self.gap_pairs:
            raise ValueError("gap_weight needs gap_pairs (e.g. {'r2scan': 'pbe'}): which fidelities to pair")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.epochs < 0 or self.warmup_steps < 0:
            raise ValueError("batch_size must be >= 1, epochs and warmup_steps >= 0")
        if self.accumulate < 1 or self.num_workers < 0 or self.checkpoint_every < 0:
            raise ValueError("accumulate must be >= 1, num_workers and checkpoint_every >= 0")
        for name in ("max_atoms", "max_edges", "buffer_rows", "reference_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision != "float32" and self.dtype != "float32":
            raise ValueError(f"precision {self.precision} needs dtype float32 (got {self.dtype})")
        if self.sampling_weights:
            weights = {str(k).strip().lower(): float(v) for k, v in self.sampling_weights.items()}
            if any(not (math.isfinite(v) and v >= 0) for v in weights.values()):
                raise ValueError(f"sampling weights must be finite and >= 0, got {weights}")
            object.__setattr__(self, "sampling_weights", weights)
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

    def run_key(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote last.pt (see :data:`_NOT_IN_RUN_KEY`)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_RUN_KEY}
        return {k: v for k, v in d.items() if k not in _NEW_DEFAULTS or v != _NEW_DEFAULTS[k]}

    def budget(self):
        """The stream's per-rank micro-batch budget: ``max_atoms`` / ``max_edges`` when set, else ``batch_size``
        structures."""
        from pipeline.train.stream import BatchBudget

        if self.max_atoms is None and self.max_edges is None:
            return BatchBudget(max_structures=self.batch_size)
        return BatchBudget(max_atoms=self.max_atoms, max_edges=self.max_edges)


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
    data = FrameData(frames, cutoff, fidelities, gap_pairs=cfg.gap_pairs if cfg.gap_weight else None)
    train_idx, val_idx = split_by_group(data.groups, cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise ValueError("training split is empty: lower val_fraction or add frames")
    # borrowed forces (cfg.borrow_forces) train, but are not labels of their fidelity to select best.pt on
    val_idx = [i for i in val_idx if not is_borrowed(data.frame_ids[i], data.fidelity_names[i])]
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


def build_streamed(path: Path, model_config: ModelConfig, cfg: TrainConfig,
                   references: ElementReferences | None,
                   reference_overrides: Mapping[str, Mapping[str, float]] | None, rank: int, world_size: int):
    """(model, train stream, validation stream or None, data hash, n_train, n_val) for a streamed dataset.

    One scan of the dataset gives its fidelities, elements and the hash split (:func:`scan_dataset`); element
    references and the convolution normaliser are fitted on a sample of the training frames (up to
    ``reference_frames`` and 2000 frames), so nothing proportional to the data set is held in memory."""
    from pipeline.train.stream import BatchBudget, FrameStream

    scan = scan_dataset(path, cfg.val_fraction, cfg.seed)
    source = load_checkpoint(cfg.init_from) if cfg.init_from else None
    new_fids = dict(cfg.new_fidelities or {})
    if source is not None:
        unknown = sorted(set(scan.fidelities) - set(source.fidelities) - set(new_fids))
        if unknown:
            raise ValueError(f"{cfg.init_from}: data fidelities {unknown} are not in the checkpoint "
                             f"({', '.join(source.fidelities)}); add --new-fidelity {unknown[0]}=SOURCE")
        fidelities, cutoff = (*source.fidelities, *new_fids), source.cutoff
    else:
        fids = [f for f in model_config.fidelities if f in scan.fidelities]
        fids += [f for f in scan.fidelities if f not in model_config.fidelities]
        config = dataclasses.replace(model_config, fidelities=tuple(fids), elements=scan.elements)
        fidelities, cutoff = config.fidelities, config.cutoff
    common = {"cutoff": cutoff, "fidelities": fidelities, "seed": cfg.seed, "buffer_rows": cfg.buffer_rows,
              "rank": rank, "world_size": world_size, "label_policy": cfg.label_policy}
    train_stream = FrameStream(path, budget=cfg.budget(), weights=cfg.sampling_weights, select=~scan.val, **common)
    val_stream = (FrameStream(path, budget=BatchBudget(max_atoms=cfg.max_atoms, max_edges=cfg.max_edges,
                                                       max_structures=cfg.batch_size), select=scan.val, **common)
                  if scan.val.any() else None)
    n_val = int(scan.val.sum())
    n_train = scan.n_frames - n_val
    if not n_train:
        raise ValueError("training split is empty: lower val_fraction or add frames")
    sample = apply_label_policy(read_frames(train_stream.index, sample_numbers(~scan.val, cfg.reference_frames,
                                                                               cfg.seed)), cfg.label_policy)
    if references is None:
        references = references_from_frames(sample)
    for fid, energies in (reference_overrides or {}).items():
        references = references.override(fid, energies)
    if source is not None:
        offsets = source_offsets(source, sample, new_fids)
        model = expand_model(source, list(scan.elements), new_fids, references, offsets)
    else:
        small = read_frames(train_stream.index, sample_numbers(~scan.val, 2000, cfg.seed))
        avg = FrameData(small, cutoff, fidelities).avg_num_neighbors()
        model = MFPotential(dataclasses.replace(config, avg_num_neighbors=avg), references)
        if cfg.tie_fidelities:
            tie_fidelity_rows(model)
    if cfg.target_fidelity and cfg.target_fidelity not in model.fidelities:
        raise ValueError(f"target fidelity {cfg.target_fidelity!r} is not one of {', '.join(model.fidelities)}")
    return model, train_stream, val_stream, scan.data_hash, n_train, n_val


def use_stream(frames: pa.Table | str | os.PathLike[str], cfg: TrainConfig, world_size: int = 1) -> bool:
    """Whether :func:`train` streams ``frames`` (see :data:`STREAM_ABOVE_FRAMES`)."""
    memory_only = [name for name, on in (("gap_weight (paired-gap loss)", cfg.gap_weight),
                                         ("borrow_forces", cfg.borrow_forces)) if on]
    if memory_only and (cfg.stream or world_size > 1):
        raise ValueError(f"{memory_only[0]} is supported on the in-memory path only, not streamed or "
                         "distributed training")
    if isinstance(frames, pa.Table):
        if cfg.stream or world_size > 1:
            raise ValueError("streamed or distributed training reads a frames dataset folder: pass its path")
        if cfg.max_atoms is not None or cfg.max_edges is not None:
            raise ValueError("max_atoms / max_edges batch by size in the streamed path, which reads a frames "
                             "dataset folder: pass its path")
        return False
    if cfg.stream is not None:
        if not cfg.stream and world_size > 1:
            raise ValueError("distributed training streams its data: do not set stream=False under torchrun")
        return cfg.stream
    if world_size > 1 or cfg.max_atoms is not None or cfg.max_edges is not None or cfg.sampling_weights:
        if memory_only:
            raise ValueError(f"{memory_only[0]} is supported on the in-memory path only: drop "
                             "max_atoms / max_edges / sampling_weights or pass a frames table")
        return True
    try:
        return frame_count(frames) > STREAM_ABOVE_FRAMES
    except (OSError, pa.ArrowException):  # not readable as Parquet: the in-memory reader names the problem
        return False


class _MemoryBatches:
    """Micro-batches of the in-memory path: the training frames in a seeded random order, ``batch_size`` each.

    ``cfg.sampling_weights`` (fidelity -> w) as in the streamed path (:func:`pipeline.train.stream.weighted_repeats`),
    so a scarce fidelity can be seen as often as a plentiful one."""

    def __init__(self, data: FrameData, train_idx: list[int], cfg: TrainConfig) -> None:
        self.data, self.train_idx, self.cfg = data, train_idx, cfg
        self.by_fidelity: dict[str, list[int]] = {}
        for i in train_idx:
            self.by_fidelity.setdefault(data.fidelity_names[i], []).append(i)
        unknown = sorted(set(cfg.sampling_weights or {}) - set(data.fidelity_names))
        if unknown:
            raise ValueError(f"sampling weights for fidelities not in the frames: {', '.join(unknown)} "
                             f"(frames have {', '.join(sorted(set(data.fidelity_names)))})")

    def samples(self, epoch: int) -> list[int]:
        """The training frames of one epoch, with repeats per the sampling weights (unordered)."""
        weights = self.cfg.sampling_weights
        if not weights:
            return self.train_idx
        from pipeline.train.stream import weighted_repeats

        rng = np.random.default_rng([int(self.cfg.seed), int(epoch), 0])
        out: list[int] = []
        for name in sorted(self.by_fidelity):
            for part in weighted_repeats(np.asarray(self.by_fidelity[name]), float(weights.get(name, 1.0)), rng):
                out += part.tolist()
        return out

    def micro_per_epoch(self) -> int:
        return math.ceil(len(self.samples(0)) / self.cfg.batch_size)

    def epoch(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any]]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        samples = self.samples(epoch)
        order = [samples[k] for k in torch.randperm(len(samples), generator=gen).tolist()]
        for start in range(skip * self.cfg.batch_size, len(order), self.cfg.batch_size):
            yield self.data.batch(order[start:start + self.cfg.batch_size])


class _StreamBatches:
    """Micro-batches of the streamed path: this rank's share of the stream's epoch plan."""

    def __init__(self, stream, cfg: TrainConfig) -> None:
        self.stream, self.cfg = stream, cfg

    def micro_per_epoch(self) -> int:
        return self.stream.steps_per_epoch(0)

    def epoch(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any]]:
        if self.stream.epoch != epoch:  # ``skip`` is restored through the stream's own state
            self.stream.epoch, self.stream.batches_consumed = epoch, 0
        for item in self.stream.iter_epoch(self.cfg.num_workers):
            yield item.graph, item.labels


def _groups(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive groups of ``size`` items (the last one may be shorter)."""
    while True:
        group = list(itertools.islice(items, size))
        if not group:
            return
        yield group


def train(
    frames: pa.Table | str | os.PathLike[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    references: ElementReferences | None = None,
    reference_overrides: Mapping[str, Mapping[str, float]] | None = None,
    resume: bool = True,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train on ``frames`` (a FRAMES_SCHEMA table, or the path of a frames Parquet file or dataset folder);
    write checkpoints and metrics under ``out_dir`` (rank 0); resume if asked.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls this: it joins the process group (gloo on CPU, NCCL
    on CUDA; left again at the end if it joined here) and trains data-parallel on the streamed path.
    ``on_step(step)`` is called after every optimizer step (and after a mid-epoch ``last.pt`` of that step)."""
    joined = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    ctx = dist_util.init_from_env(cfg.device) if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else None
    joined = joined and ctx is not None and ctx.is_distributed
    try:
        return _train(frames, model_config, cfg, out_dir, ctx, references=references,
                      reference_overrides=reference_overrides, resume=resume, progress=progress, on_step=on_step)
    finally:
        if joined:
            dist_util.shutdown()


def _train(frames, model_config, cfg, out_dir, ctx, *, references, reference_overrides, resume, progress,
           on_step) -> TrainResult:
    out_dir = Path(out_dir)
    world = ctx.world_size if ctx is not None else 1
    rank = ctx.rank if ctx is not None else 0
    device = ctx.device if ctx is not None and ctx.is_distributed else torch.device(cfg.device)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    streamed = use_stream(frames, cfg, world)
    val_stream = None
    if streamed:
        model, train_stream, val_stream, data_hash, n_train, n_val = build_streamed(
            Path(frames), model_config, cfg, references, reference_overrides, rank, world)
        source: _MemoryBatches | _StreamBatches = _StreamBatches(train_stream, cfg)
        data, val_idx = None, []
    else:
        if not isinstance(frames, pa.Table):
            frames = read_table(frames, FRAMES_SCHEMA)
        frames = borrow_forces(apply_label_policy(frames, cfg.label_policy), cfg.borrow_forces)
        data_hash = frames_hash(frames)
        model, data, train_idx, val_idx = build_model(frames, model_config, cfg, references, reference_overrides)
        source = _MemoryBatches(data, train_idx, cfg)
        n_train, n_val = len(train_idx), len(val_idx)
    model = model.to(device=device, dtype=dtype)
    config = model.config
    trained = freeze(model, cfg.freeze)
    fid_w = torch.tensor([(cfg.fidelity_weights or {}).get(f, 1.0) for f in config.fidelities],
                         dtype=dtype, device=device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    steps_per_epoch = max(math.ceil(source.micro_per_epoch() / cfg.accumulate), 1)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    step_sched, plateau = _schedulers(optimizer, cfg, total_steps)
    # buffers are not averaged: shift/scale are constant and integer index buffers must stay as they are
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=False)
           if cfg.ema_decay else None)
    eval_model = ema.module if ema is not None else model
    net = dist_util.wrap_model(model, ctx) if ctx is not None else model  # DDP when distributed
    ddp = net is not model

    last, best = out_dir / "last.pt", out_dir / "best.pt"
    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, step = 0, math.inf, -1, 0
    partial: dict[str, Any] | None = None
    run_key = {"train_config": cfg.run_key(), "model_config": config.to_dict(), "data_hash": data_hash}
    score_key = f"{cfg.target_fidelity}/val_loss" if cfg.target_fidelity else "val_loss"

    def write_metrics(stopped_early: bool = False) -> None:
        if rank == 0:
            write_json_atomic(out_dir / "metrics.json", {
                "history": history, "n_train": n_train, "n_val": n_val,
                "fidelities": list(config.fidelities), "data_hash": data_hash, "selection": score_key,
                "best_epoch": best_epoch, "steps": step, "stopped_early": stopped_early, "trained": len(trained),
                "world_size": world, "streamed": streamed})

    done = False
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
        partial = extra.get("partial")
        if partial is not None and streamed:
            train_stream.load_state_dict(partial["stream"])
        write_metrics(bool(extra.get("stopped_early")))  # a crash may have left a newer, stale metrics.json
        log.info("resuming from %s at epoch %d%s", last, start_epoch,
                 f", micro-batch {partial['micro_done']}" if partial else "")
        done = bool(extra.get("stopped_early"))
        dist_util.barrier()  # no rank may write last.pt before every rank has read it

    def state_extra(epoch_done: int, stop: bool, part: dict[str, Any] | None) -> dict[str, Any]:
        extra = {"run_key": run_key, "optimizer": optimizer.state_dict(), "history": history, "epoch": epoch_done,
                 "best_score": best_score, "best_epoch": best_epoch, "step": step, "data_hash": data_hash,
                 "raw_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "n_train": n_train, "n_val": n_val, "stopped_early": stop}
        if part is not None:
            extra["partial"] = part
        if ema is not None:
            extra["ema_state"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
        if step_sched is not None:
            extra["scheduler"] = step_sched.state_dict()
        if plateau is not None:
            extra["plateau"] = plateau.state_dict()
        return extra

    def run_step(micro: list[tuple[Any, Any]]) -> tuple[float, dict[str, float], int]:
        """One optimizer step over the micro-batches (this rank's); returns the step's loss and terms (all
        ranks) and its structure count (all ranks)."""
        moved = [(g.to(device, dtype), lab.to(device, dtype)) for g, lab in micro]
        plain = len(moved) == 1 and world == 1
        counts = [term_counts(g, lab, fid_w, True, cfg.use_stress) for g, lab in moved]
        names = list(counts[0])
        totals_t = torch.stack([sum(c[k] for c in counts) for k in names]).to(torch.float64)
        totals_t = dist_util.all_reduce_sum(totals_t) if world > 1 else totals_t
        totals = dict(zip(names, totals_t))
        optimizer.zero_grad(set_to_none=True)
        loss_sum, term_sums = 0.0, dict.fromkeys(names, 0.0)
        gap_sum = 0.0
        for j, (graph, labels) in enumerate(moved):
            # DDP all-reduces the gradients in the backward pass of the last micro-batch only
            sync = net.no_sync() if ddp and j < len(moved) - 1 else contextlib.nullcontext()
            with sync:
                with precision_context(cfg.precision, model):
                    out = net(graph, compute_forces=True, compute_stress=cfg.use_stress, create_graph=True)
                terms = loss_terms(out, labels, kind=cfg.loss, delta=cfg.huber_delta, fidelity_weights=fid_w)
                if plain:
                    loss = total_loss(terms, cfg.weights)
                else:
                    loss = scaled_loss(terms, cfg.weights, counts[j], totals, world)
                if cfg.gap_weight and labels.has_gap is not None and bool(labels.has_gap.any()):
                    # the same structures at their paired fidelity (energy only), for the predicted gap
                    other = torch.where(labels.has_gap, labels.gap_fidelity, graph.fidelity)
                    with precision_context(cfg.precision, model):
                        low = net(graph.with_fidelity(other), compute_forces=False, compute_stress=False)
                    g, _ = gap_loss(out["energy"], low["energy"], labels, kind=cfg.loss, delta=cfg.huber_delta)
                    loss = loss + cfg.gap_weight * g / len(moved)
                    gap_sum += float(g.detach()) / len(moved)
                if cfg.fidelity_prior and j == len(moved) - 1:
                    # a prior on the weights: once per optimizer step; every rank adds the same term and DDP
                    # averages the ranks' gradients, so its gradient is counted once
                    loss = loss + cfg.fidelity_prior * fidelity_gap_penalty(model)
                loss.backward()
            loss_sum += float(loss.detach()) / world
            for k, (v, _) in terms.items():
                total = float(totals[k])
                term_sums[k] += float(v.detach()) * (float(counts[j][k]) / total if total > 0 else 0.0)
        structures = sum(int(lab.n_atoms.shape[0]) for _, lab in moved)
        if world > 1:
            reduced = dist_util.all_reduce_sum(torch.tensor([loss_sum, *term_sums.values(), structures],
                                                            dtype=torch.float64))
            loss_sum, structures = float(reduced[0]), int(reduced[-1])
            term_sums = dict(zip(names, reduced[1:-1].tolist()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if cfg.gap_weight:
            term_sums["gap"] = gap_sum
        return loss_sum, term_sums, structures

    def validate() -> dict[str, float]:
        if streamed:
            if val_stream is None:
                return {}
            items = val_stream.loader(cfg.num_workers, epoch=0, start=0, even=False)
            return evaluate_stream(eval_model, items, config.fidelities, weights=cfg.weights,
                                   use_stress=cfg.use_stress, device=device, dtype=dtype, loss_kind=cfg.loss,
                                   huber_delta=cfg.huber_delta, reduce=dist_util.all_reduce_sum if world > 1 else None)
        return evaluate(eval_model, data, val_idx, batch_size=cfg.batch_size, weights=cfg.weights,
                        use_stress=cfg.use_stress, device=str(device), loss_kind=cfg.loss,
                        huber_delta=cfg.huber_delta)

    warned = False
    bar = (progress_bar(total=total_steps, initial=step, desc="train", unit="step") if rank == 0
           else tqdm(disable=True))
    try:
        for epoch in itertools.count(start_epoch):
            if done or step >= total_steps or (cfg.max_steps is None and epoch >= cfg.epochs):
                break
            t0 = time.perf_counter()
            net.train()
            sums = {"loss": 0.0, "energy": 0.0, "forces": 0.0, "stress": 0.0}
            if cfg.gap_weight:
                sums["gap"] = 0.0
            seen, micro_done = 0, 0
            if partial is not None and int(partial["epoch"]) == epoch:
                sums, seen, micro_done = dict(partial["sums"]), int(partial["seen"]), int(partial["micro_done"])
            partial = None
            steps_before = step
            for micro in _groups(source.epoch(epoch, micro_done), cfg.accumulate):
                if step >= total_steps:
                    break
                loss, terms, n_struct = run_step(micro)
                step += 1
                micro_done += len(micro)
                if ema is not None:
                    ema.update_parameters(model)
                if step_sched is not None and (cfg.scheduler == "cosine" or step <= cfg.warmup_steps):
                    step_sched.step()
                seen += n_struct
                sums["loss"] += loss * n_struct
                for k, v in terms.items():
                    sums[k] += v * n_struct
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4g}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                    part = {"epoch": epoch, "micro_done": micro_done, "sums": dict(sums), "seen": seen}
                    if streamed:
                        part["stream"] = train_stream.state_dict()
                    dist_util.on_rank0(save_checkpoint, eval_model, last, extra=state_extra(epoch - 1, False, part))
                if on_step is not None:
                    on_step(step)
            if step == steps_before and micro_done == 0:
                break  # an epoch without batches: nothing more to train on
            row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            row.update(validate())
            row["wall_s"] = time.perf_counter() - t0
            score = row.get(score_key)
            if score is None:
                if (val_idx or val_stream is not None) and cfg.target_fidelity and not warned:
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
                dist_util.on_rank0(save_checkpoint, eval_model, best, extra={
                    "epoch": epoch, "metrics": row, "selection": score_key, "train_config": cfg.to_dict(),
                    "data_hash": data_hash})
            stop = cfg.patience is not None and epoch - best_epoch >= cfg.patience
            dist_util.on_rank0(save_checkpoint, eval_model, last, extra=state_extra(epoch, stop, None))
            write_metrics(stop)
            if progress and rank == 0:
                progress(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in row.items() if isinstance(v, float)})
            if stop:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    finally:
        bar.close()
    if not best.exists():  # resumed a finished run, or no epoch ran
        dist_util.on_rank0(save_checkpoint, eval_model, best, extra={"data_hash": data_hash, "selection": score_key})
    return TrainResult(best=best, last=last, history=history, model=eval_model, steps=step, data_hash=data_hash)
