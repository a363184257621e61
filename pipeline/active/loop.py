"""The active-learning loop: screen -> pick -> label -> fine-tune -> re-screen, resumable after a kill.

Round r (folder ``OUT/round-XX``) runs four steps; each writes its outputs atomically and then records itself
in ``OUT/state.json`` (atomic), so a killed run re-run with the same command skips the finished steps and
redoes at most the interrupted one (training itself resumes from its ``last.pt``):

1. ``label``  : round 0 labels the initial candidates, round r the picks of round r-1, through the oracle
                (``labels.parquet``: energy-only frames at the high fidelity; ``label_errors.json``);
2. ``train``  : M ensemble members, member k with its own seed and training split; round 0 trains from
                ``init_from`` checkpoints (or from scratch, ``base_steps``); round r >= 1 fine-tunes the ROUND-0
                members on all labels so far (``steps``; ``finetune_from='base'``, the default) ->
                ``models/m<k>/last.pt``. Every round is thus one fine-tune of the same start: stacking
                fine-tunes (``'previous'``, each round from round r-1's members, the old behaviour) let the
                members drift (on MP Li-Ni-O, 4 rounds x 20 steps at lr 5e-3: energy MAE of the unlabelled
                candidates 76 -> 84 meV/atom against the round-0 members' with the same labels);
3. ``screen`` : every member predicts every candidate; the fidelity-gap GP (:mod:`pipeline.active.gap`,
                ``residual='gp'``) puts each member's energies on the labels' scale and gives the residual's
                joint posterior; per member a hull of (DFT labels where known, its corrected predictions
                elsewhere) places every candidate against all the others (a vertex of the hull gets its negative
                distance below the others): mean over members = E_hull; ``samples`` joint draws of the residual
                per member, each through its own hull, give the E_hull sigma (the hull's own uncertainty
                included); one scale factor fitted on the held-out errors of earlier picks, with the GP's fit to
                the labels as its prior (:func:`pipeline.active.uncertainty.fit_scale`), calibrates it ->
                ``report.parquet``, ``summary.json``, ``coverage.png``;
                with ``strategy='lookahead'``, ``samples.npz`` keeps the joint draws (E_hull and energies per
                atom) for its pick;
4. ``pick``   : ``budget`` candidates by acquisition strategy (``picks.json``); the last round has no pick.

The screen step predicts at the pool's structures (single points, no relaxation). Predicted energy of a
candidate: ``direct`` = the high-fidelity head; ``gap`` = the candidate's low-fidelity DFT energy + the
models' (high - low) prediction; then the residual model: ``gp`` (default; above), ``shift`` (a per-element shift
fitted on the labels so far, the old behaviour: the E_hull sigma is then the members' spread alone), ``none``.

Why the GP (measured on MP Li-Ni-O, seed 0, random picks, 5 -> 21 labels): with the per-element shift the
E_hull MAE rose 34 -> 47 meV/atom while a hull of the members' energies alone (no DFT substituted) stayed at
19 meV/atom, and the round-0 members (no fine-tuning at all) rose too (34 -> 40): the rise came mostly from
mixing DFT labels with model energies whose gap error (~70 meV/atom after the shift, of changing sign between
metals and oxides) no per-element shift removes, not from the training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.active import acquisition
from pipeline.active.gap import DEFAULT, GapGP, fit_gap_gp
from pipeline.active.pool import Candidate, Label, Oracle, Pool, label_frames, structure_frame
from pipeline.active.uncertainty import (
    Calibration,
    composition_features,
    coverage,
    coverage_curve,
    ensemble_stats,
    fit_scale,
    gap_novelty,
    hull_distances,
    interval_halfwidth,
    plot_coverage,
)
from pipeline.frames import frames_table
from pipeline.io import read_table, write_json_atomic
from pipeline.io.atomic import atomic_path
from pipeline.io.parquet import write_table_atomic
from pipeline.report.metrics import stable_metrics

log = logging.getLogger(__name__)

STEPS = ("label", "train", "screen", "pick")
PREDICTORS = ("direct", "gap")
#: how the members' energies are put on the labels' scale: 'gp' = the fidelity-gap residual GP
#: (:mod:`pipeline.active.gap`), 'shift' = a per-element shift only, 'none' = as predicted
RESIDUALS = ("gp", "shift", "none")
#: where round r >= 1 starts its members: 'base' = the round-0 members (every round one fine-tune of the same
#: start on all labels so far), 'previous' = round r-1's members (fine-tunes stacked round after round), 'none' =
#: no training after round 0 (the labels enter only through the shift and the hull; a control)
FINETUNE_FROM = ("base", "previous", "none")


class LoopInterrupted(RuntimeError):
    """Raised after the step named in ``stop_after`` (tests and manual checkpoints)."""


@dataclass(frozen=True)
class LoopConfig:
    """Settings of one loop (everything that changes results; hashed into the state file)."""

    rounds: int = 3
    budget: int = 5
    ensemble: int = 3
    strategy: str = "uncertainty"
    threshold: float = 0.0
    seed: int = 0
    steps: int = 60
    base_steps: int = 300
    preset: str = "small"
    batch_size: int = 8
    lr: float = 5e-3
    val_fraction: float = 0.2
    predictor: str = "direct"
    interval: float = 0.9
    initial: tuple[str, ...] = ()
    knn: int = 5
    residual: str = "gp"
    samples: int = 32
    gp_length_prior: float = 0.5
    init_from: tuple[str, ...] = ()
    finetune_from: str = "base"
    fidelity_prior: float = 0.0

    def __post_init__(self) -> None:
        if self.rounds < 0 or self.budget < 0:
            raise ValueError("rounds and budget must be >= 0")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")
        if self.strategy not in acquisition.STRATEGIES:
            raise ValueError(f"strategy must be one of {acquisition.STRATEGIES}, got {self.strategy!r}")
        joint = self.ensemble * self.samples if self.residual == "gp" else self.ensemble
        if self.strategy == "lookahead" and joint < 2:
            raise ValueError(f"strategy lookahead needs >= 2 joint samples (ensemble x samples with the gp residual, "
                             f"else ensemble members), got {joint}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.steps < 1 or self.base_steps < 1:
            raise ValueError("steps and base_steps must be >= 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if not (self.gp_length_prior >= 0 and np.isfinite(self.gp_length_prior)):
            raise ValueError(f"gp_length_prior must be a finite number >= 0, got {self.gp_length_prior}")
        if self.samples < 0:
            raise ValueError(f"samples must be >= 0, got {self.samples}")
        if self.finetune_from not in FINETUNE_FROM:
            raise ValueError(f"finetune_from must be one of {FINETUNE_FROM}, got {self.finetune_from!r}")
        if not (self.fidelity_prior >= 0 and np.isfinite(self.fidelity_prior)):
            raise ValueError(f"fidelity_prior must be a finite number >= 0, got {self.fidelity_prior}")
        if self.init_from and len(self.init_from) not in (1, self.ensemble):
            raise ValueError(f"init_from: give 1 or {self.ensemble} checkpoints, got {len(self.init_from)}")
        object.__setattr__(self, "initial", tuple(self.initial))
        object.__setattr__(self, "init_from", tuple(str(p) for p in self.init_from))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["initial"], d["init_from"] = list(self.initial), list(self.init_from)
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LoopResult:
    out: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)


def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r:02d}"


class State:
    """``state.json``: the finished (round, step) pairs, tied to the config and pool they were made with."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.done: list[list[Any]] = []
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("key") != key:
                raise ValueError(f"{path.parent} holds a loop with other settings or another pool "
                                 f"(state key {data.get('key')} != {key}); use a new --out")
            self.done = [list(x) for x in data.get("done", [])]

    def is_done(self, r: int, step: str) -> bool:
        return [r, step] in self.done

    def mark(self, r: int, step: str, info: Mapping[str, Any] | None = None) -> None:
        self.done.append([r, step])
        write_json_atomic(self.path, {"key": self.key, "done": self.done, "last": {"round": r, "step": step,
                                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      **dict(info or {})}}, indent=1)


