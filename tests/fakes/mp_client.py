"""A stand-in for ``mp_api.client.MPRester`` that serves REAL recorded Materials Project data, with injectable faults.

It has the methods :class:`pipeline.sources.mp.mp_client.MPResterClient` calls, with mp-api's names, arguments and
return types (``get_entries_in_chemsys`` -> ComputedStructureEntry list, ``materials.search`` -> documents with
``material_id`` and ``calc_types``, ``materials.tasks.get_trajectory`` -> dumped emmet ``RelaxTrajectory``), and
fails the way mp-api fails (``MPRestError`` carrying the HTTP status in its message, ``requests`` timeouts and
connection errors, an orjson decode error for a body cut short, mp-api's 32-character key check).

Data (all from ../shared/data/mp, nothing invented except where said):

* GGA_GGA+U entries: emmet ``Li-Fe-O.json.gz`` (375 MP2020-corrected entries) and the Ni-bearing GGA/GGA+U entries
  of the mp-res ``Li-Ni-O`` dump with MP2020 applied (the dump's Li-O subsystem duplicates Li-Fe-O's and is
  left out); R2SCAN entries: the dump's 51 r2SCAN entries; the mixed GGA_GGA+U_R2SCAN type is made per query by
  pymatgen's ``MaterialsProjectDFTMixingScheme`` over the other two, as MP does.
* Tasks of Li and Fe materials: the emmet Li/Fe/V task documents whose final structure matches an elemental entry
  of Li-Fe-O (same formula and space group, volume per atom within 5%); calc types from emmet's own ``calc_type`` of each
  document's inputs; trajectories built with emmet's ``RelaxTrajectory`` from the documents' ionic steps.
* Si: material ``mp-149`` (diamond Si; the structures are checked to be Fd-3m) with the emmet Si task documents
  (GGA) and the emmet raw r2SCAN relaxation of Si (task id ``fake-si-r2scan-relax``: invented, the raw files
  have none). Its GGA and R2SCAN thermo entries are built from those calculations' final structures and energies.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import requests
from monty.json import MontyDecoder
from mp_api.client.core import MPRestError
from pymatgen.core import Structure
from pymatgen.core.entries import ComputedStructureEntry

TRANSIENT_FAULTS = ("429", "500", "502", "503", "timeout", "connection", "truncated")
URL = "https://api.materialsproject.org"


class SimulatedCrash(BaseException):
    """Kills a run midway (like a SIGKILL or power cut would): not an Exception, so nothing swallows it."""


@dataclass
class RecordedMP:
    """Recorded MP data, indexed the way the API serves it."""

    entries: dict[str, list[ComputedStructureEntry]]
    calc_types: dict[str, dict[str, str]]
    trajectories: dict[str, dict[str, Any]]
    mixed_cache: dict[str, list[ComputedStructureEntry]] = field(default_factory=dict)


def _load_json_gz(path: Path) -> Any:
    with gzip.open(path, "rt") as fh:
        return json.load(fh)


def _relax_trajectory(
    task_id: str, run_type: str, task_type: str, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    from emmet.core.trajectory import RelaxTrajectory

    keys = ("structure", "e_fr_energy", "e_wo_entrp", "e_0_energy", "forces", "stress", "electronic_steps")
    props: dict[str, list[Any]] = {("energy" if k == "e_0_energy" else k): [] for k in keys}
    for step in steps:
        for k in keys:
            value = step.get(k)
            if k == "structure" and isinstance(value, dict):
                value = Structure.from_dict(value)
            props["energy" if k == "e_0_energy" else k].append(value)
    props = {k: v for k, v in props.items() if all(x is not None for x in v)}
    traj = RelaxTrajectory._from_dict(props, identifier=task_id, run_type=run_type, task_type=task_type)
    return traj.model_dump()  # what mp-api's get_trajectory returns


def _task_doc_trajectory(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from emmet.core.vasp.calc_types.utils import calc_type

    last = doc["calcs_reversed"][0]
    ctype = str(calc_type(doc.get("orig_inputs") or last["input"], last["input"]["parameters"]).value)
    run_type, _, task_type = ctype.partition(" ")
    steps = [s for calc in reversed(doc["calcs_reversed"]) for s in calc["output"]["ionic_steps"]]
    return ctype, _relax_trajectory(doc["task_id"], run_type, task_type, steps)


def _fingerprint(structure: Structure) -> tuple[str, int, float]:
    """(reduced formula, space group number, volume per atom): same material when all three agree (volume
    within 5%). Cheaper than StructureMatcher, whose cache compares every Fe structure with every other."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    spg = SpacegroupAnalyzer(structure, symprec=0.1).get_space_group_number()
    return structure.composition.reduced_formula, spg, structure.volume / len(structure)


