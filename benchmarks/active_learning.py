"""Active learning on real MP data: uncertainty-driven vs random choice of r2SCAN calculations.

Pool: the Materials Project Li-Ni-O system as `.res` files (`../shared/data/mp/mp-res_Li-Ni-O/Li-Ni-O.res.tar`,
read in place, never copied): the 51 materials with both a GGA/GGA+U and an r2SCAN calculation are the
candidates; all 236 GGA/GGA+U materials (MP2020-corrected) are the cheap-fidelity training frames. The oracle
returns MP's own r2SCAN energy (and r2SCAN structure) of a picked material: real labels, looked up, no DFT run.
Truth: each candidate's r2SCAN E_hull against all the other candidates' r2SCAN energies (a hull vertex: its
negative distance below the others); stable = E_hull <= 0.

Per seed: the initial labels (each element's lowest-GGA-energy phase + `--initial-random` others) and an
ensemble of `--ensemble` small MF potentials trained on them (`--base-steps`, seeds differ, splits differ) are
shared by both strategies (`OUT/base-s<seed>/`, reused by every `--tag`); each loop then runs `--rounds` rounds of
`--budget` picks (fine-tuning the round-0 members `--steps` per round, energies put on the labels' scale by the
fidelity-gap GP). Scores per round: stability F1 and E_hull MAE over the whole pool (DFT where labelled, the
ensemble mean elsewhere), coverage of the calibrated 90 % interval on the unlabelled (held-out) candidates
(before and after the held-out scale), energy MAE of the unlabelled; Target 1 paired by seed. Outputs:
`OUT/<tag>table.md`, `<tag>results.json`, `<tag>curves.png`, `<tag>coverage.png`.

    OMP_NUM_THREADS=1 python benchmarks/active_learning.py --out reports/al-diag --tag v2- --seeds 0,1,2,3,4,5,6,7,8,9
    python benchmarks/active_learning.py --table-only --out reports/al-diag --tag v2-
    python benchmarks/active_learning.py --diagnosis --out reports/al-diag --seeds 0,1,2   # variant runs: DIAGNOSIS

Measured results and the diagnosis of the variants: docs/active-learning.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRATEGIES = ("uncertainty", "lookahead", "random")


def _pool(path: str):
    from pipeline.active.pool import load_res_pool

    return load_res_pool(path)


def _base(args_d: dict, seed: int, k: int, init: list[str]) -> str:
    """Member k of seed's base ensemble: trained on the GGA frames + the initial r2SCAN labels."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pyarrow as pa
    import torch

    from pipeline.active.pool import label_frames
    from pipeline.model import preset
    from pipeline.train.trainer import TrainConfig, train

    torch.set_num_threads(1)
    pool, oracle = _pool(args_d["pool"])
    frames = pa.concat_tables([pool.low_frames, label_frames([oracle.labels[i] for i in init], pool.high)])
    out = Path(args_d["out"]) / f"base-s{seed}" / f"m{k}"
    tc = TrainConfig(max_steps=args_d["base_steps"], batch_size=8, lr=args_d["lr"], val_fraction=0.2,
                     seed=seed * 1000 + k, use_stress=False, target_fidelity=pool.high)
    train(frames, preset("small", fidelities=(pool.low, pool.high)), tc, out, resume=True)
    return str(out / "last.pt")


def _loop(args_d: dict, seed: int, strategy: str, init: list[str], bases: list[str]) -> str:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from pipeline.active.loop import Loop, LoopConfig

    torch.set_num_threads(1)
    pool, oracle = _pool(args_d["pool"])
    cfg = LoopConfig(rounds=args_d["rounds"], budget=args_d["budget"], ensemble=args_d["ensemble"],
                     strategy=strategy, seed=seed, steps=args_d["steps"], base_steps=args_d["base_steps"],
                     lr=args_d["lr"], predictor=args_d["predictor"], initial=tuple(init), init_from=tuple(bases),
                     finetune_from=args_d["finetune_from"], fidelity_prior=args_d["fidelity_prior"],
                     residual=args_d["residual"], samples=args_d["samples"],
                     gp_length_prior=args_d["gp_length_prior"])
    out = Path(args_d["out"]) / f"{args_d['tag']}{strategy}-s{seed}"
    t0 = time.perf_counter()
    Loop(pool, oracle, cfg, out, truth=oracle.truth()).run()
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return str(out)


