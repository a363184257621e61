"""The console script: sub-commands call the library and report clear errors."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.io import read_table


def test_import_then_hull(mp_file, tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["import", str(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar")), "--out", str(out)]) == 0
    counts = json.loads(capsys.readouterr().out)[0]
    assert counts["entries_written"] == 287 and counts["rejects_read"] == 0
    assert main(["import", str(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar")), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["entries_written"] == 0  # re-run: nothing new
    hull_file = tmp_path / "hull.parquet"
    assert main(["hull", "--entries", str(out / "entries"), "--thermo-type", "R2SCAN", "--chemsys", "Li-Ni-O",
                 "--out", str(hull_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["stable"]) == 13  # MP's R2SCAN eah0 set of Li-Ni-O
    table = pq.read_table(hull_file)
    assert table.num_rows == 51 and sum(table["is_stable"].to_pylist()) == 13
    assert read_table(out / "entries").num_rows == 287


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a structure file")
    assert main(["import", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o")]) == 0
    counts = json.loads(capsys.readouterr().out)[0]
    assert counts["rejects_written"] == 1  # kept with its error, not lost
    assert read_table(tmp_path / "o" / "rejects").to_pylist()[0]["record_id"] == str(tmp_path / "notes.txt")
    code = main(["hull", "--entries", str(tmp_path / "missing"), "--thermo-type", "R2SCAN", "--out",
                 str(tmp_path / "h.parquet")])
    assert code == 2 and "error" in capsys.readouterr().err


def test_ingest_mp_without_key_says_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MP_API_KEY", raising=False)
    assert main(["ingest-mp", "Li-O", "--out", str(tmp_path)]) == 2
    assert "MP_API_KEY" in capsys.readouterr().err


def test_import_sevenn_gives_a_pretrained_checkpoint(tmp_path, capsys):
    pytest.importorskip("sevenn")
    from pipeline.model import load_checkpoint

    assert main(["import-sevenn", "--out", str(tmp_path / "mf0.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["fidelities"] == ["r2scan", "pbe"]
    assert load_checkpoint(tmp_path / "mf0.pt").fidelities == ("r2scan", "pbe")
