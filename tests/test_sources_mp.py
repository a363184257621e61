"""MP ingestion through the MPClient protocol, offline, against a fake MPRester serving real recorded MP data."""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests
from fakes.mp_client import FakeMPRester, FaultPlan, RecordedMP, SimulatedCrash, recorded_mp
from mp_api.client.core import MPRestError

from pipeline.config import Secret
from pipeline.schema import KEYS
from pipeline.sources.mp import (
    MPIngest,
    ingest_mp,
    normalize_chemsys,
    read_outputs,
    split_calc_type,
    top_systems,
)
from pipeline.sources.mp.mp_client import (
    MPAuthError,
    MPResterClient,
    RetriesExhausted,
    RetryPolicy,
    call_with_retries,
    classify_error,
)
from pipeline.sources.mp.taskdocs import IncompleteRecord, decode_hex_gz_bundle, import_vasprun

SYSTEMS = ["Li-Fe-O", "Li-Ni-O", "Si", "O-Li"]  # O-Li is inside both ternaries: dropped
THERMO = ("GGA_GGA+U", "R2SCAN")
KEY = "abcdefghijklmnopqrstuvwxyz012345"  # a made-up 32-character key


@pytest.fixture(scope="module")
def recorded(mp_data: Path) -> RecordedMP:
    return recorded_mp(mp_data)


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def _client(recorded: RecordedMP, **kwargs) -> MPResterClient:
    return MPResterClient(FakeMPRester(data=recorded, **kwargs))


def _run(out: Path, client, *, systems=SYSTEMS, retry=None, **kwargs):
    retry = retry or RetryPolicy(max_attempts=4, sleep=Sleeps(), seed=0)
    return MPIngest(out, client, thermo_types=THERMO, max_workers=3, retry=retry, **kwargs).run(systems)


def _sorted(table: pa.Table, name: str) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: tuple(str(r[k]) for k in KEYS[name]))


def _assert_same_outputs(a: Path, b: Path) -> None:
    ta, tb = read_outputs(a), read_outputs(b)
    for name in ("entries", "frames", "rejects"):
        assert ta[name].schema == tb[name].schema
        assert _sorted(ta[name], name) == _sorted(tb[name], name), name


@pytest.fixture(scope="module")
def clean_run(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    report = _run(out, _client(recorded))
    return out, report


def test_clean_run_stores_entries_and_trajectories(clean_run, recorded, mp_file):
    out, report = clean_run
    tables = read_outputs(out)
    entries, frames = tables["entries"], tables["frames"]
    assert tables["rejects"].num_rows == 0 and not report.failed
    assert Counter(entries["thermo_type"].to_pylist()) == {
        "GGA_GGA+U": len(recorded.entries["GGA_GGA+U"]),
        "R2SCAN": len(recorded.entries["R2SCAN"]),
    }
    assert all(s is not None for s in entries["structure"].to_pylist())
    # every static / relaxation task of the materials, none of the DFPT / NSCF ones
    wanted = {
        t
        for calc_types in recorded.calc_types.values()
        for t, ct in calc_types.items()
        if ct.endswith(("Static", "Structure Optimization"))
    }
    assert set(frames["task_id"].to_pylist()) == wanted
    assert "mp-cmxxl" not in wanted and "mp-dryyt" not in wanted  # Si DFPT and NSCF tasks
    n_steps = sum(len(recorded.trajectories[t]["cart_coords"]) for t in wanted)
    assert frames.num_rows == report.frames_written == n_steps
    assert set(frames["fidelity"].to_pylist()) == {"pbe", "r2scan"}
    # the r2SCAN Si relaxation came through the trajectory route with the same labels as from its vasprun
    direct = import_vasprun(mp_file("emmet/raw_vasp_Si_r2SCAN_relax/vasprun.xml.gz"), "fake-si-r2scan-relax")
    via_api = sorted(
        (r for r in frames.to_pylist() if r["task_id"] == "fake-si-r2scan-relax"),
        key=lambda r: r["ionic_step"],
    )
    assert [r["energy"] for r in via_api] == pytest.approx([r["energy"] for r in direct.rows], abs=1e-8)
    np.testing.assert_allclose([r["stress"] for r in via_api], [r["stress"] for r in direct.rows])
    assert {r["material_id"] for r in via_api} == {"mp-149"}
    state = json.loads((out / "state.json").read_text())
    assert "entries:Li-O:GGA_GGA+U" not in state["done"] and "entries:Fe-Li-O:R2SCAN" in state["done"]


def test_faulty_run_gives_identical_parquet(clean_run, recorded, tmp_path):
    plan = FaultPlan(
        {
            "entries:Fe-Li-O:GGA_GGA+U": ["429", "truncated"],
            "entries:Li-Ni-O:R2SCAN": ["500", "timeout"],
            "materials": ["connection", "503"],
            "trajectory:fake-si-r2scan-relax": ["truncated", "502"],
            "trajectory:mp-ft": ["timeout", "connection"],
        },
        rate=0.4,
        seed=7,
        max_per_key=2,
    )
    sleeps = Sleeps()
    report = _run(
        tmp_path, _client(recorded, faults=plan), retry=RetryPolicy(max_attempts=3, sleep=sleeps, seed=1)
    )
    assert not report.failed
    kinds = Counter(kind for _, kind in plan.injected)
    assert set(kinds) == {"429", "500", "502", "503", "timeout", "connection", "truncated"}
    assert len(sleeps) == len(plan.injected) and all(0 < s <= 4.0 for s in sleeps)
    _assert_same_outputs(clean_run[0], tmp_path)


def test_interrupted_run_resumes_and_ends_identical(clean_run, recorded, tmp_path):
    crash = _client(recorded, faults=FaultPlan(crash_after=12))
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, crash)
    state = json.loads((tmp_path / "state.json").read_text())
    assert 0 < len(state["done"]) < clean_run[1].units_done
    fake = FakeMPRester(data=recorded)
    report = _run(tmp_path, MPResterClient(fake))
    assert report.units_skipped > 0 and report.units_done + len(state["done"]) == clean_run[1].units_done
    assert len(fake.calls) < clean_run[1].units_done  # the stored units were not fetched again
    _assert_same_outputs(clean_run[0], tmp_path)
    again = FakeMPRester(data=recorded)
    third = _run(tmp_path, MPResterClient(again))
    assert again.calls == [] and third.entries_written == third.frames_written == 0


