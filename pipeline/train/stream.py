"""Streaming training data over a frames Parquet dataset, for data sets that do not fit in memory.

:class:`FrameStream` never reads the whole table. It keeps a small per-frame *index* (part, row group, row,
fidelity, atom count, estimated edge count: ~30 bytes a frame, read once from the ``numbers``, ``cell``, ``pbc``
and ``fidelity`` columns) and, for each epoch, a *batch plan* computed from that index alone:

1. **Sampling**: each frame of fidelity ``f`` appears ``floor(w_f)`` times, and ``round(frac(w_f) * n_f)``
   frames of that fidelity, drawn without replacement, once more; so fidelity ``f`` contributes exactly
   ``round(w_f * n_f)`` samples per epoch (upsample the scarce r2SCAN frames with ``w > 1``; ``w = 0`` drops a
   fidelity).
2. **Shuffling**: the row groups are permuted, then cut into consecutive *blocks* of at least ``buffer_rows``
   samples; samples are shuffled within each block (the shuffle buffer).
3. **Batching by budget**: samples are packed greedily, in order, into batches holding at most ``max_atoms``
   atoms, ``max_edges`` *estimated* edges and ``max_structures`` structures (any may be None). The edge estimate
   is ``n_atoms * (n_atoms / V) * 4/3 pi rc^3`` (uniform density; ``n_atoms * (n_atoms - 1)`` when the cell is
   not periodic). A single frame larger than the budget becomes a batch of its own.
4. **Sharding**: the global plan is the same on every rank; rank ``r`` of ``W`` takes global batches
   ``r, r + W, ...``; the plan is cut to a multiple of ``W`` so every rank makes the same number of steps (DDP).

Everything is a pure function of (seed, epoch, index, options), so an epoch is reproducible, and it does not
depend on the rank count except through the cut at the end. Resuming mid-epoch needs only
``{"epoch", "batches_consumed"}`` (global batches, see :meth:`FrameStream.state_dict`): the plan is rebuilt and
the consumed batches skipped without building a single graph.

Graphs and masked labels are built in :class:`torch.utils.data.DataLoader` worker processes by
:class:`pipeline.train.data.FrameData` (the same code as in-memory training): the loader is map-style over plan
positions with a sequential sampler, and torch returns worker results in index order, so the batch order does
not depend on ``num_workers``. Each worker reads the row groups its batches need with pyarrow (only the label and
geometry columns) and caches those of the current and previous block only, so memory is bounded by the block
size, not the data set. A frame whose graph cannot be built is dropped from its batch and reported in
:attr:`StreamBatch.skipped`; the batch carries on.

Written here rather than taken from a library: torchdata's stateful loaders and the PyG/SevenNet datasets keep
per-item graphs or need a full index of graphs; none plans budget batches from Parquet metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.graphs import Graph
from pipeline.io import ParquetDataset
from pipeline.schema import FRAMES_SCHEMA
from pipeline.train.data import LABELS, FrameData, Labels

log = logging.getLogger(__name__)

__all__ = ["BatchBudget", "FrameIndex", "FrameStream", "StreamBatch", "estimate_edges"]

#: columns a worker reads to build graphs and labels (magmoms, meta, ... stay on disk)
READ_COLUMNS = ["frame_id", "material_id", "fidelity", "numbers", "positions", "cell", "pbc",
                "energy", "forces", "stress", "has_energy", "has_forces", "has_stress"]
READ_SCHEMA = pa.schema([FRAMES_SCHEMA.field(c) for c in READ_COLUMNS])


@dataclass(frozen=True)
class BatchBudget:
    """Upper bounds of one batch: atoms, estimated edges, structures (None = no bound; at least one set).

    ``max_structures`` alone gives fixed-size batches (the last one of an epoch may be smaller)."""

    max_atoms: int | None = None
    max_edges: int | None = None
    max_structures: int | None = None

    def __post_init__(self) -> None:
        values = (self.max_atoms, self.max_edges, self.max_structures)
        if all(v is None for v in values):
            raise ValueError("batch budget needs at least one of max_atoms, max_edges, max_structures")
        for name, v in zip(("max_atoms", "max_edges", "max_structures"), values):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")


def estimate_edges(n_atoms: np.ndarray, cells: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Estimated directed edge count per frame from metadata only: ``n * (n / V) * 4/3 pi rc^3`` for cells
    periodic in all three directions, ``n * (n - 1)`` (all pairs, an upper bound) otherwise."""
    n = np.asarray(n_atoms, dtype=np.float64)
    vol = np.abs(np.linalg.det(np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)))
    periodic = np.asarray(pbc, dtype=bool).reshape(-1, 3).all(axis=1) & (vol > 1e-8)
    sphere = 4.0 / 3.0 * math.pi * cutoff**3
    dense = n * n / np.where(periodic, vol, 1.0) * sphere
    return np.ceil(np.where(periodic, dense, n * (n - 1))).astype(np.int64)


