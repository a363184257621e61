"""Prefect tasks: thin wrappers that pass paths in and out and call the library (no science here).

Caching is keyed on file contents plus settings (flows.policies); retries only for errors no other layer
handles; MP calls hold a slot of the global concurrency limit ``mp-api``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from flows.policies import content_cache_key, retry_unless_permanent

#: Global concurrency limit held while talking to the Materials Project (`prefect gcl create mp-api --limit 2`).
MP_LIMIT = "mp-api"
#: Prefect Secret block read when MP_API_KEY is not in the environment.
MP_SECRET_BLOCK = "mp-api-key"


@task(name="import-files", task_run_name="import-{path}")
def import_files(path: str, out_dir: str, kind: str = "auto") -> dict[str, Any]:
    from pipeline.sources.files import import_to_dataset

    return {"path": path, **import_to_dataset(path, out_dir, kind=kind)}


def mp_key() -> Any:
    """MP_API_KEY from the environment, else the Prefect Secret block ``mp-api-key``, else None."""
    from pipeline.config import Secret, mp_api_key

    key = mp_api_key()
    if key is not None:
        return key
    try:
        from prefect.blocks.system import Secret as SecretBlock

        value = SecretBlock.load(MP_SECRET_BLOCK).get()
    except (ValueError, RuntimeError, OSError):  # no such block / no API: no key
        return None
    return Secret(value) if value else None


def has_mp_key() -> bool:
    return mp_key() is not None


@task(name="ingest-mp", task_run_name="ingest-mp-{out_dir}", retries=2, retry_delay_seconds=60,
      retry_condition_fn=retry_unless_permanent)
def ingest_mp(chemsys: list[str], out_dir: str) -> dict[str, Any]:
    from prefect.concurrency.sync import concurrency

    from pipeline.sources.mp import ingest_mp as run
    from pipeline.sources.mp.mp_client import MPResterClient

    with concurrency(MP_LIMIT, occupy=1):
        report = run(chemsys, out_dir, client=MPResterClient.from_key(mp_key()))
    return dict(report.__dict__) if hasattr(report, "__dict__") else {"report": str(report)}


@task(name="gather-entries", cache_key_fn=content_cache_key("paths"), persist_result=True)
def gather_entries(paths: list[str], out_dir: str) -> dict[str, Any]:
    from pipeline.campaign import gather_entries as run

    return run(paths, out_dir)


@task(name="make-candidates", cache_key_fn=content_cache_key("files", "prototypes", "references"),
      persist_result=True)
def make_candidates(chemsys: str, out_dir: str, files: list[str] | None = None, substitute: bool = False,
                    prototypes: str | None = None, references: str | None = None, max_candidates: int | None = 20,
                    seed: int = 0) -> dict[str, Any]:
    from pipeline.campaign import make_candidates as run

    return run(chemsys, out_dir, files=files or (), substitute=substitute, prototypes=prototypes,
               references=references, max_candidates=max_candidates, seed=seed)


@task(name="pretrained-model", cache_key_fn=content_cache_key(), persist_result=True)
def pretrained_model(name: str, out_dir: str) -> str:
    from pipeline.campaign import pretrained_checkpoint

    return str(pretrained_checkpoint(name, out_dir))


@task(name="train")
def train(frames_dir: str, out_dir: str, preset: str = "small", epochs: int = 100, batch_size: int = 8,
          lr: float = 5e-3, seed: int = 0, device: str = "cpu",
          label_policy: dict[str, list[str]] | None = None, devices: int = 1, stream: bool | None = None,
          max_atoms: int | None = None, sampling_weights: dict[str, float] | None = None, accumulate: int = 1,
          precision: str = "float32", workers: int = 0, checkpoint_every: int = 0) -> str:
    """Train (resuming from out_dir/last.pt if present); returns the best checkpoint's path.

    ``devices`` > 1 (0: every visible GPU with ``device='cuda'``): this task launches torchrun with that many
    processes, each running ``mfhull train`` (the library's DDP path); otherwise it trains in this process."""
    from pipeline.model import preset as model_preset
    from pipeline.train import TrainConfig
    from pipeline.train import train as run
    from pipeline.train.launch import launch, resolve_devices, train_argv

    policy = {k: tuple(v) for k, v in label_policy.items()} if label_policy else None
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, label_policy=policy,
                      stream=stream, max_atoms=max_atoms, sampling_weights=sampling_weights, accumulate=accumulate,
                      precision=precision, num_workers=workers, checkpoint_every=checkpoint_every)
    n = resolve_devices(devices, device)
    if n > 1:
        code = launch(n, train_argv(frames_dir, out_dir, preset, cfg, devices=n), cpu=not device.startswith("cuda"))
        if code != 0:
            raise RuntimeError(f"{n}-process training exited with code {code} (see the log above)")
        return str(Path(out_dir) / "best.pt")
    result = run(Path(frames_dir), model_preset(preset), cfg, out_dir)
    return str(result.best)


