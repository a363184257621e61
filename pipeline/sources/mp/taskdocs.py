"""Materials Project task documents, MP trajectories and raw VASP runs -> frames (one per ionic step).

Three shapes of the same VASP data are read:

* **task documents** (``calcs_reversed[].output.ionic_steps[]``) as stored by emmet / atomate: plain dicts loaded
  from JSON, emmet ``TaskDoc`` objects, or any pydantic/MSONable object with the same fields;
* **trajectories** served by ``mp-api`` (``MPRester().materials.tasks.get_trajectory``: a dumped emmet
  ``RelaxTrajectory``, per-step lists of coordinates, lattices, energies, forces and stresses);
* **raw VASP output** (``vasprun.xml``, parsed with pymatgen's ``Vasprun``), including the gzip+hex encoded
  bundles emmet uses in its tests (:func:`decode_hex_gz_bundle`).

Energy label (``energy`` column): the sigma->0 total energy, i.e. what pymatgen's ``Vasprun.final_energy`` and
MP's ``output.energy`` report, evaluated at every ionic step. Checked on the shared task documents: for the last
ionic step it equals ``output.energy`` in all 99 Li/Fe/V documents (whose VASP 5.x vasprun files carry the known
broken ionic-step ``e_0_energy``, fixed here as pymatgen does, from the last electronic step), in the SiC,
BaSi(S2O7)3 and Si documents, and in the r2SCAN Lu and Si vasprun files. ``e_fr_energy`` (the free energy
whose gradient the forces are) differs from it only for smeared metals (up to 7.7 meV/atom in Li/Fe/V); pass
``energy="free"`` to label with it instead. All three VASP energies are kept in ``meta``.

Stress: VASP/MP print kBar with compression positive; frames store ASE eV/A^3, tensile positive
(:func:`pipeline.units.vasp_kbar_to_ase_stress`).

Frame ids are stable: ``mp-task:<task_id>:<calc_index>:<ionic_step>`` where ``calc_index`` counts the calculations
of the task in the order they ran (0 = first; ``calcs_reversed`` stores them newest first), and
``mp-traj:<task_id>:<ionic_step>`` for mp-api trajectories.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pymatgen.core import Lattice, Structure

from pipeline.entries import fidelity_from_run_type, normalize_run_type
from pipeline.frames import RecordError, frame_row
from pipeline.sources.base import ImportResult
from pipeline.units import vasp_kbar_to_ase_stress

SOURCE_TASK = "mp-task"
SOURCE_TRAJ = "mp-api"

EnergyLabel = Literal["sigma0", "free"]


class IncompleteRecord(RecordError):
    """A document that is internally inconsistent the way a response cut short is: fetch it again."""


#: Largest |E(sigma->0) - E_free| (eV/atom) that smearing can explain; a larger gap means the ionic-step
#: ``e_0_energy`` is the corrupt value some VASP 5.x versions wrote to vasprun.xml.
_MAX_SMEARING_GAP = 0.5


def _plain(obj: Any) -> Any:
    """A pydantic model / MSONable / enum as plain Python data (dicts are returned as they are)."""
    if isinstance(obj, Mapping) or obj is None:
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return obj


def enum_text(value: Any) -> str | None:
    """Enum, ``{"value": ...}`` dict (serialized emmet enum), MPID or string -> plain string."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        value = value.get("value", value.get("string"))
    value = getattr(value, "value", value)
    return None if value is None else str(value)


_PADDED_ALPHA_ID = re.compile(r"^(?P<prefix>[a-z]+-)a+(?P<digits>[a-z]+)$")


def canonical_task_id(task_id: Any) -> str:
    """MP task id as one stable string: emmet pads alphabetic ids with leading 'a' (its zero digit), so
    ``mp-aaaffhdk`` (a ``TaskDoc`` after validation) and ``mp-ffhdk`` (the stored JSON) are the same task;
    the padding is dropped. Numeric ids (``mp-1201400``) are kept as they are."""
    text = enum_text(task_id) or ""
    m = _PADDED_ALPHA_ID.match(text)
    return f"{m['prefix']}{m['digits']}" if m else text