@dataclass
class FrameIndex:
    """Per-frame metadata of a frames dataset, one entry per stored row (numpy arrays, same length)."""

    parts: list[Path]
    part: np.ndarray  # int32, index into parts
    row_group: np.ndarray  # int32, row group within the part
    row: np.ndarray  # int32, row within the row group
    group_id: np.ndarray  # int32, global row-group number (shuffled as a unit)
    fidelity: np.ndarray  # int8, index into ``fidelity_names``
    fidelity_names: tuple[str, ...]
    n_atoms: np.ndarray  # int32
    edges: np.ndarray  # int64, estimated

    def __len__(self) -> int:
        return len(self.n_atoms)

    @classmethod
    def read(cls, path: str | os.PathLike[str], fidelities: Sequence[str], cutoff: float) -> FrameIndex:
        """Index of a frames dataset folder (``part-*.parquet``), reading four small columns per row group.

        A frame whose fidelity is not in ``fidelities`` is an error naming it (give that fidelity weight 0 to
        drop it instead: it stays in the index but is never sampled)."""
        parts = [Path(path)] if Path(path).is_file() else ParquetDataset(path, FRAMES_SCHEMA).parts()
        if not parts:
            raise FileNotFoundError(f"no frames Parquet parts in {path}")
        names = [str(f).strip().lower() for f in fidelities]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("part", "rg", "row", "gid", "fid", "n", "e")}
        gid = 0
        for p, part in enumerate(parts):
            pf = pq.ParquetFile(part)
            for g in range(pf.num_row_groups):
                t = pf.read_row_group(g, columns=["frame_id", "fidelity", "numbers", "cell", "pbc"])
                fid_str = pc.utf8_lower(pc.utf8_trim_whitespace(t.column("fidelity"))).to_pylist()
                unknown = sorted(set(fid_str) - set(names))
                if unknown:
                    first = t.column("frame_id")[fid_str.index(unknown[0])].as_py()
                    raise ValueError(f"{part.name}: fidelity {unknown[0]!r} (frame {first!r}) is not one of the "
                                     f"model's fidelities ({', '.join(names)})")
                n = pc.list_value_length(t.column("numbers")).to_numpy(zero_copy_only=False).astype(np.int32)
                cells = _flat(t.column("cell")).reshape(-1, 3, 3)
                pbc = _flat(t.column("pbc")).reshape(-1, 3)
                rows = t.num_rows
                cols["part"].append(np.full(rows, p, np.int32))
                cols["rg"].append(np.full(rows, g, np.int32))
                cols["row"].append(np.arange(rows, dtype=np.int32))
                cols["gid"].append(np.full(rows, gid, np.int32))
                cols["fid"].append(np.array([names.index(f) for f in fid_str], dtype=np.int8))
                cols["n"].append(n)
                cols["e"].append(estimate_edges(n, cells, pbc, cutoff))
                gid += 1
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        return cls(parts, cat["part"], cat["rg"], cat["row"], cat["gid"], cat["fid"], tuple(names),
                   cat["n"], cat["e"])


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    """Values of a (nested) fixed-size list column as one flat numpy array."""
    arr = column.combine_chunks()
    while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), stream])


