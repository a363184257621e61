"""The Si-Sn set's README: a hand-written head (what, how, settings) + tables computed from ``manifest.json``,
and :func:`gap_stats`, the measurement that says whether r2SCAN - PBE depends on structure in these data."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.label.demo_set import PBE, R2SCAN, hull_rows

Z_SI, Z_SN = 14, 50


def gap_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """r2SCAN - PBE on structures labelled at both fidelities.

    The total-energy gap is fitted as ``n_Si a + n_Sn b`` (least squares: the best per-element shift, i.e. the
    floor a model without structure dependence can reach); reported: ``a``, ``b``, the RMS and max residual per
    atom (meV/atom) overall and by prototype, and the mean |F_r2SCAN - F_PBE| per component (meV/A).
    """
    pairs: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault(r["frame_id"].rsplit(":", 1)[0], {})[r["fidelity"]] = r
    both = [(p[PBE], p[R2SCAN]) for p in pairs.values() if PBE in p and R2SCAN in p]
    if len(both) < 3:
        return {"n": len(both)}
    counts = np.array([[np.sum(np.asarray(a["numbers"]) == z) for z in (Z_SI, Z_SN)] for a, _ in both], float)
    gap = np.array([b["energy"] - a["energy"] for a, b in both])
    coef, *_ = np.linalg.lstsq(counts, gap, rcond=None)
    resid = (gap - counts @ coef) / counts.sum(axis=1) * 1000
    dforce = np.concatenate([np.abs(np.asarray(b["forces"]) - np.asarray(a["forces"])).ravel() for a, b in both])
    protos: dict[str, list[float]] = {}
    for (a, _), res in zip(both, resid, strict=True):
        protos.setdefault(json.loads(a["meta"]).get("prototype", json.loads(a["meta"]).get("parent", "?")),
                          []).append(float(res))
    return {
        "n": len(both),
        "shift_eV_per_atom": {"Si": round(float(coef[0]), 4), "Sn": round(float(coef[1]), 4)},
        "residual_rms_meV_per_atom": round(float(np.sqrt(np.mean(resid**2))), 1),
        "residual_max_meV_per_atom": round(float(np.abs(resid).max()), 1),
        "by_prototype_mean_residual_meV_per_atom": {
            k: {"n": len(v), "mean": round(float(np.mean(v)), 1), "std": round(float(np.std(v)), 1)}
            for k, v in sorted(protos.items())},
        "force_difference_mean_abs_meV_per_A": round(float(dforce.mean() * 1000), 1),
    }


README_HEAD = """\
# Si-Sn multi-fidelity DFT set (GPAW PBE + r2SCAN): covalent and metallic polymorphs

Made by the project with its own labeller (`pipeline.label.dft`), for training and benchmarking multi-fidelity
potentials on a system where **r2SCAN - PBE depends on the structure**: Si and Sn both have a covalent diamond
phase (Si, alpha-Sn) and metallic dense phases (beta-Sn, simple hexagonal, bcc/fcc/hcp), and tin's alpha/beta
balance is a few 10 meV/atom, where functionals disagree. Energies are GPAW's, on GPAW's own reference scale
(fidelities `gpaw-pbe`, `gpaw-r2scan`; the same settings hashes as `data/demo`, but another chemical system).

Resume or extend (re-run the same command: every structure stored or rejected is skipped; structure `i` is
generated from its own random stream, so ids never shift; `--stop-at` (UTC) starts no new calculation after it):

    scripts/install_dft.sh                       # once: apt libxc/BLAS/MPI/FFTW + pip gpaw gpaw-data
    OMP_NUM_THREADS=1 nice -n 19 python -m pipeline.label.sisn_set --stop-at HH:MM [--max-structures 400]
    make sisn-data STOP_AT=HH:MM                 # the same (STOP_AT optional), after scripts/install_dft.sh

This README and `manifest.json` are rewritten from the data at the end of every run (`--convergence` re-runs
the cutoff / k-point checks into `convergence.json`).

## Layout (as `data/demo`)

| path | content |
|---|---|
| `frames/` | `FRAMES_SCHEMA`, key `frame_id`: TRAINING frames (energy, forces, stress), prototypes not held out |
| `test_frames/` | frames of the HELD-OUT prototypes (hexagonal diamond, simple hexagonal), both fidelities |
| `entries/` | `ENTRIES_SCHEMA`: relaxed phases of the training prototypes at both fidelities (`thermo_type="raw"`) |
| `candidates/` | relaxed phases of the held-out prototypes (E_hull ground truth; their frames are in no split) |
| `rejects/` | failed calculations with their error (`REJECTS_SCHEMA`), skipped on re-runs |
| `convergence.json` | the cutoff / k-point checks below |
| `manifest.json` | counts, settings, versions, timings, formation energies, r2SCAN - PBE statistics |

