"""Both error kinds of the input-domain check (engine/domain.py), per model family.

Must be accepted (a refusal is a *false refusal*): the validation and tune cases of the model's
training config (written by ``python -m UNetSegmentLib.models.training.cases``; pass their folders),
the sample head CT and its robustness variants (thick, oblique, flipped, low-dose, 512², posterior
fossa only, cut at the vertex, child-sized, craniectomy), the demo case, and small synthetic head
phantoms (the contract check's ≈ 80 mm one among them); for the perfusion model its phantom maps.

Must be refused (an acceptance is a *false acceptance*): the chest CT shipped in the ``slicerio``
wheel (and slabs of it), nilearn's MNI152 T1 (MR) at 1 and 2 mm, each perfusion map given as CT, noise
volumes, a CT stored without its rescale; for the perfusion model a CT, noise and MTT in ms.

    python bench/input_domain.py [--cases DIR ...] [--perfusion-cases DIR ...] [--json OUT]

Prints one line per example and the two error rates. No timing: the check's cost is printed for
information only (it runs once per segmentation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.analysis.evaluate import case_inputs, find_cases  # noqa: E402
from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.engine.domain import check_domain  # noqa: E402
from UNetSegmentLib.image import Image  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.io.sample import load_sample  # noqa: E402
from UNetSegmentLib.models.bundle import load_bundle  # noqa: E402
from UNetSegmentLib.models.training.model_card import CASE_EXAMPLE_PREFIX  # noqa: E402
from UNetSegmentLib.models.training.head_variants import head_ct_variants  # noqa: E402
from UNetSegmentLib.phantom import head_with_blob, oblique_direction, perfusion_phantom  # noqa: E402


def head_ct_accepted(case_dirs: list[Path], channels: list[str]):
    ct = load_sample()
    yield "sample head CT", [ct]
    for name, img in head_ct_variants(ct).items():
        yield f"sample: {name}", [img]
    yield "demo case", [read_image(demo_case()[0])]
    yield "contract phantom (≈ 80 mm, 3 mm oblique)", [head_with_blob((40, 96, 96), (0.9, 0.9, 3.0), oblique_direction(12.0))[0]]
    yield "test phantom 96 mm", [head_with_blob((24, 64, 64), (1.5, 1.5, 3.0))[0]]
    yield "test phantom 115 mm, 4 mm slices", [head_with_blob()[0]]
    for d in case_dirs:
        for case in find_cases(d, channels):
            yield CASE_EXAMPLE_PREFIX + f"{d.name}/{case.name}", [read_image(p) for p in case_inputs(case, channels)]


def head_ct_refused():
    import slicerio

    chest = read_image(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")
    yield "chest CT (slicerio CTChest4)", [chest]
    k = chest.array.shape[0]
    yield "chest CT, upper half", [Image(chest.array[k // 2:].copy(), chest.ijk_to_ras @ _shift_k(k // 2))]
    yield "chest CT, lower half", [Image(chest.array[: k // 2].copy(), chest.ijk_to_ras)]
    from nilearn import datasets

    for res in (1, 2):
        t1 = datasets.load_mni152_template(resolution=res)
        yield f"MNI152 T1 MR ({res} mm)", [Image(np.asarray(t1.get_fdata(), np.float32).transpose(2, 1, 0).copy(), t1.affine)]
    maps, _ = perfusion_phantom(seed=4)
    for name, img in maps.items():
        yield f"perfusion {name} map given as CT", [img]
    ct = load_sample()
    rng = np.random.default_rng(0)
    yield "noise N(0, 500 HU)", [ct.with_array(rng.normal(0, 500, ct.array.shape).astype(np.float32))]
    yield "noise uniform −1024…3071", [ct.with_array(rng.uniform(-1024, 3071, ct.array.shape).astype(np.float32))]
    yield "noise N(40, 20) (soft tissue only)", [ct.with_array(rng.normal(40, 20, ct.array.shape).astype(np.float32))]
    yield "noise N(−1000, 50) plus bone speckle", [ct.with_array(np.where(rng.uniform(size=ct.array.shape) < 0.02, 1500.0,
                                                                        rng.normal(-1000, 50, ct.array.shape)).astype(np.float32))]
    yield "head CT without its rescale (+1024)", [ct.with_array(ct.array.astype(np.float32) + 1024)]


def _shift_k(k0: int) -> np.ndarray:
    s = np.eye(4)
    s[2, 3] = k0
    return s


def perfusion_accepted(case_dirs: list[Path], channels: list[str]):
    for seed in range(6):
        maps, _ = perfusion_phantom(seed=seed)
        yield f"perfusion phantom seed {seed}", [maps[c] for c in channels]
    for d in case_dirs:
        for case in find_cases(d, channels):
            yield CASE_EXAMPLE_PREFIX + f"{d.name}/{case.name}", [read_image(p) for p in case_inputs(case, channels)]


def perfusion_refused(channels: list[str]):
    from UNetSegmentLib.image import resample

    maps, _ = perfusion_phantom(seed=5)
    good = [maps[c] for c in channels]
    ref = good[0]
    ct = resample(load_sample(), ref.array.shape, ref.ijk_to_ras, order=1, fill=-1000.0)
    yield "head CT as every channel", [ct] * len(channels)
    yield "head CT as CBF", [ct] + good[1:]
    rng = np.random.default_rng(1)
    yield "noise N(0, 1) as CBF", [ref.with_array(rng.normal(0, 1, ref.array.shape).astype(np.float32))] + good[1:]
    yield "MTT in milliseconds", [g.with_array(g.array * 1000.0) if c == "MTT" else g for g, c in zip(good, channels)]
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    t1i = Image(np.asarray(t1.get_fdata(), np.float32).transpose(2, 1, 0).copy(), t1.affine)
    t1r = resample(t1i, ref.array.shape, ref.ijk_to_ras, order=1, fill=0.0)
    yield "MNI152 T1 (0–1 scaled ×1000) as every channel", [t1r.with_array(t1r.array * 1000.0)] * len(channels)


def run(model: str, accepted, refused) -> dict:
    bundle = load_bundle(model)
    rows = {"accepted": [], "refused": []}
    for kind, examples in (("accepted", accepted), ("refused", refused)):
        for name, images in examples:
            t = time.perf_counter()
            v = check_domain(images, bundle.channel_names, bundle.meta)
            dt = time.perf_counter() - t
            ok = (v.verdict != "refuse") if kind == "accepted" else (v.verdict == "refuse")
            rows[kind].append({"example": name, "verdict": v.verdict, "correct": ok, "seen": v.seen, "seconds": round(dt, 3)})
            print(f"  {'ok ' if ok else 'ERR'} must be {kind[:-2]}ed: {name:50s} → {v.verdict:6s} {dt * 1000:5.0f} ms  {v.seen[:90]}")
    fr = [r for r in rows["accepted"] if not r["correct"]]
    fa = [r for r in rows["refused"] if not r["correct"]]
    summary = {"model": model, "false_refusals": len(fr), "in_distribution": len(rows["accepted"]),
               "false_acceptances": len(fa), "out_of_distribution": len(rows["refused"]),
               "warned_in_distribution": sum(r["verdict"] == "warn" for r in rows["accepted"])}
    print(f"{model}: false refusals {len(fr)}/{len(rows['accepted'])} (warnings {summary['warned_in_distribution']}), "
          f"false acceptances {len(fa)}/{len(rows['refused'])}")
    return {"summary": summary, **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", type=Path, default=[], help="ct-hemorrhage case folders (val, tune)")
    ap.add_argument("--perfusion-cases", nargs="*", type=Path, default=[])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    ct_channels = load_bundle("ct-hemorrhage").channel_names
    pf_channels = load_bundle("mr-perfusion-lesion").channel_names
    out = {"ct-hemorrhage": run("ct-hemorrhage", head_ct_accepted(a.cases, ct_channels), head_ct_refused()),
           "mr-perfusion-lesion": run("mr-perfusion-lesion", perfusion_accepted(a.perfusion_cases, pf_channels),
                                      perfusion_refused(pf_channels))}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
