"""Resolve once: what a run really uses, from the user's :class:`.params.SegmentParams` and the model.

:func:`resolve` fills every "model's default" (``None``) from the bundle's ``threshold`` and
``inference`` block, derives the model's geometry (:class:`ModelSettings`: dimensions, patch, spacing,
2.5D context, channels in and out) and picks the device and precision. The pipeline, the job, the
Slicer panel, the trainer, ``evaluate`` and the benchmarks all read these values from here, so a
default or a derived setting changes in this file only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .params import SegmentParams

#: what a run uses where neither the user nor the model's ``inference`` block says
FALLBACKS: dict[str, Any] = {"overlap": 0.5, "batch_size": 4, "min_lesion_ml": 0.0, "tta": False, "tta_axes": ("i",)}


@dataclass(frozen=True)
class ModelSettings:
    """What the model fixes: how its network sees a volume."""

    dimensions: str  # "2d", "2.5d" or "3d"
    patch: tuple[int, ...]  # training window: (j, i) for 2D/2.5D, (k, j, i) for 3D
    target_spacing: tuple[float, float, float]  # mm along i, j, k (2D/2.5D: in-plane only)
    context: int  # 2.5D: neighbouring slices on each side fed as extra channels (else 0)
    channels: tuple[str, ...]  # the model's input channels, in order
    normalizations: tuple[dict, ...]  # per channel, model.json's inputs[].normalization
    out_channels: int  # background + one per label
    tta_axes: tuple[str, ...]  # canonical axes the model may be mirrored along (i, j, k)
    temperature: float = 1.0  # softmax temperature from model.json's calibration (1: uncalibrated)
    lesion_values: tuple[int, ...] = (1,)  # labels that are lesions (the rest, e.g. oedema, is context)
    label_values: tuple[int, ...] = (1,)  # every label, in output-channel order (channel c is label_values[c - 1])

    @property
    def lesion_channels(self) -> tuple[int, ...]:
        """The network output channels whose labels are lesions."""
        return tuple(c for c, v in enumerate(self.label_values, start=1) if v in self.lesion_values)

    @property
    def spatial_dims(self) -> int:
        return 3 if self.dimensions == "3d" else 2

    @property
    def in_plane_only(self) -> bool:
        """2D/2.5D models are resampled in-plane only (their slices are kept)."""
        return self.dimensions != "3d"

    @property
    def in_channels(self) -> int:
        """Network input channels: each model channel with its 2.5D context slices."""
        return len(self.channels) * (2 * self.context + 1)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "ModelSettings":
        dims = meta["dimensions"]
        inference = meta.get("inference", {})
        return cls(
            dimensions=dims,
            patch=tuple(int(p) for p in meta["patch_size"]),
            target_spacing=tuple(float(s) for s in meta["target_spacing"]),  # type: ignore[arg-type]
            context=int(meta.get("context_slices", 0)) if dims == "2.5d" else 0,
            channels=tuple(c["name"] for c in meta["inputs"]),
            normalizations=tuple(c["normalization"] for c in meta["inputs"]),
            out_channels=1 + len(meta["labels"]),
            tta_axes=tuple(inference.get("tta_axes", FALLBACKS["tta_axes"])),
            temperature=float((meta.get("calibration") or {}).get("temperature", 1.0)),
            lesion_values=lesion_label_values(meta["labels"]),
            label_values=tuple(int(l["value"]) for l in meta["labels"]),
        )


def lesion_label_values(labels: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The values of the labels (``model.json``'s ``labels``, or ``summary.json``'s ``segments``) that are
    lesions: every label unless it says ``"lesion": false``."""
    return tuple(int(l["value"]) for l in labels if l.get("lesion", True))


def context_label_values(labels: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The values of the labels that are context around the lesions, not lesions (``"lesion": false``,
    e.g. the perilesional oedema); the lesion table measures them per lesion."""
    return tuple(int(l["value"]) for l in labels if not l.get("lesion", True))


@dataclass(frozen=True)
class RunSettings:
    """Every setting of one run, resolved. ``device``/``precision`` are what will run (``"cpu"``,
    ``"cuda:0"``; ``"fp32"``…) unless resolved with ``hardware=False`` (then as asked)."""

    model: ModelSettings
    threshold: float
    overlap: float
    batch_size: int
    min_lesion_ml: float
    connectivity: int
    tta: bool
    heatmaps: tuple[str, ...]
    device: str
    precision: str
    threads: int | None
    engine: str
    gradcam_layer: str | None  # as asked; the network's default is looked up when the network is built
    cam_method: str
    allow_unusual_input: bool = False  # run although the input-domain check refuses (outputs marked)
    hardware_resolved: bool = True  # device, precision and threads are resolved (see :func:`on_hardware`)

    @property
    def fast(self) -> bool:
        return self.engine == "fast"


def resolved_parameters(params: SegmentParams, settings: RunSettings, batch_size: int | None = None) -> dict:
    """The parameters as ``summary.json`` and the report state them: what was asked, with every "model's
    default" replaced by the value used (threshold, overlap, batch size — ``batch_size`` when an
    out-of-memory fallback lowered it —, minimum lesion size, TTA)."""
    return {**params.as_dict(), "threshold": settings.threshold, "overlap": settings.overlap,
            "batch_size": batch_size or settings.batch_size, "min_lesion_ml": settings.min_lesion_ml, "tta": settings.tta}


def resolve(params: SegmentParams | None, model: Any, *, hardware: bool = True) -> RunSettings:
    """The settings of a run of ``model`` (a :class:`.models.bundle.Bundle` or its ``model.json`` dict).

    ``hardware=False`` leaves device, precision and threads as asked (no torch import: the Slicer
    panel shows the model's defaults before PyTorch is installed)."""
    params = params or SegmentParams()
    meta = getattr(model, "meta", model)
    inference = meta.get("inference", {})

    def default(name: str):
        value = getattr(params, name)
        return value if value is not None else inference.get(name, FALLBACKS[name])

    settings = RunSettings(
        model=ModelSettings.from_meta(meta),
        threshold=float(params.threshold if params.threshold is not None else meta["threshold"]),
        overlap=float(default("overlap")),
        batch_size=int(default("batch_size")),
        min_lesion_ml=float(default("min_lesion_ml") or 0.0),
        connectivity=params.connectivity,
        tta=bool(default("tta")),
        heatmaps=tuple(params.heatmaps),
        device=params.device,
        precision=params.precision,
        threads=params.threads,
        engine=params.engine,
        gradcam_layer=params.gradcam_layer,
        cam_method=params.cam_method,
        allow_unusual_input=params.allow_unusual_input,
        hardware_resolved=False,
    )
    return on_hardware(settings) if hardware else settings


def on_hardware(settings: RunSettings) -> RunSettings:
    """``settings`` with device, precision and threads resolved on this machine (``auto`` → what it has;
    :class:`.errors.DeviceError` for a device it lacks); unchanged when they already are."""
    if settings.hardware_resolved:
        return settings
    from .engine.acceleration import default_threads
    from .engine.device import resolve_device, resolve_precision

    device = resolve_device(settings.device)
    return replace(settings, device=device, precision=resolve_precision(settings.precision, device),
                   threads=settings.threads or default_threads(), hardware_resolved=True)
