"""``mfhull``: one console script; each sub-command calls the same library functions the Prefect flows call.

    mfhull import PATH... --out DIR          real files (extxyz, ASE db, entries JSON, .res, MatPES, task docs)
    mfhull ingest-mp CHEMSYS... --out DIR    Materials Project (needs MP_API_KEY)
    mfhull train --frames DIR --out DIR      multi-fidelity potential (or --config train.yaml; --strategy S)
    mfhull evaluate --checkpoint C --frames F   per-fidelity errors (+ per-frame Parquet with --out)
    mfhull screen ...                        relax candidates, E_hull vs DFT and all-model hulls, report
    mfhull hull --entries DIR ...            reference hull table of one thermo type
    mfhull import-sevenn --out FILE          pretrained SevenNet-MF-0 (PBE + r2SCAN) as an mfhull checkpoint
    mfhull demo                              the offline demo (Prefect flow on the embedded API)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import PROJECT_ROOT


def _env_defaults() -> None:
    """Defaults that must be set before numpy / Prefect are imported."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))
    # the embedded API's 20 s start-up limit is too short on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _parse_policy(items: list[str] | None) -> dict[str, tuple[str, ...]] | None:
    """['gpaw-r2scan=energy', 'pbe=energy,forces'] -> {fidelity: labels}."""
    if not items:
        return None
    out = {}
    for item in items:
        fid, _, labels = item.partition("=")
        if not labels:
            raise SystemExit(f"--labels {item!r}: expected FIDELITY=label[,label...]")
        out[fid.strip().lower()] = tuple(x.strip() for x in labels.split(","))
    return out


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.sources.files import import_to_dataset

    options = {k: v for k, v in (("fidelity", args.fidelity), ("limit", args.limit)) if v is not None}
    results = [{"path": p, **import_to_dataset(p, args.out, kind=args.kind, **options)} for p in args.paths]
    _print(results)
    return 0


def cmd_ingest_mp(args: argparse.Namespace) -> int:
    from pipeline.sources.mp import ingest_mp
    from pipeline.sources.mp_client import MPAuthError

    try:
        report = ingest_mp(args.chemsys, args.out)
    except MPAuthError as exc:  # missing / rejected key: the message says what to do (and never shows the key)
        print(f"mfhull ingest-mp: error: {exc}", file=sys.stderr)
        return 2
    _print(report.__dict__ if hasattr(report, "__dict__") else report)
    return 0