def test_units_that_keep_failing_are_kept_and_retried_next_run(clean_run, recorded, tmp_path):
    plan = FaultPlan({"trajectory:mp-ft": ["500"] * 5})
    report = _run(tmp_path, _client(recorded, faults=plan), retry=RetryPolicy(max_attempts=3, sleep=Sleeps()))
    assert list(report.failed) == ["task:mp-149:mp-ft"]
    assert "500" in report.failed["task:mp-149:mp-ft"] and "3 attempts" in report.failed["task:mp-149:mp-ft"]
    assert "mp-ft" not in set(read_outputs(tmp_path)["frames"]["task_id"].to_pylist())
    assert json.loads((tmp_path / "state.json").read_text())["failed"] == report.failed
    second = _run(tmp_path, _client(recorded))
    assert not second.failed and json.loads((tmp_path / "state.json").read_text())["failed"] == {}
    _assert_same_outputs(clean_run[0], tmp_path)


def test_permanent_errors_become_rejects_and_the_rest_is_imported(recorded, tmp_path):
    from pymatgen.core.entries import ComputedEntry

    calc_types = {m: dict(c) for m, c in recorded.calc_types.items()}
    calc_types["mp-149"]["mp-missing"] = "GGA Static"  # MP lists a task it has no trajectory for
    bad_entry = ComputedEntry("Si", -5.0, parameters={"run_type": "GGA"}, entry_id="mp-0-GGA")
    data = RecordedMP(
        entries={**recorded.entries, "GGA_GGA+U": [*recorded.entries["GGA_GGA+U"], bad_entry]},
        calc_types=calc_types,
        trajectories=recorded.trajectories,
    )
    report = _run(tmp_path, MPResterClient(FakeMPRester(data=data)), systems=["Si"])
    rejects = {r["record_id"]: r["error"] for r in read_outputs(tmp_path)["rejects"].to_pylist()}
    assert set(rejects) == {"task:mp-149:mp-missing", "entries:Si:GGA_GGA+U:mp-0-GGA"}
    assert "No trajectory data for mp-missing" in rejects["task:mp-149:mp-missing"]
    assert "no structure" in rejects["entries:Si:GGA_GGA+U:mp-0-GGA"]
    assert report.frames_written > 0 and not report.failed


