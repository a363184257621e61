"""``mfhull``: one console script; each sub-command calls the same library functions the Prefect flows call.

    mfhull import PATH... --out DIR          real files (extxyz, ASE db, entries JSON, .res, MatPES, task docs)
    mfhull ingest-mp CHEMSYS... --out DIR    Materials Project (needs MP_API_KEY)
    mfhull train --frames DIR --out DIR      multi-fidelity potential (or --config train.yaml; --strategy S)
    mfhull evaluate --checkpoint C --frames F   per-fidelity errors (+ per-frame Parquet with --out)
    mfhull screen ...                        relax candidates, E_hull vs DFT and all-model hulls, report
    mfhull hull --entries DIR ...            reference hull table of one thermo type
    mfhull import-sevenn --out FILE          pretrained SevenNet-MF-0 (PBE + r2SCAN) as an mfhull checkpoint
    mfhull demo                              the offline demo (Prefect flow on the embedded API)
    mfhull campaign --chemsys Li-Ni-O ...    ingest -> candidates -> model -> screen -> report (Prefect flow)
    mfhull loop --pool P --rounds K --budget N   active learning: screen -> pick -> label -> fine-tune
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
    from pipeline.threads import set_env_defaults

    set_env_defaults()  # OMP_WAIT_POLICY=PASSIVE, MFHULL_THREADS (see pipeline.threads)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))
    # the embedded API's 20 s start-up limit is too short on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # library loggers (epochs, failed relaxations, rejected records) reach the Prefect UI / run logs


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.sources.files import IMPORTERS, import_paths

    if args.kind != "auto" and args.kind not in IMPORTERS:
        raise ValueError(f"--kind {args.kind!r}: unknown; use auto or one of {', '.join(sorted(IMPORTERS))}")
    options = {k: v for k, v in (("fidelity", args.fidelity), ("limit", args.limit)) if v is not None}
    per_path, summary = import_paths(args.paths, args.out, kind=args.kind, **options)
    _print(per_path)
    print(summary, file=sys.stderr)
    return 0


def cmd_ingest_mp(args: argparse.Namespace) -> int:
    from pipeline.sources.mp import ingest_mp
    from pipeline.sources.mp.mp_client import MPAuthError

    try:
        report = ingest_mp(args.chemsys, args.out, timeout=args.timeout)
    except MPAuthError as exc:  # missing / rejected key: the message says what to do (and never shows the key)
        print(f"mfhull ingest-mp: error: {exc}", file=sys.stderr)
        return 2
    _print(report.__dict__)
    print(report.summary(), file=sys.stderr)
    if report.failed and report.units_done == 0:
        first = next(iter(report.failed.values()))
        print(f"mfhull ingest-mp: error: all {len(report.failed)} units failed (first: {first[:300]})",
              file=sys.stderr)
        return 1
    return 0


def _parse_pairs(items: list[str] | None, option: str, value=str, expected: str = "NAME=VALUE") -> dict[str, Any]:
    """['a=1', 'b=2'] -> {'a': value('1'), ...} with a one-line error naming the option."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, _, val = str(item).partition("=")
        if not key.strip() or not val.strip():
            raise ValueError(f"{option} {item!r}: expected {expected}")
        try:
            out[key.strip().lower()] = value(val.strip())
        except ValueError as exc:
            raise ValueError(f"{option} {item!r}: {exc}") from None
    return out