def _parse_pairs(items: list[str] | None, option: str, value=str) -> dict[str, Any]:
    """['a=1', 'b=2'] -> {'a': value('1'), ...} with a one-line error naming the option."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, _, val = str(item).partition("=")
        if not key.strip() or not val.strip():
            raise SystemExit(f"{option} {item!r}: expected NAME=VALUE")
        try:
            out[key.strip().lower()] = value(val.strip())
        except ValueError as exc:
            raise SystemExit(f"{option} {item!r}: {exc}") from exc
    return out


def _load_train_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse the command line; for ``train``, options with a YAML/JSON config file (``--config``) as defaults: keys are the option
    names (``batch-size`` or ``batch_size``); flags on the command line win."""
    import yaml

    first = parser.parse_args(argv)
    if not getattr(first, "config", None):
        return first
    path = Path(first.config)
    if not path.is_file():
        raise SystemExit(f"mfhull train: error: config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"mfhull train: error: {path}: expected a mapping of option: value")
    sub = _subparser(parser, "train")
    known = {a.dest for a in sub._actions} - {"help", "config"}
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"mfhull train: error: {path}: unknown options {unknown}; known: {sorted(known)}")
    sub.set_defaults(**values)
    return parser.parse_args(argv)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def train_config_from_args(args: argparse.Namespace):
    from pipeline.train import LossWeights, TrainConfig

    return TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, label_policy=_parse_policy(args.labels), val_fraction=args.val_fraction,
        loss=args.loss, huber_delta=args.huber_delta, ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
        scheduler=args.scheduler, patience=args.patience, target_fidelity=args.target_fidelity,
        fidelity_weights=_parse_pairs(args.fidelity_weight, "--fidelity-weight", float) or None,
        init_from=args.init_from, new_fidelities=_parse_pairs(args.new_fidelity, "--new-fidelity") or None,
        freeze=args.freeze, weights=LossWeights(args.energy_weight, args.force_weight, args.stress_weight),
    )


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.io import read_table, write_json_atomic
    from pipeline.model import preset
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train import train

    if not args.frames or not args.out:
        raise SystemExit("mfhull train: error: --frames and --out are required (on the command line or in --config)")
    frames = read_table(args.frames, FRAMES_SCHEMA)
    cfg = train_config_from_args(args)
    if args.strategy:
        from pipeline.train.strategies import run_strategy

        if not (args.high and args.low) and args.strategy != "single":
            raise SystemExit("mfhull train: error: --strategy needs --high and --low fidelities")
        steps = args.max_steps or args.epochs * -(-frames.num_rows // args.batch_size)
        res = run_strategy(args.strategy, frames, preset(args.preset), dataclasses.replace(cfg, init_from=None),
                           args.out, high=args.high, low=args.low or args.high, steps=steps,
                           init_from=args.init_from)
        summary = res.to_dict()
        write_json_atomic(Path(args.out) / "strategy.json", summary)
        _print(summary)
        return 0
    result = train(frames, preset(args.preset), cfg, args.out, resume=not args.restart)
    _print({"best": result.best, "last": result.last, "steps": result.steps, "data_hash": result.data_hash,
            "final": result.history[-1] if result.history else None})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.io import read_table, write_table_atomic
    from pipeline.model import load_checkpoint
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train.evaluation import FRAME_ERRORS_SCHEMA, frame_data_for, frame_errors, summarize

    model = load_checkpoint(args.checkpoint, device=args.device)
    data = frame_data_for(model, read_table(args.frames, FRAMES_SCHEMA), args.fidelity)
    rows = frame_errors(model, data, batch_size=args.batch_size, device=args.device)
    summary = summarize(rows)
    if args.out:
        import pyarrow as pa

        write_table_atomic(pa.Table.from_pylist(rows, schema=FRAME_ERRORS_SCHEMA), args.out)
        summary["per_frame"] = str(args.out)
    _print(summary)
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from pipeline.hull.candidates import read_candidate_files
    from pipeline.io import read_table
    from pipeline.relax.relaxer import RelaxSettings
    from pipeline.schema import ENTRIES_SCHEMA
    from pipeline.screening import screen

    cands = read_candidate_files(args.candidates)
    from pipeline.hull.candidates import candidates_table

    files = screen(
        candidates_table(cands.rows), read_table(args.references, ENTRIES_SCHEMA), checkpoint=args.checkpoint,
        thermo_type=args.thermo_type, fidelity=args.fidelity, model_fidelity=args.model_fidelity,
        out_dir=args.out, truth=read_table(args.truth, ENTRIES_SCHEMA) if args.truth else None,
        candidate_rejects=cands.rejects, relax=RelaxSettings(fmax=args.fmax, steps=args.steps),
        device=args.device,
    )
    _print({k: str(v) for k, v in files.items()})
    return 0


def cmd_hull(args: argparse.Namespace) -> int:
    from pipeline.hull import build_reference_hull
    from pipeline.io import read_table, write_table_atomic
    from pipeline.schema import ENTRIES_SCHEMA

    hull = build_reference_hull(read_table(args.entries, ENTRIES_SCHEMA), args.thermo_type, chemsys=args.chemsys,
                                fidelity=args.fidelity)
    table = hull.e_above_hull_table()
    write_table_atomic(table, args.out)
    _print({"out": args.out, "entries": table.num_rows, "stable": sorted(hull.stable_entry_ids()),
            "rejected": len(hull.rejects)})
    return 0


def cmd_import_sevenn(args: argparse.Namespace) -> int:
    from pipeline.model import import_sevenn, save_checkpoint

    model = import_sevenn(args.checkpoint)
    path = save_checkpoint(model, args.out, extra={"imported_from": str(args.checkpoint)})
    _print({"out": path, "fidelities": list(model.fidelities), "elements": len(model.elements)})
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import demo_flow
    from pipeline.config import Settings

    out = args.out or Settings().reports_dir / "demo"
    summary = demo_flow(out_dir=str(out), epochs=args.epochs)
    _print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfhull", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="import real files into frames/entries Parquet datasets")
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default="auto", help="auto (by content), extxyz, ase-db, res, entries-json, ...")
    p.add_argument("--fidelity", default=None, help="fidelity of files that do not say (e.g. an ASE db)")
    p.add_argument("--limit", type=int, default=None, help="import at most this many records per file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ingest-mp", help="ingest Materials Project entries and trajectories (MP_API_KEY)")
    p.add_argument("chemsys", nargs="+", help="chemical systems, e.g. Li-Ni-O")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ingest_mp)

    p = sub.add_parser("train", help="train the multi-fidelity potential on a frames dataset")
    p.add_argument("--config", default=None, help="YAML/JSON file of these options (keys = option names); "
                   "flags given on the command line win")
    p.add_argument("--frames", default=None, help="frames dataset (required here or in --config)")
    p.add_argument("--out", default=None, help="output folder (required here or in --config)")
    p.add_argument("--preset", default="small", help="model preset: small, mf-bench, sevennet-mf-0")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--device", default=os.environ.get("MFHULL_DEVICE", "cpu"))
    p.add_argument("--labels", action="append", help="FIDELITY=energy[,forces,stress]: labels used per fidelity")
    p.add_argument("--restart", action="store_true", help="ignore an existing last.pt instead of resuming")
    p.add_argument("--loss", default="mse", choices=["mse", "huber"])
    p.add_argument("--huber-delta", type=float, default=0.01)
    p.add_argument("--energy-weight", type=float, default=1.0)
    p.add_argument("--force-weight", type=float, default=1.0)
    p.add_argument("--stress-weight", type=float, default=0.01)
    p.add_argument("--fidelity-weight", action="append", help="FIDELITY=W: loss weight of that fidelity's labels")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights (0: off; e.g. 0.99)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "plateau", "constant"])
    p.add_argument("--patience", type=int, default=None, help="early stopping: epochs without improvement")
    p.add_argument("--target-fidelity", default=None, help="fidelity whose validation loss selects best.pt")
    p.add_argument("--init-from", default=None, help="checkpoint to fine-tune (ours, or from import-sevenn)")
    p.add_argument("--new-fidelity", action="append", help="NEW=SOURCE: add fidelity NEW, started from SOURCE")
    p.add_argument("--freeze", default="none", choices=["none", "fidelity"],
                   help="fidelity: train only the fidelity-conditioned linears and the readout")
    p.add_argument("--strategy", default=None, choices=["mf", "single", "transfer", "delta", "multihead", "meta",
                                                        "finetune-mf0"],
                   help="multi-fidelity strategy (matched steps over all stages; see pipeline.train.strategies)")
    p.add_argument("--high", default=None, help="--strategy: the high (target) fidelity, e.g. gpaw-r2scan")
    p.add_argument("--low", default=None, help="--strategy: the low fidelity, e.g. gpaw-pbe")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-fidelity energy/force/stress errors of a checkpoint on frames")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--frames", required=True, help="frames dataset with labels")
    p.add_argument("--fidelity", default=None, help="predict every frame at this model fidelity "
                   "(e.g. r2scan for frames labelled gpaw-r2scan); default: each frame's own")
    p.add_argument("--out", default=None, help="Parquet file of per-frame errors")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=os.environ.get("MFHULL_DEVICE", "cpu"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("screen", help="relax candidates and report E_hull")
    p.add_argument("--candidates", nargs="+", required=True, help="CIF/POSCAR/extxyz/JSON files or folders")
    p.add_argument("--references", required=True, help="entries dataset of the reference phases")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--thermo-type", required=True, help="R2SCAN, GGA_GGA+U, GGA_GGA+U_R2SCAN or raw")
    p.add_argument("--fidelity", required=True, help="fidelity of the references (and the report)")
    p.add_argument("--model-fidelity", default=None, help="the potential's fidelity (default: --fidelity)")
    p.add_argument("--truth", default=None, help="entries dataset with DFT energies of the candidates")
    p.add_argument("--out", required=True)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default=os.environ.get("MFHULL_DEVICE", "cpu"))
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("hull", help="reference hull (E_hull of every entry) of one thermo type")
    p.add_argument("--entries", required=True)
    p.add_argument("--thermo-type", required=True)
    p.add_argument("--chemsys", default=None)
    p.add_argument("--fidelity", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_hull)

    p = sub.add_parser("import-sevenn", help="convert a SevenNet checkpoint (default: the pretrained 7net-mf-0 "
                       "shipped with the sevenn extra) into an mfhull checkpoint")
    p.add_argument("--checkpoint", default="7net-mf-0", help="a sevenn checkpoint path or shipped name")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_sevenn)

    p = sub.add_parser("demo", help="offline demo on data/demo: train, screen, report (Prefect, embedded API)")
    p.add_argument("--out", default=None, type=Path, help="default: $MFHULL_REPORTS/demo (reports/demo)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's setting)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    _env_defaults()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _load_train_config(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"mfhull {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