@functools.cache
def recorded_mp(shared: Path) -> RecordedMP:
    """Build (once per process) the recorded data set from the shared MP files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MP2020's oxidation-state guesses, emmet/pymatgen deprecations
        return _build_recorded_mp(shared)


def _build_recorded_mp(shared: Path) -> RecordedMP:
    from pymatgen.analysis.compatibility import MaterialsProject2020Compatibility
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from pipeline.sources.files.res import read_res_entries
    from pipeline.sources.mp.taskdocs import decode_hex_gz_bundle, read_vasprun

    li_fe_o = MontyDecoder().process_decoded(_load_json_gz(shared / "emmet/Li-Fe-O.json.gz"))
    res_entries, _ = read_res_entries(shared / "mp-res_Li-Ni-O/Li-Ni-O.res.tar")
    ni_gga = [e for e in res_entries if e.parameters["run_type"] != "R2SCAN" and "Ni" in e.composition]
    ni_gga = MaterialsProject2020Compatibility(check_potcar=False).process_entries(ni_gga, inplace=False)
    r2scan = [e for e in res_entries if e.parameters["run_type"] == "R2SCAN"]
    gga = list(li_fe_o) + list(ni_gga)

    calc_types: dict[str, dict[str, str]] = {}
    trajectories: dict[str, dict[str, Any]] = {}
    elementals = [(e, _fingerprint(e.structure)) for e in li_fe_o if len(e.composition.elements) == 1]
    for doc in _load_json_gz(shared / "emmet/tasks_Li_Fe_V.json.gz"):
        formula, spg, vpa = _fingerprint(Structure.from_dict(doc["output"]["structure"]))
        for entry, (e_formula, e_spg, e_vpa) in elementals:
            if (formula, spg) == (e_formula, e_spg) and abs(vpa - e_vpa) < 0.05 * e_vpa:
                ctype, traj = _task_doc_trajectory(doc)
                calc_types.setdefault(entry.data["material_id"], {})[doc["task_id"]] = ctype
                trajectories[doc["task_id"]] = traj
                break

    si_id = "mp-149"
    for doc in _load_json_gz(shared / "emmet/test_si_tasks.json.gz"):
        ctype, traj = _task_doc_trajectory(doc)
        calc_types.setdefault(si_id, {})[doc["task_id"]] = ctype
        trajectories[doc["task_id"]] = traj
        if ctype == "GGA Structure Optimization":
            structure = Structure.from_dict(doc["output"]["structure"])
            assert SpacegroupAnalyzer(structure).get_space_group_symbol() == "Fd-3m"
            gga.append(
                ComputedStructureEntry(
                    structure,
                    doc["output"]["energy"],
                    parameters={"run_type": "GGA", "hubbards": {}},
                    data={"material_id": si_id, "task_id": doc["task_id"]},
                    entry_id=f"{si_id}-GGA",
                )
            )
    vasprun = read_vasprun(shared / "emmet/raw_vasp_Si_r2SCAN_relax/vasprun.xml.gz")
    assert SpacegroupAnalyzer(vasprun.final_structure).get_space_group_symbol() == "Fd-3m"
    si_task = "fake-si-r2scan-relax"
    calc_types[si_id][si_task] = "r2SCAN Structure Optimization"
    trajectories[si_task] = _relax_trajectory(
        si_task, "r2SCAN", "Structure Optimization", vasprun.ionic_steps
    )
    r2scan.append(
        ComputedStructureEntry(
            vasprun.final_structure,
            vasprun.final_energy,
            parameters={"run_type": "R2SCAN"},
            data={"material_id": si_id, "task_id": si_task},
            entry_id=f"{si_id}-R2SCAN",
        )
    )
    _ = decode_hex_gz_bundle  # the Lu r2SCAN bundle has no material in these systems; tests read it directly
    return RecordedMP(
        entries={"GGA_GGA+U": gga, "R2SCAN": r2scan}, calc_types=calc_types, trajectories=trajectories
    )


class FaultPlan:
    """Which faults to raise, per call key (``entries:<chemsys>:<thermo type>``, ``materials``,
    ``trajectory:<task id>``), in order; plus an optional crash after a number of calls.

    ``rate``/``seed`` add transient faults to calls of the other keys, at most ``max_per_key`` per key, so that
    enough retries always get through (the outcome is deterministic whatever the thread interleaving).
    """

    def __init__(
        self,
        per_key: dict[str, Sequence[str]] | None = None,
        *,
        rate: float = 0.0,
        seed: int = 0,
        max_per_key: int = 2,
        crash_after: int | None = None,
    ):
        self.per_key = {k: list(v) for k, v in (per_key or {}).items()}
        self.rate, self.seed, self.max_per_key = rate, seed, max_per_key
        self.crash_after = crash_after
        self.calls = 0
        self.injected: list[tuple[str, str]] = []
        self._random_count: dict[str, int] = {}
        self._lock = threading.Lock()

    def next(self, key: str) -> str | None:
        with self._lock:
            self.calls += 1
            if self.crash_after is not None and self.calls > self.crash_after:
                return "crash"
            if key in self.per_key:  # explicit faults only, then clean calls
                queue = self.per_key[key]
                fault = queue.pop(0) if queue else None
            else:
                fault = self._random(key)
            if fault:
                self.injected.append((key, fault))
            return fault

    def _random(self, key: str) -> str | None:
        if self.rate <= 0 or self._random_count.get(key, 0) >= self.max_per_key:
            return None
        import hashlib

        n = self._random_count.get(key, 0)
        h = int(hashlib.sha256(f"{self.seed}:{key}:{n}".encode()).hexdigest(), 16)
        if (h % 10_000) / 10_000 >= self.rate:
            return None
        self._random_count[key] = n + 1
        return TRANSIENT_FAULTS[(h // 10_000) % len(TRANSIENT_FAULTS)]


def _http_error(code: int, path: str, detail: str) -> MPRestError:
    return MPRestError(
        f"REST query returned with error status code {code} on URL {URL}/{path} with message:\n{detail}"
    )


class _Tasks:
    def __init__(self, owner: FakeMPRester):
        self._owner = owner

    def get_trajectory(self, task_id: str, run_type: str | None = None) -> dict[str, Any]:
        owner = self._owner
        fault = owner._fault(f"trajectory:{task_id}", "materials/tasks/trajectory")
        traj = owner.data.trajectories.get(str(task_id))
        if traj is None:
            raise MPRestError(f"No trajectory data for {task_id} found")
        traj = copy.deepcopy(traj)
        if fault == "truncated":  # a response cut short: the last ionic steps of some fields are missing
            n = max(1, len(traj["cart_coords"]) // 2)
            traj["forces"] = traj["forces"][:n] if len(traj["cart_coords"]) > 1 else []
            traj["stress"] = traj["stress"][:n]
        return traj


class _Materials:
    def __init__(self, owner: FakeMPRester):
        self._owner = owner
        self.tasks = _Tasks(owner)

    def search(
        self, material_ids: str | list[str] | None = None, fields: list[str] | None = None, **_: Any
    ) -> list[dict[str, Any]]:
        owner = self._owner
        ids = [material_ids] if isinstance(material_ids, str) else list(material_ids or [])
        docs = [
            {"material_id": mid, "calc_types": dict(owner.data.calc_types[mid])}
            for mid in ids
            if mid in owner.data.calc_types
        ]
        fault = owner._fault("materials", "materials/core/")
        if fault == "truncated":
            body = orjson.dumps({"data": docs, "meta": {"total_doc": len(docs)}})
            orjson.loads(body[: len(body) // 2])  # raises orjson.JSONDecodeError, as mp-api's load_json would
        if fields:
            docs = [{k: v for k, v in d.items() if k in fields} for d in docs]
        return docs


class FakeMPRester:
    """``MPRester``-shaped client over :func:`recorded_mp` data; see the module docstring."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        data: RecordedMP,
        faults: FaultPlan | None = None,
        accepted_keys: Iterable[str] | None = None,
        latency: float = 0.0,
        mute_progress_bars: bool = True,
        **_: Any,
    ):
        if api_key is not None and len(api_key) != 32:  # mp-api's validate_api_key, verbatim in effect
            raise MPRestError(
                "Please obtain a valid API key from https://materialsproject.org/api "
                "and export it as an environment variable `MP_API_KEY`. Valid API keys are 32 characters."
            )
        self.api_key = api_key
        self.session_headers = {"x-api-key": api_key}
        self.data = data
        self.faults = faults or FaultPlan()
        self.accepted_keys = None if accepted_keys is None else set(accepted_keys)
        self.materials = _Materials(self)
        self.latency = latency
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def _fault(self, key: str, path: str) -> str | None:
        with self._lock:
            self.calls.append(key)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
        finally:
            with self._lock:
                self.in_flight -= 1
        if self.accepted_keys is not None and self.api_key not in self.accepted_keys:
            raise _http_error(401, path, "Unauthorized: invalid API key")
        fault = self.faults.next(key)
        if fault is None or fault == "truncated":
            return fault
        if fault == "crash":
            raise SimulatedCrash(key)
        if fault == "echo-key":  # a misbehaving proxy that echoes the request headers in its error page
            raise _http_error(502, path, f"Bad Gateway; request headers: {self.session_headers}")
        if fault.isdigit():
            raise _http_error(
                int(fault), path, "Too Many Requests" if fault == "429" else "Internal Server Error"
            )
        if fault == "timeout":
            timeout = requests.exceptions.ReadTimeout(
                "HTTPSConnectionPool(host='api.materialsproject.org', port=443): Read timed out. (read timeout=20)"
            )
            if key.startswith("trajectory"):
                raise timeout
            raise MPRestError(str(timeout))  # mp-api wraps RequestException like this in _query_resource
        if fault == "connection":
            raise requests.exceptions.ConnectionError(
                "('Connection aborted.', RemoteDisconnected('Remote end closed connection without response'))"
            )
        raise ValueError(f"unknown fault {fault!r}")

    def get_entries_in_chemsys(
        self, elements: str | list[str], additional_criteria: dict[str, Any] | None = None, **_: Any
    ) -> list[ComputedStructureEntry]:
        symbols = set(elements.split("-") if isinstance(elements, str) else elements)
        chemsys = "-".join(sorted(symbols))
        thermo_types = (additional_criteria or {}).get("thermo_types", ["GGA_GGA+U_R2SCAN"])
        (thermo_type,) = thermo_types
        fault = self._fault(f"entries:{chemsys}:{thermo_type}", f"materials/thermo/?chemsys={chemsys}")
        if thermo_type == "GGA_GGA+U_R2SCAN":
            entries = self._mixed(chemsys, symbols)
        else:
            entries = [
                e for e in self.data.entries[thermo_type] if set(map(str, e.composition.elements)) <= symbols
            ]
        if fault == "truncated":
            body = orjson.dumps({"data": [e.as_dict() for e in entries]}, default=str)
            orjson.loads(body[: len(body) // 2])
        return copy.deepcopy(entries)

    def _mixed(self, chemsys: str, symbols: set[str]) -> list[ComputedStructureEntry]:
        with self._lock:
            cached = self.data.mixed_cache.get(chemsys)
        if cached is None:
            from pymatgen.analysis.compatibility.mixing_scheme import MaterialsProjectDFTMixingScheme

            pool = [
                copy.deepcopy(e)
                for tt in ("GGA_GGA+U", "R2SCAN")
                for e in self.data.entries[tt]
                if set(map(str, e.composition.elements)) <= symbols
            ]
            scheme = MaterialsProjectDFTMixingScheme(compat_1=None, check_potcar=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cached = scheme.process_entries(pool, inplace=False, verbose=False)
            with self._lock:
                self.data.mixed_cache[chemsys] = cached
        return cached


def fake_client(shared: Path, **kwargs: Any):
    """An :class:`MPResterClient` over a :class:`FakeMPRester` (kwargs go to the fake)."""
    from pipeline.sources.mp.mp_client import MPResterClient

    return MPResterClient(FakeMPRester(data=recorded_mp(shared), **kwargs))
