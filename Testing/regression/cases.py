"""The regression cases: the shipped models on the demo and validation cases, and what a run must reproduce.

``python Testing/regression/cases.py --record`` (re)writes ``golden.json`` from the current code;
``Testing/test_regression.py`` re-runs every case and compares. Only what the models compute is
recorded (labels, the probability map, the lesion table), as hashes and sums: no third-party
voxel data is committed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "UNetSegment"))

from UNetSegmentLib.image import Image  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.io.writers import write_image  # noqa: E402

GOLDEN = HERE / "golden.json"


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    volumes: Callable[[], dict[str, Image]]  # channel -> image
    params: dict = field(default_factory=dict)  # SegmentParams fields


def _demo_ct() -> dict[str, Image]:
    from UNetSegmentLib.demo import demo_case

    return {"CT": read_image(demo_case()[0])}


def _demo_ct_reoriented() -> dict[str, Image]:
    """The demo CT stored with permuted, flipped array axes and a shifted origin (same anatomy in RAS)."""
    img = _demo_ct()["CT"]
    arr = np.ascontiguousarray(np.flip(img.array.transpose(1, 0, 2), axis=2))  # K,J,I -> J,K,I, then i flipped
    k, j, i = img.array.shape
    # new voxel (i', j', k') = old (I-1-i', k', j')  ->  columns of the old matrix reordered
    m = img.ijk_to_ras
    new = np.eye(4)
    new[:3, 0] = -m[:3, 0]
    new[:3, 1] = m[:3, 2]
    new[:3, 2] = m[:3, 1]
    new[:3, 3] = (m @ np.array([i - 1, 0, 0, 1.0]))[:3]
    return {"CT": Image(arr, new)}


def _demo_perfusion() -> dict[str, Image]:
    from UNetSegmentLib.demo import perfusion_demo_case

    paths, _ = perfusion_demo_case()
    return {c: read_image(p) for c, p in paths.items()}


def _val_ct(seed: int) -> Callable[[], dict[str, Image]]:
    def make() -> dict[str, Image]:
        from UNetSegmentLib.models.training.cases import VALIDATION, ct_hemorrhage_case

        (ct,), _ = ct_hemorrhage_case(seed, VALIDATION)
        return {"CT": ct}

    return make


def _val_perfusion(seed: int) -> Callable[[], dict[str, Image]]:
    def make() -> dict[str, Image]:
        from UNetSegmentLib.models.training.cases import VALIDATION, perfusion_case

        maps, _ = perfusion_case(seed, VALIDATION)
        return dict(zip(("CBF", "CBV", "MTT", "Tmax"), maps))

    return make


NO_MAPS = {"heatmaps": [], "device": "cpu"}
CASES = [
    Case("ct-hemorrhage/demo", "ct-hemorrhage", _demo_ct, NO_MAPS),
    Case("ct-hemorrhage/demo-reoriented", "ct-hemorrhage", _demo_ct_reoriented, NO_MAPS),
    Case("ct-hemorrhage/demo-plain-engine", "ct-hemorrhage", _demo_ct, {**NO_MAPS, "engine": "plain"}),
    Case("ct-hemorrhage/val-900000", "ct-hemorrhage", _val_ct(900000), NO_MAPS),
    Case("ct-hemorrhage/val-900001", "ct-hemorrhage", _val_ct(900001), NO_MAPS),
    Case("mr-perfusion-lesion/demo", "mr-perfusion-lesion", _demo_perfusion, NO_MAPS),
    Case("mr-perfusion-lesion/val-950000", "mr-perfusion-lesion", _val_perfusion(950000), NO_MAPS),
    Case("tiny-blob/demo-tta-uncertainty", "tiny-blob", _demo_ct, {"heatmaps": ["uncertainty"], "tta": True, "device": "cpu"}),
]


def cpu_capability() -> str:
    """The SIMD level torch's kernels use: runs are bit-identical only where it (and torch) match.

    AMX tiles are named too (appended only where present, so older records stay valid): oneDNN runs
    the bf16 convolutions on them, which rounds differently from AVX512-BF16 on the same SIMD level."""
    import torch

    amx = ", AMX" if _has_amx() else ""
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}{amx}, {platform.machine()}"


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def _array_record(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a)
    f = a.astype(np.float64)
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "dtype": str(a.dtype), "shape": list(a.shape),
            "sum": float(f.sum()), "sum_sq": float((f * f).sum()), "nonzero": int(np.count_nonzero(a)),
            "max": float(f.max()) if a.size else 0.0}


def run_case(case: Case, work: Path) -> dict:
    """Segment one case through ``segment_files`` (the CLI's path) and record what it produced."""
    from UNetSegmentLib.serving.job import segment_files
    from UNetSegmentLib.params import SegmentParams

    vols = case.volumes()
    work.mkdir(parents=True, exist_ok=True)
    tokens = []
    for ch, img in vols.items():
        p = work / f"{ch}.nrrd"
        write_image(img, p)
        tokens.append(f"{ch}={p}")
    p = dict(case.params)
    if "heatmaps" in p:
        p["heatmaps"] = tuple(p["heatmaps"])
    summary = segment_files(tokens, work / "out", case.model, SegmentParams(**p))
    out = work / "out"
    rec = {
        "labels": _array_record(read_image(out / "segmentation.seg.nrrd").array),
        "probability": _array_record(read_image(out / "probability.nrrd").array),
        "lesions_csv": (out / "lesions.csv").read_text(encoding="utf-8"),
        "summary": {k: summary.get(k) for k in ("n_lesions", "total_volume_ml", "parameters")},
    }
    for kind in ("uncertainty",):
        if (out / f"{kind}.nrrd").exists():
            rec[kind] = _array_record(read_image(out / f"{kind}.nrrd").array)
    return rec


def numeric_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def record() -> None:
    out = {"cpu": cpu_capability(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n, case in enumerate(CASES):
            print(f"recording {case.name}", flush=True)
            out["cases"][case.name] = run_case(case, Path(tmp) / str(n))
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
    else:
        print(__doc__)
