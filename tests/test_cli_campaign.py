"""`mfhull --version`, `mfhull campaign --help`, and the campaign command's one-line errors (no flow is run)."""

from __future__ import annotations

from pipeline import __version__
from pipeline.cli import build_parser, main


def test_version(capsys):
    assert main(["--version"]) == 0  # main() returns exit codes, it never raises SystemExit
    assert capsys.readouterr().out.strip() == f"mfhull {__version__}"


def test_campaign_help_documents_every_option():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    campaign = sub.choices["campaign"]
    undocumented = [a.dest for a in campaign._actions if a.dest != "help" and not a.help]
    assert not undocumented
    assert "--substitute" in campaign.format_help() and "eV/A" in campaign.format_help()


def test_campaign_without_candidates_is_a_one_line_error(capsys):
    assert main(["campaign", "--chemsys", "Li-Ni-O"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mfhull campaign: error: give --candidates FILE/DIR... or --substitute (prototype substitution)"


def test_campaign_bad_thermo_type_pair(capsys):
    assert main(["campaign", "--chemsys", "Li-Ni-O", "--substitute", "--thermo-type", "R2SCAN"]) == 2
    assert "expected FIDELITY=THERMO_TYPE" in capsys.readouterr().err


def test_train_deployment_is_used_when_a_server_is_configured(monkeypatch, tmp_path):
    import prefect.deployments

    from flows import campaign

    calls = []

    class Done:
        state = type("S", (), {"is_completed": lambda self: True, "name": "Completed"})()

    def fake_run_deployment(name, parameters, timeout):
        calls.append((name, parameters))
        return Done()

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    best = campaign._train_checkpoint("data/mp/frames", str(tmp_path), "train/train-gpu", 7)
    assert best == str(tmp_path / "best.pt")
    assert calls == [("train/train-gpu", {"frames_dir": "data/mp/frames", "out_dir": str(tmp_path), "epochs": 7})]
