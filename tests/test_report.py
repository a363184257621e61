"""write_report end to end on real Li-Ni-O r2SCAN data: Parquet, summaries, plots (real PNGs)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from ase.io import read as ase_read
from matplotlib.image import imread
from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
from pymatgen.core import Composition, Structure

from pipeline.hull import R2SCAN, build_reference_hull, e_above_hull, prediction_entry
from pipeline.report import REPORT_SCHEMA, SUMMARY_SCHEMA, ReportError, report_table, write_report
from pipeline.report.provenance import provenance
from pipeline.schema import field_units
from pipeline.sources.files.res import read_res_entries

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes=10_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
    assert img[..., :3].std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def screening(mp_file):
    """Predictions = DFT energies + seeded noise for 30 Li-Ni-O r2SCAN phases; model re-computes references with
    a constant shift; one candidate with an element outside the hull fails."""
    entries, _ = read_res_entries(mp_file("mp-res_Li-Ni-O/Li-Ni-O.res.tar"))
    hull = build_reference_hull(entries, R2SCAN)
    rng = np.random.default_rng(0)
    picked = hull.entries[:30]
    shift = -0.05
    model = {e.entry_id: e.energy + shift * len(e.structure) for e in hull.entries}
    preds = [prediction_entry(f"cand-{e.entry_id}", e.structure,
                              energy=e.energy + (shift + rng.normal(0, 0.03)) * len(e.structure)) for e in picked]
    preds.append(prediction_entry("alien", "LiFeO2", energy_per_atom=-6.0))
    rows = e_above_hull(preds, hull, model_energies=model, fidelity="r2scan")
    true = {f"cand-{e.entry_id}": hull.diagram.get_e_above_hull(e) for e in picked}
    structures = {f"cand-{e.entry_id}": json.dumps(e.structure.as_dict()) for e in picked}
    for r in rows:
        r["e_hull_true"] = true.get(r["candidate_id"])
        r["structure"] = structures.get(r["candidate_id"])
        r["relax_status"] = "converged" if r["error"] is None else "not_relaxed"
        r["structure_source"] = "mp-res"  # not a report column: goes to meta
    return hull, rows


@pytest.mark.shared_data
def test_write_report_end_to_end(screening, tmp_path):
    hull, rows = screening
    prov = provenance(relax={"fmax": 0.05, "steps": 200, "optimizer": "FIRE"}, model_hull_phases=["mp-23-R2SCAN"],
                      reference_window=0.1)
    files = write_report(rows, tmp_path / "rep", model_id="mf-test-1", data_snapshot_id="mp-res-2024-03",
                         threshold=0.05, reference_diagram=hull, title="Li-Ni-O test", provenance=prov)
    assert set(files) == {"report", "summary_parquet", "summary_json", "summary_md", "parity_plot",
                          "phase_diagram_plot", "relaxed_extxyz", "relaxed_cif_dir"}
    assert all(p.exists() for p in files.values())
    assert not [p for p in (tmp_path / "rep").iterdir() if p.name.startswith(".")]  # no temp files left

    # provenance: in the Parquet file's metadata, per row (run_id), in summary.json and summary.md
    stored = json.loads(pq.read_schema(files["report"]).metadata[b"provenance"])
    assert stored["run_id"] == prov["run_id"] and stored["created_utc"].endswith("+00:00")
    assert stored["packages"]["pymatgen"] and stored["code_version"].startswith("0.1.0")
    assert stored["relax"]["fmax"] == 0.05 and stored["prefect_flow_run_id"] is None
    assert field_units(pq.read_schema(files["report"]))["e_hull_pred_dft_hull"] == "eV/atom"
    # relaxed structures: one extxyz frame and one CIF per candidate with a structure
    frames = ase_read(files["relaxed_extxyz"], index=":")
    assert len(frames) == 30 and frames[0].info["candidate_id"].startswith("cand-mp-")
    cif = Structure.from_file(files["relaxed_cif_dir"] / "cand-mp-1018134-R2SCAN.cif")
    assert cif.composition.reduced_formula == "Li"

    table = pq.read_table(files["report"])
    assert table.schema.equals(REPORT_SCHEMA, check_metadata=False) and table.num_rows == 31
    by_id = {r["candidate_id"]: r for r in table.to_pylist()}
    assert "not in the Li-Ni-O hull" in by_id["alien"]["error"] and by_id["alien"]["e_hull_pred_dft_hull"] is None
    ok = by_id["cand-mp-1018134-R2SCAN"]
    assert ok["model_id"] == "mf-test-1" and ok["data_snapshot_id"] == "mp-res-2024-03"
    assert {r["run_id"] for r in by_id.values()} == {prov["run_id"]}
    assert ok["fidelity"] == "r2scan" and ok["thermo_type"] == R2SCAN
    assert json.loads(ok["meta"]) == {"structure_source": "mp-res"}
    # the constant model shift cancels on the all-model hull but not on the DFT hull
    diffs = [r["e_hull_pred_dft_hull"] - r["e_hull_pred_model_hull"] for r in by_id.values() if r["error"] is None]
    assert np.allclose(diffs, -0.05, atol=1e-9)

    summary = pq.read_table(files["summary_parquet"])
    assert summary.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    got = {(r["hull"], r["stability_threshold"]): r for r in summary.to_pylist()}
    assert set(got) == {("dft_hull", 0.0), ("dft_hull", 0.05), ("model_hull", 0.0), ("model_hull", 0.05)}
    assert all(r["n"] == 30 for r in got.values())
    assert got[("model_hull", 0.0)]["MAE"] < got[("dft_hull", 0.0)]["MAE"]
    assert {(r["run_id"], r["model_id"], r["fidelity"], r["thermo_type"]) for r in got.values()} == {
        (prov["run_id"], "mf-test-1", "r2scan", R2SCAN)}

    js = json.loads(files["summary_json"].read_text())
    assert js["n_candidates"] == 31 and js["n_failed"] == 1 and js["model_id"] == ["mf-test-1"]
    assert {m["hull"] for m in js["metrics"]} == {"dft_hull", "model_hull"}
    md = files["summary_md"].read_text()
    assert "all-model hull" in md and "DFT reference hull" in md and "alien" in md and "DAF" in md
    assert prov["run_id"] in md and "mp-23-R2SCAN" in md and "FNR" in md
    _check_png(files["parity_plot"])
    _check_png(files["phase_diagram_plot"])


@pytest.mark.shared_data
def test_report_without_dft_truth_or_model_hull(screening, tmp_path):
    _, rows = screening
    bare = [{k: v for k, v in r.items() if k not in ("e_hull_true", "e_hull_pred_model_hull",
                                                      "decomposition_model_hull")} for r in rows]
    files = write_report(bare, tmp_path)
    assert "phase_diagram_plot" not in files
    assert pq.read_table(files["summary_parquet"]).num_rows == 0
    assert "no metrics" in files["summary_md"].read_text()
    _check_png(files["parity_plot"], min_bytes=5_000)


def test_five_elements_get_an_e_hull_strip_plot(tmp_path):
    els = ["Li", "Na", "K", "Rb", "Cs"]
    diagram = PhaseDiagram([PDEntry(Composition(e), -1.0) for e in els] + [PDEntry(Composition("LiNa"), -3.0)])
    rows = [{"candidate_id": f"x{i}", "formula": f, "energy_per_atom": -1.6, "e_hull_pred_dft_hull": e,
             "e_hull_pred_model_hull": e - 0.02, "e_hull_true": e + 0.01}
            for i, (f, e) in enumerate([("LiNa", 0.1), ("KRb", 0.05), ("CsLi2", -0.02), ("LiNa", 0.2)])]
    files = write_report(rows, tmp_path, reference_diagram=diagram)
    assert "phase_diagram_plot" not in files
    _check_png(files["e_hull_strip_plot"], min_bytes=5_000)


def test_report_table_validation():
    with pytest.raises(ReportError, match="candidate_id"):
        report_table([{"formula": "LiF"}])
    with pytest.raises(ReportError, match="relax_status"):
        report_table([{"candidate_id": "a", "relax_status": "done"}])
    t = report_table([{"candidate_id": "a", "e_hull_true": float("nan")}], model_id="m")
    assert t.to_pylist()[0]["e_hull_true"] is None and t.to_pylist()[0]["model_id"] == "m"
