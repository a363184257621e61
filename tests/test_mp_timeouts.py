"""Every Materials Project call is bounded (defect 4): a call that never returns times out, is retried, and the
unit ends in ``failed``; when every unit fails the CLI exits non-zero with one line."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.sources.mp import ingest_mp
from pipeline.sources.mp.mp_client import MPResterClient, MPUnreachable, RetryPolicy, call_with_deadline


class NeverAnswers:
    """A client whose every call blocks (like mp-api against a server that accepts and never replies)."""

    secrets = ()

    def __init__(self):
        self.release = threading.Event()

    def thermo_entries(self, chemsys, thermo_type):
        self.release.wait(600)
        return []

    def material_calc_types(self, material_ids):
        self.release.wait(600)
        return {}

    def trajectory(self, task_id):
        self.release.wait(600)
        return {}


def test_deadline_returns_values_and_errors_and_times_out():
    assert call_with_deadline(lambda: 3, 1.0, "x") == 3
    with pytest.raises(KeyError):
        call_with_deadline(lambda: {}["k"], 1.0, "x")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out after 0.2 s"):
        call_with_deadline(lambda: time.sleep(30), 0.2, "slow call")
    assert time.monotonic() - start < 5


def test_a_silent_server_fails_every_unit_within_the_bound(tmp_path):
    client = NeverAnswers()
    start = time.monotonic()
    report = ingest_mp(["Li-O"], tmp_path, client=client,
                       retry=RetryPolicy(max_attempts=2, base_delay=0.0, timeout=0.2, sleep=lambda s: None))
    client.release.set()
    assert time.monotonic() - start < 30
    assert report.units_done == 0 and report.failed
    assert all("timed out after 0.2 s" in why for why in report.failed.values())


def test_an_unreachable_endpoint_is_one_clear_error():
    def factory(**kwargs):
        time.sleep(30)

    with pytest.raises(MPUnreachable, match="cannot reach the Materials Project"):
        MPResterClient.from_key("k" * 32, rester_factory=factory, timeout=0.2)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        RetryPolicy(timeout=0)


def test_cli_exits_non_zero_with_one_line_when_every_unit_fails(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.sources import mp

    client = NeverAnswers()
    monkeypatch.setenv("MP_API_KEY", "k" * 32)
    monkeypatch.setattr(mp.MPResterClient, "from_key", classmethod(lambda cls, key, timeout=None: client))
    monkeypatch.setattr(mp, "RetryPolicy", lambda timeout=None: RetryPolicy(max_attempts=1, timeout=timeout))
    assert main(["ingest-mp", "Li-O", "--out", str(tmp_path), "--timeout", "0.2"]) == 1
    client.release.set()
    err = capsys.readouterr().err
    assert "all 3 units failed" in err and "timed out after 0.2 s" in err and "Traceback" not in err
