"""The demo: the real sample head CT with a synthetic hemorrhage (a case never used in training),
segmented with the default model; every output of the ``segment`` contract goes to one folder."""
from __future__ import annotations

from pathlib import Path

from .inference import CancelToken, ProgressFn
from .io.readers import read_image
from .io.sample import fetch_sample
from .io.writers import write_image
from .job import segment_files
from .params import SegmentParams

DEMO_SEED = 2026  # training uses other seeds


def demo_case(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Write (once) and return the demo CT and its true label next to the cached sample CT."""
    from .synth import make_demo_case

    ct_path = fetch_sample(cache_dir)
    case = ct_path.parent / f"demo-case-{DEMO_SEED}"
    img, lab = case / "image.nii.gz", case / "label.nii.gz"
    if not (img.exists() and lab.exists()):
        case.mkdir(parents=True, exist_ok=True)
        ct, label = make_demo_case(read_image(ct_path), seed=DEMO_SEED)
        write_image(ct, img)
        write_image(label, lab)
    return img, lab


def run_demo(
    output_dir: Path,
    model: str | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    img, _ = demo_case(cache_dir)
    print(f"demo case: {img} (real head CT + synthetic hemorrhage, seed {DEMO_SEED})")
    return segment_files([str(img)], output_dir, model, SegmentParams(), overwrite=True, progress=progress, cancel=cancel)
