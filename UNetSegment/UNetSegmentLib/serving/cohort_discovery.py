"""The cases of a cohort: a folder of cases or a CSV list (see :mod:`.batch`), each a :class:`Case`
with one input per model channel, or the reason it cannot run.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from ..io.readers import VOLUME_SUFFIXES
from .cohort_tables import COHORT_LESIONS, COHORT_SUMMARY

_BAD_ID = re.compile(r"[/\\\x00-\x1f\x7f]")


@dataclass
class Case:
    """One case: its id (the output sub-folder) and one input path per model channel, in order."""

    case_id: str
    inputs: list[str] = field(default_factory=list)
    #: set when the case is known bad before running (bad id, missing channel …)
    error: str = ""


def check_case_id(case_id: str) -> str:
    """'' when ``case_id`` is usable as a folder name inside the output folder, else the reason."""
    if not case_id:
        return "empty case_id"
    if _BAD_ID.search(case_id):
        return f"case_id {case_id!r} holds a path separator or control character"
    if case_id.startswith("."):
        return f"case_id {case_id!r} starts with '.'"
    if len(case_id) > 200:
        return f"case_id {case_id[:20]!r}… is longer than 200 characters"
    if case_id in (COHORT_LESIONS, COHORT_SUMMARY):
        return f"case_id {case_id!r} is the name of a cohort table"
    return ""


def _volume_stem(name: str) -> str | None:
    """``name`` without its volume suffix (any case), None when it is not a volume file name."""
    low = name.lower()
    for s in VOLUME_SUFFIXES:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def discover_cases(source: str | os.PathLike, channels: Sequence[str], exclude: str | os.PathLike | None = None) -> tuple[list[Case], list[str]]:
    """Cases of a folder or CSV list (see the module doc) and notes on what was ignored."""
    src = Path(source)
    if not src.exists():
        raise UsageError(f"{src} does not exist", "give a folder of cases or a CSV list with case_id and one column per channel")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UsageError(f"{src.name} is not a folder or a .csv list", "give a folder of cases or a CSV with case_id and one column per channel")
        cases, notes = _cases_from_csv(src, channels), []
    else:
        cases, notes = _cases_from_folder(src, channels, Path(exclude).resolve() if exclude else None)
    seen: set[str] = set()
    for c in cases:
        if not c.error:
            c.error = check_case_id(c.case_id)
        if c.case_id in seen and not c.error:
            c.error = f"duplicate case_id {c.case_id!r}: an earlier case has the same id"
        seen.add(c.case_id)
    if not cases:
        raise UsageError(f"no cases found in {src}", "put one volume file, DICOM folder or per-case folder per case there, or give a CSV list")
    return cases, notes


def _cases_from_csv(path: Path, channels: Sequence[str]) -> list[Case]:
    """One case per non-empty row of a CSV list with ``case_id`` and one column per channel."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path.name}: {e}", "give a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    lower = {h.lower(): h for h in header}
    if "case_id" not in lower:
        raise UsageError(f"{path.name} has no case_id column (columns: {', '.join(header) or 'none'})",
                         "add a header row: case_id," + ",".join(channels))
    cols = []
    for ch in channels:
        col = lower.get(ch.lower())
        if col is None and len(channels) == 1:
            col = lower.get("path") or lower.get("input")
        if col is None:
            raise UsageError(f"{path.name} has no column for channel {ch}",
                             "give a header row case_id," + ",".join(channels) + " (one column per model channel)")
        cols.append(col)
    base = path.parent
    cases = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        cid = row.get(lower["case_id"], "")
        if not cid and not any(row.values()):
            continue
        case = Case(cid or f"row{n}")
        missing = [ch for ch, col in zip(channels, cols) if not row.get(col)]
        if not cid:
            case.error = f"row {n} of {path.name} has no case_id"
        elif missing:
            case.error = f"row {n} of {path.name} has no path for {', '.join(missing)}"
        case.inputs = [str((base / row[col]) if row.get(col) else "") for col in cols]
        cases.append(case)
    return cases


def _cases_from_folder(folder: Path, channels: Sequence[str], exclude: Path | None) -> tuple[list[Case], list[str]]:
    """One case per visible volume file or sub-folder of ``folder`` (``exclude``: the output folder)."""
    cases: list[Case] = []
    ignored: list[str] = []
    multi = len(channels) > 1
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        if p.name.startswith("."):
            continue
        if exclude is not None and (p.resolve() == exclude or p.resolve() in exclude.parents):
            continue  # the output folder inside the input folder
        if p.is_dir():
            cases.append(_case_from_subfolder(p, channels))
        elif (stem := _volume_stem(p.name)) is not None:
            if multi:
                cases.append(Case(stem, [str(p)], f"{p.name} is a single file but the model needs {len(channels)} channels "
                                                   f"({', '.join(channels)}): put them in a per-case folder or list them in a CSV"))
            else:
                cases.append(Case(stem, [str(p)]))
        else:
            ignored.append(p.name)
    notes = [f"ignored {len(ignored)} file(s) that are not volumes: {', '.join(ignored[:5])}{' …' if len(ignored) > 5 else ''}"] if ignored else []
    return cases, notes


def _case_from_subfolder(d: Path, channels: Sequence[str]) -> Case:
    """A case folder: one volume per channel named after it, a single volume file, or a DICOM series."""
    entries = [e for e in sorted(d.iterdir(), key=lambda q: q.name) if not e.name.startswith(".")]
    by_stem: dict[str, Path] = {}
    for e in entries:
        stem = e.name if e.is_dir() else _volume_stem(e.name)
        if stem is not None:
            by_stem.setdefault(stem.lower(), e)
    named = [by_stem.get(ch.lower()) for ch in channels]
    if all(named):
        return Case(d.name, [str(p) for p in named])
    if len(channels) > 1:
        missing = [ch for ch, p in zip(channels, named) if p is None]
        return Case(d.name, [], f"case folder {d.name} has no volume for {', '.join(missing)} "
                                f"(expects one file or DICOM folder per channel named {', '.join(channels)}, e.g. {channels[0]}.nii.gz)")
    volumes = [e for e in entries if e.is_file() and _volume_stem(e.name) is not None]
    if len(volumes) == 1 and len(entries) == 1:
        return Case(d.name, [str(volumes[0])])
    return Case(d.name, [str(d)])  # a DICOM series folder (read_image says what is wrong if it is not)