def test_rejected_key_fails_fast_without_retries(recorded, tmp_path):
    fake = FakeMPRester(api_key=KEY, data=recorded, accepted_keys={"z" * 32})
    sleeps = Sleeps()
    with pytest.raises(MPAuthError, match="MP_API_KEY") as info:
        _run(tmp_path, MPResterClient(fake, secrets=(Secret(KEY),)), retry=RetryPolicy(sleep=sleeps))
    assert "401" in str(info.value) and KEY not in str(info.value)
    assert sleeps == [] and len(fake.calls) == len(set(fake.calls)) <= 3  # no retry, queued units not started
    assert not (tmp_path / "entries").exists()


def test_missing_or_malformed_key(monkeypatch, recorded, tmp_path):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    with pytest.raises(MPAuthError, match="MP_API_KEY"):
        ingest_mp(["Si"], tmp_path)
    factory = functools.partial(FakeMPRester, data=recorded)
    with pytest.raises(MPAuthError, match="MP_API_KEY") as info:
        MPResterClient.from_key(Secret("short-key"), rester_factory=factory)
    assert "short-key" not in str(info.value)


def test_api_key_never_reaches_logs_or_files(monkeypatch, caplog, recorded, tmp_path):
    monkeypatch.setenv("MP_API_KEY", KEY)
    plan = FaultPlan({"entries:Si:GGA_GGA+U": ["echo-key", "429"], "trajectory:mp-ft": ["echo-key"] * 5})
    factory = functools.partial(FakeMPRester, data=recorded, faults=plan)
    client = MPResterClient.from_key(rester_factory=factory)  # key read from MP_API_KEY
    assert client.rester.api_key == KEY
    caplog.set_level(logging.DEBUG)
    report = ingest_mp(
        ["Si"], tmp_path, client, thermo_types=THERMO, retry=RetryPolicy(max_attempts=3, sleep=Sleeps())
    )
    assert report.failed  # mp-ft kept failing with the key echoed in the error
    assert ("trajectory:mp-ft", "echo-key") in plan.injected
    assert KEY not in caplog.text and "********" in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and not any(KEY.encode() in p.read_bytes() for p in files)
    assert KEY not in repr(report) and KEY not in repr(client.secrets)


def test_bounded_parallelism(recorded, tmp_path):
    fake = FakeMPRester(data=recorded, latency=0.05)
    MPIngest(tmp_path, MPResterClient(fake), thermo_types=THERMO, max_workers=2).run(["Si"])  # 3 tasks
    assert fake.max_in_flight == 2


def test_mixed_thermo_type(recorded, tmp_path):
    report = MPIngest(
        tmp_path, _client(recorded), thermo_types=("GGA_GGA+U_R2SCAN",), include_tasks=False
    ).run(["Li-O"])
    entries = read_outputs(tmp_path)["entries"].to_pylist()
    assert report.entries_written == len(entries) > 0
    assert {e["thermo_type"] for e in entries} == {"GGA_GGA+U_R2SCAN"}
    assert {e["run_type"] for e in entries} >= {"GGA", "R2SCAN"}
    mixed = recorded.mixed_cache["Li-O"]
    by_id = {e.entry_id: e for e in mixed}
    for row in entries:
        assert row["energy"] == pytest.approx(by_id[row["entry_id"]].energy)


def test_retry_policy_and_error_classes():
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, jitter=0.5, seed=0)
    delays = [policy.delay(n) for n in range(8)]
    assert all(0.5 * min(5.0, 2**n) <= d <= min(5.0, 2**n) for n, d in enumerate(delays))
    assert max(delays) <= 5.0 and len(set(delays)) == len(delays)

    def err(code: int) -> MPRestError:
        return MPRestError(f"REST query returned with error status code {code} on URL x with message:\ny")

    assert classify_error(err(429)) == classify_error(err(503)) == "transient"
    assert classify_error(err(401)) == classify_error(err(403)) == "auth"
    assert classify_error(err(404)) == "permanent"
    assert (
        classify_error(
            MPRestError(
                "... Max retries exceeded with url: (Caused by ResponseError('too many 429 error responses'))"
            )
        )
        == "transient"
    )
    assert classify_error(requests.exceptions.ReadTimeout("read timed out")) == "transient"
    assert classify_error(requests.exceptions.ConnectionError("aborted")) == "transient"
    assert classify_error(json.JSONDecodeError("cut", "{", 1)) == "transient"
    assert classify_error(IncompleteRecord("forces has 2 steps")) == "transient"
    assert classify_error(MPRestError("No trajectory data for mp-1 found")) == "permanent"
    assert classify_error(ValueError("bad")) == "permanent"

    calls, sleeps = [], Sleeps()

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise err(429)
        return "ok"

    assert call_with_retries(flaky, what="x", policy=RetryPolicy(sleep=sleeps, seed=0)) == "ok"
    assert len(sleeps) == 2 and sleeps[0] <= 1.0 and sleeps[1] <= 2.0
    with pytest.raises(RetriesExhausted, match="gave up after 2 attempts"):
        call_with_retries(
            lambda: (_ for _ in ()).throw(err(500)),
            what="x",
            policy=RetryPolicy(max_attempts=2, sleep=Sleeps()),
        )
    with pytest.raises(MPAuthError):
        call_with_retries(lambda: (_ for _ in ()).throw(err(401)), what="x", policy=RetryPolicy(sleep=sleeps))
    with pytest.raises(MPRestError, match="404"):
        call_with_retries(lambda: (_ for _ in ()).throw(err(404)), what="x", policy=RetryPolicy(sleep=sleeps))
    assert len(sleeps) == 2


