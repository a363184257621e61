"""Relaxed structures of a report in files a scientist opens directly: one extxyz with every candidate (ASE) and
one CIF per candidate (pymatgen's CifWriter). Written atomically; the report's ``structure`` column keeps the
pymatgen JSON."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ase.io import write as ase_write
from pymatgen.core import Structure
from pymatgen.io.ase import AseAtomsAdaptor
from pymatgen.io.cif import CifWriter

from pipeline.io import write_text_atomic

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")

#: Report columns copied into each extxyz frame's info (next to ``candidate_id``).
INFO_KEYS = ("formula", "material_id", "fidelity", "thermo_type", "energy", "e_hull_pred_dft_hull",
             "e_hull_pred_model_hull", "e_hull_true", "relax_status")


def safe_name(candidate_id: str) -> str:
    """A file name for a candidate id (ids hold ':' and '/' from paths and substitutions)."""
    return _UNSAFE.sub("_", candidate_id).strip("._") or "candidate"


def write_structures(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Write ``relaxed.extxyz`` and ``<candidate>.cif`` for every row with a ``structure``; {} when none has."""
    out = Path(out_dir)
    frames, cifs, used = [], {}, set()
    for r in rows:
        if not r.get("structure"):
            continue
        structure = Structure.from_dict(json.loads(r["structure"]))
        atoms = AseAtomsAdaptor.get_atoms(structure)
        atoms.info = {"candidate_id": r["candidate_id"],
                      **{k: r[k] for k in INFO_KEYS if r.get(k) is not None}}
        frames.append(atoms)
        name = safe_name(r["candidate_id"])
        while name in used:
            name += "_"
        used.add(name)
        cifs[name] = str(CifWriter(structure))
    if not frames:
        return {}
    buf = io.StringIO()
    ase_write(buf, frames, format="extxyz")
    files = {"relaxed_extxyz": write_text_atomic(out / "relaxed.extxyz", buf.getvalue())}
    for name, text in cifs.items():
        write_text_atomic(out / f"{name}.cif", text)
    files["relaxed_cif_dir"] = out
    return files