def _load_train_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse the command line; for ``train``, options with a YAML/JSON config file (``--config``) as defaults: keys are the option
    names (``batch-size`` or ``batch_size``); flags on the command line win."""
    import yaml

    first = parser.parse_args(argv)
    if not getattr(first, "config", None):
        return first
    path = Path(first.config)  # checked to be a file by its argparse type
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


def _labels(text: str) -> tuple[str, ...]:
    """'energy,forces' -> ('energy', 'forces') (a --labels value)."""
    return tuple(x.strip() for x in text.split(","))


def train_config_from_args(args: argparse.Namespace):
    from pipeline.train import LossWeights, TrainConfig
    from pipeline.train.finetune import FINETUNE_LR

    lr = args.lr
    if lr is None:
        lr = FINETUNE_LR if args.init_from or (getattr(args, "strategy", None) or "").startswith("finetune-mf0") \
            else 5e-3
    return TrainConfig(
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
        device=args.device, label_policy=_parse_pairs(args.labels, "--labels", _labels, expected="FIDELITY=label[,label...]") or None, val_fraction=args.val_fraction,
        loss=args.loss, huber_delta=args.huber_delta, ema_decay=args.ema_decay, warmup_steps=args.warmup_steps,
        scheduler=args.scheduler, patience=args.patience, target_fidelity=args.target_fidelity,
        fidelity_weights=_parse_pairs(args.fidelity_weight, "--fidelity-weight", float) or None,
        fidelity_prior=args.fidelity_prior, init_from=args.init_from, new_fidelities=_parse_pairs(args.new_fidelity, "--new-fidelity") or None,
        freeze=args.freeze, weights=LossWeights(args.energy_weight, args.force_weight, args.stress_weight),
        stream=args.stream, max_atoms=args.max_atoms, max_edges=args.max_edges,
        sampling_weights=_parse_pairs(args.sampling_weight, "--sampling-weight", float) or None,
        accumulate=args.accumulate, precision=args.precision, num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
        gap_pairs=_parse_pairs(getattr(args, "gap_pair", None), "--gap-pair", expected="HIGH=LOW") or None,
        gap_weight=getattr(args, "gap_weight", 0.0),
        borrow_forces=_parse_pairs(getattr(args, "borrow_forces", None), "--borrow-forces",
                                   expected="HIGH=LOW") or None,
    )


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from pipeline.cli_args import read_input_table
    from pipeline.io import write_json_atomic
    from pipeline.model import MFPotential, preset
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train import train
    from pipeline.train.launch import launch, under_torchrun
    from pipeline.train.trainer import use_stream

    if not args.frames or not args.out:
        raise ValueError("--frames and --out are required (on the command line or in --config)")
    cfg = train_config_from_args(args)
    if args.devices > 1 and not under_torchrun():  # this process becomes the launcher of N ranks
        if args.strategy:
            raise ValueError("--strategy runs in one process: drop --devices")
        return launch(args.devices, args.argv, verbose=args.verbose, cpu=not str(args.device).startswith("cuda"))
    if not args.strategy and use_stream(Path(args.frames), cfg, int(os.environ.get("WORLD_SIZE", "1"))):
        _threads_for(MFPotential(preset(args.preset)))
        result = train(Path(args.frames), preset(args.preset), cfg, args.out, resume=not args.restart)
        if int(os.environ.get("RANK", "0")) == 0:
            _print({"best": result.best, "last": result.last, "steps": result.steps, "data_hash": result.data_hash,
                    "final": result.history[-1] if result.history else None})
        return 0
    frames = read_input_table("--frames", args.frames, FRAMES_SCHEMA)
    if frames.num_rows == 0:
        raise ValueError(f"--frames {args.frames}: no frames to train on")
    model_config = preset(args.preset)
    _threads_for(MFPotential(model_config))
    if args.strategy:
        from pipeline.train.strategies import run_strategy

        if not (args.high and args.low) and args.strategy != "single":
            raise ValueError("--strategy needs --high and --low fidelities")
        steps = args.max_steps or args.epochs * -(-frames.num_rows // args.batch_size)
        res = run_strategy(args.strategy, frames, model_config, dataclasses.replace(cfg, init_from=None),
                           args.out, high=args.high, low=args.low or args.high, steps=steps,
                           init_from=args.init_from)
        summary = res.to_dict()
        write_json_atomic(Path(args.out) / "strategy.json", summary)
        _print(summary)
        return 0
    result = train(frames, model_config, cfg, args.out, resume=not args.restart)
    _print({"best": result.best, "last": result.last, "steps": result.steps, "data_hash": result.data_hash,
            "final": result.history[-1] if result.history else None})
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.cli_args import read_input_table
    from pipeline.io import write_table_atomic
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train.evaluation import FRAME_ERRORS_SCHEMA, frame_data_for, frame_errors, summarize

    model = _check_checkpoint(args.checkpoint)
    if args.device != "cpu":
        model = model.to(args.device)
    data = frame_data_for(model, read_input_table("--frames", args.frames, FRAMES_SCHEMA), args.fidelity)
    rows = frame_errors(model, data, batch_size=args.batch_size, device=args.device)
    summary = summarize(rows)
    if args.out:
        import pyarrow as pa

        write_table_atomic(pa.Table.from_pylist(rows, schema=FRAME_ERRORS_SCHEMA), args.out)
        summary["per_frame"] = str(args.out)
    _print(summary)
    return 0


def _threads_for(model: Any) -> int:
    """torch threads for this model (pipeline.threads: one for small models, MFHULL_THREADS overrides)."""
    from pipeline.threads import configure_torch_threads

    return configure_torch_threads(sum(p.numel() for p in model.parameters()))


def _check_checkpoint(path: Path) -> Any:
    """The model of an mfhull checkpoint; one-line ValueError naming ``path`` when it is not loadable."""
    from pipeline.model import load_checkpoint

    try:
        return load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for broken files
        text = str(exc).strip().splitlines()
        raise ValueError(f"--checkpoint {path}: not a readable mfhull checkpoint ({type(exc).__name__}: "
                         f"{text[0][:200] if text else ''})") from None


def cmd_screen(args: argparse.Namespace) -> int:
    from pipeline.cli_args import read_input_table
    from pipeline.hull.candidates import candidates_table, read_candidate_files
    from pipeline.relax.relaxer import RelaxSettings
    from pipeline.schema import ENTRIES_SCHEMA
    from pipeline.screening import failure_table, screen

    references = read_input_table("--references", args.references, ENTRIES_SCHEMA)
    truth = read_input_table("--truth", args.truth, ENTRIES_SCHEMA) if args.truth else None
    _threads_for(_check_checkpoint(args.checkpoint))
    cands = read_candidate_files(args.candidates)
    files = screen(
        candidates_table(cands.rows), references, checkpoint=args.checkpoint,
        thermo_type=args.thermo_type, fidelity=args.fidelity, model_fidelity=args.model_fidelity,
        out_dir=args.out, truth=truth, candidate_rejects=cands.rejects,
        relax=RelaxSettings(fmax=args.fmax, steps=args.steps, engine=args.relax_engine, max_atoms=args.batch_atoms),
        reference_window=args.reference_window, device=args.device,
    )
    _print({k: str(v) for k, v in files.items()})
    print(failure_table(files["report"]), file=sys.stderr)
    return 1 if _all_failed(files) else 0


def _all_failed(files: dict[str, Path]) -> bool:
    """True when no candidate got a prediction (every row failed, none merely suspect)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(files["report"], columns=["error"]).column("error").to_pylist()
    return bool(rows) and all(e is not None and not e.startswith("suspect:") for e in rows)


