"""Active-learning flow: each step of each round (label, train, screen, pick) is a Prefect task run.

The flow drives :class:`pipeline.active.loop.Loop`, whose state file makes it resumable: a re-run of a killed
or failed flow run with the same parameters skips the finished steps (no Prefect result cache is needed)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task


@task(name="loop-step", task_run_name="{name}")
def _step(name: str, fn: Any) -> Any:
    return fn()


@flow(name="active-loop")
def loop_flow(pool: str, out_dir: str, rounds: int = 3, budget: int = 5, ensemble: int = 3,
              strategy: str = "uncertainty", threshold: float = 0.0, seed: int = 0, steps: int = 20,
              base_steps: int = 150, predictor: str = "gap", initial_random: int = 2,
              initial: list[str] | None = None, score: bool = False, finetune_from: str = "base",
              residual: str = "gp", samples: int = 32) -> list[dict[str, Any]]:
    """Run the loop on a ``.res`` pool with precomputed labels; returns the per-round summaries."""
    from pipeline.active.loop import Loop, LoopConfig, initial_set
    from pipeline.active.pool import load_res_pool

    p, oracle = load_res_pool(pool)
    init = tuple(initial) if initial else tuple(initial_set(p, initial_random, seed))
    cfg = LoopConfig(rounds=rounds, budget=budget, ensemble=ensemble, strategy=strategy, threshold=threshold,
                     seed=seed, steps=steps, base_steps=base_steps, predictor=predictor, initial=init,
                     finetune_from=finetune_from, residual=residual, samples=samples)
    loop = Loop(p, oracle, cfg, out_dir, truth=oracle.truth() if score else None,
                step_runner=lambda name, fn: _step(name, fn))
    return loop.run().rounds
