"""Materials Project dumps in AIRSS ``.res`` form (one relaxed structure + raw energy per file).

The format (as written by the mp-res tools) carries, in ``REM`` lines, the raw VASP energy ``Energy
(Uncorrected)``, ``Correction`` (0: stripped on purpose), ``material_id``, ``run_type`` (GGA | GGA+U | R2SCAN) and
``task_id``; the last atom column is the magnetic moment. Parsing is pymatgen's ``ResProvider``; only the REM
key/value lines are read here, because pymatgen keeps them as free text.

The files hold no POTCAR or U information. MP's run type names the U scheme unambiguously (MP input sets), so the
entry parameters get MP's standard U values for GGA+U (``MP_HUBBARD_U`` below, MPRelaxSet / MP2020) and
``potcar_spec`` is left out: apply compatibility schemes with ``check_potcar=False``.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pymatgen.core.entries import ComputedStructureEntry
from pymatgen.io.res import ResProvider

from pipeline.entries import entry_to_row, fidelity_from_run_type, normalize_run_type
from pipeline.frames import RecordError
from pipeline.sources.base import ImportResult, collect

SOURCE = "res"

#: MP's U values (eV) for oxides and fluorides, as in MPRelaxSet and MaterialsProject2020Compatibility.
MP_HUBBARD_U = {"Co": 3.32, "Cr": 3.7, "Fe": 5.3, "Mn": 3.9, "Mo": 4.38, "Ni": 6.2, "V": 3.25, "W": 6.2}

_REM = re.compile(r"^\s*(?P<key>[A-Za-z_ ()]+?)\s*=\s*(?P<value>\S+)")


def parse_rems(rems: list[str]) -> dict[str, str]:
    """``REM key = value [unit]`` lines -> {key: value}."""
    out = {}
    for line in rems:
        m = _REM.match(line)
        if m:
            out[m.group("key").strip()] = m.group("value")
    return out


def res_to_entry(text: str, name: str = "") -> ComputedStructureEntry:
    """One ``.res`` text -> ComputedStructureEntry (raw energy, MP-style parameters)."""
    try:
        provider = ResProvider.from_str(text)
    except Exception as exc:  # pymatgen raises several types for malformed files
        raise RecordError(f"unparseable .res: {exc}") from exc
    rem = parse_rems(provider.rems)
    if "Energy (Uncorrected)" not in rem:
        raise RecordError("no 'REM Energy (Uncorrected)' line")
    energy = float(rem["Energy (Uncorrected)"])
    run_type = normalize_run_type(rem.get("run_type"))
    fidelity_from_run_type(run_type)  # validates the run type
    structure = provider.structure
    if structure.lattice.volume < 1e-6:
        raise RecordError("zero-volume cell")
    elements = {el.symbol for el in structure.composition.elements}
    hubbards = {el: u for el, u in MP_HUBBARD_U.items() if el in elements} if run_type == "GGA+U" else {}
    parameters: dict[str, Any] = {"run_type": run_type, "is_hubbard": bool(hubbards), "hubbards": hubbards}
    material_id = rem.get("material_id")
    data = {"material_id": material_id, "task_id": rem.get("task_id"), "file": name}
    entry_id = f"{material_id}-{run_type}" if material_id else Path(name).stem
    return ComputedStructureEntry(structure, energy, parameters=parameters, data=data, entry_id=entry_id)


def _decode(name: str, raw: bytes) -> str | RecordError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RecordError(f"not UTF-8 text (byte {exc.start}): not a .res file")


def iter_res(path: str | Path) -> Iterator[tuple[str, str | RecordError]]:
    """(name, text) of each ``.res`` in a file, a folder, or a tar archive; a file that cannot be decoded
    yields a :class:`RecordError` in place of its text (it becomes a reject, the others carry on)."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(path.rglob("*.res")):
            yield str(p.relative_to(path)), _decode(p.name, p.read_bytes())
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".res"):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        yield Path(member.name).name, _decode(member.name, fh.read())
    else:
        yield path.name, _decode(path.name, path.read_bytes())


def read_res_entries(path: str | Path) -> tuple[list[ComputedStructureEntry], ImportResult]:
    """Entries of every readable ``.res`` under ``path``; unreadable files become rejects."""
    entries: list[ComputedStructureEntry] = []

    def convert(name: str, text: str | RecordError) -> list[dict[str, Any]]:
        if isinstance(text, RecordError):
            raise text
        entry = res_to_entry(text, name)
        row = entry_to_row(entry, source=SOURCE, thermo_type="raw", meta={"file": name, "archive": str(path)})
        entries.append(entry)
        return [row]

    result = collect(SOURCE, iter_res(path), convert)
    return entries, result


def import_res(path: str | Path) -> ImportResult:
    """Entry rows (ENTRIES_SCHEMA, thermo_type 'raw') of every ``.res`` under ``path``."""
    return read_res_entries(path)[1]