def run(args: argparse.Namespace) -> None:
    from pipeline.active.loop import initial_set

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool, _ = _pool(args.pool)
    args_d = {k: getattr(args, k) for k in ("pool", "out", "rounds", "budget", "ensemble", "steps", "base_steps",
                                            "lr", "predictor", "finetune_from", "fidelity_prior", "tag",
                                            "residual", "samples", "gp_length_prior")}
    inits = {s: initial_set(pool, args.initial_random, s) for s in args.seeds}
    (out / f"{args.tag}setup.json").write_text(json.dumps({"args": args_d, "seeds": args.seeds, "initial": inits,
                                                "pool": pool.describe()}, indent=1, default=str))
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as ex:
        futs = {(s, k): ex.submit(_base, args_d, s, k, inits[s]) for s in args.seeds for k in range(args.ensemble)}
        bases = {s: [futs[(s, k)].result() for k in range(args.ensemble)] for s in args.seeds}
        print(f"base ensembles: {time.perf_counter() - t0:.0f} s", flush=True)
        jobs = [ex.submit(_loop, args_d, s, st, inits[s], bases[s]) for s in args.seeds for st in args.strategies]
        for j in jobs:
            print("done", j.result(), f"{time.perf_counter() - t0:.0f} s", flush=True)
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")


def _ms(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value), NaN-aware."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def collect(out: Path, tag: str = "") -> dict:
    """Per strategy and round: n calculations, F1 / MAE mean and std over seeds, pooled held-out coverage."""
    from pipeline.active.uncertainty import coverage, coverage_curve
    from pipeline.io import read_table

    setup = json.loads((out / f"{tag}setup.json").read_text())
    res: dict = {"setup": setup, "strategies": {}, "per_seed": {}}
    for st in STRATEGIES:
        runs = sorted(out.glob(f"{tag}{st}-s*/curve.json"))
        if not runs:
            continue
        curves = [json.loads(p.read_text()) for p in runs]
        seeds = [int(p.parent.name.rsplit("-s", 1)[1]) for p in runs]
        n_rounds = min(len(c) for c in curves)
        res["per_seed"][st] = {str(sd): {"F1": [c[r]["F1"] for r in range(n_rounds)],
                                         "MAE": [c[r]["MAE"] for r in range(n_rounds)]}
                               for sd, c in zip(seeds, curves)}
        rows = []
        for r in range(n_rounds):
            err, sig, sig_raw = [], [], []
            for p in runs:
                rep = read_table(p.parent / f"round-{r:02d}" / "report.parquet").to_pylist()
                for x in rep:
                    if not x["labelled"] and x["e_hull_true"] is not None:
                        err.append(x["e_hull_mean"] - x["e_hull_true"])
                        sig.append(x["e_hull_sigma"])
                        sig_raw.append(x.get("e_hull_sigma_raw", x["e_hull_sigma"]))
            row = {"round": r, "n_calcs": int(np.mean([c[r]["n_labelled"] for c in curves])), "n_seeds": len(curves),
                   "seeds": seeds, "coverage90_unlabelled": coverage(err, sig, 0.9),
                   "coverage90_unlabelled_raw": coverage(err, sig_raw, 0.9), "n_unlabelled": len(err),
                   "coverage_curve": coverage_curve(err, sig)}
            for key in ("F1", "MAE", "MAE_unlabelled", "energy_MAE_unlabelled"):
                row[f"{key}_mean"], row[f"{key}_std"] = _ms([c[r].get(key) for c in curves])
            rows.append(row)
        res["strategies"][st] = rows
    rnd = res["strategies"].get("random")
    res["target_f1"] = {}
    for st in STRATEGIES:
        u = res["strategies"].get(st)
        if st == "random" or not u or not rnd:
            continue
        n0 = rnd[0]["n_calcs"]
        acq_r = rnd[-1]["n_calcs"] - n0
        half = max((row for row in u if row["n_calcs"] - n0 <= acq_r / 2), key=lambda row: row["round"])
        f_rand = res["per_seed"]["random"]
        f_unc = res["per_seed"][st]
        paired = sorted(set(f_rand) & set(f_unc), key=int)
        d = [f_unc[sd]["F1"][half["round"]] - f_rand[sd]["F1"][-1] for sd in paired]
        gain = [f_rand[sd]["F1"][-1] - f_rand[sd]["F1"][0] for sd in paired]
        t = {
            "random_final_round": rnd[-1]["round"], "random_calcs": rnd[-1]["n_calcs"], "random_acquired": acq_r,
            "random_final_F1": rnd[-1]["F1_mean"], "random_final_F1_std": rnd[-1]["F1_std"],
            "half_round": half["round"], "half_calcs": half["n_calcs"], "half_acquired": half["n_calcs"] - n0,
            "half_F1": half["F1_mean"], "half_F1_std": half["F1_std"],
            "paired_seeds": [int(x) for x in paired], "paired_diff": d, "paired_diff_mean": _ms(d)[0],
            "paired_diff_std": _ms(d)[1], "seeds_reached": int(sum(x >= 0 for x in d)),
            "met": bool(half["F1_mean"] >= rnd[-1]["F1_mean"]),
            # random's own gain over the shared round-0 F1: if it is not positive, any strategy 'reaches' it
            "random_gain_over_round0": gain, "random_gain_mean": _ms(gain)[0],
            "trivial": bool(rnd[-1]["F1_mean"] <= rnd[0]["F1_mean"]),
            "F1_gap_per_round": [round(a["F1_mean"] - b["F1_mean"], 4) for a, b in zip(u, rnd)],
        }
        # the same round, paired by seed (same initial labels and round-0 members): strategy - random
        per_round = []
        for r in range(min(len(u), len(rnd))):
            dr = [f_unc[sd]["F1"][r] - f_rand[sd]["F1"][r] for sd in paired]
            per_round.append({"round": r, "mean": _ms(dr)[0], "std": _ms(dr)[1],
                              "better": int(sum(x > 0 for x in dr)), "rand_better": int(sum(x < 0 for x in dr))})
        t["paired_per_round"] = per_round
        res["target_f1"][st] = t
    if rnd and res["target_f1"]:
        rows = [row for st in STRATEGIES for row in res["strategies"].get(st, [])
                if row["coverage90_unlabelled"] is not None]
        pooled = (float(sum(row["coverage90_unlabelled"] * row["n_unlabelled"] for row in rows)
                        / max(sum(row["n_unlabelled"] for row in rows), 1)) if rows else None)
        pooled_raw = (float(sum(row["coverage90_unlabelled_raw"] * row["n_unlabelled"] for row in rows)
                            / max(sum(row["n_unlabelled"] for row in rows), 1)) if rows else None)
        in_band = [0.8 <= row["coverage90_unlabelled"] <= 0.95 for row in rows]
        res["coverage90"] = {"pooled": pooled, "pooled_raw": pooled_raw, "rounds_in_band": int(sum(in_band)),
                             "rounds": len(in_band), "met": bool(pooled is not None and 0.8 <= pooled <= 0.95)}
    return res


