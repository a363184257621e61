"""Thread settings that degrade under load (defect 12): affinity CPUs, load, small models, the override."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.threads import available_cpus, choose_threads, set_env_defaults


def test_small_models_use_one_thread():
    assert choose_threads(6_000, cpus=8, busy=0.0, env={}) == 1


def test_large_models_use_the_free_cpus():
    assert choose_threads(10**6, cpus=8, busy=0.0, env={}) == 8
    assert choose_threads(10**6, cpus=8, busy=5.0, env={}) == 4  # 4 CPUs busy elsewhere (+ this process)
    assert choose_threads(10**6, cpus=2, busy=7.0, env={}) == 1  # overloaded: never below one
    assert 1 <= choose_threads(None, env={}) <= available_cpus()


def test_override_wins_and_bad_values_are_named():
    assert choose_threads(6_000, cpus=2, busy=9.0, env={"MFHULL_THREADS": "3"}) == 3
    assert choose_threads(10**6, cpus=2, busy=0.0, env={"MFHULL_THREADS": "auto"}) == 2
    with pytest.raises(ValueError, match="MFHULL_THREADS='0'"):
        choose_threads(env={"MFHULL_THREADS": "0"})


def test_env_defaults_are_passive_and_respect_the_user():
    env: dict[str, str] = {"MFHULL_THREADS": "2"}
    set_env_defaults(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == "2"
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    set_env_defaults(mine)
    assert mine["OMP_WAIT_POLICY"] == "ACTIVE"


def test_cli_names_a_bad_override(monkeypatch, capsys):
    monkeypatch.setenv("MFHULL_THREADS", "many")
    assert main(["hull", "--help"]) == 2
    assert "MFHULL_THREADS='many'" in capsys.readouterr().err