@task(name="evaluate")
def evaluate(checkpoint: str, frames_dir: str) -> dict[str, float]:
    from pipeline.io import read_table
    from pipeline.model import load_checkpoint
    from pipeline.schema import FRAMES_SCHEMA
    from pipeline.train import evaluate_frames

    return evaluate_frames(load_checkpoint(checkpoint), read_table(frames_dir, FRAMES_SCHEMA))


@task(name="relax-batch", task_run_name="relax[{fidelity}]-{role}-{ids[0]}+{batch_size}",
      cache_key_fn=content_cache_key("candidates_path", "references_dir", "checkpoint"), persist_result=True)
def relax_batch(candidates_path: str, references_dir: str | None, role: str, ids: list[str], checkpoint: str,
                fidelity: str, relax_dir: str, thermo_type: str = "raw", reference_window: float | None = None,
                model_fidelity: str | None = None, fmax: float = 0.05, steps: int = 500, device: str = "cpu",
                batch_size: int = 0) -> dict[str, int]:
    """Relax the ``ids`` of one role (candidate / reference) into the relaxation store (batch_size: run name)."""
    from pipeline.campaign import relax_batch as run
    from pipeline.campaign import structures_to_relax

    todo = structures_to_relax(candidates_path, references_dir if role == "reference" else None,
                               thermo_type=thermo_type, fidelity=fidelity, reference_window=reference_window)
    wanted = set(ids)
    items = [(i, s) for i, s in todo[role] if i in wanted]
    return run(items, checkpoint, fidelity, relax_dir, role=role, model_fidelity=model_fidelity, fmax=fmax,
               steps=steps, device=device)


@task(name="screen", task_run_name="screen-{fidelity}",
      cache_key_fn=content_cache_key("candidates", "references_dir", "checkpoint", "truth_dir"), persist_result=True)
def screen(candidates: list[str], references_dir: str, checkpoint: str, thermo_type: str, fidelity: str,
           out_dir: str, truth_dir: str | None = None, model_fidelity: str | None = None,
           fmax: float = 0.05, steps: int = 500, device: str = "cpu", reference_window: float | None = None) -> dict[str, str]:
    """Screen candidate files (CIF/POSCAR/extxyz/JSON) or a candidates Parquet written by make-candidates."""
    from pipeline.campaign import read_candidates
    from pipeline.hull.candidates import candidates_table, read_candidate_files
    from pipeline.io import read_table
    from pipeline.relax.relaxer import RelaxSettings
    from pipeline.schema import ENTRIES_SCHEMA
    from pipeline.screening import screen as run

    if len(candidates) == 1 and candidates[0].endswith(".parquet"):
        table, rejects = read_candidates(candidates[0])
    else:
        cands = read_candidate_files(candidates)
        table, rejects = candidates_table(cands.rows), cands.rejects
    truth = read_table(truth_dir, ENTRIES_SCHEMA) if truth_dir and Path(truth_dir).exists() else None
    files = run(table, read_table(references_dir, ENTRIES_SCHEMA), checkpoint=checkpoint,
                thermo_type=thermo_type, fidelity=fidelity, model_fidelity=model_fidelity, out_dir=out_dir,
                truth=truth, candidate_rejects=rejects, relax=RelaxSettings(fmax=fmax, steps=steps),
                device=device, reference_window=reference_window)
    return {k: str(v) for k, v in files.items()}


@task(name="publish-artifacts", task_run_name="artifacts-{fidelity}")
def publish(files: dict[str, str], fidelity: str, title: str) -> None:
    """Markdown (headline metrics) and tables (top candidates, failures) as artifacts of this run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from pipeline.campaign import failures, top_candidates

    key = "".join(c if c.isalnum() else "-" for c in f"{title}-{fidelity}".lower())[:60].strip("-")
    markdown = Path(files["summary_md"]).read_text() if "summary_md" in files else f"# {title}\n"
    create_markdown_artifact(markdown, key=f"{key}-summary", description=f"{title}: headline metrics")
    top = top_candidates(files["report"])
    create_table_artifact(top or [{"candidate_id": "none"}], key=f"{key}-top",
                          description=f"{title}: lowest predicted E_hull (eV/atom)")
    fails = failures(files["report"])
    create_table_artifact(fails or [{"candidate_id": "none", "error": ""}], key=f"{key}-failures",
                          description=f"{title}: candidates that failed ({len(fails)})")
