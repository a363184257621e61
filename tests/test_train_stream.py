"""Streaming frames dataset: determinism, mid-epoch resume, budget batches, fidelity weights, workers, shards.

Data: the first 240 real MPtrj frames (shared mattersim file), every 4th relabelled 'r2scan' so that there are
two fidelities to weight, written as 4 Parquet parts (4 row groups)."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.frames import frames_table
from pipeline.io import ParquetDataset
from pipeline.schema import FRAMES_SCHEMA, KEYS
from pipeline.sources.files import import_path
from pipeline.train.stream import BatchBudget, FrameStream, estimate_edges, sample_frames, shuffle_blocks

FIDS = ("pbe", "r2scan")
CUTOFF = 4.5
N_FRAMES = 240


@pytest.fixture(scope="module")
def frames_dir(mp_file, tmp_path_factory):
    rows = import_path(mp_file("mattersim/mptrj-random-1k.xyz"), limit=N_FRAMES).rows
    for i, row in enumerate(rows):
        if i % 4 == 0:
            row["fidelity"] = "r2scan"
    out = tmp_path_factory.mktemp("stream") / "frames"
    dataset = ParquetDataset(out, FRAMES_SCHEMA, KEYS["frames"])
    for start in range(0, len(rows), 60):
        dataset.append(frames_table(rows[start:start + 60]))
    return out


def make(path, **kw):
    opts = {"cutoff": CUTOFF, "fidelities": FIDS, "budget": BatchBudget(max_atoms=300, max_edges=15_000),
            "buffer_rows": 100, "seed": 3}
    return FrameStream(path, **{**opts, **kw})


def plan_ids(stream, epoch):
    return [b.tolist() for b in stream.global_plan(epoch)[0]]


def test_plan_is_deterministic_for_seed_and_epoch(frames_dir):
    a, b = make(frames_dir), make(frames_dir)
    assert plan_ids(a, 0) == plan_ids(b, 0)
    assert plan_ids(a, 1) == plan_ids(b, 1)
    assert plan_ids(a, 0) != plan_ids(a, 1)
    assert plan_ids(a, 0) != plan_ids(make(frames_dir, seed=4), 0)
    # every frame exactly once per epoch with unit weights
    assert sorted(np.concatenate(a.global_plan(0)[0]).tolist()) == list(range(N_FRAMES))
    ids_a = [item.frame_ids for item in a.loader(epoch=1)]
    ids_b = [item.frame_ids for item in b.loader(epoch=1)]
    assert ids_a == ids_b


def test_shuffle_mixes_row_groups_but_stays_in_buffer_blocks(frames_dir):
    s = make(frames_dir, buffer_rows=100)
    samples = sample_frames(s.index, {}, seed=3, epoch=0)
    order, blocks = shuffle_blocks(s.index, samples, 100, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(N_FRAMES)) and order.tolist() != sorted(order.tolist())
    # 60-row groups and a 100-sample buffer: two blocks of two whole row groups, streamed one after the other
    assert blocks.tolist() == sorted(blocks.tolist()) and set(blocks.tolist()) == {0, 1}
    groups = [set(s.index.group_id[order[blocks == b]].tolist()) for b in (0, 1)]
    assert [len(g) for g in groups] == [2, 2] and not groups[0] & groups[1]
    # within a block the two row groups are interleaved (shuffled), not one after the other
    first = s.index.group_id[order[blocks == 0]]
    assert np.count_nonzero(np.diff(first)) > 10
    # a batch only needs the row groups of its block and the one before (what a worker caches)
    batches, batch_blocks = s.global_plan(0)
    block_of = dict(zip(order.tolist(), blocks.tolist()))
    for batch, b in zip(batches, batch_blocks):
        assert {block_of[f] for f in batch.tolist()} <= {b - 1, b}


def test_mid_epoch_resume_gives_the_remaining_batches(frames_dir, tmp_path):
    full = make(frames_dir)
    full.load_state_dict({**full.state_dict(), "epoch": 2})
    expected = [item.frame_ids for item in full.iter_epoch()]
    assert full.state_dict()["epoch"] == 3 and full.state_dict()["batches_consumed"] == 0

    first = make(frames_dir)
    first.load_state_dict({**first.state_dict(), "epoch": 2})
    seen = []
    for k, item in enumerate(first.iter_epoch(num_workers=2)):  # workers prefetch: only yielded batches count
        seen.append(item.frame_ids)
        if k == 4:
            break
    assert first.state_dict() == {**first.state_dict(), "epoch": 2, "batches_consumed": 5}
    torch.save({"stream": first.state_dict()}, tmp_path / "ckpt.pt")  # plain types: loads with weights_only
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["stream"]
    resumed = make(frames_dir)
    resumed.load_state_dict(state)
    rest = [item.frame_ids for item in resumed.iter_epoch()]
    assert seen + rest == expected


def test_resume_at_another_world_size_continues_the_global_plan(frames_dir):
    budget = BatchBudget(max_structures=4)
    global_batches = [b.tolist() for b in make(frames_dir, budget=budget).global_plan(0)[0]]
    shards = [make(frames_dir, budget=budget, rank=r, world_size=2) for r in range(2)]
    for shard in shards:  # two steps on each of two ranks
        it = shard.iter_epoch()
        next(it), next(it)
    state = shards[0].state_dict()
    assert state == shards[1].state_dict() and state["batches_consumed"] == 4
    single = make(frames_dir, budget=budget, rank=0, world_size=1)
    single.load_state_dict(state)
    rest = [item.frame_ids for item in single.iter_epoch()]
    frame_ids = ParquetDataset(frames_dir, FRAMES_SCHEMA).read(columns=["frame_id"]).column("frame_id").to_pylist()
    assert rest == [[frame_ids[f] for f in b] for b in global_batches[4:]]


def test_resume_rejects_another_configuration(frames_dir):
    state = make(frames_dir).state_dict()
    with pytest.raises(ValueError, match="another data set or stream configuration"):
        make(frames_dir, seed=9).load_state_dict(state)


def test_batches_respect_the_budget(frames_dir):
    budget = BatchBudget(max_atoms=120, max_edges=6_000, max_structures=7)
    s = make(frames_dir, budget=budget)
    batches, _ = s.global_plan(0)
    assert len(batches) > 10
    for b in batches:
        atoms, edges = s.index.n_atoms[b].sum(), s.index.edges[b].sum()
        if len(b) > 1:
            assert atoms <= 120 and edges <= 6_000 and len(b) <= 7
        else:  # a frame over the budget on its own
            assert len(b) == 1
    # greedy packing: the next frame would not have fitted
    for b, nxt in itertools.pairwise(batches):
        f = nxt[0]
        assert (s.index.n_atoms[b].sum() + s.index.n_atoms[f] > 120
                or s.index.edges[b].sum() + s.index.edges[f] > 6_000 or len(b) == 7)
    # the built batches hold the planned atoms
    for item, b in zip(s.loader(epoch=0), batches[:3]):
        assert item.graph.num_atoms == s.index.n_atoms[b].sum()
        assert item.labels.forces.shape == (item.graph.num_atoms, 3)


def test_oversized_frame_is_a_batch_of_its_own(frames_dir):
    s = make(frames_dir, budget=BatchBudget(max_atoms=8))
    batches, _ = s.global_plan(0)
    big = [b for b in batches if s.index.n_atoms[b].sum() > 8]
    assert big and all(len(b) == 1 for b in big)


def test_edge_estimate_from_density():
    cell = np.eye(3) * 10.0
    est = estimate_edges(np.array([100, 2]), np.stack([cell, cell]), np.array([[True] * 3, [False] * 3]), 3.0)
    assert est[0] == int(np.ceil(100 * 100 / 1000 * 4 / 3 * np.pi * 27))
    assert est[1] == 2  # not periodic: all ordered pairs


def test_sampling_weights_give_the_expected_counts(frames_dir):
    s = make(frames_dir, weights={"r2scan": 2.5, "pbe": 0.5})
    n_r2 = int((s.index.fidelity == 1).sum())
    n_pbe = N_FRAMES - n_r2
    for epoch in (0, 1):
        order = np.concatenate(s.global_plan(epoch)[0])
        counts = collections.Counter(s.index.fidelity[order].tolist())
        assert counts[1] == round(2.5 * n_r2) and counts[0] == round(0.5 * n_pbe)
        per_frame = collections.Counter(order.tolist())
        assert {per_frame[f] for f in np.flatnonzero(s.index.fidelity == 1)} == {2, 3}
        assert set(per_frame.values()) <= {1, 2, 3}
    assert plan_ids(s, 0) == plan_ids(make(frames_dir, weights={"r2scan": 2.5, "pbe": 0.5}), 0)
    dropped = make(frames_dir, weights={"pbe": 0})
    assert set(dropped.index.fidelity[np.concatenate(dropped.global_plan(0)[0])].tolist()) == {1}
    with pytest.raises(ValueError, match="unknown fidelity 'scan'"):
        make(frames_dir, weights={"scan": 2})


def test_worker_count_does_not_change_the_batches(frames_dir):
    s = make(frames_dir)
    serial = list(s.loader(num_workers=0, epoch=0))
    parallel = list(s.loader(num_workers=2, epoch=0))
    assert [b.frame_ids for b in serial] == [b.frame_ids for b in parallel]
    assert [b.position for b in parallel] == list(range(len(serial)))
    for a, b in zip(serial, parallel):
        assert torch.equal(a.graph.edge_index, b.graph.edge_index)
        assert torch.equal(a.labels.forces, b.labels.forces)
        assert torch.equal(a.labels.fidelity, b.labels.fidelity)


def test_ranks_share_out_the_global_plan(frames_dir):
    one = make(frames_dir, budget=BatchBudget(max_structures=5))
    shards = [make(frames_dir, budget=BatchBudget(max_structures=5), rank=r, world_size=3) for r in range(3)]
    batches, _ = one.global_plan(0)
    n_steps = len(batches) // 3
    got = [s.plan(0)[2] for s in shards]
    assert all(len(p) == n_steps for p in got)
    assert sorted(p for positions in got for p in positions) == list(range(3 * n_steps))
    assert [shards[1].plan(0)[0][k].tolist() for k in range(n_steps)] == [batches[3 * k + 1].tolist()
                                                                          for k in range(n_steps)]
    # a shard's consumed count is global: rank 1 after 2 steps of 3 ranks -> 6 batches consumed
    it = shards[1].iter_epoch()
    next(it), next(it)
    assert shards[1].state_dict()["batches_consumed"] == 6
    with pytest.raises(ValueError, match="rank 3 is not in"):
        make(frames_dir, rank=3, world_size=3)


def test_bad_frame_is_skipped_and_named(frames_dir, tmp_path):
    rows = ParquetDataset(frames_dir, FRAMES_SCHEMA).read().slice(0, 6).to_pylist()
    rows[2]["cell"] = [[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]  # periodic cell with zero volume
    ParquetDataset(tmp_path / "bad", FRAMES_SCHEMA, KEYS["frames"]).append(pa.Table.from_pylist(rows,
                                                                                               schema=FRAMES_SCHEMA))
    s = make(tmp_path / "bad", budget=BatchBudget(max_structures=6))
    (item,) = list(s.loader(epoch=0))
    assert len(item.frame_ids) == 5 and item.graph.num_graphs == 5
    assert item.skipped[0][0] == rows[2]["frame_id"] and "zero volume" in item.skipped[0][1]


def test_unknown_fidelity_in_data_is_named(frames_dir):
    with pytest.raises(ValueError, match="fidelity 'r2scan' .* is not one of the model's fidelities"):
        make(frames_dir, fidelities=("pbe",))