def sample_frames(index: FrameIndex, weights: Mapping[str, float], seed: int, epoch: int,
                  select: np.ndarray | None = None) -> np.ndarray:
    """Frame numbers sampled for an epoch (unordered): fidelity ``f`` exactly ``round(w_f * n_f)`` times
    (``select``: boolean mask of the frames that may be sampled, e.g. the training split; None = all)."""
    rng = _rng(seed, epoch, 0)
    out = []
    for k, name in enumerate(index.fidelity_names):
        members = np.flatnonzero((index.fidelity == k) if select is None else (index.fidelity == k) & select)
        out.extend(weighted_repeats(members, float(weights.get(name, 1.0)), rng))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def weighted_repeats(members: np.ndarray, w: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One fidelity's share of an epoch at sampling weight ``w``: all ``members`` ``floor(w)`` times plus a random
    ``round(frac(w) * n)`` of them (sorted) once more."""
    whole, frac = math.floor(w), w - math.floor(w)
    out = [members] * whole
    extra = round(frac * len(members))
    if extra:
        out.append(np.sort(rng.choice(members, size=extra, replace=False)))
    return out


def shuffle_blocks(index: FrameIndex, samples: np.ndarray, buffer_rows: int, seed: int,
                   epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples in epoch order (row groups permuted, shuffled within blocks of >= ``buffer_rows`` samples) and
    the block number of each sample."""
    rng = _rng(seed, epoch, 1)
    groups = index.group_id[samples]
    n_groups = int(index.group_id.max()) + 1 if len(index) else 0
    rank_of_group = np.empty(n_groups, np.int64)
    rank_of_group[rng.permutation(n_groups)] = np.arange(n_groups)
    order = samples[np.argsort(rank_of_group[groups], kind="stable")]
    sizes = np.bincount(rank_of_group[groups], minlength=n_groups)  # samples per group, in shuffled order
    block_of_rank = np.zeros(n_groups, np.int64)
    block, filled = 0, 0
    for r in range(n_groups):
        block_of_rank[r] = block
        filled += sizes[r]
        if filled >= buffer_rows:
            block, filled = block + 1, 0
    blocks = block_of_rank[rank_of_group[index.group_id[order]]]  # non-decreasing along ``order``
    bounds = np.flatnonzero(np.diff(blocks)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(order)]])):
        order[lo:hi] = order[lo:hi][rng.permutation(hi - lo)]
    return order, blocks


def pack_batches(order: np.ndarray, n_atoms: np.ndarray, edges: np.ndarray, budget: BatchBudget) -> list[np.ndarray]:
    """Greedy in-order packing of frame numbers into batches within ``budget`` (an oversized frame alone)."""
    big = np.iinfo(np.int64).max
    max_a = budget.max_atoms or big
    max_e = budget.max_edges or big
    max_s = budget.max_structures or big
    batches, start, atoms, edge_sum = [], 0, 0, 0
    for k, frame in enumerate(order):
        a, e = int(n_atoms[frame]), int(edges[frame])
        if k > start and (atoms + a > max_a or edge_sum + e > max_e or k - start >= max_s):
            batches.append(order[start:k])
            start, atoms, edge_sum = k, 0, 0
        atoms += a
        edge_sum += e
    if len(order) > start:
        batches.append(order[start:])
    return batches