def table(res: dict) -> str:
    strats = list(res["strategies"])
    short = {"uncertainty": "unc.", "lookahead": "look.", "random": "rand."}
    first = res["strategies"][strats[0]]
    n_seeds = first[0]["n_seeds"]
    head = (["round", "r2SCAN calcs"] + [f"F1 {st}" for st in strats]
            + [f"E_hull MAE {short.get(st, st)} (meV/atom)" for st in strats]
            + [f"energy MAE unlabelled {' / '.join(short.get(st, st) for st in strats)} (meV/atom)"]
            + [f"90 % coverage {short.get(st, st)}" for st in strats])
    lines = [(f"Mean ± sample std over {n_seeds} seeds ({', '.join(map(str, first[0]['seeds']))}); E_hull MAE over "
              "the whole pool; coverage of the 90 % interval on the unlabelled candidates, pooled over seeds "
              "(calibrated; in brackets before calibration)."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pm(row, key, scale=1.0, fmt=".3f"):
        return f"{scale * row[f'{key}_mean']:{fmt}} ± {scale * row[f'{key}_std']:{fmt}}"

    for rows in zip(*(res["strategies"][st] for st in strats)):
        cells = [str(rows[0]["round"]), str(rows[0]["n_calcs"])]
        cells += [pm(x, "F1") for x in rows] + [pm(x, "MAE", 1e3, ".1f") for x in rows]
        cells.append(" / ".join(f"{1e3 * x['energy_MAE_unlabelled_mean']:.1f}" for x in rows))
        cells += [f"{x['coverage90_unlabelled']:.2f} ({x['coverage90_unlabelled_raw']:.2f}, n={x['n_unlabelled']})"
                  for x in rows]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for st, t in res.get("target_f1", {}).items():
        lines.append(
            f"Target 1, {st} (reaches random's F1 with at most half the r2SCAN calculations): random after "
            f"{t['random_acquired']} acquired ({t['random_calcs']} calcs, round {t['random_final_round']}): F1 "
            f"{t['random_final_F1']:.3f} ± {t['random_final_F1_std']:.3f}; {st} after {t['half_acquired']}"
            f" acquired ({t['half_calcs']} calcs, round {t['half_round']}): F1 "
            f"{t['half_F1']:.3f} ± {t['half_F1_std']:.3f}; paired difference per seed "
            f"{t['paired_diff_mean']:+.3f} ± {t['paired_diff_std']:.3f}, reached in {t['seeds_reached']} of "
            f"{len(t['paired_seeds'])} seeds -> {'MET (on the mean)' if t['met'] else 'NOT MET'}"
            + (f"; TRIVIAL: random's final F1 is not above the shared round-0 F1 (gain {t['random_gain_mean']:+.3f})"
               if t["trivial"] else f"; random's own gain over round 0: {t['random_gain_mean']:+.3f}"))
        lines.append(f"F1 {st} - random at the same round, paired by seed: " + "; ".join(
            f"round {x['round']}: {x['mean']:+.3f} ± {x['std']:.3f} ({st} better in {x['better']}, random in "
            f"{x['rand_better']})" for x in t["paired_per_round"][1:]))
    c = res.get("coverage90", {})
    if c:
        lines.append(f"Target 2 (90 % interval coverage on held-out candidates in 80-95 %): pooled over all rounds, "
                     f"all strategies and all seeds {c['pooled']:.3f} (before calibration {c['pooled_raw']:.3f}) -> "
                     f"{'MET' if c['met'] else 'NOT MET'}; per (strategy, round) in the band: {c['rounds_in_band']} "
                     f"of {c['rounds']}")
    return "\n".join(lines)


def plot(res: dict, out: Path, tag: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.active.uncertainty import plot_coverage
    from pipeline.io.atomic import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), dpi=120)
    colors = {"uncertainty": "tab:blue", "lookahead": "tab:green", "random": "tab:orange"}
    for st, rows in res["strategies"].items():
        n = [r["n_calcs"] for r in rows]
        for ax, key, scale in ((axes[0], "F1", 1.0), (axes[1], "MAE", 1e3)):
            m = np.array([r[f"{key}_mean"] for r in rows]) * scale
            s = np.array([r[f"{key}_std"] for r in rows]) * scale
            ax.plot(n, m, marker="o", color=colors[st], label=f"{st} (mean ± std, {rows[0]['n_seeds']} seeds)")
            ax.fill_between(n, m - s, m + s, color=colors[st], alpha=0.2)
        axes[2].plot(n, [r["coverage90_unlabelled"] for r in rows], marker="o", color=colors[st],
                     label=f"{st}, calibrated")
        axes[2].plot(n, [r["coverage90_unlabelled_raw"] for r in rows], marker="x", ls="--", color=colors[st],
                     alpha=0.6, label=f"{st}, before calibration")
    t = next(iter(res.get("target_f1", {}).values()), None)
    if t:
        axes[0].axhline(t["random_final_F1"], color="0.5", ls=":", lw=1, label="random, final F1")
        axes[0].axvline(t["half_calcs"], color="0.5", ls="--", lw=0.8, label="half of random's acquisitions")
    axes[2].axhspan(0.8, 0.95, color="0.6", alpha=0.2, label="target 80-95 %")
    axes[0].set_ylabel("stability F1 (whole pool)")
    axes[1].set_ylabel("E_hull MAE (meV/atom, whole pool)")
    axes[2].set_ylabel("90 % interval coverage (unlabelled, pooled)")
    axes[2].set_ylim(0, 1.02)
    for ax in axes:
        ax.set_xlabel("r2SCAN calculations (incl. initial)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Active learning on MP Li-Ni-O ({res['setup']['pool']['n_candidates']} candidates, "
                 f"real r2SCAN labels)", fontsize=9)
    fig.tight_layout()
    with atomic_path(out / f"{tag}curves.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    curves, cmap = {}, {}
    for st, rows in res["strategies"].items():
        if not curves:  # round 0 is the same for every strategy (same seeds, members and initial labels)
            label = "round 0, all (GP fitted on the initial labels)"
            curves[label], cmap[label] = rows[0]["coverage_curve"], "0.3"
        label = f"{st}, round {rows[-1]['round']}"
        curves[label], cmap[label] = rows[-1]["coverage_curve"], colors[st]
    plot_coverage(curves, out / f"{tag}coverage.png", colors=cmap,
                  title="E_hull of unlabelled candidates (pooled over seeds)")


#: the diagnosis of the rising E_hull MAE: (tag, --residual, --finetune-from) of runs with --strategies random
DIAGNOSIS = (("prev-", "shift", "previous (old)"), ("shiftnone-", "shift", "none (round-0 members)"),
             ("shiftbase-", "shift", "base"), ("gpnone-", "gp, plain ML", "none (round-0 members)"),
             ("gp10-", "gp, plain ML", "base"), ("v2-", "gp, l prior (default)", "base"))


def diagnosis_table(out: Path, seeds: list[int]) -> str:
    """Random picks, per (residual, fine-tune) variant and round: mean ± std over ``seeds`` of the E_hull MAE
    (hull of DFT labels + model energies), of the E_hull MAE of a hull of the members' energies alone, and of the
    energy MAE of the unlabelled candidates (meV/atom). Runs: ``--strategies random --residual R
    --finetune-from F --tag T`` for each row of :data:`DIAGNOSIS`."""
    head = "| residual | fine-tune from | quantity (meV/atom) | " + " | ".join(f"round {r}" for r in range(5)) + " |"
    lines = [head, "|---|---|---|" + "---|" * 5]
    for tag, residual, ft in DIAGNOSIS:
        curves = [json.loads((out / f"{tag}random-s{sd}" / "curve.json").read_text()) for sd in seeds
                  if (out / f"{tag}random-s{sd}" / "curve.json").exists()]
        if not curves:
            continue
        for key, name in (("MAE", "E_hull MAE"), ("MAE_model_hull", "E_hull MAE, model energies only"),
                          ("energy_MAE_unlabelled", "energy MAE, unlabelled")):
            cells = []
            for r in range(min(len(c) for c in curves)):
                m, sd = _ms([None if c[r].get(key) is None else 1e3 * c[r][key] for c in curves])
                cells.append(f"{m:.1f} ± {sd:.1f}")
            lines.append(f"| {residual} | {ft} | {name} ({len(curves)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import shared_data_dir
    from pipeline.io import write_json_atomic
    from pipeline.io.atomic import atomic_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default=str(shared_data_dir() / "mp-res_Li-Ni-O" / "Li-Ni-O.res.tar"))
    p.add_argument("--out", default="reports/active_learning")
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--budget", type=int, default=4)
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--initial-random", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps per member per round")
    p.add_argument("--base-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--predictor", default="gap", choices=("gap", "direct"))
    p.add_argument("--finetune-from", default="base", choices=("base", "previous", "none"),
                   help="round r >= 1 fine-tunes the round-0 members (base), round r-1's (previous), or none")
    p.add_argument("--fidelity-prior", type=float, default=0.0)
    p.add_argument("--residual", default="gp", choices=("gp", "shift", "none"),
                   help="put the members' energies on the labels' scale by the fidelity-gap GP or a per-element shift")
    p.add_argument("--samples", type=int, default=32, help="GP draws per member for the E_hull sigma")
    p.add_argument("--gp-length-prior", type=float, default=0.5,
                   help="log-sd of the GP length scale's log-normal prior around 0.2 (0: plain maximum likelihood)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), type=lambda s: s.split(","))
    p.add_argument("--tag", default="", help="prefix of the loop folders (variants sharing one base ensemble)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--diagnosis", action="store_true",
                   help="print the diagnosis table of the variant runs (see DIAGNOSIS) for --seeds and exit")
    args = p.parse_args(argv)
    if not Path(args.pool).exists():
        p.error(f"--pool: {args.pool} not found (the shared MP data, read in place)")
    out = Path(args.out)
    if args.diagnosis:
        print(diagnosis_table(out, args.seeds))
        return
    if not args.table_only:
        run(args)
    res = collect(out, args.tag)
    write_json_atomic(out / f"{args.tag}results.json", res, indent=1)
    if "random" not in res["strategies"] or len(res["strategies"]) < 2:
        print(json.dumps({st: [{k: v for k, v in row.items() if k != "coverage_curve"} for row in rows]
                          for st, rows in res["strategies"].items()}, indent=1))
        return
    text = table(res)
    with atomic_path(out / f"{args.tag}table.md") as tmp:
        Path(tmp).write_text(text + "\n")
    plot(res, out, args.tag)
    print(text)


if __name__ == "__main__":
    main()