def test_adapter_calls_exist_in_installed_mp_api():
    """The calls MPResterClient makes (and the fake mimics) exist with these names in mp-api / emmet."""
    import inspect

    from emmet.core.trajectory import RelaxTrajectory
    from mp_api.client import MPRester
    from mp_api.client.routes.materials.materials import MaterialsRester
    from mp_api.client.routes.materials.tasks import TaskRester

    assert {"elements", "additional_criteria"} <= set(
        inspect.signature(MPRester.get_entries_in_chemsys).parameters
    )
    assert {"material_ids", "fields"} <= set(inspect.signature(MaterialsRester.search).parameters)
    assert "task_id" in inspect.signature(TaskRester.get_trajectory).parameters
    assert {"material_id", "calc_types"} <= set(
        MaterialsRester.document_model.model_json_schema()["properties"]
    )
    read_by_us = {
        "cart_coords",
        "lattice",
        "elements",
        "energy",
        "e_fr_energy",
        "e_wo_entrp",
        "forces",
        "stress",
    }
    assert read_by_us | {"electronic_steps", "identifier", "run_type", "task_type"} <= set(
        RelaxTrajectory.model_fields
    )


def test_chemsys_helpers():
    assert normalize_chemsys("O-Li-Fe") == normalize_chemsys(["Fe", "Li", "O", "O"]) == "Fe-Li-O"
    with pytest.raises(ValueError, match="Xx"):
        normalize_chemsys("Li-Xx")
    assert top_systems(["Li-O", "Li-Fe-O", "Si", "O-Li-Ni"]) == ["Fe-Li-O", "Li-Ni-O", "Si"]
    assert split_calc_type("r2SCAN Structure Optimization") == ("R2SCAN", "Structure Optimization")
    assert split_calc_type("GGA+U Static") == ("GGA+U", "Static")


def test_lu_bundle_is_readable(mp_file):
    assert set(decode_hex_gz_bundle(mp_file("emmet/r2scan_relax_Lu.json.gz"))) >= {"vasprun.xml", "INCAR"}


def test_unreadable_state_is_a_clear_error(recorded, tmp_path):
    (tmp_path / "state.json").write_text('{"done": [')
    with pytest.raises(ValueError, match="state.json: unreadable ingestion state"):
        MPIngest(tmp_path, _client(recorded))


def test_ingested_r2scan_entries_reproduce_mps_hull(clean_run, mp_file):
    """End to end: the R2SCAN entries stored by the ingestion rebuild MP's R2SCAN hull of Li-Ni-O exactly
    (stable set = the 13 entries MP reported with energy_above_hull == 0, shared eah0 archive)."""
    import tarfile

    from pymatgen.analysis.phase_diagram import PhaseDiagram

    from pipeline.entries import row_to_entry

    rows = read_outputs(clean_run[0])["entries"].to_pylist()
    lini_o = {"Li", "Ni", "O"}
    entries = [
        row_to_entry(r)
        for r in rows
        if r["thermo_type"] == "R2SCAN" and set(r["chemsys"].split("-")) <= lini_o
    ]
    assert len(entries) == 51
    stable = {e.entry_id for e in PhaseDiagram(entries).stable_entries}
    with tarfile.open(mp_file("mp-res_Li-Ni-O/Li-Ni-O_eah0.res.tar")) as tar:
        expected = {Path(m.name).stem for m in tar.getmembers() if m.name.endswith("-R2SCAN.res")}
    assert len(expected) == 13 and stable == expected
