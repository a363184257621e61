"""Materials Project ingestion: thermo entries and task trajectories of chemical systems -> Parquet datasets.

For each chemical system (and its subsystems, as ``get_entries_in_chemsys`` returns them):

1. thermo entries for each thermo type (default GGA_GGA+U, R2SCAN and the mixed GGA_GGA+U_R2SCAN) ->
   ``<out>/entries`` (ENTRIES_SCHEMA, key entry_id + thermo_type);
2. the calc types of the materials of those entries -> the tasks to fetch: GGA / GGA+U / r2SCAN structure
   optimizations and statics (the tasks MPtrj was made of; see ``task_kinds``);
3. each task's trajectory -> one frame per ionic step in ``<out>/frames`` (FRAMES_SCHEMA), via
   :func:`pipeline.sources.mp.taskdocs.trajectory_frames`.

Bad records go to ``<out>/rejects`` (REJECTS_SCHEMA) with their error. Every finished unit of work (one
chemical system x thermo type, one batch of materials, one task) is recorded in ``<out>/state.json`` (written
atomically) after its rows are stored, so a re-run skips it. Rows are buffered and written every ``flush_units``
units (one Parquet part per dataset and flush; also when a run stops on an error). Rows are appended by key, so
a unit whose rows landed but whose state was not saved adds nothing twice when it runs again. Units that kept
failing with transient errors are listed under ``failed`` in the state and retried by the next run.

Requests run in a thread pool (``max_workers``); results are written by the calling thread only. The API key is
used only to open the client: it is never logged, stored, or put in an error message (messages are redacted).

Note for the mixed thermo type: MP references a mixed entry's correction to the chemical system it was built
for, so the same entry can differ between overlapping systems (e.g. Li-Fe-O and Li-Ni-O both contain Li-O);
the first one stored is kept. Requested systems that are subsystems of another requested system are dropped
(their entries come with the larger system).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pymatgen.core import Element

from pipeline.config import mp_api_key
from pipeline.entries import entries_table, entry_to_row, normalize_run_type
from pipeline.frames import RecordError, frames_table
from pipeline.io import ParquetDataset, write_json_atomic
from pipeline.progress import progress
from pipeline.schema import ENTRIES_SCHEMA, FRAMES_SCHEMA, KEYS, REJECTS_SCHEMA
from pipeline.sources.mp.mp_client import (
    DEFAULT_TIMEOUT,
    MPAuthError,
    MPClient,
    MPResterClient,
    RetriesExhausted,
    RetryPolicy,
    call_with_retries,
    redact,
)
from pipeline.sources.mp.taskdocs import trajectory_frames

log = logging.getLogger(__name__)

SOURCE = "mp-api"
THERMO_TYPES = ("GGA_GGA+U", "R2SCAN", "GGA_GGA+U_R2SCAN")
TASK_RUN_TYPES = ("GGA", "GGA+U", "R2SCAN")
TASK_KINDS = ("Structure Optimization", "Static")
STATE_VERSION = 1


def normalize_chemsys(chemsys: str | Iterable[str]) -> str:
    """'O-Li-Fe' or ['Fe', 'Li', 'O'] -> 'Fe-Li-O'; unknown elements raise ValueError naming them."""
    symbols = chemsys.split("-") if isinstance(chemsys, str) else list(chemsys)
    symbols = [s.strip() for s in symbols if s.strip()]
    if not symbols:
        raise ValueError(f"empty chemical system {chemsys!r}")
    bad = [s for s in symbols if not Element.is_valid_symbol(s)]
    if bad:
        raise ValueError(f"chemical system {chemsys!r}: unknown element(s) {bad}")
    return "-".join(sorted(set(symbols)))


def top_systems(chemsystems: Iterable[str]) -> list[str]:
    """Normalized systems, without those contained in another requested system."""
    systems = sorted({normalize_chemsys(c) for c in chemsystems})
    sets = {s: set(s.split("-")) for s in systems}
    return [s for s in systems if not any(sets[s] < sets[o] for o in systems)]


def split_calc_type(calc_type: str) -> tuple[str | None, str]:
    """'GGA+U Structure Optimization' -> ('GGA+U', 'Structure Optimization'); 'r2SCAN Static' -> ('R2SCAN',
    'Static')."""
    head, _, tail = str(calc_type).strip().partition(" ")
    return normalize_run_type(head), tail.strip()


@dataclass
class IngestReport:
    """What one run did."""

    entries_written: int = 0
    frames_written: int = 0
    rejects_written: int = 0
    units_done: int = 0
    units_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"mp ingest: {self.entries_written} entries, {self.frames_written} frames, {self.rejects_written} "
            f"rejects written; {self.units_done} units done, {self.units_skipped} already done, "
            f"{len(self.failed)} failed (retried next run)"
        )


class _State:
    """The resumable state: finished units, the task list of each material, units that failed."""

    def __init__(self, path: Path):
        self.path = path
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise ValueError(
                    f"{path}: unreadable ingestion state ({exc}); delete it to start over"
                ) from exc
        self.done: set[str] = set(data.get("done", []))
        self.materials: dict[str, dict[str, str]] = dict(data.get("materials", {}))
        self.failed: dict[str, str] = dict(data.get("failed", {}))

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "version": STATE_VERSION,
                "done": sorted(self.done),
                "materials": {k: dict(sorted(v.items())) for k, v in sorted(self.materials.items())},
                "failed": dict(sorted(self.failed.items())),
            },
        )


class MPIngest:
    """One ingestion into ``out_dir`` (entries/, frames/, rejects/, state.json) through an :class:`MPClient`."""

    def __init__(
        self,
        out_dir: str | Path,
        client: MPClient,
        *,
        thermo_types: Sequence[str] = THERMO_TYPES,
        task_run_types: Sequence[str] = TASK_RUN_TYPES,
        task_kinds: Sequence[str] = TASK_KINDS,
        include_tasks: bool = True,
        max_workers: int = 4,
        batch_size: int = 50,
        flush_units: int = 25,
        flush_rows: int = 5000,
        retry: RetryPolicy | None = None,
        secrets: Sequence[str | None] = (),
    ):
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.out = Path(out_dir)
        self.client = client
        self.thermo_types = tuple(thermo_types)
        self.task_run_types = {normalize_run_type(r) for r in task_run_types}
        self.task_kinds = {k.lower() for k in task_kinds}
        self.include_tasks = include_tasks
        self.max_workers = max_workers
        self.batch_size = batch_size
        self.flush_units, self.flush_rows = flush_units, flush_rows
        self.retry = retry or RetryPolicy()
        env_key = mp_api_key()
        self.secrets = (*secrets, *getattr(client, "secrets", ()), env_key.reveal() if env_key else None)
        self.entries = ParquetDataset(self.out / "entries", ENTRIES_SCHEMA, KEYS["entries"])
        self.frames = ParquetDataset(self.out / "frames", FRAMES_SCHEMA, KEYS["frames"])
        self.rejects = ParquetDataset(self.out / "rejects", REJECTS_SCHEMA, KEYS["rejects"])
        self.state = _State(self.out / "state.json")
        self.report = IngestReport()
        self._buffer: dict[str, list[dict[str, Any]]] = {"entries": [], "frames": [], "rejects": []}
        self._buffered_units: list[str] = []
        self._abort = threading.Event()
        self._fatal: MPAuthError | None = None

    # -- driver ---------------------------------------------------------------------------------------------
    def run(self, chemsystems: Iterable[str]) -> IngestReport:
        systems = top_systems(chemsystems)
        log.info("mp ingest into %s: systems %s, thermo types %s", self.out, systems, self.thermo_types)
        entry_units = [f"entries:{cs}:{tt}" for cs in systems for tt in self.thermo_types]
        self._run_units(entry_units, self._fetch_entries, self._store_entries)
        if self.include_tasks:
            batches = self._material_batches(systems)
            self._run_units(batches, self._fetch_calc_types, self._store_calc_types)
            self._run_units(self._task_units(systems), self._fetch_trajectory, self._store_frames)
        log.info(self.report.summary())
        return self.report

    def _run_units(
        self, units: Sequence[str], fetch: Callable[[str], Any], store: Callable[[str, Any], None]
    ) -> None:
        todo = [u for u in units if u not in self.state.done]
        self.report.units_skipped += len(units) - len(todo)
        if not todo:
            return
        pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="mp-ingest")
        bar = progress(total=len(todo), desc=f"ingest {todo[0].split(':', 1)[0]}", unit="unit")
        try:
            futures: dict[Future[Any], str] = {pool.submit(self._guarded, fetch, u): u for u in todo}
            for future in as_completed(futures):
                unit = futures[future]
                bar.update(1)
                try:
                    result = future.result()
                except RetriesExhausted as exc:
                    self._fail(unit, str(exc))
                    continue
                except MPAuthError as exc:
                    raise (self._fatal or exc) from None  # the refusal itself, not a unit aborted after it
                except Exception as exc:  # noqa: BLE001 - a permanent failure of one unit; the rest carry on
                    self._reject(unit, exc)
                    self._finish(unit)
                    continue
                store(unit, result)
                self._finish(unit)
        except BaseException:
            self._abort.set()  # stopping (auth, crash, Ctrl-C): queued units must not start
            raise
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            self._flush()  # what finished is stored even when the run is being torn down

    def _guarded(self, fetch: Callable[[str], Any], unit: str) -> Any:
        """Run one unit in a worker, unless an auth failure or a crash elsewhere already doomed the run."""
        if self._abort.is_set():
            raise MPAuthError("aborted: the run is stopping (API key refused or interrupted)")
        try:
            return fetch(unit)
        except Exception as exc:
            if isinstance(exc, MPAuthError) and not self._abort.is_set():
                self._fatal = exc
                self._abort.set()
            raise
        except BaseException:
            self._abort.set()  # KeyboardInterrupt, SystemExit...: queued units must not start
            raise

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return call_with_retries(fn, what=what, policy=self.retry, secrets=self.secrets)

    def _finish(self, unit: str) -> None:
        self._buffered_units.append(unit)
        self.report.units_done += 1
        n_rows = sum(len(rows) for rows in self._buffer.values())
        if len(self._buffered_units) >= self.flush_units or n_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        """Append the buffered rows (one Parquet part per dataset), then mark their units done in the state."""
        datasets = {"entries": self.entries, "frames": self.frames, "rejects": self.rejects}
        tables = {"entries": entries_table, "frames": frames_table, "rejects": _rejects_table}
        for name, rows in self._buffer.items():
            if rows:
                written = datasets[name].append(tables[name](rows))
                setattr(self.report, f"{name}_written", getattr(self.report, f"{name}_written") + written)
                rows.clear()
        for unit in self._buffered_units:
            self.state.done.add(unit)
            self.state.failed.pop(unit, None)
        self._buffered_units.clear()
        self.state.save()

    def _fail(self, unit: str, message: str) -> None:
        message = redact(message, *self.secrets)
        log.error("%s: %s", unit, message)
        self.state.failed[unit] = message
        self.report.failed[unit] = message

    def _reject(self, record_id: str, error: BaseException | str) -> None:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        text = redact(text, *self.secrets)
        log.warning("rejected %s: %s", record_id, text[:500])
        self._buffer["rejects"].append({"record_id": record_id, "source": SOURCE, "error": text})

    # -- entries --------------------------------------------------------------------------------------------
    def _fetch_entries(self, unit: str) -> list[Any]:
        _, chemsys, thermo_type = unit.split(":", 2)
        return self._call(unit, lambda: self.client.thermo_entries(chemsys, thermo_type))

    def _store_entries(self, unit: str, entries: list[Any]) -> None:
        thermo_type = unit.rsplit(":", 1)[1]
        rows = []
        for i, entry in enumerate(entries):
            record = f"{unit}:{getattr(entry, 'entry_id', None) or i}"
            try:
                if getattr(entry, "structure", None) is None:
                    raise RecordError("entry has no structure")
                rows.append(entry_to_row(entry, source=SOURCE, thermo_type=thermo_type))
            except Exception as exc:  # noqa: BLE001
                self._reject(record, exc)
        self._buffer["entries"].extend(rows)
        log.info("%s: %d entries", unit, len(rows))

    # -- tasks ----------------------------------------------------------------------------------------------
    def _system_material_ids(self, systems: Sequence[str]) -> list[str]:
        table = self.entries.read(columns=["material_id", "chemsys"])
        element_sets = [set(s.split("-")) for s in systems]
        mids = set()
        for mid, cs in zip(table["material_id"].to_pylist(), table["chemsys"].to_pylist(), strict=True):
            if mid and any(set(cs.split("-")) <= es for es in element_sets):
                mids.add(mid)
        return sorted(mids)

    def _material_batches(self, systems: Sequence[str]) -> list[str]:
        todo = [m for m in self._system_material_ids(systems) if m not in self.state.materials]
        return [
            "materials:" + ",".join(todo[i : i + self.batch_size])
            for i in range(0, len(todo), self.batch_size)
        ]

    def _fetch_calc_types(self, unit: str) -> dict[str, dict[str, str]]:
        mids = unit.split(":", 1)[1].split(",")
        return self._call(
            f"calc types of {len(mids)} materials", lambda: self.client.material_calc_types(mids)
        )

    def _store_calc_types(self, unit: str, calc_types: dict[str, dict[str, str]]) -> None:
        for mid in unit.split(":", 1)[1].split(","):
            self.state.materials[mid] = dict(calc_types.get(mid, {}))

    def _wanted(self, calc_type: str) -> bool:
        run_type, kind = split_calc_type(calc_type)
        return run_type in self.task_run_types and kind.lower() in self.task_kinds

    def _task_units(self, systems: Sequence[str]) -> list[str]:
        units = []
        for mid in self._system_material_ids(systems):
            for task_id, calc_type in sorted(self.state.materials.get(mid, {}).items()):
                if self._wanted(calc_type):
                    units.append(f"task:{mid}:{task_id}")
        return units

    def _fetch_trajectory(self, unit: str) -> tuple[list[dict[str, Any]], list[tuple[str, Exception]]]:
        _, mid, task_id = unit.split(":", 2)

        def fetch_and_check() -> tuple[list[dict[str, Any]], list[tuple[str, Exception]]]:
            # trajectory_frames raises IncompleteRecord on a response cut short: retried like a 5xx
            return trajectory_frames(self.client.trajectory(task_id), task_id=task_id, material_id=mid)

        return self._call(unit, fetch_and_check)

    def _store_frames(
        self, unit: str, result: tuple[list[dict[str, Any]], list[tuple[str, Exception]]]
    ) -> None:
        rows, step_rejects = result
        for step_id, exc in step_rejects:
            self._reject(step_id, exc)
        self._buffer["frames"].extend(rows)


def _rejects_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)


def ingest_mp(
    chemsystems: Iterable[str],
    out_dir: str | Path,
    client: MPClient | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> IngestReport:
    """Ingest MP entries and task trajectories of ``chemsystems`` into ``out_dir`` (see :class:`MPIngest`).

    Without ``client`` an mp-api ``MPRester`` is opened with MP_API_KEY (:class:`MPAuthError` if unset,
    :class:`MPUnreachable` if it does not answer). ``timeout`` bounds every network call (s), also of the
    retries of ``retry`` when none is given."""
    if client is None:
        client = MPResterClient.from_key(mp_api_key(), timeout=timeout)
    kwargs.setdefault("retry", RetryPolicy(timeout=timeout))
    return MPIngest(out_dir, client, **kwargs).run(chemsystems)


def read_outputs(out_dir: str | Path) -> dict[str, pa.Table]:
    """The entries, frames and rejects tables of an ingestion folder."""
    out = Path(out_dir)
    return {
        "entries": ParquetDataset(out / "entries", ENTRIES_SCHEMA, KEYS["entries"]).read(),
        "frames": ParquetDataset(out / "frames", FRAMES_SCHEMA, KEYS["frames"]).read(),
        "rejects": ParquetDataset(out / "rejects", REJECTS_SCHEMA, KEYS["rejects"]).read(),
    }