def _labels_of(out: Path, upto: int) -> pa.Table | None:
    parts = [read_table(round_dir(out, r) / "labels.parquet") for r in range(upto + 1)
             if (round_dir(out, r) / "labels.parquet").exists()]
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts) if parts else None


def _failed_of(out: Path, upto: int) -> dict[str, str]:
    errs: dict[str, str] = {}
    for r in range(upto + 1):
        p = round_dir(out, r) / "label_errors.json"
        if p.exists():
            errs.update(json.loads(p.read_text()))
    return errs


def _member_checkpoint(out: Path, r: int, k: int) -> Path:
    return round_dir(out, r) / "models" / f"m{k}" / "last.pt"


def _predict_members(paths: Sequence[Path], candidates: Sequence[Candidate], fidelities: Sequence[str]
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """{fidelity: (M, N) energies per atom}; a candidate the model cannot predict is NaN + an error."""
    from pipeline.model.checkpoint import load_checkpoint
    from pipeline.train.evaluation import predict

    n = len(candidates)
    out = {f: np.full((len(paths), n), np.nan) for f in fidelities}
    errors: dict[str, str] = {}
    rows = []
    for c in candidates:
        try:
            # energy 0: a placeholder the frame schema needs; predictions never read it
            rows.append(structure_frame(c.structure, frame_id=c.candidate_id, fidelity=fidelities[0], energy=0.0,
                                        source="candidate"))
        except Exception as exc:  # noqa: BLE001 - one bad candidate never stops the screen
            rows.append(None)
            errors[c.candidate_id] = f"unusable structure: {exc}"
    good = [k for k, r in enumerate(rows) if r is not None]
    if not good:
        return out, errors
    table = frames_table([rows[k] for k in good])
    nat = np.array([candidates[k].nsites for k in good], dtype=float)
    for m, path in enumerate(paths):
        model = load_checkpoint(path)
        for f in fidelities:
            try:
                preds = predict([(model, f)], table)
                out[f][m, good] = np.array([p["energy"] for p in preds]) / nat
            except Exception:  # noqa: BLE001 - fall back to one by one, so one failure stays one row
                for j, k in enumerate(good):
                    try:
                        out[f][m, k] = predict([(model, f)], table.slice(j, 1))[0]["energy"] / nat[j]
                    except Exception as exc:  # noqa: BLE001
                        errors[candidates[k].candidate_id] = f"prediction failed: {type(exc).__name__}: {exc}"
    return out, errors


def _shifted(est_m: np.ndarray, cands: Sequence[Candidate], labelled: Sequence[int],
             e_lab: np.ndarray) -> np.ndarray:
    """Each member's predictions + a per-element shift fitted on the labelled candidates (label - prediction;
    :func:`pipeline.train.finetune.fit_shift`): the composition-linear part of a member's error, which a few
    fine-tuning steps leave large on scarce high-fidelity data, is taken out before the hull is built."""
    from pipeline.train.finetune import apply_shift, fit_shift

    nums = [[s.specie.Z for s in c.structure] for c in cands]
    nat = np.array([c.nsites for c in cands], dtype=float)
    out = est_m.copy()
    for m in range(est_m.shape[0]):
        ok = [k for k in labelled if np.isfinite(est_m[m, k])]
        if not ok:
            continue
        shift = fit_shift([nums[k] for k in ok], (est_m[m, ok] * nat[ok]).tolist(), (e_lab[
            [labelled.index(k) for k in ok]] * nat[ok]).tolist())
        out[m] = est_m[m] + np.array([apply_shift(shift, z) for z in nums]) / nat
    return out


def _gp_corrected(est_m: np.ndarray, feats: np.ndarray, labelled: np.ndarray, e_lab: np.ndarray,
                  length_prior: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, GapGP]:
    """Each member's energies + the posterior mean of its residual (label - prediction) under the fidelity-gap
    GP (:mod:`pipeline.active.gap`), and the residual's posterior covariance over all candidates (0 on the
    labelled ones, whose energies are their labels)."""
    lab = np.where(labelled)[0]
    y = e_lab[None, lab] - est_m[:, lab]
    ok = np.all(np.isfinite(y), axis=0)
    lab, y = lab[ok], y[:, ok]
    gp = fit_gap_gp(feats[lab], y, length_prior=length_prior)
    same = (np.arange(len(feats))[:, None] == lab[None, :]).astype(float)
    mean, cov = gp.predict(feats[lab], y, feats, same)
    cov[labelled, :] = 0.0
    cov[:, labelled] = 0.0
    return est_m + mean, cov, gp


def _select_initial(pool: Pool, cfg: LoopConfig) -> list[str]:
    known = set(pool.ids())
    bad = [i for i in cfg.initial if i not in known]
    if bad:
        raise ValueError(f"initial candidates not in the pool: {bad[:5]}")
    return list(cfg.initial)


def initial_set(pool: Pool, n_random: int, seed: int) -> list[str]:
    """A natural start: the lowest-energy (low fidelity) phase of each element, plus ``n_random`` others."""
    chosen: list[str] = []
    for el in pool.elements():
        elem = [c for c in pool.candidates if c.composition.is_element and c.composition.elements[0].symbol == el]
        if elem and all(c.low_energy is not None for c in elem):
            chosen.append(min(elem, key=lambda c: c.low_energy / c.nsites).candidate_id)
    rest = sorted(set(pool.ids()) - set(chosen))
    rng = np.random.default_rng([seed, 7])
    take = min(n_random, len(rest))
    return chosen + [rest[k] for k in sorted(rng.choice(len(rest), size=take, replace=False))]


class Loop:
    """One active-learning campaign over a pool, written under ``out``."""

    def __init__(self, pool: Pool, oracle: Oracle, cfg: LoopConfig, out: str | Path, *,
                 truth: Mapping[str, Label] | None = None,
                 step_runner: Callable[[str, Callable[[], Any]], Any] | None = None):
        self.pool, self.oracle, self.cfg = pool, oracle, cfg
        self.out = Path(out)
        self.truth = dict(truth or {})
        self.step_runner = step_runner or (lambda name, fn: fn())
        self.cands = pool.by_id()
        pool_key = hashlib.sha256(json.dumps(sorted(pool.ids())).encode()).hexdigest()[:12]
        self.key = f"{cfg.key()}-{pool_key}"
        self._truth_e_hull: dict[str, float] | None = None

    # ---- steps --------------------------------------------------------------------------------------------
    def step_label(self, r: int) -> dict[str, Any]:
        d = round_dir(self.out, r)
        if r == 0:
            ids = _select_initial(self.pool, self.cfg)
        else:
            ids = json.loads((round_dir(self.out, r - 1) / "picks.json").read_text())["picks"]
        t0 = time.perf_counter()
        labels, errors = self.oracle.label([self.cands[i] for i in ids])
        table = label_frames(labels, self.pool.high) if labels else frames_table([])
        write_table_atomic(table, d / "labels.parquet")
        write_json_atomic(d / "label_errors.json", errors, indent=1)
        for cid, err in errors.items():
            log.warning("label %s: %s", cid, err)
        return {"labelled": len(labels), "failed": len(errors), "wall_s": round(time.perf_counter() - t0, 2)}

    def step_train(self, r: int) -> dict[str, Any]:
        from pipeline.model import preset
        from pipeline.train.trainer import TrainConfig, train

        cfg = self.cfg
        labels = _labels_of(self.out, r)
        frames = self.pool.low_frames if labels is None else pa.concat_tables([self.pool.low_frames, labels])
        model_config = preset(cfg.preset, fidelities=(self.pool.low, self.pool.high))
        t0 = time.perf_counter()
        if r > 0 and cfg.finetune_from == "none":
            return {"members": cfg.ensemble, "frames": 0, "wall_s": 0.0, "trained": False}
        for k in range(cfg.ensemble):
            if r > 0:
                start = 0 if cfg.finetune_from == "base" else r - 1
                init, steps = str(_member_checkpoint(self.out, start, k)), cfg.steps
            elif cfg.init_from:
                init, steps = cfg.init_from[k % len(cfg.init_from)], cfg.steps
            else:
                init, steps = None, cfg.base_steps
            tc = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, val_fraction=cfg.val_fraction,
                             seed=cfg.seed * 1000 + k, use_stress=False, target_fidelity=self.pool.high,
                             init_from=init, fidelity_prior=cfg.fidelity_prior)
            train(frames, model_config, tc, round_dir(self.out, r) / "models" / f"m{k}", resume=True)
        return {"members": cfg.ensemble, "frames": frames.num_rows, "wall_s": round(time.perf_counter() - t0, 2)}

    def _calibration_pairs(self, r: int) -> dict[str, np.ndarray]:
        """Held-out errors: each earlier pick's predicted energy (made before its label existed) vs the label,
        with the energy sigma predicted then, before calibration (``energy_sigma_raw``)."""
        errs, sig = [], []
        for q in range(1, r + 1):
            prev = round_dir(self.out, q - 1) / "report.parquet"
            lab = round_dir(self.out, q) / "labels.parquet"
            if not (prev.exists() and lab.exists()):
                continue
            rep = {row["candidate_id"]: row for row in read_table(prev).to_pylist()}
            for row in read_table(lab).select(["material_id", "energy", "numbers"]).to_pylist():
                p = rep.get(row["material_id"])
                if p is None or p["labelled"]:
                    continue
                errs.append(p["energy_pred"] - row["energy"] / len(row["numbers"]))
                sig.append(p["energy_sigma_raw"])
        return {"errors": np.array(errs), "sigma": np.array(sig)}

    def _sampled_sigma(self, r: int, comps: Sequence[Any], member_e: np.ndarray, cov: np.ndarray,
                       labelled: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """E_hull sigma from sampled energies: per member ``samples`` draws of the unlabelled candidates'
        residuals from the GP posterior (jointly, so polymorphs and neighbours move together), each placed on
        its own hull; sigma = RMS deviation of the sampled E_hull from the point estimate ``mu`` (the mean of
        the members' hulls), so it holds the hull's own uncertainty and the bias a noisy hull adds.
        Returns (sigma, sampled E_hull (S, n), sampled energies per atom (S, n)), S = members x samples."""
        free = np.where(~labelled)[0]
        n = len(comps)
        if not len(free) or self.cfg.samples < 1:
            return np.zeros(n), np.zeros((0, n)), np.zeros((0, n))
        sub = cov[np.ix_(free, free)]
        w, v = np.linalg.eigh(0.5 * (sub + sub.T))
        root = v * np.sqrt(np.clip(w, 0.0, None))[None, :]
        rng = np.random.default_rng([self.cfg.seed, r, 23])
        dev = np.zeros(n)
        count = np.zeros(n)
        hs, es = [], []
        for m in range(member_e.shape[0]):
            for _ in range(self.cfg.samples):
                e = member_e[m].copy()
                e[free] = e[free] + root @ rng.standard_normal(len(free))
                h = hull_distances(comps, e)
                ok = np.isfinite(h) & np.isfinite(mu)
                dev[ok] += (h[ok] - mu[ok]) ** 2
                count[ok] += 1
                hs.append(h)
                es.append(e)
        with np.errstate(invalid="ignore", divide="ignore"):
            sigma = np.where(count > 0, np.sqrt(dev / np.maximum(count, 1)), np.nan)
        return sigma, np.array(hs), np.array(es)

    def truth_e_hull(self) -> dict[str, float]:
        """E_hull of every candidate from the full answer (benchmarks only)."""
        if self._truth_e_hull is None:
            ids = [i for i in self.pool.ids() if i in self.truth]
            comps = [self.truth[i].structure.composition for i in ids]
            e = hull_distances(comps, [self.truth[i].energy_per_atom for i in ids])
            self._truth_e_hull = dict(zip(ids, e.tolist()))
        return self._truth_e_hull

    def step_screen(self, r: int) -> dict[str, Any]:
        cfg, pool = self.cfg, self.pool
        d = round_dir(self.out, r)
        ids = pool.ids()
        cands = [self.cands[i] for i in ids]
        labels = _labels_of(self.out, r)
        lab_e: dict[str, float] = {}
        if labels is not None:
            for row in labels.select(["material_id", "energy", "numbers"]).to_pylist():
                lab_e[row["material_id"]] = row["energy"] / len(row["numbers"])
        failed = _failed_of(self.out, r)
        paths = [_member_checkpoint(self.out, 0 if cfg.finetune_from == "none" else r, k) for k in range(cfg.ensemble)]
        pred, pred_err = _predict_members(paths, cands, [pool.low, pool.high])
        hi, lo = pred[pool.high], pred[pool.low]
        low_dft = np.array([c.low_energy / c.nsites if c.low_energy is not None else np.nan for c in cands])
        est_m = low_dft[None, :] + (hi - lo) if cfg.predictor == "gap" else hi.copy()
        labelled = np.array([i in lab_e for i in ids])
        e_lab = np.array([lab_e.get(i, np.nan) for i in ids])
        labelled_ids = [k for k in range(len(ids)) if labelled[k]]
        comps = [c.composition for c in cands]
        elements = pool.elements()
        feats = composition_features(comps, elements)
        est_raw = est_m
        cov = np.zeros((len(ids), len(ids)))
        gp: GapGP | None = None
        if cfg.residual == "gp" and labelled_ids:
            prior = (DEFAULT[1], cfg.gp_length_prior) if cfg.gp_length_prior else None
            est_m, cov, gp = _gp_corrected(est_m, feats, labelled, e_lab, prior)
        elif cfg.residual == "shift" and labelled_ids:
            est_m = _shifted(est_m, cands, labelled_ids, e_lab[labelled_ids])
        # the fidelity gap each member implies (against the low-fidelity DFT energy where the pool has one)
        gap_m = est_m - np.where(np.isfinite(low_dft)[None, :], low_dft[None, :], lo)
        e_pred, e_std = ensemble_stats(est_m)
        # energy sigma of a candidate before calibration: members' spread and the residual's own variance
        e_sigma_raw = np.sqrt(e_std ** 2 + np.clip(np.diag(cov), 0.0, None))
        # each member's hull: DFT where labelled, its own prediction elsewhere; every candidate is placed against
        # the hull of all the others (with exact energies this is the true E_hull of the whole pool)
        member_e = np.where(labelled[None, :], e_lab[None, :], est_m)
        eh_m = np.stack([hull_distances(comps, member_e[m]) for m in range(cfg.ensemble)])
        mu, sig_ens = ensemble_stats(eh_m)
        if gp is not None:
            sig_raw, h_samples, e_samples = self._sampled_sigma(r, comps, member_e, cov, labelled, mu)
        else:  # no residual model: the members themselves are the samples
            sig_raw, h_samples, e_samples = sig_ens, eh_m, member_e
        if cfg.strategy == "lookahead":  # its pick reads the joint samples
            with atomic_path(d / "samples.npz") as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, ids=np.array(ids, dtype=str), e_hull=h_samples, energy=e_samples)
        gap_pred, _ = ensemble_stats(gap_m)
        # fidelity-gap novelty (a report column): the predicted gap against the DFT gaps of the nearest labelled
        # composition
        pair = [k for k, i in enumerate(ids) if labelled[k] and self.cands[i].low_energy is not None]
        train_gap = np.array([e_lab[k] - cands[k].low_energy / cands[k].nsites for k in pair])
        gap_dev, gap_z = gap_novelty(gap_pred, feats, feats[pair] if pair else np.zeros((0, len(elements))),
                                     train_gap, k=cfg.knn)
        gap_dev = np.where(labelled, 0.0, gap_dev)
        gap_z = np.where(labelled, 0.0, gap_z)
        pairs = self._calibration_pairs(r)
        prior_dof = float(max(len(labelled_ids) - len(elements), 0)) if gp is not None and gp.fitted else 0.0
        calib = fit_scale(pairs["errors"], pairs["sigma"], prior_dof=prior_dof)
        sigma = calib.sigma(sig_raw)
        e_sigma = calib.sigma(e_sigma_raw)
        p_flip = acquisition.p_other_side(np.nan_to_num(mu, nan=np.inf), np.nan_to_num(sigma, nan=0.0),
                                          cfg.threshold)
        p_flip = np.where(np.isfinite(mu), p_flip, np.nan)
        half = interval_halfwidth(sigma, cfg.interval)
        truth = self.truth_e_hull() if self.truth else {}
        diag = self._diagnostics(ids, comps, labelled, est_raw, est_m) if self.truth else {}
        if gp is not None:
            diag["gap_gp"] = gp.to_dict()
        errors = {**{i: e for i, e in failed.items()}, **pred_err}
        rows = []
        for k, i in enumerate(ids):
            rows.append({
                "candidate_id": i, "formula": comps[k].reduced_formula, "labelled": bool(labelled[k]),
                "energy_pred": float(e_pred[k]), "energy_std": float(e_std[k]), "energy_sigma": float(e_sigma[k]),
                "energy_sigma_raw": float(e_sigma_raw[k]),
                "energy_dft": float(e_lab[k]) if labelled[k] else None,
                "e_hull_mean": float(mu[k]), "e_hull_std_ensemble": float(sig_ens[k]),
                "e_hull_sigma_raw": float(sig_raw[k]), "e_hull_sigma": float(sigma[k]),
                "e_hull_lo": float(mu[k] - half[k]), "e_hull_hi": float(mu[k] + half[k]),
                "gap_pred": float(gap_pred[k]), "gap_dev": float(gap_dev[k]), "gap_z": float(gap_z[k]),
                "p_other_side": float(p_flip[k]), "predicted_stable": bool(mu[k] <= cfg.threshold),
                "e_hull_true": truth.get(i), "error": errors.get(i),
            })
        write_table_atomic(pa.Table.from_pylist(rows), d / "report.parquet")
        summary = {**self._summary(r, rows, calib, pairs), **diag}
        write_json_atomic(d / "summary.json", summary, indent=1)
        return {k: summary[k] for k in ("n_labelled", "F1", "MAE") if k in summary}

    def _diagnostics(self, ids: Sequence[str], comps: Sequence[Any], labelled: np.ndarray, est_raw: np.ndarray,
                     est_m: np.ndarray) -> dict[str, Any]:
        """Scores against the full answer that separate the models' energies from the hull (benchmarks only).

        ``energy_MAE_{labelled,unlabelled}``: ensemble-mean energy (eV/atom, after the shift) vs the label;
        ``..._noshift``: the same before the shift; ``MAE_model_hull``: E_hull from the members' energies alone
        (no DFT substituted for the labelled candidates) vs the truth."""
        e_true = np.array([self.truth[i].energy_per_atom if i in self.truth else np.nan for i in ids])
        out: dict[str, Any] = {}
        for name, est in (("", est_m), ("_noshift", est_raw)):
            mean, _ = ensemble_stats(est)
            err = np.abs(mean - e_true)
            for part, mask in (("labelled", labelled), ("unlabelled", ~labelled)):
                sel = mask & np.isfinite(err)
                out[f"energy_MAE_{part}{name}"] = float(err[sel].mean()) if sel.any() else None
        t = self.truth_e_hull()
        eh_true = np.array([t.get(i, np.nan) for i in ids])
        eh_model, _ = ensemble_stats(np.stack([hull_distances(comps, est_m[m]) for m in range(est_m.shape[0])]))
        err = np.abs(eh_model - eh_true)
        out["MAE_model_hull"] = float(np.nanmean(err)) if np.isfinite(err).any() else None
        return out

    def _summary(self, r: int, rows: list[dict[str, Any]], calib: Calibration,
                 pairs: Mapping[str, np.ndarray]) -> dict[str, Any]:
        cfg = self.cfg
        n_lab = sum(1 for x in rows if x["labelled"])
        s: dict[str, Any] = {"round": r, "n_labelled": n_lab, "n_candidates": len(rows), "strategy": cfg.strategy,
                             "calibration": calib.to_dict(), "threshold": cfg.threshold,
                             "predicted_stable": sorted(x["candidate_id"] for x in rows if x["predicted_stable"])}
        curves = {}
        if len(pairs["errors"]):
            sig_e = calib.sigma(pairs["sigma"])
            curves["energy, earlier picks"] = coverage_curve(pairs["errors"], sig_e)
            s["coverage_energy_picks"] = coverage(pairs["errors"], sig_e, cfg.interval)
        truth_rows = [x for x in rows if x["e_hull_true"] is not None]
        if truth_rows:
            y = np.array([x["e_hull_true"] for x in truth_rows])
            mu = np.array([x["e_hull_mean"] for x in truth_rows])
            m = stable_metrics(y.tolist(), mu.tolist(), cfg.threshold)
            f1 = m["F1"] if np.isfinite(m["F1"]) else 0.0  # no true positive: F1 counted as 0
            s.update({"F1": f1, "Precision": m["Precision"], "Recall": m["Recall"], "TP": m["TP"], "FP": m["FP"],
                      "FN": m["FN"], "TN": m["TN"], "MAE": m["MAE"]})
            held = [x for x in truth_rows if not x["labelled"]]
            if held:
                err = np.array([x["e_hull_mean"] - x["e_hull_true"] for x in held])
                sg = np.array([x["e_hull_sigma"] for x in held])
                s["coverage_e_hull_unlabelled"] = coverage(err, sg, cfg.interval)
                s["coverage_e_hull_unlabelled_raw"] = coverage(
                    err, np.array([x["e_hull_sigma_raw"] for x in held]), cfg.interval)
                s["MAE_unlabelled"] = float(np.nanmean(np.abs(err)))
                s["n_unlabelled"] = len(held)
                curves["E_hull, unlabelled (truth)"] = coverage_curve(err, sg)
        if curves:
            plot_coverage(curves, round_dir(self.out, r) / "coverage.png",
                          title=f"round {r}: {n_lab} labels, {cfg.strategy}\nscale {calib.s_ens:.2f} from "
                                f"{calib.n} held-out picks (GP prior: {calib.prior_dof:g} dof)")
            s["coverage_curves"] = curves
        return s

    def step_pick(self, r: int) -> dict[str, Any]:
        cfg = self.cfg
        d = round_dir(self.out, r)
        rep = read_table(d / "report.parquet").to_pylist()
        exclude = {x["candidate_id"] for x in rep if x["labelled"]} | set(_failed_of(self.out, r))
        ids = [x["candidate_id"] for x in rep]
        mu = np.array([x["e_hull_mean"] for x in rep], dtype=float)
        sig = np.array([x["e_hull_sigma"] for x in rep], dtype=float)
        rng = np.random.default_rng([cfg.seed, r, 11])
        extra: dict[str, Any] = {}
        if cfg.strategy == "lookahead":
            with np.load(d / "samples.npz") as z:
                if z["ids"].tolist() != ids:
                    raise ValueError(f"{d / 'samples.npz'}: candidates differ from report.parquet's")
                h, e = z["e_hull"], z["energy"]
            # the samples' spread put on the calibrated scale of the report's sigma
            raw = np.array([x["e_hull_sigma_raw"] for x in rep], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                scale = np.where(raw > 0, sig / raw, 1.0)
            h = mu[None, :] + np.nan_to_num(scale, nan=1.0)[None, :] * (h - mu[None, :])
            chosen = acquisition.lookahead_select(ids, h, e, cfg.budget, cfg.threshold, exclude)
            picks = [i for i, _ in chosen]
            extra = {"expected_misclassified": {"before": float(acquisition.expected_misclassified(h, None,
                                                                                                   cfg.threshold)),
                                                "after": {i: v for i, v in chosen}}}
        else:
            picks = acquisition.select(cfg.strategy, ids, mu, sig, cfg.budget, cfg.threshold, exclude, rng)
        p = {x["candidate_id"]: x["p_other_side"] for x in rep}
        write_json_atomic(d / "picks.json", {"picks": picks, "strategy": cfg.strategy,
                                             "p_other_side": {i: p[i] for i in picks}, **extra}, indent=1)
        return {"picks": len(picks)}

    # ---- driver -------------------------------------------------------------------------------------------
    def run(self, stop_after: tuple[int, str] | None = None) -> LoopResult:
        self.out.mkdir(parents=True, exist_ok=True)
        state = State(self.out / "state.json", self.key)
        write_json_atomic(self.out / "loop.json", {"config": self.cfg.to_dict(), "pool": self.pool.describe(),
                                                   "key": self.key}, indent=1)
        result = LoopResult(self.out)
        for r in range(self.cfg.rounds + 1):
            for step in STEPS:
                if step == "pick" and r == self.cfg.rounds:
                    continue
                if not state.is_done(r, step):
                    round_dir(self.out, r).mkdir(parents=True, exist_ok=True)
                    info = self.step_runner(f"{step}-{r}", lambda s=step, q=r: getattr(self, f"step_{s}")(q))
                    state.mark(r, step, info)
                    log.info("round %d %s: %s", r, step, info)
                if stop_after == (r, step):
                    raise LoopInterrupted(f"stopped after round {r} step {step}")
            result.rounds.append(json.loads((round_dir(self.out, r) / "summary.json").read_text()))
        write_json_atomic(self.out / "curve.json", [{k: s.get(k) for k in (
            "round", "n_labelled", "F1", "MAE", "MAE_unlabelled", "coverage_e_hull_unlabelled",
            "coverage_energy_picks", "coverage_e_hull_unlabelled_raw", "energy_MAE_labelled", "energy_MAE_unlabelled", "energy_MAE_unlabelled_noshift",
            "MAE_model_hull")} for s in result.rounds], indent=1)
        return result
