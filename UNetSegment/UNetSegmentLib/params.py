"""Run parameters: one definition shared by the CLI flags, the Slicer module and the server.

``None`` means "the bundle's default" (its ``threshold`` and ``inference`` block).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

HEATMAP_KINDS = ("gradcam", "uncertainty")
ENGINES = ("fast", "plain")


@dataclass
class SegmentParams:
    device: str = "auto"
    precision: str = "auto"
    threshold: float | None = None
    min_lesion_ml: float | None = None
    connectivity: int = 26
    overlap: float | None = None
    batch_size: int | None = None
    tta: bool = False
    heatmaps: tuple[str, ...] = ("gradcam",)
    threads: int | None = None
    gradcam_layer: str | None = None
    cam_method: str = "hirescam"
    engine: str = "fast"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["heatmaps"] = list(self.heatmaps)
        return d


#: help text per parameter, used by argparse and the Slicer tooltips
HELP = {
    "device": "auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps",
    "precision": "auto (fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32), fp32, fp16 or bf16",
    "threshold": "probability at or above which a voxel is lesion (default: the model's)",
    "min_lesion_ml": "drop connected lesions smaller than this volume in mL (default: the model's, else 0)",
    "connectivity": "voxel connectivity that joins a lesion: 6 (faces) or 26 (faces, edges, corners)",
    "overlap": "fraction of overlap between sliding windows, 0 to <1 (default: the model's)",
    "batch_size": "windows per forward pass (default: the model's)",
    "tta": "average over mirrored copies (test-time augmentation); slower, reports TTA variance",
    "heatmaps": "extra maps beside probability.nrrd: comma list of gradcam, uncertainty, or none",
    "gradcam_layer": "network layer for Grad-CAM (default: the model's, a deep decoder stage such as decoder.0)",
    "cam_method": "hirescam (element-wise gradient × activation; stays on the lesion it explains) or gradcam (channel-averaged gradients, Selvaraju 2017)",
    "threads": "CPU threads for inference (default: the cores available to this process; in Slicer one fewer, so the application stays responsive)",
    "engine": "fast (default: windows only over the body, one fitted window per slice for 2D/2.5D models, BatchNorm folded, channels-last) or plain (the reference engine: training-size windows over the whole volume); on the sample head CT they agree to labels Dice ≥ 0.999 (|Δp| ≤ 0.01 at 99.99 % of voxels; bench/inference_vs_monai.py)",
}


def parameter_names() -> list[str]:
    return [f.name for f in fields(SegmentParams)]
