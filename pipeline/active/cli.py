"""``mfhull loop``: the active-learning loop from the command line (the same :class:`pipeline.active.loop.Loop`
the ``active-loop`` Prefect flow runs)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_loop_parser(sub: Any) -> None:
    from pipeline.cli_args import existing_file, float_range, int_range, out_dir

    p = sub.add_parser(
        "loop", help="active learning: screen -> pick -> label -> fine-tune -> re-screen, K rounds of N picks",
        description="Active-learning loop over a pool of candidates with precomputed high-fidelity labels (a "
                    "Materials Project .res archive/folder holding GGA/GGA+U and r2SCAN calculations of the same "
                    "materials; the r2SCAN ones are revealed only when picked). Every round is kept in "
                    "OUT/round-XX/ (labels, models, report.parquet, summary.json, coverage.png, picks.json); a "
                    "killed run re-run with the same command continues after the last finished step.")
    p.add_argument("--pool", required=True, type=existing_file, metavar="PATH",
                   help=".res archive (.tar) with both fidelities, e.g. ../shared/data/mp/mp-res_Li-Ni-O/Li-Ni-O.res.tar")
    p.add_argument("--out", required=True, type=out_dir, help="loop folder (state.json, round-XX/)")
    p.add_argument("--rounds", type=int_range(0, 1000), default=3, help="acquisition rounds K (default 3)")
    p.add_argument("--budget", type=int_range(0, 100_000), default=5,
                   help="r2SCAN calculations per round N (default 5)")
    p.add_argument("--ensemble", type=int_range(1, 32), default=3, help="ensemble members (default 3)")
    p.add_argument("--strategy", choices=("uncertainty", "lookahead", "random"), default="uncertainty",
                   help="uncertainty: P(E_hull on the other side of --threshold); lookahead: the batch that most "
                        "lowers the expected misclassified candidates of the pool; random: the baseline")
    p.add_argument("--threshold", type=float_range(-1.0, 1.0), default=0.0,
                   help="stability threshold on E_hull (eV/atom, default 0)")
    p.add_argument("--initial-random", type=int_range(0, 100_000), default=2,
                   help="labelled before round 0 besides each element's lowest-energy phase (default 2)")
    p.add_argument("--initial", nargs="+", default=None, metavar="ID",
                   help="explicit initial candidate ids (instead of the elements + --initial-random)")
    p.add_argument("--steps", type=int_range(1, 10_000_000), default=20,
                   help="fine-tuning optimizer steps per member per round (default 20)")
    p.add_argument("--base-steps", type=int_range(1, 10_000_000), default=150,
                   help="steps of the first training when no --init-from is given (default 150)")
    p.add_argument("--init-from", nargs="+", default=None, type=existing_file, metavar="CKPT",
                   help="start the members from these checkpoints (1, or one per member)")
    p.add_argument("--predictor", choices=("gap", "direct"), default="gap",
                   help="gap: low-fidelity DFT energy + the models' (high - low) prediction; direct: high head")
    p.add_argument("--finetune-from", choices=("base", "previous", "none"), default="base",
                   help="round r >= 1 fine-tunes the round-0 members (base, default), round r-1's (previous: "
                        "fine-tunes stacked, which drifts), or trains nothing after round 0 (none)")
    p.add_argument("--residual", choices=("gp", "shift", "none"), default="gp",
                   help="put the members' energies on the labels' scale: gp (default) = fidelity-gap GP over "
                        "composition (also the round-0 uncertainty), shift = per-element shift only")
    p.add_argument("--samples", type=int_range(0, 100_000), default=32,
                   help="GP draws per member propagated through the hull for the E_hull sigma (default 32)")
    p.add_argument("--seed", type=int_range(0, 2**31 - 1), default=0)
    p.add_argument("--lr", type=float_range(0.0, 1.0, low_open=True), default=5e-3)
    p.add_argument("--score", action="store_true",
                   help="score every round against the pool's full answer (benchmarks: F1, MAE, coverage)")
    p.set_defaults(func=cmd_loop)


def cmd_loop(args: argparse.Namespace) -> int:
    from pipeline.active.loop import Loop, LoopConfig, initial_set
    from pipeline.active.pool import load_res_pool
    from pipeline.threads import configure_torch_threads

    configure_torch_threads(None)
    pool, oracle = load_res_pool(args.pool)
    initial = tuple(args.initial) if args.initial else tuple(initial_set(pool, args.initial_random, args.seed))
    cfg = LoopConfig(rounds=args.rounds, budget=args.budget, ensemble=args.ensemble, strategy=args.strategy,
                     threshold=args.threshold, seed=args.seed, steps=args.steps, base_steps=args.base_steps,
                     lr=args.lr, predictor=args.predictor, initial=initial,
                     init_from=tuple(str(p) for p in args.init_from or ()), finetune_from=args.finetune_from,
                     residual=args.residual, samples=args.samples)
    result = Loop(pool, oracle, cfg, args.out, truth=oracle.truth() if args.score else None).run()
    keys = ("round", "n_labelled", "F1", "MAE", "coverage_e_hull_unlabelled", "coverage_e_hull_unlabelled_raw",
            "coverage_energy_picks")
    print(json.dumps([{k: r.get(k) for k in keys if k in r} for r in result.rounds], indent=1))
    return 0
