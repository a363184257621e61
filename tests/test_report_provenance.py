"""Report provenance: run id, versions, Prefect flow-run id, material ids."""

from __future__ import annotations

import sys

import pytest

from pipeline.report.provenance import material_id, new_run_id, prefect_flow_run_id, provenance


def test_provenance_outside_prefect_has_versions_and_no_flow_run():
    p = provenance(relax={"fmax": 0.05})
    assert p["run_id"] != new_run_id() and p["created_utc"].endswith("+00:00")
    assert p["packages"]["pymatgen"] and p["packages"]["pyarrow"] and p["relax"] == {"fmax": 0.05}
    if "prefect" not in sys.modules:
        assert p["prefect_flow_run_id"] is None


def test_flow_run_id_is_read_from_prefect_runtime(monkeypatch):
    """Inside a flow run Prefect exposes the id through prefect.runtime (from its context, or the
    PREFECT__FLOW_RUN_ID variable a worker sets)."""
    pytest.importorskip("prefect.runtime")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0f4c4b8e-2b67-4c1e-9d2a-5b0c7f3e9a11")
    assert prefect_flow_run_id() == "0f4c4b8e-2b67-4c1e-9d2a-5b0c7f3e9a11"
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID")
    assert prefect_flow_run_id() is None


def test_material_id():
    assert material_id("file.cif:0", "../mp-1960.cif") == "mp-1960"
    assert material_id("wbm-1-2345") == "wbm-1-2345"
    assert material_id("x", meta={"material_id": "mp-1"}) == "mp-1"
    assert material_id("LiNiO2-candidate", None) is None