def cmd_hull(args: argparse.Namespace) -> int:
    from pipeline.cli_args import read_input_table
    from pipeline.hull import build_reference_hull
    from pipeline.io import write_table_atomic
    from pipeline.schema import ENTRIES_SCHEMA

    hull = build_reference_hull(read_input_table("--entries", args.entries, ENTRIES_SCHEMA), args.thermo_type, chemsys=args.chemsys,
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
    from pipeline.model import MFPotential, preset

    _threads_for(MFPotential(preset("small")))  # the demo trains and relaxes with the small preset: one thread
    out = args.out or Settings().reports_dir / "demo"
    summary = demo_flow(out_dir=str(out), epochs=args.epochs)
    _print(summary)
    return 0


def cmd_campaign(args: argparse.Namespace) -> int:
    from flows.campaign import campaign_flow
    from pipeline.threads import configure_torch_threads

    configure_torch_threads(None)  # the model is chosen inside the flow: threads from the CPUs free now

    if not args.candidates and not args.substitute:
        raise ValueError("give --candidates FILE/DIR... or --substitute (prototype substitution)")
    summary = campaign_flow(
        chemsys=args.chemsys, entries=args.entries, candidates=args.candidates, substitute=args.substitute,
        prototypes=args.prototypes, truth=args.truth, checkpoint=args.checkpoint, model=args.model,
        train=args.train, train_epochs=args.train_epochs, fidelities=args.fidelity,
        model_fidelity=args.model_fidelity, thermo_types=_parse_pairs(args.thermo_type, "--thermo-type", expected="FIDELITY=THERMO_TYPE"),
        max_candidates=args.max_candidates, reference_window=args.reference_window, fmax=args.fmax, steps=args.steps, batch_size=args.batch_size,
        dask_address=args.dask_address, dask_workers=args.dask_workers, device=args.device,
        out_dir=str(args.out) if args.out else None,
    )
    _print(summary)
    return 0


def add_campaign_parser(sub: Any) -> None:
    from pipeline.cli_args import float_range, int_range

    p = sub.add_parser(
        "campaign", help="one screening campaign: ingest -> candidates -> model -> screen -> report (Prefect flow)",
        description="Reference entries from --entries (or the Materials Project when MP_API_KEY is set and no "
                    "--entries are given), candidates from --candidates files and/or --substitute, the model from "
                    "--checkpoint, the pretrained --model, or --train; screened at each --fidelity. Output: "
                    "OUT/screen-<fidelity>/ (report.parquet, summary.{json,md,parquet}, plots), "
                    "OUT/campaign_summary.json. Re-runs reuse every unchanged step (Prefect cache on file content).")
    p.add_argument("--chemsys", required=True, help="target chemical system, e.g. Li-Ni-O")
    p.add_argument("--entries", nargs="+", default=None, metavar="PATH",
                   help="reference entries: entry JSON / .res / task-doc files or an entries dataset folder "
                        "(default: ingest from MP, which needs MP_API_KEY)")
    p.add_argument("--candidates", nargs="+", default=None, metavar="PATH",
                   help="candidate structures: CIF/POSCAR/extxyz/pymatgen-JSON files or folders")
    p.add_argument("--substitute", action="store_true",
                   help="make candidates by prototype substitution into --chemsys (prototypes: --prototypes, "
                        "default the reference entries)")
    p.add_argument("--prototypes", nargs="+", default=None, metavar="PATH",
                   help="entries files/datasets whose structures serve as prototypes for --substitute")
    p.add_argument("--max-candidates", type=int_range(1), default=20,
                   help="at most this many substituted candidates (seeded sample; default 20)")
    p.add_argument("--truth", nargs="+", default=None, metavar="PATH",
                   help="DFT entries of the candidates (files or dataset), for E_hull error metrics")
    p.add_argument("--checkpoint", default=None, help="an mfhull checkpoint (.pt) to screen with")
    p.add_argument("--model", default="7net-mf-0", choices=["7net-mf-0", "sevennet-mf-0"],
                   help="pretrained model used when no --checkpoint / --train (needs the sevenn extra; "
                        "converted once into models/7net-mf-0.pt)")
    p.add_argument("--train", action="store_true",
                   help="train a model on the ingested frames: on the gpu pool (deployment train/train-gpu) when "
                        "PREFECT_API_URL is set, else here")
    p.add_argument("--train-epochs", type=int_range(1), default=100, help="epochs for --train (default 100)")
    p.add_argument("--fidelity", nargs="+", default=["r2scan"], metavar="FIDELITY",
                   help="fidelities to screen at: r2scan, pbe, gpaw-r2scan, gpaw-pbe... (default r2scan)")
    p.add_argument("--model-fidelity", default=None,
                   help="the model's fidelity head to use for every --fidelity (default: the same name)")
    p.add_argument("--thermo-type", action="append", metavar="FIDELITY=TYPE",
                   help="thermo type of the reference hull per fidelity, one of R2SCAN, GGA_GGA+U, "
                        "GGA_GGA+U_R2SCAN, raw (default: r2scan=R2SCAN, pbe=GGA_GGA+U, others raw)")
    p.add_argument("--reference-window", type=float_range(0), default=None,
                   help="reference phases within this E_hull (eV/atom) are relaxed too, for the all-model hull "
                        "(default: all of them when there are <= 50, else 0.1)")
    p.add_argument("--fmax", type=float_range(0, low_open=True), default=0.05, help="relaxation force tolerance (eV/A, default 0.05)")
    p.add_argument("--steps", type=int_range(1), default=500,
                   help="relaxation step limit (default 500, as matbench-discovery)")
    p.add_argument("--batch-size", type=int_range(1), default=4, help="candidates per relaxation batch (Dask task)")
    p.add_argument("--dask-address", default=os.environ.get("MFHULL_DASK_ADDRESS"),
                   help="Dask scheduler address (tcp://host:8786) for the relaxation batches; default a "
                        "LocalCluster ($MFHULL_DASK_ADDRESS)")
    p.add_argument("--dask-workers", type=int_range(1), default=2,
                   help="worker processes of the LocalCluster (one thread each; default 2)")
    p.add_argument("--device", default=os.environ.get("MFHULL_DEVICE", "cpu"), choices=["cpu", "cuda"],
                   help="torch device for relaxation ($MFHULL_DEVICE, default cpu)")
    p.add_argument("--out", default=None, type=Path,
                   help="output folder (default: $MFHULL_REPORTS/campaign-<chemsys>)")
    p.set_defaults(func=cmd_campaign)


def _device(value: str) -> str:
    """cpu, cuda, cuda:N or mps (checked here; whether it is present is checked when the model is built)."""
    import re

    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device (cpu, cuda, cuda:N, mps)")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): 'mfhull CMD: error: argument --X: <why> (see --help)'."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__
    from pipeline.cli_args import (
        existing_file,
        existing_path,
        float_range,
        int_or_auto,
        int_range,
        out_dir,
        out_file,
    )

    parser = _Parser(prog="mfhull", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress (INFO) and show the full traceback of an unexpected error")
    parser.add_argument("--version", action="version", version=f"mfhull {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    device_help = "torch device: cpu, cuda, cuda:N or mps (default: $MFHULL_DEVICE or cpu)"

    p = sub.add_parser("import", help="import real files into frames/entries Parquet datasets")
    p.add_argument("paths", nargs="+", type=existing_path, help="files or folders (folders are read recursively)")
    p.add_argument("--out", required=True, type=out_dir,
                   help="dataset folder: frames/, entries/ and rejects/ are appended there")
    p.add_argument("--kind", default="auto",
                   help="auto (by content), extxyz, ase-db, res, entries-json, matpes, mp-element-refs, "
                        "task-docs, wbm, vasprun, vasp-bundle (default: auto)")
    p.add_argument("--fidelity", default=None,
                   help="fidelity name for files that do not say (e.g. an ASE db or a plain extxyz), e.g. pbe")
    p.add_argument("--limit", type=int_range(1), default=None, help="import at most this many records per file (>= 1)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("ingest-mp", help="ingest Materials Project entries and trajectories (MP_API_KEY)")
    p.add_argument("chemsys", nargs="+", help="chemical systems, e.g. Li-Ni-O")
    p.add_argument("--out", required=True, type=out_dir, help="dataset folder for entries/, frames/, rejects/")
    p.add_argument("--timeout", type=float_range(0, 3600, low_open=True), default=60.0,
                   help="seconds any one network call may take before it counts as failed (default: 60)")
    p.set_defaults(func=cmd_ingest_mp)

    p = sub.add_parser("train", help="train the multi-fidelity potential on a frames dataset")
    p.add_argument("--config", default=None, type=existing_file,
                   help="YAML/JSON file of these options (keys = option names); flags on the command line win")
    p.add_argument("--frames", default=None, type=existing_path,
                   help="frames Parquet file or dataset folder (required here or in --config)")
    p.add_argument("--out", default=None, type=out_dir,
                   help="run folder: best.pt, last.pt, metrics.json (required here or in --config)")
    p.add_argument("--preset", default="small", choices=["small", "mf-bench", "sevennet-mf-0"],
                   help="model size preset (default: small)")
    p.add_argument("--epochs", type=int_range(1, 1_000_000), default=100, help="training epochs (>= 1; default: 100)")
    p.add_argument("--max-steps", type=int_range(1), default=None,
                   help="optimizer steps in all (overrides --epochs)")
    p.add_argument("--batch-size", type=int_range(1, 100_000), default=8,
                   help="structures per batch (>= 1; default: 8)")
    p.add_argument("--lr", type=float_range(0, 10, low_open=True), default=None,
                   help="learning rate of Adam (> 0; default: 5e-3, or 2e-4 with --init-from or --strategy "
                        "finetune-mf0*, SevenNet's fine-tuning recipe)")
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0, help="random seed (0 .. 2^32-1; default: 0)")
    p.add_argument("--val-fraction", type=float_range(0, 1, high_open=True), default=0.1,
                   help="fraction of structures held out for validation, in [0, 1) (default: 0.1)")
    p.add_argument("--device", type=_device, default=os.environ.get("MFHULL_DEVICE", "cpu"), help=device_help)
    p.add_argument("--labels", action="append",
                   help="FIDELITY=energy[,forces,stress]: labels used per fidelity (repeat per fidelity)")
    p.add_argument("--restart", action="store_true", help="ignore an existing last.pt instead of resuming")
    p.add_argument("--loss", default="mse", choices=["mse", "huber"], help="loss per label (default: mse)")
    p.add_argument("--huber-delta", type=float_range(0, low_open=True), default=0.01,
                   help="Huber transition, in the label's units (eV/atom, eV/A, eV/A^3; default: 0.01)")
    p.add_argument("--energy-weight", type=float_range(0), default=1.0, help="energy loss weight (default: 1)")
    p.add_argument("--force-weight", type=float_range(0), default=1.0, help="force loss weight (default: 1)")
    p.add_argument("--stress-weight", type=float_range(0), default=0.01, help="stress loss weight (default: 0.01)")
    p.add_argument("--fidelity-weight", action="append", help="FIDELITY=W: loss weight of that fidelity's labels")
    p.add_argument("--fidelity-prior", type=float_range(0), default=0.0,
                   help="weight of a prior keeping the fidelities' conditioned weights close, so a scarce fidelity "
                        "moves from the plentiful one only as far as its labels support (0: off; e.g. 0.1)")
    p.add_argument("--gap-pair", action="append",
                   help="HIGH=LOW: a loss term on the predicted HIGH - LOW energy of every structure labelled at "
                        "both (with --gap-weight; strategy mf-gap sets r2scan=pbe itself)")
    p.add_argument("--gap-weight", type=float_range(0), default=0.0,
                   help="weight of the --gap-pair loss term (0: off; strategy mf-gap: 1 when unset)")
    p.add_argument("--borrow-forces", action="append",
                   help="HIGH=LOW: HIGH also trains on the LOW forces of every structure it has no label for "
                        "(high-level energies + low-level forces; strategy mf-gap-lf sets it itself)")
    p.add_argument("--ema-decay", type=float_range(0, 1, high_open=True), default=0.0,
                   help="EMA decay of the weights, in [0, 1) (0: off; e.g. 0.99)")
    p.add_argument("--warmup-steps", type=int_range(0), default=0,
                   help="optimizer steps of linear learning-rate warm-up (default: 0)")
    p.add_argument("--scheduler", default="cosine", choices=["cosine", "plateau", "constant"])
    p.add_argument("--patience", type=int_range(1), default=None,
                   help="early stopping: epochs without improvement of the target fidelity (default: off)")
    p.add_argument("--target-fidelity", default=None, help="fidelity whose validation loss selects best.pt")
    p.add_argument("--init-from", default=None, help="checkpoint to fine-tune (ours, or from import-sevenn)")
    p.add_argument("--new-fidelity", action="append", help="NEW=SOURCE: add fidelity NEW, started from SOURCE")
    p.add_argument("--freeze", default="none", choices=["none", "fidelity"],
                   help="fidelity: train only the fidelity-conditioned linears and the readout")
    p.add_argument("--strategy", default=None, choices=["mf", "mf-prior", "mf-gap", "mf-gap-lf", "single", "transfer",
                                                        "delta", "multihead", "meta", "finetune-mf0",
                                                        "finetune-mf0-gap", "finetune-mf0-gap-lf"],
                   help="multi-fidelity strategy (matched steps over all stages; see pipeline.train.strategies)")
    p.add_argument("--high", default=None, help="--strategy: the high (target) fidelity, e.g. gpaw-r2scan")
    p.add_argument("--low", default=None, help="--strategy: the low fidelity, e.g. gpaw-pbe")
    p.add_argument("--devices", type=int_range(1, 1024), default=1,
                   help="training processes on this node, launched with torchrun (gloo on CPU, NCCL with --device "
                        "cuda: one GPU each); implies --stream (default: 1)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="stream --frames (a dataset folder) instead of loading it (default: above 200000 frames, "
                        "with --devices > 1, --max-atoms, --max-edges or --sampling-weight)")
    p.add_argument("--max-atoms", type=int_range(1), default=None,
                   help="streamed: atoms per micro-batch and process (instead of --batch-size structures)")
    p.add_argument("--max-edges", type=int_range(1), default=None,
                   help="streamed: estimated edges per micro-batch and process")
    p.add_argument("--sampling-weight", action="append",
                   help="FIDELITY=W: streamed: each epoch draws round(W x n) frames of that fidelity (default 1)")
    p.add_argument("--accumulate", type=int_range(1, 10_000), default=1,
                   help="micro-batches per optimizer step (loss = mean over all labelled items of the step)")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16", "tf32"],
                   help="bf16: autocast of the network (CUDA); tf32: TF32 matmuls (CUDA); energy sums, forces and "
                        "stress stay float32 (default: float32)")
    p.add_argument("--workers", type=int_range(0, 64), default=0,
                   help="streamed: DataLoader worker processes building graphs (default: 0)")
    p.add_argument("--checkpoint-every", type=int_range(0), default=0,
                   help="also write last.pt every N optimizer steps (resumes mid-epoch; default: 0 = per epoch)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-fidelity energy/force/stress errors of a checkpoint on frames")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="mfhull potential checkpoint (.pt)")
    p.add_argument("--frames", required=True, type=existing_path, help="frames Parquet file or dataset with labels")
    p.add_argument("--fidelity", default=None, help="predict every frame at this model fidelity "
                   "(e.g. r2scan for frames labelled gpaw-r2scan); default: each frame's own")
    p.add_argument("--out", default=None, type=out_file, help="Parquet file of per-frame errors")
    p.add_argument("--batch-size", type=int_range(1), default=16, help="structures per batch (default: 16)")
    p.add_argument("--device", type=_device, default=os.environ.get("MFHULL_DEVICE", "cpu"), help=device_help)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("screen", help="relax candidates and report E_hull")
    p.add_argument("--candidates", nargs="+", required=True, type=existing_path,
                   help="CIF/POSCAR/extxyz/JSON files or folders (every structure in them is one candidate)")
    p.add_argument("--references", required=True, type=existing_path,
                   help="entries Parquet file or dataset of the reference phases")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="mfhull potential checkpoint (.pt)")
    p.add_argument("--thermo-type", required=True, help="R2SCAN, GGA_GGA+U, GGA_GGA+U_R2SCAN or raw")
    p.add_argument("--fidelity", required=True, help="fidelity of the references (and the report), e.g. r2scan")
    p.add_argument("--model-fidelity", default=None, help="the potential's fidelity (default: --fidelity)")
    p.add_argument("--truth", default=None, type=existing_path,
                   help="entries dataset with DFT energies of the candidates (for metrics)")
    p.add_argument("--out", required=True, type=out_dir, help="report folder")
    p.add_argument("--fmax", type=float_range(0, 100, low_open=True), default=0.05,
                   help="force convergence of the relaxation, eV/Angstrom (> 0; default: 0.05, as matbench-discovery)")
    p.add_argument("--steps", type=int_range(0, 1_000_000), default=500,
                   help="optimizer step limit per structure (>= 0; 0 = single point; default: 500)")
    p.add_argument("--relax-engine", default="auto", choices=["auto", "batched", "ase"],
                   help="batched FIRE relaxer or the ASE reference path (auto: batched)")
    p.add_argument("--batch-atoms", type=int_or_auto(1), default="auto",
                   help="atoms per batch of the batched relaxer, or 'auto' (default): measured on the device")
    p.add_argument("--reference-window", type=float_range(0), default=None,
                   help="recompute reference phases within this many eV/atom of the DFT hull with the model, for "
                        "the all-model hull (default: all of them when there are <= 50, else 0.1)")
    p.add_argument("--device", type=_device, default=os.environ.get("MFHULL_DEVICE", "cpu"), help=device_help)
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("hull", help="reference hull (E_hull of every entry) of one thermo type")
    p.add_argument("--entries", required=True, type=existing_path, help="entries Parquet file or dataset folder")
    p.add_argument("--thermo-type", required=True, help="R2SCAN, GGA_GGA+U, GGA_GGA+U_R2SCAN or raw")
    p.add_argument("--chemsys", default=None, help="restrict to one chemical system, e.g. Li-Ni-O (default: all)")
    p.add_argument("--fidelity", default=None, help="restrict to entries of one fidelity (default: all)")
    p.add_argument("--out", required=True, type=out_file, help="output Parquet file (E_hull per entry)")
    p.set_defaults(func=cmd_hull)

    p = sub.add_parser("import-sevenn", help="convert a SevenNet checkpoint (default: the pretrained 7net-mf-0 "
                       "shipped with the sevenn extra) into an mfhull checkpoint")
    p.add_argument("--checkpoint", default="7net-mf-0",
                   help="a sevenn checkpoint path or shipped name: 7net-mf-0, 7net-0 (default: 7net-mf-0); "
                        "files are loaded without running code (weights only, allow-listed globals)")
    p.add_argument("--out", required=True, type=out_file, help="output mfhull checkpoint file (.pt)")
    p.set_defaults(func=cmd_import_sevenn)

    p = sub.add_parser("demo", help="offline demo on data/demo: train, screen, report (Prefect, embedded API)")
    p.add_argument("--out", default=None, type=out_dir, help="default: $MFHULL_REPORTS/demo (reports/demo)")
    p.add_argument("--epochs", type=int_range(1, 100_000), default=None,
                   help="training epochs (>= 1; default: the demo's setting)")
    p.set_defaults(func=cmd_demo)
    add_campaign_parser(sub)
    from pipeline.active.cli import add_loop_parser

    add_loop_parser(sub)
    return parser


#: a temporary file older than this (s) in an output folder is a leftover of a killed run, not a live write
STALE_TMP_S = 600.0


def _clean_leftovers(args: argparse.Namespace) -> None:
    """Remove ``.*.tmp`` files that killed runs left in the output folder (and its dataset folders)."""
    from pipeline.io import remove_stale_tmp

    out = getattr(args, "out", None)
    if out is None:
        return
    folder = Path(out) if Path(out).is_dir() else Path(out).parent
    for sub in [folder, *(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []:
        for tmp in remove_stale_tmp(sub, older_than_s=STALE_TMP_S):
            logging.getLogger(__name__).info("removed %s, left by a killed run", tmp)


#: Errors whose message is meant for the user: printed as one line, exit 2.
def _user_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (ValueError, KeyError, OSError, ImportError, pa.ArrowException)


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Known errors (bad files, bad values, missing data) end as one line on stderr and
    exit 2; anything else as one line and exit 1 (``-v`` shows its traceback). Never a traceback otherwise."""
    try:
        _env_defaults()
    except ValueError as exc:  # a bad MFHULL_THREADS
        print(f"mfhull: error: {exc}", file=sys.stderr)
        return 2
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = _load_train_config(build_parser(), argv)
        args.argv = argv  # train --devices N relaunches the same command line under torchrun
    except SystemExit as exc:  # --help (0), a bad argument (2, its one line already printed) or a bad --config
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    # force: the CLI owns the root logger. Importing Prefect gives root its rich console handler, bound to the
    # stderr of that moment; library records would otherwise print through it (or fail on a closed stream).
    # Prefect's own loggers keep their handlers, so flow-run lines still show.
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:  # the level is the console's: flows route pipeline.* INFO to
        handler.setLevel(level)                   # Prefect's run logs through a logger level of their own
    from pipeline.quiet import RunNameFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RunNameFilter())
    if not args.verbose:  # one-line errors on the console: failed-run records keep their message, not the traceback
        from pipeline.quiet import NoTracebackFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(NoTracebackFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        _clean_leftovers(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mfhull {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place where errors become messages
        if args.verbose:
            raise
        print(f"mfhull {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _user_errors()) else 1


def _one_line(exc: BaseException) -> str:
    """The message of an error on one line; the type is named unless it is a plain ValueError/FileNotFoundError
    (whose messages in this project name the item and the problem)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    if isinstance(exc, (ValueError, FileNotFoundError, ConnectionError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
