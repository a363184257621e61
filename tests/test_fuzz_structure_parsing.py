"""Hypothesis fuzz of structure parsing (issue 9): mutated CIF / POSCAR / extxyz files never raise out of the
candidate reader or the extxyz importer, and every file ends up as rows or rejects (nothing lost)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymatgen.core import Lattice, Structure

from pipeline.hull.candidates import read_candidate_files
from pipeline.sources.files.extxyz import import_extxyz

_B2 = Structure(Lattice.cubic(3.2), ["Li", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])
SEEDS = {
    ".cif": _B2.to(fmt="cif"),
    ".vasp": _B2.to(fmt="poscar"),
    ".xyz": ("2\nLattice=\"3.2 0 0 0 3.2 0 0 0 3.2\" Properties=species:S:1:pos:R:3 energy=-1.0 pbc=\"T T T\"\n"
             "Li 0 0 0\nAl 1.6 1.6 1.6\n") * 2,
}


@st.composite
def mutated(draw) -> tuple[str, str]:
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    text = SEEDS[suffix]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "insert", "delete", "replace"]))
        junk = draw(st.text(alphabet=st.sampled_from(list("0123456789.-e+ \nxLiAlFe_#'\"")), max_size=12))
        if op == "cut":
            text = text[:i]
        elif op == "insert":
            text = text[:i] + junk + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + len(junk):]
        else:
            text = text[:i] + junk + text[i + len(junk):]
    return suffix, text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_candidate_reader_never_raises_and_loses_nothing(sample):
    suffix, text = sample
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_text(text)
        result = read_candidate_files([path])
        assert result.n_ok + result.n_rejected >= 1
        for rej in result.rejects:
            assert rej["record_id"].startswith(str(path)) and rej["error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_candidate_reader_survives_random_bytes(data):
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for suffix in (".cif", ".xyz", ".vasp", ".json"):
            path = Path(tmp) / f"bytes{suffix}"
            path.write_bytes(data)
            result = read_candidate_files([path])
            assert result.n_ok + result.n_rejected >= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated().filter(lambda s: s[0] == ".xyz"))
def test_extxyz_importer_never_raises(sample):
    _, text = sample
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fuzz.xyz"
        path.write_text(text)
        result = import_extxyz(path, fidelity="f")
        assert all(r["frame_id"] for r in result.rows)
        assert result.n_ok + result.n_rejected >= (1 if text.strip() else 0)
