"""pipeline.screen_structures: the README example runs as written; bad inputs are rows with their error."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from pipeline.config import PROJECT_ROOT


def _readme_example() -> str:
    text = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example:begin -->\s*```python\n(.*?)```\s*<!-- api-example:end -->", text, re.DOTALL)
    assert block, "README lost its API example markers"
    return block.group(1)


@pytest.mark.slow  # imports SevenNet-MF-0 and relaxes with it (~1 min on 2 busy cores)
def test_readme_api_example_runs(monkeypatch, capsys):
    pytest.importorskip("sevenn")
    monkeypatch.chdir(PROJECT_ROOT)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    df = namespace["df"]
    assert list(df["candidate_id"]) == ["LiAl-B2", "LiAl3-L12"]
    assert df["error"].isna().all() and df["e_hull_pred_model_hull"].notna().all()
    assert "LiAl-B2" in capsys.readouterr().out


def test_screen_structures_keeps_bad_structures_as_rows(tmp_path):
    import torch
    from ase.build import bulk
    from pymatgen.core.entries import ComputedStructureEntry

    import pipeline
    from pipeline.entries import entries_table, entry_to_row
    from pipeline.model import MFPotential, fit_element_references, preset, save_checkpoint

    torch.manual_seed(0)
    al = Structure(Lattice.cubic(4.05), ["Al"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cu = Structure(Lattice.cubic(3.6), ["Cu"] * 4, [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    refs = entries_table(entry_to_row(ComputedStructureEntry(s, e, entry_id=n, parameters={"run_type": "EMT"}),
                                      source="test", thermo_type="raw", fidelity="emt")
                         for n, s, e in (("Al", al, -14.0), ("Cu", cu, -16.0)))
    model = MFPotential(preset("small", elements=("Al", "Cu"), fidelities=("emt",)),
                        fit_element_references([[13], [29]], [-3.5, -4.0], ["emt", "emt"]))
    ckpt = save_checkpoint(model, tmp_path / "tiny.pt")
    b2 = bulk("Al", "sc", a=2.9)
    b2 += bulk("Cu", "sc", a=2.9)
    b2.positions[1] = [1.45, 1.45, 1.45]
    molecule = bulk("Cu", "sc", a=2.9)
    molecule.pbc = False
    df = pipeline.screen_structures([b2, molecule, "not a structure"], ckpt, refs, "emt", "raw", steps=5)
    assert list(df["candidate_id"]) == ["structure-0", "structure-1", "structure-2"]
    assert pd.isna(df.loc[0, "error"]) and df.loc[0, "formula"] == "AlCu" and df.loc[0, "relax_status"]
    assert "periodic" in df.loc[1, "error"] and "expected a pymatgen Structure" in df.loc[2, "error"]
