"""Screen real MP Li-Ni-O r2SCAN materials with the pretrained SevenNet-MF-0 (r2SCAN head, imported into mfhull)
and compare E_hull with MP's r2SCAN values: the whole screen stage on real data, with a measured error.

    .venv/bin/python benchmarks/bench_screen_mf0_li_ni_o.py [--n 12] [--out /tmp/mf0-screen]

Candidates: the N smallest R2SCAN materials of ../shared/data/mp/mp-res_Li-Ni-O/Li-Ni-O.res.tar (their MP r2SCAN
entries are the DFT truth); references: every other R2SCAN entry of Li-Ni-O (thermo type R2SCAN) — the candidates
are left out of the reference hull, as in a real screening, so a stable candidate has E_hull <= 0.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.config import shared_data_dir
from pipeline.entries import entries_table
from pipeline.hull.candidates import candidate_row, candidates_table
from pipeline.model import import_sevenn, save_checkpoint
from pipeline.relax.relaxer import RelaxSettings
from pipeline.screening import screen
from pipeline.sources.files.res import read_res_entries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--out", default="/tmp/mf0-screen")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    entries, result = read_res_entries(shared_data_dir() / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar")
    r2 = sorted((e for e in entries if e.parameters["run_type"] == "R2SCAN"),
                key=lambda e: (len(e.structure), e.entry_id))
    picked = [e for e in r2 if len(e.composition.elements) > 1][: args.n]
    ids = {e.entry_id for e in picked}
    rows = [r for r in result.rows if r["run_type"] == "R2SCAN"]
    refs = entries_table(r for r in rows if r["entry_id"] not in ids)
    truth = entries_table(r for r in rows if r["entry_id"] in ids)
    cands = candidates_table(candidate_row(e.entry_id, e.structure, source="file", origin="mp-res") for e in picked)
    ckpt = save_checkpoint(import_sevenn("7net-mf-0"), out / "mf0.pt")
    t0 = time.perf_counter()
    files = screen(cands, refs, checkpoint=ckpt, thermo_type="R2SCAN", fidelity="r2scan", out_dir=out,
                   truth=truth, relax=RelaxSettings(fmax=0.05, steps=200), reference_window=0.05)
    wall = time.perf_counter() - t0
    summary = json.loads(Path(files["summary_json"]).read_text())
    report = pq.read_table(files["report"]).to_pylist()
    print(f"candidates {len(report)}, wall {wall:.0f} s")
    for r in sorted(report, key=lambda r: r["candidate_id"]):
        print(f"  {r['candidate_id']:22s} {r['formula']:10s} DFT {r['e_hull_true']:+.3f}  "
              f"vs DFT hull {r['e_hull_pred_dft_hull']:+.3f}  vs model hull {r['e_hull_pred_model_hull']:+.3f} "
              f"({r['relax_status']})")
    for m in summary["metrics"]:
        f1 = "n/a" if m["F1"] is None else f"{m['F1']:.2f}"
        print(f"{m['hull']:10s} threshold {m['stability_threshold']}: MAE {m['MAE']:.3f} eV/atom, "
              f"RMSE {m['RMSE']:.3f}, F1 {f1}, Accuracy {m['Accuracy']:.2f}")


if __name__ == "__main__":
    main()