Frame ids: `gpaw:<kind>-<prototype>-<formula>-<index>:<fidelity>` (single points; `material_id` =
`sisn:<kind>-<prototype>-<formula>-<index>`, shared by both fidelities of a structure, so a split by
`material_id` keeps them together) and `gpaw:reference-<phase>:<fidelity>:relax:<step>` (ionic steps; the last
step has `meta.kind == "reference"`). `meta` (JSON): `kind`, `prototype`, `bonding` (covalent | metallic),
`held_out`, `element`, `rattle_sigma`, `index`, and the provenance `settings`, `settings_hash`, `software`
(gpaw, libxc, gpaw-data versions) and `seconds` (wall time of that calculation on one shared core).
Stress: eV/A^3, ASE sign (tensile positive), present for both fidelities.

## Structures

Prototypes (one element per site, volumes guessed from the PBE diamond volume of each element times a factor:
diamond 1.0, hexagonal diamond 1.0, beta-Sn 0.78, simple hexagonal 0.75, bcc/fcc/hcp 0.74):

| prototype | bonding | split | sites |
|---|---|---|---|
| diamond (A4) | covalent | train | 2 |
| beta-Sn (A5, c/a 0.546) | metallic | train | 2 |
| bcc, fcc, hcp | metallic | train | 1, 1, 2 |
| hexagonal diamond (lonsdaleite) | covalent | **test** | 4 |
| simple hexagonal (c/a 0.94) | metallic | **test** | 1 |

Structure `i` has prototype `("diamond", "betaSn", "bcc", "hexdiamond", "fcc", "hcp", "diamond", "sh",
"betaSn")[i % 9]` and kind `("strained", "rattled", "decorated", "rattled")[i % 4]` (every pair once in 36):
*strained*: primitive cell, Si or Sn, volume -8..+8 %, random symmetric strain up to 4 %, rattle 0.02 A;
*rattled*: supercell of 2-8 atoms (Sn: <= 4), strain up to 2 %, rattle 0.05 / 0.1 / 0.15 A;
*decorated*: supercell of 2-8 sites, random Si/Sn occupation at Vegard volume, strain up to 2 %, rattle 0.03 A.
Every structure is computed at PBE and then at r2SCAN before the next one, so (nearly) every structure has both
labels; the benchmark decides which r2SCAN labels to hide.

Relaxed phases (ASE BFGS + FrechetCellFilter + FixSymmetry, fmax 0.02 eV/A, <= 40 steps; r2SCAN from the PBE
structure): references Si-diamond, Sn-diamond (alpha), Sn-betaSn, SiSn-B3 (zincblende, hypothetical), then
Si-betaSn, Si-bcc, Si-fcc, Sn-bcc, Sn-fcc; candidates (held-out prototypes) Si/Sn hexagonal diamond and simple
hexagonal.

