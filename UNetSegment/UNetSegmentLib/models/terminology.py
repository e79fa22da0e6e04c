"""One terminology per segment: the codes of a bundle label, as every output writes them.

A label in ``model.json`` may carry a ``code`` (``{"scheme", "value", "meaning"}``: the segmented
property *type*) and a Slicer ``terminology`` string (``context~category~type~type modifier~anatomic
context~region~region modifier``, each code as ``scheme^value^meaning``). The ``.seg.nrrd`` (Slicer's
``TerminologyEntry`` tag), the DICOM SEG (segmented property category/type) and ``summary.json`` all
take their codes from :func:`label_codes`, and :func:`check_label_codes` refuses a bundle whose two
fields name different concepts, so a segment is the same concept in every file.
"""
from __future__ import annotations

from typing import Any

from ..errors import ModelError

SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: used where a label gives no category / no code
DEFAULT_CATEGORY = {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically Altered Structure"}
DEFAULT_TYPE = {"scheme": "SCT", "value": "52988006", "meaning": "Lesion"}


def _parse_code(text: str) -> dict[str, str] | None:
    parts = text.split("^")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    return {"scheme": parts[0], "value": parts[1], "meaning": parts[2]}


def parse_terminology(entry: str) -> tuple[dict[str, str], dict[str, str]] | None:
    """``(category, type)`` codes of a Slicer terminology string (None if it is not one)."""
    fields = entry.split("~")
    if len(fields) < 3:
        return None
    cat, typ = _parse_code(fields[1]), _parse_code(fields[2])
    return (cat, typ) if cat and typ else None


def _code_text(code: dict[str, str]) -> str:
    return f"{code['scheme']}^{code['value']}^{code['meaning']}"


def label_codes(label: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """``(category, type)`` of a bundle label: type = its ``code``, else the type of its
    ``terminology``, else SCT 52988006 "Lesion"; category from ``terminology``, else SCT 49755003."""
    parsed = parse_terminology(label["terminology"]) if label.get("terminology") else None
    category = parsed[0] if parsed else dict(DEFAULT_CATEGORY)
    code = label.get("code")
    typ = {k: str(code[k]) for k in ("scheme", "value", "meaning")} if code else (parsed[1] if parsed else dict(DEFAULT_TYPE))
    return category, typ


def label_terminology(label: dict[str, Any]) -> str:
    """The Slicer ``TerminologyEntry`` of a label: its own string (checked to match ``code``), else one
    built from :func:`label_codes`."""
    if label.get("terminology"):
        return str(label["terminology"])
    category, typ = label_codes(label)
    return f"{SLICER_CONTEXT}~{_code_text(category)}~{_code_text(typ)}~^^~{ANATOMIC_CONTEXT}~^^~^^"


def check_label_codes(meta: dict[str, Any], where: str = "model.json") -> None:
    """Refuse labels whose ``terminology`` string is malformed or names another type than ``code``."""
    for i, label in enumerate(meta.get("labels", [])):
        entry = label.get("terminology")
        if not entry:
            continue
        parsed = parse_terminology(entry)
        if parsed is None:
            raise ModelError(f"{where}: labels/{i} ({label.get('name')}): terminology {entry!r} is not a Slicer "
                             "terminology entry", "use 'context~SCHEME^VALUE^MEANING (category)~SCHEME^VALUE^MEANING (type)~...'")
        code = label.get("code")
        typ = parsed[1]
        if code and (code["scheme"], code["value"], code["meaning"]) != (typ["scheme"], typ["value"], typ["meaning"]):
            raise ModelError(
                f"{where}: labels/{i} ({label.get('name')}): code {code['scheme']} {code['value']} \"{code['meaning']}\" and "
                f"terminology type {typ['scheme']} {typ['value']} \"{typ['meaning']}\" differ, so outputs would disagree",
                "give the same code in both (or drop one: the other is derived from it)",
            )
