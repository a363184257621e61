"""Relaxation batches fanned out on Dask (prefect-dask's DaskTaskRunner): a LocalCluster by default, or the
Dask scheduler at ``dask_address``. Every batch writes through the relaxation store, which screening reuses."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Dask's own INFO chatter (scheduler/nanny start and stop) stays out of the run's log; workers inherit this.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

from prefect import flow
from prefect_dask import DaskTaskRunner

from flows import tasks


@contextmanager
def api_url_for_workers() -> Iterator[None]:
    """Local Dask workers are new processes: without PREFECT_API_URL each would start its own temporary
    Prefect server (about a minute each, and their task runs would land there). Export the URL of the API
    this flow runs on while the cluster starts, so that they report to it."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def dask_runner(address: str | None = None, n_workers: int = 2, threads_per_worker: int = 1) -> DaskTaskRunner:
    """A DaskTaskRunner on ``address`` (an existing scheduler, e.g. tcp://host:8786), else a LocalCluster of
    ``n_workers`` processes with ``threads_per_worker`` threads each."""
    if os.environ["DASK_LOGGING__DISTRIBUTED"] == "warning":
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": n_workers, "threads_per_worker": threads_per_worker,
                                          "processes": True, "dashboard_address": None})


@flow(name="relax-batches", flow_run_name="relax-{fidelity}")
def relax_batches_flow(candidates_path: str, references_dir: str | None, batches: dict[str, list[list[str]]],
                       checkpoint: str, fidelity: str, relax_dir: str, thermo_type: str = "raw",
                       reference_window: float | None = None, model_fidelity: str | None = None, fmax: float = 0.05,
                       steps: int = 500, device: str = "cpu") -> dict[str, dict[str, int]]:
    """Submit one relax-batch task per batch ({role: [[id...]...]}) to the flow's task runner; status counts
    per role."""
    futures = [(role, tasks.relax_batch.submit(
        candidates_path, references_dir, role, ids, checkpoint, fidelity, relax_dir, thermo_type=thermo_type,
        reference_window=reference_window, model_fidelity=model_fidelity, fmax=fmax, steps=steps, device=device,
        batch_size=len(ids))) for role, role_batches in batches.items() for ids in role_batches]
    counts: dict[str, dict[str, int]] = {}
    for role, future in futures:
        for status, n in future.result().items():
            counts.setdefault(role, {})[status] = counts.get(role, {}).get(status, 0) + n
    return counts


def relax_all(candidates_path: str, references_dir: str | None, checkpoint: str, fidelity: str, relax_dir: str, *,
              thermo_type: str = "raw", reference_window: float | None = None, batch_size: int = 4,
              dask_address: str | None = None, dask_workers: int = 2, **settings: Any) -> dict[str, dict[str, int]]:
    """Relax the candidates and the near-hull reference phases (what screening needs) in batches on Dask (see
    :func:`dask_runner`); the screen task then finds every relaxation in the store."""
    from pipeline.campaign import batches, structures_to_relax

    todo = structures_to_relax(candidates_path, references_dir, thermo_type=thermo_type, fidelity=fidelity,
                               reference_window=reference_window)
    cut = {role: batches([i for i, _ in items], batch_size) for role, items in todo.items() if items}
    runner = dask_runner(dask_address, dask_workers)
    with api_url_for_workers():
        return relax_batches_flow.with_options(task_runner=runner)(
            candidates_path, references_dir, cut, checkpoint, fidelity, relax_dir, thermo_type=thermo_type,
            reference_window=reference_window, **settings)
