"""Timings of the hull stage on real MP data (prints measured numbers; ratios against a baseline of the same run).

    .venv/bin/python benchmarks/bench_hull.py [--repeat 3]

* reference hulls of Li-Ni-O (287 entries) per thermo type; baseline = the R2SCAN hull (no corrections);
* E_hull of 236 predictions (GGA/GGA+U raw energies, MP2020 applied per prediction) vs the GGA_GGA+U hull;
* PatchedPhaseDiagram vs PhaseDiagram on Fe-Li-O-P (943 entries, already corrected);
* prototype substitution Li-Fe-O -> Li-Ni-O: all unique candidates vs a cap of 10.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

from monty.serialization import loadfn
from pymatgen.analysis.phase_diagram import PatchedPhaseDiagram, PhaseDiagram

from pipeline.config import shared_data_dir
from pipeline.hull import (
    GGA_GGA_U,
    GGA_GGA_U_R2SCAN,
    R2SCAN,
    build_reference_hull,
    e_above_hull,
    prediction_entry,
    substitute_prototypes,
)
from pipeline.sources.files.res import read_res_entries


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = shared_data_dir()
    entries, _ = read_res_entries(data / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar")

    print(f"# reference hulls, Li-Ni-O ({len(entries)} entries), best of {args.repeat}")
    base, _ = best_of(lambda: build_reference_hull(entries, R2SCAN), args.repeat)
    print(f"R2SCAN             {base:8.3f} s   1.00x")
    for tt in (GGA_GGA_U, GGA_GGA_U_R2SCAN):
        t, hull = best_of(lambda tt=tt: build_reference_hull(entries, tt), args.repeat)
        print(f"{tt:18s} {t:8.3f} s  {t / base:5.2f}x  ({len(hull.stable_entry_ids())} stable)")

    gga_hull = build_reference_hull(entries, GGA_GGA_U)
    preds = [prediction_entry(e.entry_id, e.structure, energy=e.uncorrected_energy) for e in gga_hull.entries]
    t, rows = best_of(lambda: e_above_hull(preds, gga_hull), args.repeat)
    print(f"\n# E_hull of {len(preds)} GGA(+U) predictions (MP2020 per prediction): {t:.3f} s "
          f"= {1000 * t / len(preds):.2f} ms/candidate; {sum(r['error'] is None for r in rows)} ok")

    flop = loadfn(data / "reaction-network" / "Fe_Li_O_P_entries.json.gz")
    t_pd, pd = best_of(lambda: PhaseDiagram(flop), args.repeat)
    t_ppd, ppd = best_of(lambda: PatchedPhaseDiagram(flop), args.repeat)
    print(f"\n# Fe-Li-O-P ({len(flop)} entries): PhaseDiagram {t_pd:.3f} s ({len(pd.stable_entries)} stable), "
          f"PatchedPhaseDiagram {t_ppd:.3f} s ({len(ppd.stable_entries)} stable), ratio {t_ppd / t_pd:.2f}x")

    lfo = loadfn(data / "emmet" / "Li-Fe-O.json.gz")
    t_all, r_all = best_of(lambda: substitute_prototypes(lfo, "Li-Ni-O"), 1)
    runs = [best_of(lambda s=s: substitute_prototypes(lfo, "Li-Ni-O", max_candidates=10, seed=s), 1)[0]
            for s in range(args.repeat)]
    t_cap = statistics.median(runs)
    print(f"\n# substitution Li-Fe-O ({len(lfo)} prototypes) -> Li-Ni-O: all unique {t_all:.2f} s "
          f"({len(r_all.rows)} candidates); cap 10 {t_cap:.2f} s (median of {len(runs)} seeds), "
          f"ratio {t_cap / t_all:.2f}x")


if __name__ == "__main__":
    main()
