"""Bad candidates become report rows with a reason (defects 2, 3, 6): foreign elements, overlapping atoms, far-away
coordinates; the others carry on; suspect rows stay out of the metrics."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.core.entries import ComputedStructureEntry

from pipeline.entries import entries_table, entry_to_row
from pipeline.hull.candidates import candidate_row, candidates_table
from pipeline.model import MFPotential, fit_element_references, preset, save_checkpoint
from pipeline.relax import sanity
from pipeline.relax.relaxer import RelaxSettings
from pipeline.screening import failure_table, screen

torch.set_num_threads(1)


def _b2(a: float) -> Structure:
    return Structure(Lattice.cubic(a), ["Li", "Al"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("li_al")
    li = Structure(Lattice.cubic(3.44), ["Li", "Li"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    al = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.04), ["Al"], [[0, 0, 0]])
    refs = [ComputedStructureEntry(li, -1.9 * 2, entry_id="Li"), ComputedStructureEntry(al, -3.7 * 4, entry_id="Al")]
    references = entries_table(entry_to_row(e, source="t", thermo_type="raw", fidelity="f") for e in refs)
    model = MFPotential(preset("small", elements=("Li", "Al"), fidelities=("f",)),
                        fit_element_references([[3], [13]], [-1.9, -3.7], ["f", "f"]))
    return references, save_checkpoint(model, tmp / "m.pt")


def test_bad_candidates_are_rows_with_reasons_and_the_good_one_is_relaxed(world, tmp_path):
    references, ckpt = world
    far = _b2(3.2)
    far.replace(1, "Al", coords=[1e12, 0.5, 0.5], coords_are_cartesian=False)
    fe = Structure(Lattice.cubic(2.9), ["Li", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    rows = [candidate_row("good", _b2(3.2), source="file", origin="good.cif"),
            candidate_row("squeezed", _b2(1.2), source="file", origin="squeezed.cif"),
            candidate_row("far", far, source="file", origin="far.cif"),
            candidate_row("iron", fe, source="file", origin="cands/iron.cif")]
    files = screen(candidates_table(rows), references, checkpoint=ckpt, thermo_type="raw", fidelity="f",
                   out_dir=tmp_path, relax=RelaxSettings(steps=3))
    by_id = {r["candidate_id"]: r for r in pq.read_table(files["report"]).to_pylist()}
    assert set(by_id) == {"good", "squeezed", "far", "iron"}  # no row lost
    assert "cands/iron.cif" in by_id["iron"]["error"] and "Fe" in by_id["iron"]["error"]
    assert "covalent radii" in by_id["squeezed"]["error"] and by_id["squeezed"]["relax_status"] == "not_relaxed"
    assert "cells from the origin" in by_id["far"]["error"]
    assert by_id["good"]["relax_status"] in ("converged", "not_converged")
    table = failure_table(files["report"])
    assert "3 of 4 candidates failed" in table.splitlines()[0] or "4 of 4" in table.splitlines()[0]
    assert "iron" in table and "Traceback" not in table


def test_only_foreign_candidates_still_give_a_report(world, tmp_path):
    references, ckpt = world
    fe = Structure(Lattice.cubic(2.9), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    files = screen(candidates_table([candidate_row("fe", fe, source="file", origin="fe.cif")]), references,
                   checkpoint=ckpt, thermo_type="raw", fidelity="f", out_dir=tmp_path,
                   candidate_rejects=[{"record_id": "x.cif", "error": "RecordError: empty file"}])
    rows = pq.read_table(files["report"]).to_pylist()
    assert {r["candidate_id"] for r in rows} == {"fe", "x.cif"} and all(r["error"] for r in rows)
    assert "2 of 2 candidates failed" in failure_table(files["report"])


def test_sanity_thresholds():
    assert sanity.before_relaxation(_b2(3.2)) == []
    squeezed = sanity.before_relaxation(_b2(1.2))  # Li-Al 1.04 A: the example
    assert sanity.worst(squeezed) == "failed" and "1.04 A" in squeezed[0].reason
    huge = sanity.volume_findings(_b2(9.0), (16.0, 21.0))
    assert sanity.worst(huge) == "suspect"
    assert sanity.energy_findings(-0.43) and not sanity.energy_findings(-0.1) and not sanity.energy_findings(None)
