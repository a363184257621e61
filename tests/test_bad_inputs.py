"""Table-driven bad-input suite through the CLI entry point (issue 9's done-when): every case must end with exit
code 0/1 and rows for each input, or exit 2 and ONE clear line on stderr naming the problem; never a traceback,
never a hang (ingest-mp runs against a local server on 127.0.0.1 that never answers).

Figures (counted by the parametrisation below): see ``CASES``; each case asserts no traceback and, for import,
that every input file is counted (rows lost = 0)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from pymatgen.core import Lattice, Structure
from pymatgen.core.entries import ComputedStructureEntry

from pipeline.cli import main
from pipeline.entries import entries_table, entry_to_row
from pipeline.io import read_table
from pipeline.model import MFPotential, fit_element_references, preset, save_checkpoint

torch.set_num_threads(1)

B2 = Structure(Lattice.cubic(3.2), ["Li", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _frame(i: int, energy: float = -1.0) -> Atoms:
    atoms = Atoms("LiAl", positions=[[0, 0, 0], [1.6, 1.6, 1.6]], cell=np.eye(3) * (3.2 + 0.01 * i), pbc=True)
    atoms.info["frame_id"] = f"f{i}"
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((2, 3)))
    return atoms


class _Payload:
    """Unpickling it would create a file: the attack of a crafted .pth."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Valid inputs (references, checkpoint, frames, candidates) and broken ones, made once."""
    d = tmp_path_factory.mktemp("bad_inputs")
    li = Structure(Lattice.cubic(3.44), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    al = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.04), ["Al"], [[0, 0, 0]])
    refs = [ComputedStructureEntry(li, -3.8, entry_id="Li"), ComputedStructureEntry(al, -14.8, entry_id="Al")]
    pq.write_table(entries_table(entry_to_row(e, source="t", thermo_type="raw", fidelity="f") for e in refs),
                   d / "refs.parquet")
    model = MFPotential(preset("small", elements=("Li", "Al"), fidelities=("f",)),
                        fit_element_references([[3], [13]], [-1.9, -3.7], ["f", "f"]))
    save_checkpoint(model, d / "model.pt")
    (d / "truncated.pt").write_bytes((d / "model.pt").read_bytes()[:500])
    (d / "text.pt").write_text("not a checkpoint")
    torch.save({"w": torch.zeros(1)}, d / "foreign.pt")
    torch.save({"config": {}, "model_state_dict": {}, "x": _Payload(d / "pwned")}, d / "evil.pth")
    pq.write_table(pa.table({"x": [1, 2]}), d / "wrong.parquet")
    (d / "notparquet.parquet").write_text("hello")
    (d / "a_file").write_text("I am a file")
    write(d / "frames.xyz", [_frame(i) for i in range(4)], format="extxyz")
    assert main(["import", str(d / "frames.xyz"), "--out", str(d / "data"), "--fidelity", "f"]) == 0
    B2.to(filename=str(d / "good.cif"))
    Structure(Lattice.cubic(2.9), ["Li", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(d / "iron.cif"))
    Structure(Lattice.cubic(2.9), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(d / "fe.cif"))
    Structure(Lattice.cubic(1.2), ["Li", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(d / "squeezed.vasp"),
                                                                               fmt="poscar")
    text = (d / "frames.xyz").read_text().splitlines(keepends=True)
    (d / "cands.xyz").write_text("".join(text[:4] + text[8:10] + text[:4]).replace("f0", "c0", 1))
    (d / "two.cif").write_text((d / "good.cif").read_text() + "\ndata_broken\n_cell_length_a 3\n")
    return d


def _hanging_server() -> tuple[int, list[socket.socket]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            held.append(conn)  # never answered

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1], held


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# (id, argv builder(world, tmp) -> list[str], expected exit code, text the error/summary must contain)
Case = tuple[str, Callable[[Path, Path], list[str]], int, str]


def _imp(*names: str, extra: tuple[str, ...] = ()) -> Callable[[Path, Path], list[str]]:
    return lambda w, t: ["import", *[str(t / n) for n in names], "--out", str(t / "out"), *extra]


def _screen(**over: str) -> Callable[[Path, Path], list[str]]:
    def build(w: Path, t: Path) -> list[str]:
        args = {"--candidates": str(w / "good.cif"), "--references": str(w / "refs.parquet"),
                "--checkpoint": str(w / "model.pt"), "--thermo-type": "raw", "--fidelity": "f",
                "--out": str(t / "report"), "--steps": "1"}
        args.update({k: v.format(w=w, t=t) for k, v in over.items()})
        return ["screen", *[x for k, v in args.items() for x in ([k, *v.split(" ")] if v else [])]]
    return build


def _train(**over: str) -> Callable[[Path, Path], list[str]]:
    def build(w: Path, t: Path) -> list[str]:
        args = {"--frames": str(w / "data" / "frames"), "--out": str(t / "run"), "--epochs": "1"}
        args.update({k: v.format(w=w, t=t) for k, v in over.items()})
        return ["train", *[x for k, v in args.items() for x in (k, v)]]
    return build


def _ingest(*extra: str) -> Callable[[Path, Path], list[str]]:
    return lambda w, t: ["ingest-mp", "Li-O", "--out", str(t / "mp"), "--timeout", "1", *extra]


CASES: list[Case] = [
    # import: every file ends up stored or as a reject (exit 0), bad options are one line (exit 2)
    ("import-text-file", _imp("notes.txt"), 0, "rejected"),
    ("import-empty-xyz", _imp("empty.xyz"), 0, "empty file"),
    ("import-truncated-frame", _imp("trunc.xyz", extra=("--fidelity", "f")), 0, "1 rejected (frame announces"),
    ("import-non-utf8-res", _imp("latin1.res"), 0, "not UTF-8"),
    ("import-binary-json", _imp("garbage.json"), 0, "rejected"),
    ("import-json-of-ints", _imp("ints.json"), 0, "rejected"),
    ("import-corrupt-gzip", _imp("bad.json.gz"), 0, "rejected"),
    ("import-folder-subdirs-dotfiles", _imp("tree"), 0, "4 files"),
    ("import-same-basename-twice", _imp("tree/a/x.xyz", "tree/b/x.xyz"), 0, "stored"),
    ("import-duplicate-id-other-content", _imp("dup1.xyz", "dup2.xyz", extra=("--fidelity", "f")), 0,
     "duplicate key"),
    ("import-res-with-fidelity-and-limit", _imp("ok.res", extra=("--fidelity", "pbe", "--limit", "1")), 0,
     "options ignored"),
    ("import-limit-zero", _imp("notes.txt", extra=("--limit", "0")), 2, "--limit"),
    ("import-limit-negative", _imp("notes.txt", extra=("--limit", "-1")), 2, "--limit"),
    ("import-limit-not-int", _imp("notes.txt", extra=("--limit", "ten")), 2, "not an integer"),
    ("import-missing-path", _imp("nope.xyz"), 2, "no such file"),
    ("import-out-is-a-file", lambda w, t: ["import", str(t / "notes.txt"), "--out", str(w / "a_file")], 2,
     "is a file"),
    ("import-out-under-a-file", lambda w, t: ["import", str(t / "notes.txt"), "--out", str(w / "a_file" / "x")],
     2, "is a file"),
    ("import-unknown-kind", _imp("notes.txt", extra=("--kind", "poscar")), 2, "--kind"),
    # screen
    ("screen-steps-negative", _screen(**{"--steps": "-5"}), 2, "--steps"),
    ("screen-steps-not-int", _screen(**{"--steps": "many"}), 2, "--steps"),
    ("screen-fmax-nan", _screen(**{"--fmax": "nan"}), 2, "finite"),
    ("screen-fmax-zero", _screen(**{"--fmax": "0"}), 2, "--fmax"),
    ("screen-fmax-negative", _screen(**{"--fmax": "-0.1"}), 2, "--fmax"),
    ("screen-fmax-inf", _screen(**{"--fmax": "inf"}), 2, "finite"),
    ("screen-checkpoint-missing", _screen(**{"--checkpoint": "{w}/none.pt"}), 2, "no such file"),
    ("screen-checkpoint-truncated", _screen(**{"--checkpoint": "{w}/truncated.pt"}), 2, "truncated.pt: not a"),
    ("screen-checkpoint-text", _screen(**{"--checkpoint": "{w}/text.pt"}), 2, "text.pt: not a"),
    ("screen-checkpoint-foreign-dict", _screen(**{"--checkpoint": "{w}/foreign.pt"}), 2, "foreign.pt"),
    ("screen-checkpoint-folder", _screen(**{"--checkpoint": "{w}"}), 2, "is a folder"),
    ("screen-references-wrong-schema", _screen(**{"--references": "{w}/wrong.parquet"}), 2, "missing columns"),
    ("screen-references-not-parquet", _screen(**{"--references": "{w}/notparquet.parquet"}), 2,
     "notparquet.parquet: not a readable Parquet"),
    ("screen-references-missing", _screen(**{"--references": "{w}/none.parquet"}), 2, "no such file"),
    ("screen-truth-wrong-schema", _screen(**{"--truth": "{w}/wrong.parquet"}), 2, "--truth"),
    ("screen-out-is-a-file", _screen(**{"--out": "{w}/a_file"}), 2, "is a file"),
    ("screen-bad-device", _screen(**{"--device": "gpu0"}), 2, "not a device"),
    ("screen-unknown-thermo-type", _screen(**{"--thermo-type": "PBE_SOL"}), 2, "thermo type"),
    ("screen-only-foreign-elements", _screen(**{"--candidates": "{w}/fe.cif"}), 1, "Fe"),
    ("screen-mixed-bad-candidates", _screen(**{"--candidates": "{w}/good.cif {w}/iron.cif {w}/squeezed.vasp "
                                                                "{w}/cands.xyz {w}/two.cif {t}/notes.txt"}), 0,
     "failed or suspect"),
    # train
    ("train-epochs-zero", _train(**{"--epochs": "0"}), 2, "--epochs"),
    ("train-epochs-negative", _train(**{"--epochs": "-3"}), 2, "--epochs"),
    ("train-batch-size-zero", _train(**{"--batch-size": "0"}), 2, "--batch-size"),
    ("train-lr-nan", _train(**{"--lr": "nan"}), 2, "finite"),
    ("train-lr-negative", _train(**{"--lr": "-1e-3"}), 2, "--lr"),
    ("train-val-fraction-above-one", _train(**{"--val-fraction": "1.5"}), 2, "--val-fraction"),
    ("train-seed-negative", _train(**{"--seed": "-1"}), 2, "--seed"),
    ("train-frames-wrong-schema", _train(**{"--frames": "{w}/wrong.parquet"}), 2, "missing columns"),
    ("train-frames-missing", _train(**{"--frames": "{w}/none"}), 2, "no such file"),
    ("train-out-is-a-file", _train(**{"--out": "{w}/a_file"}), 2, "is a file"),
    ("train-bad-labels", _train(**{"--labels": "pbe"}), 2, "--labels"),
    ("train-unknown-preset", _train(**{"--preset": "huge"}), 2, "huge"),
    ("train-bad-device", _train(**{"--device": "tpu"}), 2, "not a device"),
    # ingest-mp, against 127.0.0.1 only
    ("ingest-server-never-answers", _ingest(), 2, "timed out after 1 s"),
    ("ingest-connection-refused", _ingest(), 2, "cannot reach the Materials Project"),
    ("ingest-timeout-zero", lambda w, t: ["ingest-mp", "Li-O", "--out", str(t), "--timeout", "0"], 2, "--timeout"),
    ("ingest-timeout-nan", lambda w, t: ["ingest-mp", "Li-O", "--out", str(t), "--timeout", "nan"], 2, "finite"),
    ("ingest-no-key", _ingest(), 2, "MP_API_KEY"),
    ("ingest-out-is-a-file", lambda w, t: ["ingest-mp", "Li-O", "--out", str(w / "a_file")], 2, "is a file"),
    # import-sevenn: untrusted files never run code
    ("sevenn-crafted-payload", lambda w, t: ["import-sevenn", "--checkpoint", str(w / "evil.pth"), "--out",
                                              str(t / "m.pt")], 2, "refused"),
    ("sevenn-text-file", lambda w, t: ["import-sevenn", "--checkpoint", str(w / "text.pt"), "--out",
                                        str(t / "m.pt")], 2, "not a readable torch checkpoint"),
    ("sevenn-unknown-name", lambda w, t: ["import-sevenn", "--checkpoint", "7net-9", "--out", str(t / "m.pt")], 2,
     "no such file"),
    ("hull-out-is-a-folder", lambda w, t: ["hull", "--entries", str(w / "refs.parquet"), "--thermo-type", "raw",
                                            "--out", str(t)], 2, "is a folder"),
]


def _inputs(w: Path, t: Path) -> None:
    """The per-case input files (cheap to write)."""
    (t / "notes.txt").write_text("not a structure file")
    (t / "empty.xyz").write_text("")
    text = (w / "frames.xyz").read_text().splitlines(keepends=True)
    (t / "trunc.xyz").write_text("".join(text[:4] + text[4:7] + text[8:12]))  # 2nd frame cut short
    (t / "latin1.res").write_bytes("TITL caf\xe9\n".encode("latin-1"))
    (t / "garbage.json").write_bytes(bytes(range(256)))
    (t / "ints.json").write_text("[1, 2, 3]")
    (t / "bad.json.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    for sub in ("tree/a", "tree/b"):
        (t / sub).mkdir(parents=True)
    write(t / "tree" / "a" / "x.xyz", [_frame(0)], format="extxyz")
    (t / "tree" / "b" / "x.xyz").write_text("1\nbad\n")
    (t / "tree" / ".hidden").write_text("dot")
    (t / "tree" / "b" / "notes.md").write_text("# notes")
    write(t / "dup1.xyz", [_frame(7)], format="extxyz")
    write(t / "dup2.xyz", [_frame(7, energy=-5.0)], format="extxyz")
    (t / "ok.res").write_text(
        "TITL x\nREM Energy (Uncorrected) = -5.0 eV\nREM run_type = R2SCAN\nREM material_id = mp-1\n"
        "CELL 1.0 3.0 3.0 3.0 90 90 90\nLATT -1\nSFAC Li\nLi 1 0.0 0.0 0.0 1.0 0.0\nEND\n")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    name, build, expected, text = case
    _inputs(world, tmp_path)
    monkeypatch.setenv("MP_API_KEY", "a" * 32)
    if name == "ingest-no-key":
        monkeypatch.delenv("MP_API_KEY")
    if name == "ingest-server-never-answers":
        port, _held = _hanging_server()
        monkeypatch.setenv("MP_API_ENDPOINT", f"http://127.0.0.1:{port}/")
    elif name.startswith("ingest"):
        monkeypatch.setenv("MP_API_ENDPOINT", f"http://127.0.0.1:{_closed_port()}/")
    if name.startswith("ingest"):
        pytest.importorskip("mp_api.client")  # imported before the clock starts: only the call is bounded here
        pytest.importorskip("pipeline.sources.mp")
    start = time.monotonic()
    code = main(build(world, tmp_path))
    took = time.monotonic() - start
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, err
    assert code == expected, (code, err[-2000:])
    assert text in err, err[-2000:]
    assert not (world / "pwned").exists()  # no payload ever ran
    if expected == 2:  # a clear error: exactly one line, naming the problem
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and " error: " in lines[0], err
    if name.startswith("ingest"):
        assert took < 120, f"{name} took {took:.0f} s"  # bounded (1 s limit; slack for lazy imports on a busy CI)
    if name.startswith("import") and expected == 0:  # rows lost = 0: every file is counted, stored or rejected
        args = build(world, tmp_path)
        paths = [Path(a) for a in args[1:args.index("--out")]]
        files = [q for p in paths for q in (sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p])]
        assert f"{len(files)} files" in err
        out_dir = tmp_path / "out"
        rejected = {r["record_id"] for r in read_table(out_dir / "rejects").to_pylist()} \
            if (out_dir / "rejects").exists() else set()
        with_reject = [f for f in files if any(r == str(f) or r.startswith(f"{f}:") for r in rejected)]
        rows = sum(read_table(out_dir / d).num_rows for d in ("frames", "entries") if (out_dir / d).exists())
        assert rows >= len(files) - len(with_reject), (files, rejected)  # each other file stored something