@dataclass
class StreamBatch:
    """One training batch: graph + masked labels (float64 on CPU; move with ``.to``), the position in the
    global epoch plan, the frame ids it holds, and frames dropped because their graph failed (id, error)."""

    graph: Graph
    labels: Labels
    position: int
    frame_ids: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _PlanDataset(Dataset):
    """Map-style view of one rank's batch plan; item ``k`` is built (in a worker) from the row groups it needs."""

    def __init__(self, stream: FrameStream, plan: list[np.ndarray], blocks: list[int], positions: list[int]):
        self.parts = stream.index.parts
        self.part, self.rg, self.row = stream.index.part, stream.index.row_group, stream.index.row
        self.cutoff, self.fidelities, self.policy = stream.cutoff, stream.fidelities, stream.label_policy
        self.plan, self.blocks, self.positions = plan, blocks, positions
        self._cache: dict[tuple[int, int], tuple[int, pa.Table]] = {}

    def __len__(self) -> int:
        return len(self.plan)

    def _group(self, part: int, rg: int, block: int) -> pa.Table:
        key = (part, rg)
        if key not in self._cache:
            # keep the current and previous block only: bounded by the shuffle buffer, not the data set
            self._cache = {k: v for k, v in self._cache.items() if v[0] >= block - 1}
            table = pq.ParquetFile(self.parts[part]).read_row_group(rg, columns=READ_COLUMNS).cast(READ_SCHEMA)
            self._cache[key] = (block, table)
        return self._cache[key][1]

    def rows(self, k: int) -> pa.Table:
        frames = self.plan[k]
        tables = [self._group(int(self.part[f]), int(self.rg[f]), self.blocks[k]).slice(int(self.row[f]), 1)
                  for f in frames]
        return pa.concat_tables(tables)

    def __getitem__(self, k: int) -> StreamBatch:
        table = self.rows(k)
        skipped: list[tuple[str, str]] = []
        try:
            data = FrameData(table, self.cutoff, self.fidelities, self.policy)
        except ValueError:
            keep = []
            for i in range(table.num_rows):
                try:
                    FrameData(table.slice(i, 1), self.cutoff, self.fidelities, self.policy)
                    keep.append(i)
                except ValueError as exc:
                    fid = table.column("frame_id")[i].as_py()
                    log.warning("training batch %d: skipped frame %r: %s", self.positions[k], fid, exc)
                    skipped.append((fid, str(exc)))
            if not keep:
                raise ValueError(f"training batch {self.positions[k]}: no frame could be built "
                                 f"({skipped[0][0]}: {skipped[0][1]})") from None
            table = table.take(pa.array(keep, pa.int64()))
            data = FrameData(table, self.cutoff, self.fidelities, self.policy)
        graph, labels = data.batch(range(len(data)))
        return StreamBatch(graph, labels, self.positions[k], list(data.frame_ids), skipped)


def _identity(item: StreamBatch) -> StreamBatch:
    return item


