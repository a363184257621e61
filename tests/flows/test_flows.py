"""Flows run on a local Prefect test API; deployments point at real flows."""

from __future__ import annotations

import importlib
import inspect

import pyarrow.parquet as pq
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from pipeline.config import PROJECT_ROOT
from pipeline.io import read_table


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness():
        yield


def test_deployments_point_at_flows():
    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    names = set()
    for dep in spec["deployments"]:
        path, _, func = dep["entrypoint"].partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert hasattr(flow, "fn"), f"{dep['entrypoint']} is not a Prefect flow"
        params = set(dep.get("parameters", {}))
        assert params <= set(inspect.signature(flow.fn).parameters), dep["name"]
        names.add(dep["work_pool"]["name"])
    assert {"cpu", "gpu"} <= names


def test_ingest_files_flow_on_real_res(prefect_api, mp_file, tmp_path):
    from flows.ingest import ingest_files_flow

    out = ingest_files_flow([str(mp_file("mp-res_Li-Ni-O/Li-Ni-O_eah0.res.tar"))], str(tmp_path))
    assert out[0]["entries_read"] == out[0]["entries_written"] == 25 and out[0]["rejects_read"] == 0
    assert read_table(tmp_path / "entries").num_rows == 25


def test_demo_flow_end_to_end(prefect_api, tmp_path):
    """The README's main job on the committed data/demo set (2 epochs: checks the wiring, not the accuracy)."""
    from flows.demo import DEMO_FIDELITIES, demo_flow

    summary = demo_flow(out_dir=str(tmp_path), epochs=2)
    assert (tmp_path / "model" / "best.pt").exists() and (tmp_path / "demo_summary.json").exists()
    for fidelity in DEMO_FIDELITIES:
        files = summary["reports"][fidelity]
        report = pq.read_table(files["report"]).to_pylist()
        assert report and all(r["fidelity"] == fidelity for r in report)
        assert all(r["e_hull_true"] is not None for r in report)  # DFT truth matched to every candidate
        assert all(r["error"] is None for r in report), [r["error"] for r in report]
    if "held_out_test" in summary:
        assert any(k.startswith("gpaw-r2scan/") for k in summary["held_out_test"])