Work order: Si-diamond and Sn-diamond; structures 0-8; Sn-betaSn and SiSn-B3; structures 9-53; the other
relaxed phases and the candidates; the remaining structures.
"""


def _settings_lines(manifest: dict[str, Any]) -> list[str]:
    s = manifest["fidelities"][PBE]["settings"]
    sw = manifest.get("software", {})
    lines = ["## DFT settings (both fidelities identical except the functional)", "",
             (f"* GPAW {sw.get('gpaw', '?')} (libxc {sw.get('libxc', '?')}, gpaw-data {sw.get('gpaw-data', '?')}), "
             f"plane waves, cutoff {s['ecut']:.0f} eV; Gamma-centred Monkhorst-Pack grid with ASE k-point density "
             f"{s['kpoint_density']} per reciprocal Angstrom; Fermi-Dirac smearing {s['smearing']} eV (energies "
             "extrapolated to zero width); GPAW default SCF convergence."),
             ("* PBE: `xc=\"PBE\"`; r2SCAN: libxc `MGGA_X_R2SCAN+MGGA_C_R2SCAN`. PAW setups: GPAW's PBE setups for "
             "both functionals (Si: 4 valence electrons; Sn: 14, 4d in valence)."),
             (f"* Settings hashes: gpaw-pbe `{manifest['fidelities'][PBE]['settings_hash']}`, gpaw-r2scan "
             f"`{manifest['fidelities'][R2SCAN]['settings_hash']}`."), ""]
    conv = manifest.get("convergence")
    if conv:
        lines += [("Convergence (measured before generating; energy differences at fixed, unrelaxed geometries, "
                  "meV/atom; seconds = the four structures together, one shared core):"), "",
                  "| xc | cutoff (eV) | k density | Si betaSn-diamond | Sn betaSn-diamond | s |",
                  "|---|---|---|---|---|---|"]
        for r in conv["rows"]:
            lines.append(f"| {r['xc']} | {r['ecut']} | {r['kpoint_density']} | {r['Si betaSn-diamond']} | "
                         f"{r['Sn betaSn-diamond']} | {r['seconds']} |")
        lines.append("")
    return lines


def readme(manifest: dict[str, Any], notes: str = "") -> str:
    """The whole README text for ``manifest``."""
    c = manifest["counts"]
    lines = [README_HEAD, *_settings_lines(manifest), notes, "## Counts (this commit)", "",
             "| set | fidelity | frames | by kind |", "|---|---|---|---|"]
    for part in ("frames", "test_frames"):
        for fid, s in sorted(manifest[part].items()):
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["by_kind"].items()))
            lines.append(f"| `{part}/` | {fid} | {s['frames']} | {kinds} |")
    both = c["structures_with_both_fidelities"]
    lines += ["", (f"Structures with both PBE and r2SCAN: {both['frames']} in `frames/` (train), "
              f"{both['test_frames']} in `test_frames/` (held-out prototypes). Entries: {c['entries']}, "
              f"candidates: {c['candidates']}, rejected calculations: {c['rejects']}."), "",
              "Structures (PBE frames) by prototype: train " + ", ".join(
                  f"{k} {v}" for k, v in c["structures_by_prototype"]["frames"].items()) + "; test " + ", ".join(
                  f"{k} {v}" for k, v in c["structures_by_prototype"]["test_frames"].items()) + ".", ""]
    gap = manifest.get("gap", {})
    if gap.get("n", 0) >= 3:
        lines += ["## Does r2SCAN - PBE depend on structure? (measured on these frames, train + test)", "",
                  (f"Best per-element shift (least squares over {gap['n']} structures): Si "
                  f"{gap['shift_eV_per_atom']['Si']} eV/atom, Sn {gap['shift_eV_per_atom']['Sn']} eV/atom. "
                  f"What it leaves: RMS {gap['residual_rms_meV_per_atom']} meV/atom, max "
                  f"{gap['residual_max_meV_per_atom']} meV/atom. Mean |F_r2SCAN - F_PBE| per component: "
                  f"{gap['force_difference_mean_abs_meV_per_A']} meV/A."), "",
                  "| prototype | n | mean residual (meV/atom) | std |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n']} | {v['mean']} | {v['std']} |"
                  for k, v in gap["by_prototype_mean_residual_meV_per_atom"].items()]
        lines.append("")
    lines += ["## Time per single-point calculation (seconds, `meta.seconds`)", "",
              ("Wall time on one core of a 2-core machine shared with five other developers' jobs, at `nice 19`: "
               "upper bounds, several times the cost on an idle core."), "",
              "| fidelity | atoms | n | mean | max |", "|---|---|---|---|---|"]
    for part in ("frames", "test_frames"):
        for fid, s in sorted(manifest[part].items()):
            for nat, t in s["single_point_seconds_by_natoms"].items():
                lines.append(f"| {fid} ({part}) | {nat} | {t['n']} | {t['mean']} | {t['max']} |")
    compute = sum(s["seconds_total"] for part in ("frames", "test_frames") for s in manifest[part].values())
    relax = sum(v.get("relax_seconds") or 0.0 for v in manifest["entries"].values())
    lines += ["", (f"Compute: {compute / 60:.0f} min for the frames (single points + ionic steps of the reference "
              f"relaxations); all relaxations: {relax / 60:.0f} min."), "",
              "Relaxations (whole relaxation):", "", "| entry | steps | seconds | E (eV/atom) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['relax_steps']} | {v['relax_seconds']} | {v['energy_per_atom']:.4f} |"
              for k, v in sorted(manifest["entries"].items())]
    hull = manifest.get("hull", {})
    lines += ["", "## Formation energies and energy above the hull (eV/atom)", "",
              ("Hull = the relaxed phases in `entries/` of the same fidelity; candidates are placed on it. A fidelity "
              "appears once both elements have a relaxed phase at it."), "",
              "| phase | E_f PBE | E_hull PBE | E_f r2SCAN | E_hull r2SCAN |", "|---|---|---|---|---|"]
    lines += hull_rows(hull)
    return "\n".join(lines) + "\n"
