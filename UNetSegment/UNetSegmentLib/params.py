"""Run parameters: one definition (:data:`FIELDS`) behind the CLI flags, the server's form fields, the
worker's request, the Slicer panel and the Python API.

Each :class:`Field` says a parameter's type, allowed values, default and help once. From it
:class:`SegmentParams` validates itself on construction, :func:`add_arguments` makes the argparse
options, :meth:`SegmentParams.from_mapping` reads JSON requests, form fields and stored summaries, and
the Slicer panel takes its tooltips and choices. ``None`` means "the model's default", worked out once
by :func:`.settings.resolve`.

Nothing here imports torch: the panel and ``--help`` work before PyTorch is installed.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from .errors import UsageError

HEATMAP_KINDS = ("gradcam", "uncertainty")
ENGINES = ("fast", "plain")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CAM_METHODS = ("hirescam", "gradcam", "gradinput")
CONNECTIVITIES = (6, 26)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Field:
    """One run parameter. ``kind``: float, int, bool, str or kinds (a comma list of :data:`HEATMAP_KINDS`).

    ``low``/``high`` bound numbers (``*_open``: the bound itself is excluded); ``choices`` lists the
    allowed values; ``optional``: ``None`` is allowed and means the model's default."""

    name: str
    kind: str
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    flag: str | None = None  # the CLI flag when not --<name with dashes>
    server_owned: bool = False  # set by `unetsegment serve`, never per job

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def parse_text(self, text: str) -> Any:
        """The value of a CLI argument or form field; :class:`ValueError` names what is wrong."""
        t = str(text).strip()
        if self.optional and t.lower() in ("", "default", "model"):
            return None
        if self.kind == "float":
            return float(t)
        if self.kind == "int":
            if not re.fullmatch(r"[+-]?\d+", t):
                raise ValueError(f"{text!r} is not a whole number")
            return int(t)
        if self.kind == "bool":
            if t.lower() not in _TRUE + _FALSE:
                raise ValueError(f"{text!r} is not a boolean (true or false)")
            return t.lower() in _TRUE
        if self.kind == "kinds":
            items = tuple(x.strip().lower() for x in t.split(",") if x.strip())
            return () if items in ((), ("none",)) else items
        return t

    def check(self, value: Any) -> Any:
        """``value`` in its canonical type, or :class:`UsageError` naming the parameter and what it takes."""
        if isinstance(value, str) and self.kind != "str":
            try:
                value = self.parse_text(value)  # form fields and JSON strings: "0.4", "true", "" (= the model's)
            except ValueError as e:
                raise UsageError(f"{self.name}={value!r}: {e}", f"use {self.allowed()}") from None
        if value is None:
            if self.optional:
                return None
            raise UsageError(f"{self.name} must be given", f"use {self.allowed()}")
        try:
            v = self._coerce(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise UsageError(f"{self.name}={value!r}: {e}", f"use {self.allowed()}") from None
        if self.choices and v not in self.choices:
            raise UsageError(f"{self.name}={value!r} is not allowed", f"use {self.allowed()}")
        if self.kind == "kinds":
            bad = [k for k in v if k not in HEATMAP_KINDS]
            if bad:
                raise UsageError(f"unknown heatmap kind {bad[0]!r}", f"use {', '.join(HEATMAP_KINDS)} or none")
        if self.kind in ("float", "int") and not self._in_range(v):
            raise UsageError(f"{self.name}={value!r} is out of range", f"use {self.allowed()}")
        return v

    def _coerce(self, value: Any) -> Any:
        if self.kind == "float":
            if isinstance(value, bool):
                raise TypeError("a boolean is not a number")
            v = float(value)
            if not math.isfinite(v):
                raise ValueError("not a finite number")
            return v
        if self.kind == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError("not a whole number")
            return int(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise TypeError("not true or false")
            return value
        if self.kind == "kinds":
            if isinstance(value, str):
                raise TypeError("not a list")
            return tuple(str(k).strip().lower() for k in value)
        if not isinstance(value, str):
            raise TypeError("not text")
        return value.strip().lower() if self.choices or self.name == "device" else value.strip()

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def allowed(self) -> str:
        """What the parameter takes, in words (for messages and ``--help``)."""
        if self.choices:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind == "kinds":
            text = "a comma list of " + ", ".join(HEATMAP_KINDS) + ", or none"
        elif self.kind == "bool":
            text = "true or false"
        elif self.name == "device":
            text = "auto, cpu, cuda, cuda:N or mps"
        elif self.low is not None or self.high is not None:
            lo = "" if self.low is None else f"{'>' if self.low_open else '≥'} {self.low:g}"
            hi = "" if self.high is None else f"{'<' if self.high_open else '≤'} {self.high:g}"
            text = f"a {'whole number' if self.kind == 'int' else 'number'} " + " and ".join(x for x in (lo, hi) if x)
        else:
            text = "a name"
        return text + (" (leave out for the model's default)" if self.optional else "")


FIELDS: tuple[Field, ...] = (
    # which devices exist is known only at run time: engine.device.resolve_device refuses the others (exit 5)
    Field("device", "str", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N or mps", server_owned=True),
    Field("precision", "str", "auto (fp16 on CUDA, bf16 on CPUs with AMX/AVX512-BF16, else fp32), fp32, fp16 or bf16",
          choices=PRECISIONS),
    Field("threshold", "float", "probability at or above which a voxel is lesion (default: the model's)",
          low=0.0, high=1.0, low_open=True, high_open=True, optional=True),
    Field("min_lesion_ml", "float", "drop connected lesions smaller than this volume in mL (default: the model's, else 0)",
          low=0.0, optional=True),
    Field("connectivity", "int", "voxel connectivity that joins a lesion: 6 (faces) or 26 (faces, edges, corners)",
          choices=CONNECTIVITIES),
    Field("overlap", "float", "fraction of overlap between sliding windows, 0 to <1 (default: the model's)",
          low=0.0, high=1.0, high_open=True, optional=True),
    Field("batch_size", "int", "windows per forward pass (default: the model's)", low=1, optional=True),
    Field("tta", "bool", "average over mirrored copies (test-time augmentation); slower, reports TTA variance "
          "(default: the model's)", optional=True),
    Field("heatmaps", "kinds", "extra maps beside probability.nrrd: comma list of gradcam, uncertainty, or none",
          flag="--heatmap"),
    Field("threads", "int", "CPU threads for inference (default: the cores available to this process; in Slicer "
          "too, with the worker at a lower CPU priority so the application stays responsive)", low=1, optional=True,
          server_owned=True),
    Field("gradcam_layer", "str", "network layer for Grad-CAM (default: the model's, a deep decoder stage such as "
          "decoder.0)", optional=True),
    Field("cam_method", "str", "hirescam (element-wise gradient × activation; stays on the lesion it explains) or "
          "gradcam (channel-averaged gradients, Selvaraju 2017) or gradinput (gradient × input at the input voxels; "
          "the layer is ignored)", choices=CAM_METHODS),
    Field("allow_unusual_input", "bool", "run even when the input does not look like what the model reads (another "
          "modality or body part, e.g. a chest CT for a head model); every output is then marked as unusual input"),
    Field("engine", "str", "fast (default: windows only over the body, one fitted window per slice for 2D/2.5D models, "
          "BatchNorm folded, channels-last) or plain (the reference engine: training-size windows over the whole "
          "volume); on the sample head CT they agree to labels Dice ≥ 0.999 (|Δp| ≤ 0.01 at 99.99 % of voxels; "
          "bench/inference_vs_monai.py)", choices=ENGINES),
)
FIELD = {f.name: f for f in FIELDS}
#: help text per parameter (the Slicer panel's tooltips)
HELP = {f.name: f.help for f in FIELDS}


#: other names a parameter is known by (the CLI's ``--heatmap``)
ALIASES = {"heatmap": "heatmaps"}


def field_name(key: str) -> str:
    """A flag, form field or JSON key as a parameter name: ``--min-lesion-ml`` → ``min_lesion_ml``,
    ``heatmap`` → ``heatmaps`` (not checked: see :data:`FIELD`)."""
    name = str(key).strip().lstrip("-").lower().replace("-", "_")
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class SegmentParams:
    """What a user may set for one run; validated against :data:`FIELDS` on construction (also by
    ``dataclasses.replace``; :class:`UsageError` on a bad value). ``None``: the model's default
    (:func:`.settings.resolve`)."""

    device: str = "auto"
    precision: str = "auto"
    threshold: float | None = None
    min_lesion_ml: float | None = None
    connectivity: int = 26
    overlap: float | None = None
    batch_size: int | None = None
    tta: bool | None = None
    heatmaps: tuple[str, ...] = ("gradcam",)
    threads: int | None = None
    gradcam_layer: str | None = None
    cam_method: str = "hirescam"
    allow_unusual_input: bool = False
    engine: str = "fast"

    def __post_init__(self) -> None:
        for f in FIELDS:
            object.__setattr__(self, f.name, f.check(getattr(self, f.name)))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["heatmaps"] = list(self.heatmaps)
        return d

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "SegmentParams | None" = None,
                     allow_server_owned: bool = True) -> "SegmentParams":
        """Parameters from a JSON request, form fields (text) or a stored summary, over ``base``
        (default: the defaults). Unknown names and, unless allowed, server-owned ones are refused."""
        d = asdict(base) if base is not None else {}
        for key, value in values.items():
            name = field_name(key)
            if name not in FIELD:
                raise UsageError(f"unknown parameter {str(key)[:60]!r}",
                                 "use the segment parameters: " + ", ".join(f.name for f in FIELDS))
            if FIELD[name].server_owned and not allow_server_owned:
                raise UsageError(f"{name} is set by the server, not per job",
                                 f"leave it out (the admin sets `unetsegment serve {FIELD[name].option}`)")
            d[name] = value
        return cls(**d)


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """The run parameters (or ``only`` those) as command-line options, from :data:`FIELDS`."""
    defaults = SegmentParams()
    for f in FIELDS:
        if only is not None and f.name not in only:
            continue
        help_text = f.help.replace("%", "%%")  # argparse reads % as a format code
        if f.kind == "bool":
            parser.add_argument(f.option, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=getattr(defaults, f.name), help=help_text)
            continue
        parser.add_argument(f.option, dest=f.name, type=_argparse_type(f), default=getattr(defaults, f.name),
                            choices=list(f.choices) or None, metavar=None if f.choices else f.name.upper(),
                            help=help_text)


def _argparse_type(f: Field):
    def convert(text: str):
        try:
            return f.check(f.parse_text(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}; use {f.allowed()}") from None
        except UsageError as e:
            raise argparse.ArgumentTypeError(f"{e.problem}; {e.fix}") from None

    convert.__name__ = f.name  # argparse names the type in its messages
    return convert


def params_from_args(ns: argparse.Namespace) -> SegmentParams:
    """:class:`SegmentParams` from options made by :func:`add_arguments`."""
    return SegmentParams(**{f.name: getattr(ns, f.name) for f in FIELDS})
