#!/usr/bin/env python3
"""Our engine vs MONAI's inferers on the sample head CT, same network and weights, one process.

MONAI is run as a user would run it: ``SliceInferer`` (2D/2.5D bundles) or
``sliding_window_inference`` (3D) with roi = the bundle's patch size, the same batch size, MONAI's
defaults for everything else (overlap 0.25, mode "constant"), fp32, on the whole volume. Both sides
share reading and our pre-processing (MONAI gets the network-grid tensor we feed our own engine) and
both resample probabilities back to the input grid, so the ratio compares full pipelines.

Prints both times, ``ratio: X`` (MONAI time / ours, ours at its default settings — the fast engine
and automatic precision —, probabilities only, no heatmaps), the same ratio at equal precision and
windows (our plain engine in fp32: pure engine overhead), max |Δprobability|, ΔDice, the cost of
Grad-CAM relative to one inference pass, an ablation of the engine's speed-ups (each step's time
on the network-grid volume), and the forward pass's effective GFLOP/s next to this machine's
measured fp32 and bf16 matrix-multiply throughput.

On the evaluation cases (``--cases DIR``, default ``.cache/eval-ct-hemorrhage`` from ``make evaluate``:
case folders with ``image.nii.gz`` + ``label.nii.gz``) it runs, case by case and interleaved, MONAI
(fp32), MONAI under bf16 autocast and ours (defaults), ``--rounds`` times (≥ 3). Per round the ratio
is MONAI's total time over ours; ``ratio: X`` is the median over the rounds (with no case folder: the
demo case's ratio). It also prints the ratio against MONAI in bf16, ours per stage (read, preprocess,
inference, postprocess) and the share of the windows run at full resolution, and the equal-Dice
check: on every case with ≥ 1 mL of lesion |Dice(ours) − Dice(MONAI)| ≤ 0.005 against the truth, and
the same true lesions ≥ 0.5 mL found.

usage: python bench/inference_vs_monai.py [--model NAME|PATH] [--case PATH] [--repeats N] [--cases DIR]
                                          [--rounds N] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UNetSegment"))

from UNetSegmentLib.models.bundle import default_model_name, load_bundle  # noqa: E402
from UNetSegmentLib.demo import demo_case  # noqa: E402
from UNetSegmentLib.image import Image  # noqa: E402
from UNetSegmentLib.engine.inference import slice_with_context  # noqa: E402
from UNetSegmentLib.engine.labels import labels_from_probabilities  # noqa: E402
from UNetSegmentLib.io.readers import read_image  # noqa: E402
from UNetSegmentLib.params import SegmentParams  # noqa: E402
from UNetSegmentLib.engine.pipeline import segment  # noqa: E402
from UNetSegmentLib.engine.preprocess import prepare_inputs  # noqa: E402
from UNetSegmentLib.settings import RunSettings, resolve  # noqa: E402


def autocast_bf16(net):
    """``net`` under CPU bf16 autocast, its output in fp32: MONAI at its best precision on a bf16 CPU."""

    def run(x):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return net(x).float()

    return run


def monai_pipeline(image: Image, settings: RunSettings, net) -> np.ndarray:
    """Foreground probability on the input grid, with MONAI doing the windowed inference."""
    from monai.inferers import SliceInferer, sliding_window_inference

    m = settings.model
    prep = prepare_inputs([image], m)
    x = prep.volume  # [C, K, J, I] on the network grid
    if m.context:  # 2.5D as a MONAI user builds it: neighbouring slices stacked as channels, then SliceInferer
        x = np.stack([slice_with_context(x, k, m.context) for k in range(x.shape[1])], axis=1)
    xt = torch.from_numpy(np.ascontiguousarray(x))[None]  # B, C, K, J, I
    with torch.inference_mode():
        if m.spatial_dims == 3:
            logits = sliding_window_inference(xt, list(m.patch), settings.batch_size, net)
        else:
            logits = SliceInferer(roi_size=list(m.patch), sw_batch_size=settings.batch_size, spatial_dim=0, progress=False)(xt, net)
        fg = 1.0 - torch.softmax(logits.float(), 1)[0, 0].numpy()
    return prep.mapping.to_input(fg, floor=0.0).array  # MONAI's map as it comes: no probability floor


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--case", default=None, help="input volume (default: the demo case on the sample head CT)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", type=Path, default=Path(".cache/eval-ct-hemorrhage"),
                    help="evaluation case folders (default: make evaluate's); skipped when absent")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the evaluation cases (≥ 3)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many evaluation cases")
    a = ap.parse_args()
    import monai

    bundle = load_bundle(a.model or default_model_name())
    case = Path(a.case) if a.case else demo_case()[0]
    net = bundle.build_network()
    defaults = resolve(SegmentParams(heatmaps=()), bundle)  # ours at its defaults; MONAI gets the same batch size
    threshold = defaults.threshold
    print(f"model {bundle.name} {bundle.version} ({bundle.dimensions}, patch {list(defaults.model.patch)}), case {case}")
    print(f"CPU {cpu_name()}, torch {torch.__version__} threads {torch.get_num_threads()}, MONAI {monai.__version__}")

    def ours(settings: RunSettings):
        img = read_image(case)
        return segment([img], bundle, network=net, settings=settings)

    def theirs():
        img = read_image(case)
        return monai_pipeline(img, defaults, net)

    t_monai, p_monai = timed(theirs, a.repeats)
    t_ours, r_ours = timed(lambda: ours(defaults), a.repeats)
    eq = resolve(SegmentParams(precision="fp32", overlap=0.25, heatmaps=(), engine="plain"), bundle)
    t_eq, r_eq = timed(lambda: ours(eq), a.repeats)
    p_ours = r_ours.probability.array
    d_prob = float(np.abs(p_ours - p_monai).max())
    d_prob_eq = float(np.abs(r_eq.probability.array - p_monai).max())
    dice_ours_monai = dice(lesion(p_ours, threshold), lesion(p_monai, threshold))
    truth = Path(case).parent / "label.nii.gz"
    print(f"MONAI  (fp32, overlap 0.25): {t_monai:.2f} s")
    print(f"ours   (defaults, {r_ours.precision}): {t_ours:.2f} s")
    print(f"ours   (fp32, overlap 0.25): {t_eq:.2f} s")
    print(f"max |Δprobability| ours-default vs MONAI: {d_prob:.2e}; at equal settings: {d_prob_eq:.2e}")
    print(f"Dice(ours, MONAI) of the label maps: {dice_ours_monai:.4f}")
    if truth.exists():
        gt = read_image(truth).array > 0
        d1, d2 = dice(lesion(p_ours, threshold), gt), dice(lesion(p_monai, threshold), gt)
        print(f"Dice vs truth: ours {d1:.4f}, MONAI {d2:.4f}, ΔDice {d1 - d2:+.4f}")
    t_cam, r_cam = timed(lambda: ours(resolve(SegmentParams(), bundle)), 1)
    print(f"ours with Grad-CAM ({r_cam.extra.get('cam_method')}): inference {r_cam.timings['inference_s']:.2f} s, "
          f"Grad-CAM {r_cam.timings.get('gradcam_s', 0):.2f} s (×{r_cam.timings.get('gradcam_s', 0) / r_cam.timings['inference_s']:.2f} of inference)")
    ablation(case, bundle, net, a.repeats)
    print(f"precision of ours: {r_ours.precision}; threads: {torch.get_num_threads()}")
    print(f"demo case: ratio at equal precision and windows: {t_monai / t_eq:.2f}; ratio {t_monai / t_ours:.2f}")
    cases = sorted(p for p in a.cases.iterdir() if (p / "image.nii.gz").exists())[: a.limit] if a.cases.is_dir() else []
    if not cases:
        print(f"(no evaluation cases in {a.cases}: `make evaluate` makes them; the ratio below is the demo case's)")
        print(f"ratio: {t_monai / t_ours:.2f}")
        return 0
    ratio, equal = over_cases(cases, bundle, net, defaults, max(3, a.rounds))
    print(f"ratio: {ratio:.2f}")
    return 0 if equal else 1


def over_cases(cases: list[Path], bundle, net, settings: RunSettings, rounds: int) -> tuple[float, bool]:
    """MONAI (fp32 and bf16) and ours, interleaved case by case over ``rounds`` rounds; the median round
    ratio, the per-stage breakdown, and the equal-Dice check. Returns (median ratio, check passed)."""
    from UNetSegmentLib.analysis.evaluate import score_case
    from UNetSegmentLib.analysis.lesions import remove_small_lesions

    net16 = autocast_bf16(net)
    t = {k: np.zeros((rounds, len(cases))) for k in ("monai", "monai_bf16", "ours")}
    stages = {k: np.zeros((rounds, len(cases))) for k in ("read_s", "preprocess_s", "inference_s", "postprocess_s")}
    fraction, last_ours, last_monai = [], {}, {}
    for r in range(rounds):
        for n, c in enumerate(cases):
            t0 = time.perf_counter()
            p_monai = monai_pipeline(read_image(c / "image.nii.gz"), settings, net)
            t1 = time.perf_counter()
            monai_pipeline(read_image(c / "image.nii.gz"), settings, net16)
            t2 = time.perf_counter()
            img = read_image(c / "image.nii.gz")
            t_read = time.perf_counter() - t2
            res = segment([img], bundle, network=net, settings=settings)
            t3 = time.perf_counter()
            t["monai"][r, n], t["monai_bf16"][r, n], t["ours"][r, n] = t1 - t0, t2 - t1, t3 - t2
            stages["read_s"][r, n] = t_read
            for k in ("preprocess_s", "inference_s", "postprocess_s"):
                stages[k][r, n] = res.timings.get(k, 0.0)
            if r == rounds - 1:
                last_ours[c.name], last_monai[c.name] = res, p_monai
                fraction.append(res.extra.get("coarse_to_fine", {}).get("full_resolution_fraction", 1.0))
    per_round = t["monai"].sum(1) / t["ours"].sum(1)
    per_round_bf16 = t["monai_bf16"].sum(1) / t["ours"].sum(1)
    mid = int(np.argsort(per_round)[len(per_round) // 2])
    print(f"evaluation cases: {len(cases)}, {rounds} interleaved rounds; totals per round (s): MONAI "
          + ", ".join(f"{v:.1f}" for v in t["monai"].sum(1)) + "; MONAI bf16 " + ", ".join(f"{v:.1f}" for v in t["monai_bf16"].sum(1))
          + "; ours " + ", ".join(f"{v:.1f}" for v in t["ours"].sum(1)))
    print("ours per stage (the median round, s): " + ", ".join(f"{k[:-2]} {stages[k][mid].sum():.1f}" for k in stages)
          + f", other {t['ours'][mid].sum() - sum(stages[k][mid].sum() for k in stages):.1f}")
    print(f"windows run at full resolution: {np.mean(fraction):.0%} (the full pass: no coarse-to-fine first pass)")
    print(f"ratio against MONAI under bf16 autocast (median of rounds): {np.median(per_round_bf16):.2f}")
    thr, min_ml = settings.threshold, settings.min_lesion_ml
    worst, same, n_pos = 0.0, True, 0
    for c in cases:
        truth, res, p_monai = read_image(c / "label.nii.gz"), last_ours[c.name], last_monai[c.name]
        ours_lab = remove_small_lesions(res.labels, min_ml)
        monai_lab = remove_small_lesions(Image(lesion(p_monai, thr).astype(np.uint8), res.labels.ijk_to_ras), min_ml)
        so, sm = score_case(c.name, truth, ours_lab), score_case(c.name, truth, monai_lab)
        same &= [x["detected"] for x in so.true_lesions if x["volume_ml"] >= 0.5] == \
                [x["detected"] for x in sm.true_lesions if x["volume_ml"] >= 0.5]
        if so.true_ml >= 1.0:
            n_pos += 1
            worst = max(worst, abs(so.dice - sm.dice))
            if abs(so.dice - sm.dice) > 0.005:  # which case, and whose Dice is the higher
                print(f"  {c.name}: Dice vs truth ours {so.dice:.4f}, MONAI {sm.dice:.4f} (ΔDice {so.dice - sm.dice:+.4f}); "
                      f"voxels ours {int((ours_lab.array > 0).sum())}, MONAI {int((monai_lab.array > 0).sum())}")
    equal = worst <= 0.005 and same
    print(f"equal-Dice check on the {n_pos} cases with ≥ 1 mL of lesion: max |ΔDice| {worst:.4f} (≤ 0.005), "
          f"same true lesions ≥ 0.5 mL found: {same} → {'passed' if equal else 'FAILED'}")
    return float(np.median(per_round)), equal


def matmul_tflops(dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def counted_flops(fn) -> float:
    """Forward FLOPs of ``fn()`` as torch's FlopCounterMode counts them (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def ablation(case: Path, bundle, net, repeats: int) -> None:
    """The engine's speed-ups one at a time, on the network-grid volume of ``case`` (engine time only, CPU,
    MONAI's overlap 0.25 throughout)."""
    from UNetSegmentLib.engine.acceleration import prepare_network
    from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor
    from UNetSegmentLib.engine.pipeline import plan_for

    plain = resolve(SegmentParams(device="cpu", precision="fp32", overlap=0.25, tta=False, engine="plain"), bundle)
    fast = resolve(SegmentParams(device="cpu", overlap=0.25, tta=False, engine="fast"), bundle)
    m, bs, auto = plain.model, plain.batch_size, fast.precision  # auto: bf16 on CPUs with AMX/AVX512-BF16, else fp32
    vol = prepare_inputs([read_image(case)], m).volume
    fast_net = prepare_network(net, m.spatial_dims, "cpu")
    plain_plan, fast_plan = plan_for(vol, plain, net), plan_for(vol, fast, fast_net)

    def engine(network, precision: str, plan, batch_size: int = bs):
        predictor = softmax_predictor(network, m.out_channels, precision)
        return lambda: sliding_window(vol, predictor, plan, batch_size=batch_size)

    fitted = fast_plan.fitted_windows()  # 2D/2.5D: one window per slice, sized to the slab's body
    steps = [
        ("plain engine, fp32 (MONAI's windows)", engine(net, "fp32", plain_plan)),
        (f"+ {auto} autocast", engine(net, auto, plain_plan)),
        ("+ folded BatchNorm, channels-last", engine(fast_net, auto, plain_plan)),
        ("+ body crop" + ("" if fitted else " (= fast)"), engine(fast_net, auto, fast_plan.without_fitted_windows())),
    ] + ([("+ fitted windows per slab (= fast)", engine(fast_net, auto, fast_plan))] if fitted else []) \
      + [(f"  fast, batch {b}", engine(fast_net, auto, fast_plan, b)) for b in (1, 8, 16) if b != bs]
    print(f"ablation (engine only, network-grid volume {vol.shape[1:]}, best of {repeats}):")
    base = None
    for name, fn in steps:
        t, _ = timed(fn, repeats)
        base = base or t
        print(f"  {name:<42} {t:6.2f} s  ×{base / t:4.2f}")
    fp32_tf, bf16_tf = matmul_tflops(torch.float32), matmul_tflops(torch.bfloat16)
    fast_run, plain_run = engine(fast_net, auto, fast_plan), engine(net, "fp32", plain_plan)
    t_fast, _ = timed(fast_run, 1)
    flops = counted_flops(fast_run)
    t_plain, _ = timed(plain_run, 1)
    flops_plain = counted_flops(plain_run)
    print(f"forward pass: fast engine {flops / 1e9:.0f} GFLOP in {t_fast:.2f} s = {flops / t_fast / 1e9:.0f} GFLOP/s ({auto}); "
          f"plain fp32 {flops_plain / 1e9:.0f} GFLOP in {t_plain:.2f} s = {flops_plain / t_plain / 1e9:.0f} GFLOP/s")
    print(f"this CPU's matmul throughput (2048², {torch.get_num_threads()} threads): fp32 {fp32_tf * 1e3:.0f} GFLOP/s, "
          f"bf16 {bf16_tf * 1e3:.0f} GFLOP/s")


def lesion(p_foreground: np.ndarray, threshold: float) -> np.ndarray:
    """Lesion voxels of a P(not background) map by the engine's threshold rule (one label)."""
    return labels_from_probabilities({1: p_foreground}, threshold) > 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