class FrameStream:
    """Epochs of budgeted, shuffled, fidelity-weighted batches streamed from a frames dataset (see module doc).

    ``weights``: fidelity -> sampling weight (missing: 1). ``buffer_rows``: the shuffle buffer (samples per
    block). ``rank``/``world_size``: this process's shard (defaults from :mod:`torch.distributed` when it is
    initialised). ``label_policy``: as in :class:`~pipeline.train.data.FrameData`. ``select``: boolean mask over
    the stored frames (index order = parts, row groups, rows) of those that may be sampled (the training or the
    validation split); None = all. ``path`` may also be a single Parquet file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cutoff: float,
        fidelities: Sequence[str],
        budget: BatchBudget,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        buffer_rows: int = 10_000,
        rank: int | None = None,
        world_size: int | None = None,
        label_policy: Mapping[str, Sequence[str]] | None = None,
        worker_start_method: str = "spawn",
        select: np.ndarray | None = None,
    ) -> None:
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows must be positive, got {buffer_rows}")
        self.path = Path(path)
        self.cutoff = float(cutoff)
        self.fidelities = tuple(str(f).strip().lower() for f in fidelities)
        self.budget = budget
        self.weights = {str(k).strip().lower(): float(v) for k, v in (weights or {}).items()}
        bad = {k: v for k, v in self.weights.items() if not (v >= 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"sampling weights must be finite and >= 0, got {bad}")
        unknown = sorted(set(self.weights) - set(self.fidelities))
        if unknown:
            raise ValueError(f"sampling weight for unknown fidelity {unknown[0]!r}; known: {', '.join(self.fidelities)}")
        unknown_labels = {lab for labs in (label_policy or {}).values() for lab in labs} - set(LABELS)
        if unknown_labels:
            raise ValueError(f"unknown labels in label policy: {sorted(unknown_labels)}; known: {list(LABELS)}")
        self.seed = int(seed)
        self.buffer_rows = int(buffer_rows)
        self.label_policy = label_policy
        self.worker_start_method = worker_start_method  # DataLoader workers: "spawn" (safe) or "fork" (faster start)
        if world_size is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            world_size = torch.distributed.get_world_size() if initialised else 1
            rank = torch.distributed.get_rank() if initialised else 0
        self.rank, self.world_size = int(rank or 0), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.index = FrameIndex.read(self.path, self.fidelities, self.cutoff)
        if select is not None:
            select = np.asarray(select, dtype=bool)
            if select.shape != (len(self.index),):
                raise ValueError(f"select mask has {select.shape} entries for {len(self.index)} frames")
        self.select = select
        self.epoch = 0
        self.batches_consumed = 0  # global batches of ``epoch`` already trained on (all ranks together)

    # --- the plan (metadata only) ---------------------------------------------------------------------------

    def global_plan(self, epoch: int) -> tuple[list[np.ndarray], list[int]]:
        """All batches of an epoch (frame numbers, before sharding) and the shuffle block of each batch."""
        samples = sample_frames(self.index, self.weights, self.seed, epoch, self.select)
        order, blocks = shuffle_blocks(self.index, samples, self.buffer_rows, self.seed, epoch)
        batches = pack_batches(order, self.index.n_atoms, self.index.edges, self.budget)
        ends = np.cumsum([len(b) for b in batches]) - 1
        return batches, [int(blocks[e]) for e in ends]

    def plan(self, epoch: int, start: int = 0, even: bool = True) -> tuple[list[np.ndarray], list[int], list[int]]:
        """This rank's batches of ``epoch`` from global batch ``start`` on: (batches, blocks, global positions).

        ``even``: the global plan is cut to a multiple of the world size so that every rank makes the same number
        of steps (the cut batches are dropped for this epoch); ``even=False`` keeps every batch (for evaluation:
        ranks may then get one batch more than others)."""
        batches, blocks = self.global_plan(epoch)
        if not even:
            usable = len(batches)
        elif start < len(batches):
            usable = start + (len(batches) - start) // self.world_size * self.world_size
        else:
            usable = start
        positions = list(range(start + self.rank, usable, self.world_size))
        return [batches[p] for p in positions], [blocks[p] for p in positions], positions

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Optimizer steps (batches per rank) in a whole epoch."""
        return len(self.global_plan(self.epoch if epoch is None else epoch)[0]) // self.world_size

    # --- iteration ---------------------------------------------------------------------------------------------

    def loader(self, num_workers: int = 0, epoch: int | None = None, start: int | None = None,
               prefetch_factor: int | None = None, even: bool = True) -> DataLoader:
        """A DataLoader of :class:`StreamBatch` for this rank from global batch ``start`` (default: where the
        state says); does not update the state (use :meth:`iter_epoch` for that)."""
        epoch = self.epoch if epoch is None else epoch
        start = self.batches_consumed if start is None else start
        batches, blocks, positions = self.plan(epoch, start, even)
        dataset = _PlanDataset(self, batches, blocks, positions)
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            # spawned workers: forking a process that already runs threads (Prefect, Dask, torch's pools) can
            # leave a worker holding a lock that no thread will release (seen as workers dying in the test suite)
            kwargs["multiprocessing_context"] = self.worker_start_method
            kwargs["persistent_workers"] = False
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                          collate_fn=_identity, **kwargs)

    def iter_epoch(self, num_workers: int = 0) -> Iterator[StreamBatch]:
        """Batches of the current epoch from where the state stands; the state advances by ``world_size``
        global batches per yielded batch (so a checkpoint taken between steps resumes after it), and moves to
        the next epoch at the end."""
        for item in self.loader(num_workers):
            self.batches_consumed = item.position + self.world_size - self.rank
            yield item
        self.epoch += 1
        self.batches_consumed = 0

    # --- resumable state ---------------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of what the plan depends on besides the epoch (data set layout, seed, budget, weights, buffer)."""
        spec = {
            "parts": [p.name for p in self.index.parts], "frames": len(self.index), "seed": self.seed,
            "budget": [self.budget.max_atoms, self.budget.max_edges, self.budget.max_structures],
            "weights": sorted(self.weights.items()), "buffer_rows": self.buffer_rows, "cutoff": self.cutoff,
            "fidelities": list(self.fidelities),
            "select": None if self.select is None else hashlib.sha256(np.packbits(self.select).tobytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state for a checkpoint (loads with ``weights_only=True``): epoch, global batches consumed,
        world size, fingerprint."""
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "world_size": self.world_size,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`. Same world size: the exact remaining batches. Another world size: the
        same remaining global batches, grouped into steps differently (statistically, not bit-, equivalent)."""
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError("stream state is from another data set or stream configuration "
                             f"(fingerprint {state.get('fingerprint')!r}, this stream {self.fingerprint()!r})")
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
