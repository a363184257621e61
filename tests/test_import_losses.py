"""`mfhull import` loses nothing (defect 5): every file and record ends up stored or in rejects, with a summary;
concurrent writers store nothing twice (defect 8); a killed writer's .tmp files are cleaned (defect 10)."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from pipeline.io import ParquetDataset, read_table
from pipeline.schema import KEYS, REJECTS_SCHEMA
from pipeline.sources.files import import_paths, import_to_dataset, reject_reason

RES = """TITL mp-1-R2SCAN 0.0 10.0 -5.0 0 0 1 (P1) n - 1
REM Energy (Uncorrected) = -5.0 eV
REM run_type = R2SCAN
REM material_id = mp-1
CELL 1.0 3.0 3.0 3.0 90 90 90
LATT -1
SFAC Li
Li 1 0.0 0.0 0.0 1.0 0.0
END
"""


def _frame(i: int, energy: float = -1.0) -> Atoms:
    atoms = Atoms("Li2", positions=[[0, 0, 0], [1.5, 1.5, 1.5]], cell=np.eye(3) * 3.0 + 0.01 * i, pbc=True)
    atoms.info["frame_id"] = f"f{i}"
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((2, 3)))
    return atoms


def _tree(root):
    """A folder with every trap of defect 5: subfolder, dotfile, mixed .res, non-UTF-8 .res, empty file,
    same base name twice, a duplicate frame_id with different content."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write(root / "a" / "x.xyz", [_frame(0), _frame(1)], format="extxyz")
    write(root / "b" / "x.xyz", [_frame(1, energy=-2.0)], format="extxyz")  # f1 again, other energy
    (root / "b" / "junk.xyz").write_text("2\nbroken\n")
    (root / "ok.res").write_text(RES)
    (root / "latin1.res").write_bytes("TITL caf\xe9\n".encode("latin-1"))
    (root / "empty.json").write_text("")
    (root / ".hidden.xyz").write_text((root / "a" / "x.xyz").read_text().replace("f0", "h0").replace("f1", "h1"))
    return root


def test_every_file_and_record_is_stored_or_rejected(tmp_path):
    src = _tree(tmp_path / "src")
    out = tmp_path / "out"
    per_path, summary = import_paths([src], out, fidelity="pbe", limit=10)
    counts = per_path[0]
    assert counts["files"] == 7
    frames = read_table(out / "frames")
    entries = read_table(out / "entries")
    rejects = read_table(out / "rejects", REJECTS_SCHEMA).to_pylist()
    ids = {r["record_id"] for r in rejects}
    assert set(frames.column("frame_id").to_pylist()) == {"f0", "f1", "h0", "h1"}
    assert entries.num_rows == 1  # ok.res, imported although --fidelity and --limit were given
    assert any("latin1.res" in i for i in ids) and any("empty.json" in i for i in ids)
    assert any(i.startswith(str(src / "b" / "junk.xyz")) for i in ids)
    assert any("duplicate key f1 with different content" in r["error"] for r in rejects)
    # 6 records read: 4 frames + 1 entry stored, the conflicting f1 rejected; nothing silent
    assert counts["frames_read"] + counts["entries_read"] == 6
    assert counts["frames_written"] + counts["entries_written"] + counts["conflicts"] + counts["already_stored"] == 6
    assert "7 files" in summary and "rejected" in summary and "empty file" in summary
    assert counts["options_ignored"] == ["fidelity"]  # .res files carry their own fidelity: said, not a TypeError
    again = import_to_dataset(src, out, fidelity="pbe")  # a re-run stores nothing new and loses nothing
    assert again["frames_written"] == again["entries_written"] == 0 and again["already_stored"] == 5


def test_reject_reasons_are_words():
    assert reject_reason("RecordError: unreadable extxyz file: boom") == "unreadable extxyz file"
    assert reject_reason("RecordError: empty file") == "empty file"


def _append_many(path: str, start: int) -> None:
    ds = ParquetDataset(path, REJECTS_SCHEMA, KEYS["rejects"])
    for i in range(start, start + 20):
        ds.append(pa.Table.from_pylist([{"record_id": f"r{i % 25}", "source": "s", "error": "e"}],
                                       schema=REJECTS_SCHEMA))


def test_concurrent_writers_store_every_row_once(tmp_path):
    path = str(tmp_path / "ds")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, s)) for s in (0, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    import pyarrow.parquet as pq

    raw = pa.concat_tables(pq.read_table(p) for p in ParquetDataset(path, REJECTS_SCHEMA).parts())
    assert sorted(raw.column("record_id").to_pylist()) == sorted(f"r{i}" for i in range(25))  # no row twice


def test_a_killed_writers_tmp_file_is_removed_by_the_next_writer(tmp_path):
    ds = ParquetDataset(tmp_path / "ds", REJECTS_SCHEMA, KEYS["rejects"])
    (tmp_path / "ds").mkdir()
    stale = tmp_path / "ds" / ".part-00000-dead.parquet.abc.tmp"
    stale.write_bytes(b"half a part")
    os.utime(stale, (0, 0))
    ds.append(pa.Table.from_pylist([{"record_id": "r", "source": "s", "error": "e"}], schema=REJECTS_SCHEMA))
    assert not stale.exists() and ds.read().num_rows == 1


def test_the_cli_removes_old_tmp_leftovers_in_its_output_folder(tmp_path):
    from pipeline.cli import main

    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    old, fresh = out / ".report.parquet.x1.tmp", out / "sub" / ".best.pt.x2.tmp"
    live = out / ".live.parquet.x3.tmp"
    for p in (old, fresh, live):
        p.write_bytes(b"partial")
    os.utime(old, (0, 0))
    os.utime(fresh, (0, 0))
    (tmp_path / "notes.txt").write_text("x")
    assert main(["import", str(tmp_path / "notes.txt"), "--out", str(out)]) == 0
    assert not old.exists() and not fresh.exists() and live.exists()  # a recent one may be another live writer
