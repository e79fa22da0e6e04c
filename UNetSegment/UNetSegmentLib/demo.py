"""The demo: one command, one case per bundled model, every output of the ``segment`` contract in one folder.

* CT models (one CT channel, e.g. ``ct-hemorrhage``, ``tiny-blob``): the real sample head CT with a
  synthetic hemorrhage (a case never used in training).
* Perfusion models (CBF, CBV, MTT, Tmax): synthetic perfusion maps with an infarct core from
  :func:`.phantom.perfusion_phantom` — generated in the core, no download and no training extras.
"""
from __future__ import annotations

from pathlib import Path

from .engine.inference import CancelToken, ProgressFn
from .errors import UsageError
from .io.readers import read_image
from .io.sample import default_cache_dir, fetch_sample
from .io.writers import write_image
from .models.bundle import Bundle, default_model_name, load_bundle
from .params import SegmentParams
from .phantom import PERFUSION_CHANNELS, PERFUSION_PHANTOM_VERSION, perfusion_phantom
from .serving.job import segment_files

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


def perfusion_demo_case(cache_dir: Path | None = None) -> tuple[dict[str, Path], Path]:
    """Write (once) and return the perfusion demo maps (channel → NIfTI path) and the true core label."""
    case = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / f"demo-perfusion-{DEMO_SEED}-v{PERFUSION_PHANTOM_VERSION}"
    paths = {c: case / f"{c}.nii.gz" for c in PERFUSION_CHANNELS}
    lab = case / "label.nii.gz"
    if not (lab.exists() and all(p.exists() for p in paths.values())):
        case.mkdir(parents=True, exist_ok=True)
        maps, label = perfusion_phantom(seed=DEMO_SEED)
        for c, p in paths.items():
            write_image(maps[c], p)
        write_image(label, lab)  # last: its presence means the case is complete
    return paths, lab


def demo_inputs(bundle: Bundle, cache_dir: Path | None = None) -> tuple[list[str], str]:
    """The demo case for ``bundle``: ``segment`` input tokens and a one-line description."""
    names = bundle.channel_names
    if sorted(names) == sorted(PERFUSION_CHANNELS):
        paths, _ = perfusion_demo_case(cache_dir)
        return [f"{c}={paths[c]}" for c in names], (
            f"{paths[names[0]].parent} (synthetic CBF/CBV/MTT/Tmax maps with a ~25 mL infarct core, seed {DEMO_SEED})")
    if len(names) == 1 and bundle.meta["inputs"][0].get("modality", "").upper() == "CT":
        img, _ = demo_case(cache_dir)
        return [str(img)], f"{img} (real head CT + synthetic hemorrhage, seed {DEMO_SEED})"
    raise UsageError(
        f"model {bundle.name} has no demo case (its inputs: {', '.join(names)}; demos exist for CT and for "
        f"{'/'.join(PERFUSION_CHANNELS)} models)",
        "run `unetsegment segment` on your own volumes instead",
    )


def run_demo(
    output_dir: Path,
    model: str | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    params: SegmentParams | None = None,
) -> dict:
    """Segment the demo case of ``model`` (default: the default model) into ``output_dir``; the summary."""
    bundle = load_bundle(model or default_model_name())
    inputs, what = demo_inputs(bundle, cache_dir)
    print(f"demo case for {bundle.name}: {what}")
    return segment_files(inputs, output_dir, model or bundle.name, params or SegmentParams(), overwrite=True,
                         progress=progress, cancel=cancel)
