"""Report figures (matplotlib, Agg canvas, PNG): E_hull parity plot and the phase diagram with candidates marked.

Figures are saved through an Agg canvas (no display needed). The phase diagram itself is drawn by pymatgen's
``PDPlotter`` (which draws via pyplot, so that figure is a pyplot one, closed after saving); only the candidate
markers are added here, placed with pymatgen's own coordinates (``pd_coords`` + ``triangular_coord``/``tet_coord``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pymatgen.analysis.phase_diagram import (
    PatchedPhaseDiagram,
    PDEntry,
    PDPlotter,
    PhaseDiagram,
    tet_coord,
    triangular_coord,
)
from pymatgen.core import Composition

from pipeline.hull.ehull import HULL_DFT, HULL_MODEL
from pipeline.io import atomic_path
from pipeline.report.metrics import regression_metrics
from pipeline.report.schema import HULL_COLUMNS

HULL_LABELS = {HULL_DFT: "vs DFT reference hull", HULL_MODEL: "vs all-model hull"}


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _label_outliers(ax: Any, xs: Sequence[float], ys: Sequence[float], names: Sequence[str], n: int) -> None:
    """Annotate the ``n`` points farthest from y = x with their names."""
    worst = sorted(range(len(xs)), key=lambda i: -abs(ys[i] - xs[i]))[:n]
    for i in worst:
        ax.annotate(names[i], (xs[i], ys[i]), xytext=(4, -10), textcoords="offset points", fontsize=7,
                    color="0.2")


def parity_plot(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], threshold: float = 0.0,
    subtitle: str | None = None, n_outliers: int = 5,
) -> Path:
    """Predicted vs DFT E_hull (eV/atom), one series per hull, the ``n_outliers`` worst points labelled with their
    formula; without DFT values, all-model vs DFT-hull predictions."""
    fig = Figure(figsize=(6, 5.6))
    ax = fig.add_subplot()
    has_true = any(_finite(r.get("e_hull_true")) for r in rows)
    points: list[float] = []
    if has_true:
        for kind, col in HULL_COLUMNS.items():
            sel = [r for r in rows if _finite(r.get("e_hull_true")) and _finite(r.get(col))]
            if not sel:
                continue
            t, p = [r["e_hull_true"] for r in sel], [r[col] for r in sel]
            mae = regression_metrics(t, p)["MAE"]
            ax.scatter(t, p, s=18, alpha=0.75, label=f"{HULL_LABELS[kind]} (n={len(t)}, MAE={mae:.3f} eV/atom)")
            _label_outliers(ax, t, p, [r.get("formula") or r["candidate_id"] for r in sel], n_outliers)
            points += t + p
        ax.set_xlabel("DFT E_hull (eV/atom)")
        ax.set_ylabel("predicted E_hull (eV/atom)")
        ax.set_title("E_hull parity" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    else:
        sel = [r for r in rows if _finite(r.get("e_hull_pred_dft_hull")) and _finite(r.get("e_hull_pred_model_hull"))]
        if sel:
            x, y = [r["e_hull_pred_dft_hull"] for r in sel], [r["e_hull_pred_model_hull"] for r in sel]
            ax.scatter(x, y, s=18, alpha=0.75, label=f"candidates (n={len(x)})")
            _label_outliers(ax, x, y, [r.get("formula") or r["candidate_id"] for r in sel], n_outliers)
            points += x + y
        ax.set_xlabel("predicted E_hull vs DFT reference hull (eV/atom)")
        ax.set_ylabel("predicted E_hull vs all-model hull (eV/atom)")
        ax.set_title("E_hull: DFT hull vs all-model hull (no DFT E_hull known)"
                     + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    lo, hi = (min(points), max(points)) if points else (-0.1, 0.1)
    pad = 0.08 * (hi - lo) + 1e-3
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", label="y = x")
    ax.axvline(threshold, color="0.7", lw=0.8)
    ax.axhline(threshold, color="0.7", lw=0.8)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def e_hull_strip_plot(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None,
    threshold: float = 0.0,
) -> Path:
    """E_hull of every candidate by composition (one strip per reduced formula) for systems with more than 4
    elements, where no phase diagram can be drawn: vs DFT hull (circles), vs all-model hull (triangles) and the
    DFT value (crosses) when known."""
    by_formula: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("formula") and any(_finite(r.get(c)) for c in (*HULL_COLUMNS.values(), "e_hull_true")):
            by_formula.setdefault(r["formula"], []).append(r)
    formulas = sorted(by_formula, key=lambda f: min(
        (r[c] for r in by_formula[f] for c in HULL_COLUMNS.values() if _finite(r.get(c))), default=np.inf))
    fig = Figure(figsize=(max(6.0, 0.45 * len(formulas) + 2), 4.8))
    ax = fig.add_subplot()
    series = [("e_hull_pred_dft_hull", "o", HULL_LABELS[HULL_DFT]),
              ("e_hull_pred_model_hull", "^", HULL_LABELS[HULL_MODEL]), ("e_hull_true", "x", "DFT E_hull")]
    for col, marker, label in series:
        xs, ys = [], []
        for i, f in enumerate(formulas):
            vals = [r[col] for r in by_formula[f] if _finite(r.get(col))]
            xs += [i + 0.12 * (k - (len(vals) - 1) / 2) for k in range(len(vals))]
            ys += vals
        if ys:
            ax.scatter(xs, ys, marker=marker, s=28, alpha=0.8, label=f"{label} (n={len(ys)})")
    ax.axhline(threshold, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(len(formulas)))
    ax.set_xticklabels(formulas, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("candidate composition (sorted by lowest predicted E_hull)")
    ax.set_ylabel("E_hull (eV/atom)")
    ax.set_title(title or "E_hull by composition", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_coords(diagram: PhaseDiagram, composition: Composition, form_energy: float) -> tuple[float, ...]:
    coords = diagram.pd_coords(composition)
    dim = len(diagram.elements)
    if dim == 2:
        return (float(coords[0]), form_energy)
    if dim == 3:
        x, y = triangular_coord(coords)
        return (float(x), float(y))
    x, y, z = tet_coord(coords)
    return (float(x), float(y), float(z))


class _Crowd:
    """Points already labelled (display pixels): a new optional label too close to one is skipped, so that the
    labels of crowded regions stay readable."""

    def __init__(self, ax: Any, radius_px: float = 22.0) -> None:
        self.ax, self.radius, self.points = ax, radius_px, []

    def free(self, xyz: Sequence[float]) -> bool:
        if len(xyz) == 3:
            return True
        p = self.ax.transData.transform(np.asarray(xyz[:2], dtype=float))
        return all(np.hypot(*(p - q)) > self.radius for q in self.points)

    def add(self, xyz: Sequence[float]) -> None:
        if len(xyz) == 2:
            self.points.append(self.ax.transData.transform(np.asarray(xyz, dtype=float)))


def _label(ax: Any, xyz: Sequence[float], text: str, center: np.ndarray | None, *, size: float,
           color: str = "k", weight: str = "normal", offset: tuple[float, float] = (6.0, -9.0)) -> None:
    """Label a point: pushed away from the diagram's ``center`` (2-D axes), else at ``offset`` points (or beside
    it on 3-D axes)."""
    if len(xyz) == 3:
        ax.text(*xyz, text, fontsize=size, color=color, fontweight=weight)
        return
    if center is None:
        vec = np.asarray(offset, dtype=float)
    else:
        vec = np.asarray(xyz[:2]) - center
        norm = np.linalg.norm(vec)
        vec = vec / norm * 9 if norm > 0 else np.array([0.0, 9.0])
    ax.annotate(text, xyz[:2], xytext=tuple(vec), textcoords="offset points", fontsize=size, color=color,
                fontweight=weight, ha="left" if vec[0] > 1 else "right" if vec[0] < -1 else "center",
                va="bottom" if vec[1] > 0 else "top", annotation_clip=False)


def phase_diagram_plot(
    diagram: PhaseDiagram,
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    show_unstable: float = 0.1,
    max_unstable_labels: int = 8,
    max_candidate_labels: int = 25,
    title: str | None = None,
) -> Path:
    """pymatgen's phase diagram (2-4 elements: hull lines and stable phases) with the candidates marked (stars
    coloured by E_hull vs the DFT reference hull, labelled by formula) and the reference phases up to
    ``show_unstable`` eV/atom above the hull drawn faded, the lowest ``max_unstable_labels`` of them labelled
    with their E_hull. Optional labels (candidates, unstable phases) too close to a placed one are left out. Binary diagrams name their composition axis (x in A(1-x)B(x)). Candidates need
    ``formula`` and ``energy_per_atom`` (hull scale)."""
    if isinstance(diagram, PatchedPhaseDiagram):
        diagram = PhaseDiagram(diagram.all_entries)
    dim = len(diagram.elements)
    if not 2 <= dim <= 4:
        raise ValueError(f"phase diagram plot needs 2-4 elements, this hull has {dim}")
    # PDPlotter draws through pyplot's current axes: give it ours, close the figure afterwards.
    fig = plt.figure(figsize=(8, 6.5))
    try:
        ax = fig.add_subplot(projection="3d" if dim == 4 else None)
        plt.sca(ax)
        plotter = PDPlotter(diagram, show_unstable=0, backend="matplotlib")
        if dim < 4:
            plotter.get_plot(ax=ax, label_stable=False, label_unstable=False)
        else:
            plotter.get_plot(ax=ax)
        fig.set_size_inches(8, 6.5)
        if dim == 3:  # room for the corner labels (pymatgen's limits clip the corners at this size)
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xlim(-0.12, 1.12)
            ax.set_ylim(-0.1, 0.98)
        center = np.array([0.5, math.sqrt(3) / 6]) if dim == 3 else np.array([0.5, 0.0])
        crowd = _Crowd(ax)
        if dim < 4:
            for xy, entry in plotter.pd_plot_data[1].items():
                _label(ax, xy, entry.composition.reduced_formula, center, size=11, weight="bold")
                crowd.add(xy)
        low = _mark_candidates(fig, ax, diagram, rows, max_candidate_labels, crowd)
        low = min(low, _mark_unstable(ax, diagram, show_unstable, max_unstable_labels, crowd))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1 if dim == 2 else 0.0), fontsize=8, ncol=2,
                      frameon=False)
        if dim == 2:
            a, b = (el.symbol for el in diagram.elements)
            ax.set_xlabel(f"x in {a}$_{{1-x}}${b}$_x$", fontsize=12, fontweight="normal")
            ax.set_ylabel("formation energy (eV/atom)", fontsize=12, fontweight="normal")
            bottom, top = ax.get_ylim()
            if np.isfinite(low) and low < bottom:
                ax.set_ylim(low - 0.05 * (top - low), top)
        ax.set_title(title or f"{'-'.join(el.symbol for el in diagram.elements)} phase diagram", fontsize=12)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _mark_unstable(ax: Any, diagram: PhaseDiagram, window: float, n_labels: int, crowd: _Crowd) -> float:
    """Faded markers for compounds 0 < E_hull <= window (the lowest polymorph of each formula; the lowest
    ``n_labels`` labelled); returns the lowest y drawn (binary diagrams) or inf."""
    if window <= 0:
        return np.inf
    best: dict[str, tuple[float, Any]] = {}
    for e in diagram.all_entries:
        e_hull = diagram.get_e_above_hull(e, allow_negative=True)
        name = e.composition.reduced_formula
        if e.composition.is_element:
            continue
        if 1e-6 < e_hull <= window and (name not in best or e_hull < best[name][0]):
            best[name] = (e_hull, e)
    if not best:
        return np.inf
    pts, n_labelled = [], 0
    for name, (e_hull, e) in sorted(best.items(), key=lambda kv: kv[1][0]):
        xyz = _plot_coords(diagram, e.composition, float(diagram.get_form_energy_per_atom(e)))
        pts.append(xyz)
        if n_labelled < n_labels and crowd.free(xyz):
            _label(ax, xyz, f"{name} +{e_hull:.3f}", None, size=7, color="0.4", offset=(5.0, 4.0))
            crowd.add(xyz)
            n_labelled += 1
    arr = np.array(pts)
    ax.scatter(*arr.T, marker="s", s=22, c="0.6", alpha=0.45, edgecolors="none", zorder=5,
               label=f"unstable references, E_hull <= {window:g} eV/atom (n={len(pts)})")
    return float(arr[:, 1].min()) if arr.shape[1] == 2 else np.inf


def _mark_candidates(fig: Figure, ax: Any, diagram: PhaseDiagram, rows: Sequence[Mapping[str, Any]],
                     n_labels: int, crowd: _Crowd) -> float:
    els = set(diagram.elements)
    marks: list[tuple[tuple[float, ...], float, str]] = []
    for r in rows:
        if not r.get("formula") or not _finite(r.get("energy_per_atom")):
            continue
        comp = Composition(r["formula"])
        if not set(comp.elements) <= els:
            continue
        entry = PDEntry(comp, float(r["energy_per_atom"]) * comp.num_atoms)
        xyz = _plot_coords(diagram, comp, float(diagram.get_form_energy_per_atom(entry)))
        e_hull = r.get("e_hull_pred_dft_hull")
        marks.append((xyz, float(e_hull) if _finite(e_hull) else np.nan, comp.reduced_formula))
    if not marks:
        return np.inf
    pts = np.array([m[0] for m in marks])
    colour = np.array([m[1] for m in marks])
    sc = ax.scatter(*pts.T, c=colour, cmap="viridis", marker="*", s=130, edgecolors="k", linewidths=0.5,
                    zorder=10, label=f"candidates (n={len(marks)})")
    n_labelled = 0
    for xyz, _, name in sorted(marks, key=lambda m: (np.nan_to_num(m[1], nan=np.inf))):
        if n_labelled < n_labels and crowd.free(xyz):
            _label(ax, xyz, name, None, size=8, color="tab:blue")
            crowd.add(xyz)
            n_labelled += 1
    fig.colorbar(sc, ax=ax, shrink=0.7, label="predicted E_hull vs DFT hull (eV/atom)")
    return float(pts[:, 1].min()) if pts.shape[1] == 2 else np.inf