def _structure(obj: Any) -> Structure:
    if isinstance(obj, Structure):
        return obj
    if isinstance(obj, Mapping):
        return Structure.from_dict(obj)
    raise RecordError(f"no structure (got {type(obj).__name__})")


def field_value(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for mappings, ``obj.key`` for models (mp-api returns either, per ``use_document_model``)."""
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def sigma0_energy(
    e_fr: float | None,
    e_0: float | None,
    e_wo: float | None,
    last_estep: Mapping[str, Any] | None,
    n_atoms: int,
) -> tuple[float | None, str]:
    """Sigma->0 total energy of one ionic step, and which rule gave it.

    VASP 5.x wrote a wrong ``e_0_energy`` for each ionic step into vasprun.xml (a value near zero); pymatgen's
    ``Vasprun.final_energy`` repairs it from the last electronic step: ``e_fr(ionic) + (e_0 - e_fr)(last
    electronic step)``. That rule is used whenever the electronic step is available. Without it, a
    plausible ``e_0_energy`` is taken as is; an implausible one (further from ``e_fr_energy`` than smearing can
    explain) falls back to the ionic ``e_wo_entrp``, which those VASP versions filled with the sigma->0 value.
    """
    if e_fr is not None and last_estep is not None:
        est_e0, est_fr = field_value(last_estep, "e_0_energy"), field_value(last_estep, "e_fr_energy")
        if est_e0 is not None and est_fr is not None:
            return round(float(e_fr) + float(est_e0) - float(est_fr), 8), "e_fr+estep(e_0-e_fr)"
    if e_0 is not None and (e_fr is None or abs(e_0 - e_fr) <= _MAX_SMEARING_GAP * n_atoms):
        return float(e_0), "e_0_energy"
    if e_wo is not None and (e_fr is None or abs(e_wo - e_fr) <= _MAX_SMEARING_GAP * n_atoms):
        return float(e_wo), "e_wo_entrp"
    if e_fr is not None:
        return float(e_fr), "e_fr_energy"
    return None, "missing"


def _step_energy(
    step: Mapping[str, Any], n_atoms: int, energy: EnergyLabel
) -> tuple[float | None, dict[str, Any]]:
    e_fr, e_0, e_wo = (
        None if step.get(k) is None else float(step[k]) for k in ("e_fr_energy", "e_0_energy", "e_wo_entrp")
    )
    esteps = step.get("electronic_steps") or []
    last = _plain(esteps[-1]) if esteps else None
    if energy == "free":
        value, rule = e_fr, "e_fr_energy"
    elif energy == "sigma0":
        value, rule = sigma0_energy(e_fr, e_0, e_wo, last, n_atoms)
    else:
        raise ValueError(f"energy must be 'sigma0' or 'free', not {energy!r}")
    info = {"e_fr_energy": e_fr, "e_0_energy": e_0, "e_wo_entrp": e_wo, "energy_rule": rule}
    return value, info


@dataclass(frozen=True)
class _Context:
    task_id: str
    material_id: str | None
    source: str
    run_type: str | None
    calc_type: str | None
    meta: dict[str, Any]


def _step_row(
    frame_id: str,
    step_index: int,
    structure: Structure,
    step: Mapping[str, Any],
    ctx: _Context,
    energy: EnergyLabel,
) -> dict[str, Any]:
    fidelity = fidelity_from_run_type(ctx.run_type)
    if not structure.is_ordered:
        raise RecordError("disordered structure")
    n = len(structure)
    value, info = _step_energy(step, n, energy)
    stress = step.get("stress")
    magmoms = structure.site_properties.get("magmom")
    return frame_row(
        frame_id=frame_id,
        source=ctx.source,
        fidelity=fidelity,
        numbers=structure.atomic_numbers,
        positions=structure.cart_coords,
        cell=structure.lattice.matrix,
        energy=value,
        forces=step.get("forces"),
        stress=None if stress is None else vasp_kbar_to_ase_stress(stress),
        magmoms=magmoms,
        material_id=ctx.material_id,
        task_id=ctx.task_id,
        run_type=ctx.run_type,
        calc_type=ctx.calc_type,
        ionic_step=step_index,
        meta={**ctx.meta, **info},
    )


def task_doc_frames(
    doc: Any, *, material_id: str | None = None, energy: EnergyLabel = "sigma0", source: str = SOURCE_TASK
) -> tuple[list[dict[str, Any]], list[tuple[str, Exception]]]:
    """Frames of every ionic step of a task document, and (step id, error) for the steps that failed.

    Raises :class:`RecordError` when the document itself is unusable (no task id, no calculations).
    """
    doc = _plain(doc)
    task_id = canonical_task_id(field_value(doc, "task_id"))
    if not task_id:
        raise RecordError("task document without task_id")
    calcs = field_value(doc, "calcs_reversed")
    if not calcs:
        raise RecordError(
            f"task {task_id}: no calcs_reversed (mp-api's CoreTaskDoc has no ionic steps: use "
            "MPRester().materials.tasks.get_trajectory and trajectory_frames)"
        )
    calcs = [_plain(c) for c in calcs]
    doc_run_type = enum_text(field_value(doc, "run_type"))
    doc_calc_type = enum_text(field_value(doc, "calc_type")) or enum_text(field_value(doc, "task_type"))
    mid = material_id or enum_text(field_value(doc, "material_id"))
    rows: list[dict[str, Any]] = []
    rejects: list[tuple[str, Exception]] = []
    n_calcs = len(calcs)
    for calc_index, calc in enumerate(reversed(calcs)):  # chronological: 0 = first calculation of the task
        is_last = calc_index == n_calcs - 1
        prefix = f"{source}:{task_id}:{calc_index}"
        output = _plain(calc.get("output")) or {}
        steps = output.get("ionic_steps") or []
        if not steps:
            rejects.append((prefix, RecordError("calculation has no ionic_steps")))
            continue
        run_type = normalize_run_type(enum_text(calc.get("run_type")) or doc_run_type)
        calc_type = enum_text(calc.get("calc_type")) or (doc_calc_type if is_last else None)
        ctx = _Context(
            task_id=task_id,
            material_id=mid,
            source=source,
            run_type=run_type,
            calc_type=calc_type,
            meta={
                "calc_index": calc_index,
                "n_calcs": n_calcs,
                "vasp_version": calc.get("vasp_version"),
                "task_type": enum_text(calc.get("task_type")),
            },
        )
        for i, step in enumerate(steps):
            frame_id = f"{prefix}:{i}"
            try:
                step = _plain(step)
                rows.append(_step_row(frame_id, i, _structure(step.get("structure")), step, ctx, energy))
            except Exception as exc:  # noqa: BLE001 - a bad step is reported, the others are kept
                rejects.append((frame_id, exc))
    return rows, rejects


def task_doc_to_frames(
    doc: Any, *, material_id: str | None = None, energy: EnergyLabel = "sigma0", source: str = SOURCE_TASK
) -> list[dict[str, Any]]:
    """Frames of every ionic step of a task document (dict, emmet ``TaskDoc`` or mp-api document).

    Strict: raises :class:`RecordError` naming the first bad step. :func:`import_task_docs` is the lenient
    batch version that keeps the good steps and rejects the bad ones.
    """
    rows, rejects = task_doc_frames(doc, material_id=material_id, energy=energy, source=source)
    if rejects:
        step_id, exc = rejects[0]
        raise RecordError(f"{step_id}: {type(exc).__name__}: {exc}") from exc
    return rows


def trajectory_frames(
    traj: Any,
    *,
    task_id: str | None = None,
    material_id: str | None = None,
    energy: EnergyLabel = "sigma0",
    source: str = SOURCE_TRAJ,
) -> tuple[list[dict[str, Any]], list[tuple[str, Exception]]]:
    """Frames of an mp-api trajectory (dumped emmet ``RelaxTrajectory``), and (step id, error) of bad steps.

    Raises :class:`RecordError` when the trajectory is inconsistent as a whole (per-step lists of different
    lengths, as a response cut short would give): such a document must be fetched again, not half-imported.
    """
    traj = _plain(traj)
    tid = canonical_task_id(task_id or traj.get("identifier"))
    if not tid:
        raise RecordError("trajectory without identifier/task_id")
    coords = traj.get("cart_coords") or []
    n_steps = len(coords)
    if n_steps == 0:
        raise RecordError(f"trajectory {tid}: no ionic steps")
    declared = traj.get("num_ionic_steps")
    if declared is not None and int(declared) != n_steps:
        raise IncompleteRecord(f"trajectory {tid}: num_ionic_steps={declared} but {n_steps} coordinate sets")
    per_step = ("energy", "e_fr_energy", "e_wo_entrp", "forces", "stress", "electronic_steps")
    for key in per_step:
        values = traj.get(key)
        if values is not None and len(values) != n_steps:
            raise IncompleteRecord(f"trajectory {tid}: {key} has {len(values)} steps, cart_coords {n_steps}")
    lattices = traj.get("lattice")
    if not lattices or len(lattices) not in (1, n_steps):
        raise IncompleteRecord(f"trajectory {tid}: need 1 or {n_steps} lattices, got {len(lattices or [])}")
    elements = [int(z) for z in traj.get("elements") or []]
    run_type = normalize_run_type(enum_text(traj.get("run_type")))
    ctx = _Context(
        task_id=tid,
        material_id=material_id,
        source=source,
        run_type=run_type,
        calc_type=None,
        meta={"task_type": enum_text(traj.get("task_type"))},
    )
    rows, rejects = [], []
    for i in range(n_steps):
        frame_id = f"mp-traj:{tid}:{i}"
        try:
            if coords[i] is None:
                raise RecordError("no coordinates for this step")
            lattice = Lattice(lattices[0] if len(lattices) == 1 else lattices[i])
            structure = Structure(lattice, elements, coords[i], coords_are_cartesian=True)
            step = {
                "e_0_energy": traj["energy"][i] if traj.get("energy") else None,
                **{
                    k: traj[k][i]
                    for k in ("e_fr_energy", "e_wo_entrp", "forces", "stress", "electronic_steps")
                    if traj.get(k)
                },
            }
            rows.append(_step_row(frame_id, i, structure, step, ctx, energy))
        except Exception as exc:  # noqa: BLE001
            rejects.append((frame_id, exc))
    return rows, rejects


def decode_hex_gz_bundle(path: str | Path) -> dict[str, bytes]:
    """emmet's encoded raw-VASP bundles: JSON ``{file name: {"0": hex of gzip bytes}}`` -> {name: raw bytes}.

    The ``.gz`` suffix of each name is dropped (the bytes are returned decompressed).
    """
    data = json.loads(_read_bytes(path))
    out = {}
    for name, chunks in data.items():
        payload = bytes.fromhex("".join(chunks[k] for k in sorted(chunks, key=int)))
        out[name.removesuffix(".gz")] = gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload
    return out


def vasprun_to_task_doc(vasprun: Any, task_id: str, *, run_type: str | None = None) -> dict[str, Any]:
    """A minimal task document (one calculation) from a parsed pymatgen ``Vasprun``.

    ``run_type`` defaults to pymatgen's ``Vasprun.run_type`` (GGA, GGA+U, R2SCAN, ...).
    """
    return {
        "task_id": task_id,
        "calcs_reversed": [
            {
                "run_type": run_type or vasprun.run_type,
                "vasp_version": vasprun.vasp_version,
                "output": {"ionic_steps": vasprun.ionic_steps, "energy": vasprun.final_energy},
            }
        ],
    }


def read_vasprun(source: str | Path | bytes) -> Any:
    """Parse a vasprun.xml (path, .gz path or raw bytes) with pymatgen, skipping DOS/eigenvalues/POTCARs."""
    import tempfile

    from pymatgen.io.vasp import Vasprun

    kwargs = {
        "parse_dos": False,
        "parse_eigen": False,
        "parse_projected_eigen": False,
        "parse_potcar_file": False,
    }
    if isinstance(source, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "vasprun.xml"
            path.write_bytes(source)
            return Vasprun(str(path), **kwargs)
    return Vasprun(str(source), **kwargs)


def _read_bytes(path: str | Path) -> bytes:
    raw = Path(path).read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def load_task_docs(path: str | Path) -> list[Any]:
    """Task documents in a JSON / JSON.gz file (one document or a list) or in every such file of a folder."""
    path = Path(path)
    if path.is_dir():
        return [doc for p in sorted(path.glob("*.json*")) for doc in load_task_docs(p)]
    data = json.loads(_read_bytes(path))
    return data if isinstance(data, list) else [data]


def _records(path_or_docs: str | Path | Iterable[Any] | Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    if isinstance(path_or_docs, (str, Path)):
        docs: Iterable[Any] = load_task_docs(path_or_docs)
        name = Path(path_or_docs).name
    elif isinstance(path_or_docs, Mapping) or hasattr(path_or_docs, "model_dump"):
        docs, name = [path_or_docs], "docs"
    else:
        docs, name = path_or_docs, "docs"
    for i, doc in enumerate(docs):
        tid = canonical_task_id(field_value(_plain(doc), "task_id"))
        yield (tid or f"{name}:{i}"), doc


def import_task_docs(
    path_or_docs: str | Path | Iterable[Any] | Mapping[str, Any],
    *,
    energy: EnergyLabel = "sigma0",
    material_ids: Mapping[str, str] | None = None,
) -> ImportResult:
    """Frames of every ionic step of every task document; bad documents and bad steps become rejects.

    ``path_or_docs``: a JSON/JSON.gz file or folder of them, one document, or an iterable of documents.
    ``material_ids`` optionally maps task id -> material id (task documents do not carry it).
    """
    result = ImportResult(SOURCE_TASK)
    for record_id, doc in _records(path_or_docs):
        try:
            rows, rejects = task_doc_frames(
                doc, material_id=(material_ids or {}).get(record_id), energy=energy
            )
        except Exception as exc:  # noqa: BLE001 - a bad document is reported, the batch carries on
            result.reject(record_id, exc)
            continue
        _extend(result, rows, rejects)
    return result


def _extend(result: ImportResult, rows: list[dict[str, Any]], rejects: list[tuple[str, Exception]]) -> None:
    result.rows.extend(rows)
    for step_id, exc in rejects:
        result.reject(step_id, exc)


def import_vasprun(
    source: str | Path | bytes,
    task_id: str,
    *,
    run_type: str | None = None,
    material_id: str | None = None,
    energy: EnergyLabel = "sigma0",
) -> ImportResult:
    """Frames of every ionic step of one vasprun.xml (file, .gz or bytes)."""
    result = ImportResult(SOURCE_TASK)
    try:
        doc = vasprun_to_task_doc(read_vasprun(source), task_id, run_type=run_type)
        rows, rejects = task_doc_frames(doc, material_id=material_id, energy=energy)
    except Exception as exc:  # noqa: BLE001
        result.reject(task_id, exc)
        return result
    _extend(result, rows, rejects)
    return result


def final_step_energy(doc: Any) -> float:
    """``output.energy`` of a task document's last calculation (MP's reported raw total energy)."""
    doc = _plain(doc)
    last = _plain(doc["calcs_reversed"][0])
    return float(_plain(last["output"])["energy"])


__all__ = [
    "IncompleteRecord",
    "canonical_task_id",
    "decode_hex_gz_bundle",
    "enum_text",
    "field_value",
    "final_step_energy",
    "import_task_docs",
    "import_vasprun",
    "load_task_docs",
    "read_vasprun",
    "sigma0_energy",
    "task_doc_frames",
    "task_doc_to_frames",
    "trajectory_frames",
    "vasprun_to_task_doc",
]
