"""The campaign flow on the committed data/demo set: Dask fan-out (2-worker LocalCluster, 1 thread each), content
cache hits on re-run and recomputation when an input changes, artifacts, retry policy, warnings summary."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings

import pyarrow.parquet as pq
import pytest
import torch
from ase.io import read, write
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.testing.utilities import prefect_test_harness
from pymatgen.core import Structure

from flows.policies import content_cache_key, retry_unless_permanent
from pipeline.config import PROJECT_ROOT
from pipeline.io import read_table
from pipeline.model import MFPotential, fit_element_references, preset, save_checkpoint
from pipeline.quiet import summarised_warnings
from pipeline.sources.mp.mp_client import MPAuthError, RetriesExhausted

DEMO = PROJECT_ROOT / "data" / "demo"
FID = "gpaw-r2scan"


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=180):  # the default 30 s is too short on a loaded machine
        yield


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """An untrained small Li-Al potential with element references fitted to the demo entries (wiring only)."""
    torch.manual_seed(0)
    rows = [r for r in read_table(DEMO / "entries").to_pylist() if r["fidelity"] == FID]
    numbers = [Structure.from_dict(json.loads(r["structure"])).atomic_numbers for r in rows]
    refs = fit_element_references(numbers, [r["uncorrected_energy"] for r in rows], [FID] * len(rows))
    model = MFPotential(preset("small", elements=("Al", "Li"), fidelities=(FID,)), refs)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny.pt"))


def _task_states(flow_run_id) -> dict[str, str]:
    """{task name: state name} of a flow run and of its subflow runs."""
    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(s.id for s in subs)]
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)))
        assert client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs if r.state}


@pytest.mark.slow  # three campaign runs with a Dask LocalCluster each: ~1-5 min on 2 busy cores
def test_campaign_on_demo_fans_out_on_dask_and_hits_the_cache(prefect_api, demo_checkpoint, tmp_path,
                                                               monkeypatch):
    from flows.campaign import campaign_flow

    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))  # Dask worker processes import this checkout's flows
    cands = tmp_path / "candidates.extxyz"
    shutil.copy(DEMO / "candidates.extxyz", cands)
    kwargs = {"chemsys": "Li-Al", "entries": [str(DEMO / "entries")], "candidates": [str(cands)],
              "truth": [str(DEMO / "candidates")], "checkpoint": demo_checkpoint, "fidelities": [FID], "steps": 3,
              "batch_size": 2, "dask_workers": 2, "out_dir": str(tmp_path / "out")}
    state = campaign_flow(**kwargs, return_state=True)
    summary = state.result()
    report = pq.read_table(summary["reports"][FID]["report"]).to_pylist()
    n = len(read(cands, ":"))
    assert len(report) == n and all(r["fidelity"] == FID and r["error"] is None for r in report)
    assert all(r["e_hull_true"] is not None for r in report)
    relaxed = summary["relaxations"][FID]
    assert sum(relaxed["candidate"].values()) == n and sum(relaxed["reference"].values()) > 0  # by Dask batches
    first = _task_states(state.state_details.flow_run_id)
    assert sum(name.startswith(f"relax[{FID}]-candidate-") for name in first) == (n + 1) // 2, first

    again = campaign_flow(**kwargs, return_state=True)
    states = _task_states(again.state_details.flow_run_id)
    for step in ("gather-entries", "make-candidates", "screen-", "relax["):
        named = {k: v for k, v in states.items() if k.startswith(step)}
        assert named and set(named.values()) == {"Cached"}, (step, states)

    write(cands, read(cands, ":")[:-1])  # a changed candidate file: candidates and screening are recomputed
    changed = campaign_flow(**kwargs, return_state=True)
    states = _task_states(changed.state_details.flow_run_id)
    assert {v for k, v in states.items() if k.startswith(("make-candidates", "screen-"))} == {"Completed"}
    assert {v for k, v in states.items() if k.startswith("gather-entries")} == {"Cached"}
    assert len(pq.read_table(changed.result()["reports"][FID]["report"])) == n - 1


def test_campaign_without_entries_or_key_fails_clearly(prefect_api, monkeypatch):
    from flows.campaign import campaign_flow

    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(ValueError, match="no reference entries"):
        campaign_flow(chemsys="Li-Ni-O", substitute=True)


def test_retries_skip_auth_and_already_retried_errors(prefect_api):
    calls: list[str] = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_permanent)
    def flaky(kind: str) -> None:
        calls.append(kind)
        raise {"auth": MPAuthError("key rejected"), "exhausted": RetriesExhausted("429 x5"),
               "input": ValueError("bad chemsys"), "network": ConnectionError("reset")}[kind]

    @flow
    def run(kind: str) -> None:
        flaky(kind)

    for kind in ("auth", "exhausted", "input", "network"):
        run(kind, return_state=True)
    assert calls == ["auth", "exhausted", "input", "network", "network", "network"]


def test_cache_key_follows_file_content_not_path(tmp_path):
    key = content_cache_key("files")
    f = tmp_path / "a.cif"
    f.write_text("one")
    k1 = key(None, {"files": [str(f)], "steps": 3})
    assert key(None, {"files": [str(f)], "steps": 3}) == k1
    assert key(None, {"files": [str(f)], "steps": 4}) != k1
    f.write_text("two")
    assert key(None, {"files": [str(f)], "steps": 3}) != k1
    moved = tmp_path / "b.cif"
    shutil.copy(f, moved)
    assert key(None, {"files": [str(moved)], "steps": 3}) == key(None, {"files": [str(f)], "steps": 3})


def test_library_warnings_become_one_line(caplog):
    log = logging.getLogger("pipeline.test")
    with caplog.at_level(logging.WARNING, logger="pipeline.test"), summarised_warnings(log, "reading CIFs"):
        for i in range(5):
            warnings.warn(f"Issues encountered while parsing CIF: site {i}", UserWarning, stacklevel=1)
        warnings.warn("other", RuntimeWarning, stacklevel=1)
    assert len(caplog.records) == 1
    assert "reading CIFs: 6 warnings (6 kinds)" in caplog.records[0].getMessage()


def test_library_logs_reach_the_prefect_run(prefect_api):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    import flows  # noqa: F401 - routes pipeline.* loggers to Prefect

    @task
    def work() -> None:
        logging.getLogger("pipeline.relax.relaxer").info("relaxation of X failed: test message")

    @flow
    def run() -> None:
        work()

    state = run(return_state=True)
    for handler in logging.getLogger("pipeline").handlers:
        if isinstance(handler, APILogHandler):
            handler.flush()
    messages: list[str] = []
    for _ in range(30):  # the API log handler ships records in batches
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[state.state_details.flow_run_id])))
        messages = [log.message for log in logs]
        if any("relaxation of X failed: test message" in m for m in messages):
            break
        time.sleep(1)
    assert any("relaxation of X failed: test message" in m for m in messages), messages


def test_ingest_task_holds_the_mp_limit_takes_the_key_from_a_secret_block_and_never_retries_auth(
        prefect_api, monkeypatch, tmp_path):
    from prefect.blocks.system import Secret as SecretBlock
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows import tasks
    from pipeline.sources.mp.mp_client import MPResterClient

    monkeypatch.delenv("MP_API_KEY", raising=False)
    SecretBlock(value="k" * 32).save(tasks.MP_SECRET_BLOCK, overwrite=True)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=tasks.MP_LIMIT, limit=1))
    seen: dict[str, object] = {"calls": 0}

    class RejectingClient:
        """Answers the first MP call with an auth error, recording the limit's slots and the key it was given."""

        def thermo_entries(self, chemsys, thermo_type):
            seen["calls"] += 1
            with get_client(sync_client=True) as client:
                seen["active"] = client.read_global_concurrency_limit_by_name(tasks.MP_LIMIT).active_slots
            raise MPAuthError("MP API key rejected (401)")

        material_calc_types = trajectory = thermo_entries

    def from_key(key=None, **kwargs):
        seen["key"] = key.reveal()
        return RejectingClient()

    monkeypatch.setattr(MPResterClient, "from_key", staticmethod(from_key))

    @flow
    def run() -> None:
        tasks.ingest_mp(["Li-O"], str(tmp_path))

    state = run(return_state=True)
    assert state.is_failed()
    assert seen["active"] == 1 and seen["key"] == "k" * 32  # one slot held; the key came from the Secret block
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert [(r.name.split("-")[0], r.run_count) for r in runs] == [("ingest", 1)]  # the auth error: no retry
