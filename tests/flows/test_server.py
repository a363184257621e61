"""A real `prefect server` on 127.0.0.1 (own PREFECT_HOME): `prefect deploy --all` of prefect.yaml, the
scheduler creates the scheduled runs, the trigger becomes an automation, and the demo deployment runs through a
process worker. Every step is bounded by a timeout and the server and worker are always stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT

PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, api: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(key, None)
    env.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
    })
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _get(api: str, path: str) -> object:
    with urllib.request.urlopen(f"{api}{path}", timeout=10) as r:
        return json.loads(r.read())


def _post(api: str, path: str, body: dict) -> object:
    req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "prefect-home"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=_env(home, api), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait("the server's health check", lambda: _get(api, "/health") is True, 180, proc, log)
        yield api, home, log
    finally:
        _stop(proc)


def _cli(args: list[str], env: dict[str, str], timeout: float = 240) -> str:
    out = subprocess.run([*PREFECT, *args], check=False, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def test_server_schedules_triggers_and_runs_demo_through_a_worker(server, tmp_path):
    api, home, log = server
    env = _env(home, api, MFHULL_REPO=str(PROJECT_ROOT))
    for pool in ("cpu", "gpu"):
        _cli(["work-pool", "create", pool, "--type", "process"], env)
    _cli(["--no-prompt", "deploy", "--all"], env)

    deployments = {d["name"]: d for d in _post(api, "/deployments/filter", {})}
    assert {"ingest-mp-weekly", "screen-after-ingest", "train-gpu", "demo"} <= set(deployments)
    weekly = deployments["ingest-mp-weekly"]["id"]

    def scheduled():
        runs = _post(api, "/flow_runs/filter", {"deployments": {"id": {"any_": [weekly]}},
                                                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
        return runs if len(runs) >= 3 else None

    runs = _wait("the scheduler to create the weekly runs", scheduled, 120, log=log)
    starts = sorted(r["next_scheduled_start_time"] for r in runs)
    assert all(s[11:16] == "02:00" for s in starts)  # cron "0 2 * * 1" (UTC)

    automations = _post(api, "/automations/filter", {})
    assert any("screen-after-ingest" in a["name"] for a in automations), [a["name"] for a in automations]

    out = tmp_path / "demo-out"
    run = _post(api, f"/deployments/{deployments['demo']['id']}/create_flow_run",
                {"parameters": {"out_dir": str(out), "epochs": 1}})
    wlog = tmp_path / "worker.log"
    with wlog.open("w") as fh:
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", "cpu", "--limit", "1"], env=env,
                                  cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def finished():
            state = _get(api, f"/flow_runs/{run['id']}")["state"]
            return state if state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

        state = _wait("the demo run on the process worker", finished, 400, worker, wlog)
    finally:
        _stop(worker)
    assert state["type"] == "COMPLETED", wlog.read_text()[-4000:]
    assert (out / "demo_summary.json").exists()


def test_worker_without_mfhull_repo_fails_in_one_line(monkeypatch):
    from flows.steps import WorkerConfigError, enter_repo

    monkeypatch.delenv("MFHULL_REPO", raising=False)
    with pytest.raises(WorkerConfigError, match="MFHULL_REPO is not set on this worker"):
        enter_repo("")
    with pytest.raises(WorkerConfigError, match="not an mfhull checkout"):
        enter_repo("/")
    cwd = os.getcwd()
    try:
        assert enter_repo(str(PROJECT_ROOT))["directory"] == str(PROJECT_ROOT.resolve())
    finally:
        os.chdir(cwd)
