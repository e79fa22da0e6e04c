"""Run parameters and their resolution: ``params.SegmentParams`` validates itself against one field
table; ``settings.resolve`` fills the model's defaults, derives the model's geometry and picks the
hardware, once. (End-to-end use by the CLI and the job: ``test_run_settings.py``.)"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

from UNetSegmentLib.errors import DeviceError, UsageError
from UNetSegmentLib.params import FIELDS, SegmentParams, add_arguments, params_from_args
from UNetSegmentLib.settings import FALLBACKS, ModelSettings, resolve

CT = {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40}


def _meta(dims: str = "2d", inference: dict | None = None, **extra) -> dict:
    """The parts of a ``model.json`` that :func:`resolve` reads."""
    meta = {"dimensions": dims, "patch_size": [8, 32, 32] if dims == "3d" else [32, 32],
            "target_spacing": [0.5, 0.6, 3.0], "threshold": 0.45,
            "inputs": [{"name": "CT", "normalization": CT}, {"name": "CTA", "normalization": CT}],
            "labels": [{"value": 1, "name": "a"}, {"value": 2, "name": "b"}]}
    if inference is not None:
        meta["inference"] = inference
    meta.update(extra)
    return meta


# --- settings.resolve ----------------------------------------------------------------------------
def test_model_defaults_fill_what_the_user_left_out():
    inference = {"overlap": 0.3, "batch_size": 3, "min_lesion_ml": 0.02, "tta": True, "tta_axes": ["i", "j"]}
    s = resolve(SegmentParams(), _meta(inference=inference), hardware=False)
    assert (s.threshold, s.overlap, s.batch_size, s.min_lesion_ml, s.tta) == (0.45, 0.3, 3, 0.02, True)
    assert s.model.tta_axes == ("i", "j")
    bare = resolve(None, _meta(), hardware=False)  # no inference block: the fallbacks
    assert (bare.overlap, bare.batch_size, bare.min_lesion_ml, bare.tta) == (
        FALLBACKS["overlap"], FALLBACKS["batch_size"], FALLBACKS["min_lesion_ml"], FALLBACKS["tta"])
    assert bare.model.tta_axes == FALLBACKS["tta_axes"] and bare.threshold == 0.45


def test_what_the_user_set_overrides_the_model_even_when_falsy():
    inference = {"overlap": 0.3, "batch_size": 3, "min_lesion_ml": 0.02, "tta": True}
    p = SegmentParams(threshold=0.2, overlap=0.0, batch_size=1, min_lesion_ml=0.0, tta=False, connectivity=6,
                      heatmaps=("uncertainty",), engine="plain", cam_method="gradcam", gradcam_layer="decoder.1")
    s = resolve(p, _meta(inference=inference), hardware=False)
    assert (s.threshold, s.overlap, s.batch_size, s.min_lesion_ml, s.tta) == (0.2, 0.0, 1, 0.0, False)
    assert (s.connectivity, s.heatmaps, s.engine, s.fast, s.cam_method, s.gradcam_layer) == (
        6, ("uncertainty",), "plain", False, "gradcam", "decoder.1")


def test_resolve_takes_a_bundle_or_its_meta(tiny_bundle):
    from UNetSegmentLib.models.bundle import load_bundle

    b = load_bundle(str(tiny_bundle))
    assert resolve(SegmentParams(), b, hardware=False) == resolve(SegmentParams(), b.meta, hardware=False)


def test_without_hardware_device_precision_and_threads_stay_as_asked():
    s = resolve(SegmentParams(device="cuda:3", precision="fp16", threads=5), _meta(), hardware=False)
    assert (s.device, s.precision, s.threads) == ("cuda:3", "fp16", 5)
    s = resolve(SegmentParams(), _meta(), hardware=False)
    assert (s.device, s.precision, s.threads) == ("auto", "auto", None)


def test_resolve_without_hardware_imports_no_torch():
    """The Slicer panel resolves the model's defaults before PyTorch is installed: with torch made
    unimportable, params, settings and --help still work."""
    code = f"""
import argparse, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from UNetSegmentLib.params import SegmentParams, add_arguments
from UNetSegmentLib.settings import resolve
s = resolve(SegmentParams(tta=True), {json.dumps(_meta("2.5d", context_slices=1))}, hardware=False)
parser = argparse.ArgumentParser()
add_arguments(parser)
parser.format_help()
print(s.model.context, s.tta, s.device)
"""
    env = {"PYTHONPATH": str(REPO / "UNetSegment"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "True", "auto"]


def test_with_hardware_device_and_precision_are_resolved():
    s = resolve(SegmentParams(device="cpu", precision="fp32", threads=2), _meta())
    assert (s.device, s.precision, s.threads) == ("cpu", "fp32", 2)
    auto = resolve(SegmentParams(device="cpu"), _meta())
    assert auto.precision in ("fp32", "bf16") and auto.threads >= 1
    with pytest.raises(DeviceError, match="fp16 is not supported on the CPU"):
        resolve(SegmentParams(device="cpu", precision="fp16"), _meta())


def test_a_device_that_does_not_exist_is_refused_when_resolved():
    """Which devices exist is known only at run time: SegmentParams keeps the name, resolve refuses it
    with a one-line error naming the fix (the CLI's device exit code)."""
    assert SegmentParams(device=" CUDA:1 ").device == "cuda:1"
    p = SegmentParams(device="tpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'") as err:
        resolve(p, _meta())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dims,context_slices,context,spatial_dims", [
    ("2d", None, 0, 2), ("2d", 2, 0, 2), ("2.5d", 2, 2, 2), ("2.5d", 0, 0, 2), ("3d", 2, 0, 3)])
def test_model_settings_context_is_zero_unless_2p5d(dims, context_slices, context, spatial_dims):
    extra = {} if context_slices is None else {"context_slices": context_slices}
    m = resolve(SegmentParams(), _meta(dims, **extra), hardware=False).model
    assert isinstance(m, ModelSettings)
    assert (m.dimensions, m.context, m.spatial_dims) == (dims, context, spatial_dims)
    assert m.in_channels == 2 * (2 * context + 1), "each model channel with its context slices"
    assert m.out_channels == 3 and m.channels == ("CT", "CTA") and m.normalizations == (CT, CT)
    assert m.patch == ((8, 32, 32) if dims == "3d" else (32, 32)) and m.target_spacing == (0.5, 0.6, 3.0)
    assert m.in_plane_only == (dims != "3d")


# --- SegmentParams validates itself --------------------------------------------------------------
@pytest.mark.parametrize("name,value", [
    ("threshold", 0.0), ("threshold", 1.0), ("threshold", -0.1), ("threshold", math.nan), ("threshold", "abc"),
    ("threshold", True), ("overlap", 1.0), ("overlap", -0.5), ("batch_size", 0), ("batch_size", 2.5),
    ("min_lesion_ml", -1.0), ("connectivity", 18), ("threads", 0), ("heatmaps", ("gradcam", "saliency")),
    ("heatmaps", 5), ("engine", "turbo"), ("precision", "int8"), ("cam_method", "nope"), ("tta", "maybe"),
    ("device", 3), ("cam_method", None)])
def test_bad_values_are_one_line_usage_errors_naming_the_parameter(name, value):
    with pytest.raises(UsageError) as err:
        SegmentParams(**{name: value})
    text = str(err.value)
    assert "\n" not in text
    assert name in text or "heatmap kind" in text
    assert "use " in text, "the message says what the parameter takes"


def test_good_values_are_kept_in_their_canonical_type():
    p = SegmentParams(threshold=0.4, overlap=0.0, batch_size=2.0, tta=None, engine=" PLAIN ", precision="BF16",
                      heatmaps=["GradCAM", " uncertainty"], connectivity=6, min_lesion_ml=0)
    assert (p.threshold, p.overlap, p.batch_size, p.tta, p.engine, p.precision) == (0.4, 0.0, 2, None, "plain", "bf16")
    assert p.heatmaps == ("gradcam", "uncertainty") and isinstance(p.batch_size, int)
    assert p.min_lesion_ml == 0.0 and isinstance(p.min_lesion_ml, float)
    assert SegmentParams(heatmaps="gradcam,uncertainty").heatmaps == ("gradcam", "uncertainty"), "a form field's text"
    assert SegmentParams().as_dict()["heatmaps"] == ["gradcam"]


def test_from_mapping_reads_text_values_over_a_base():
    p = SegmentParams.from_mapping({"threshold": "0.4", "tta": "true", "heatmap": "gradcam, uncertainty",
                                    "batch-size": "2", "--overlap": "", "connectivity": "6"})
    assert (p.threshold, p.tta, p.heatmaps, p.batch_size, p.overlap, p.connectivity) == (
        0.4, True, ("gradcam", "uncertainty"), 2, None, 6)
    assert SegmentParams.from_mapping({"tta": "off", "heatmaps": "none"}).heatmaps == ()
    base = SegmentParams(engine="plain", threshold=0.3)
    q = SegmentParams.from_mapping({"threshold": 0.6}, base=base)
    assert (q.engine, q.threshold) == ("plain", 0.6) and base.threshold == 0.3
    stored = SegmentParams(threshold=0.35, tta=True, heatmaps=("uncertainty",)).as_dict()
    assert SegmentParams.from_mapping(json.loads(json.dumps(stored))) == SegmentParams(**{**stored, "heatmaps": ("uncertainty",)})
    with pytest.raises(UsageError, match="threshold='0,4'"):
        SegmentParams.from_mapping({"threshold": "0,4"})
    with pytest.raises(UsageError, match="not a boolean"):
        SegmentParams.from_mapping({"tta": "sometimes"})


def test_from_mapping_refuses_unknown_and_server_owned_names():
    with pytest.raises(UsageError, match="unknown parameter 'treshold'") as err:
        SegmentParams.from_mapping({"treshold": "0.4"})
    assert "threshold" in str(err.value).split("—")[-1], "the message lists the real names"
    for key, value in (("device", "cpu"), ("threads", "2")):
        with pytest.raises(UsageError, match=f"{key} is set by the server"):
            SegmentParams.from_mapping({key: value}, allow_server_owned=False)
        assert SegmentParams.from_mapping({key: value}) is not None, "allowed by default (CLI, stored summaries)"
    assert SegmentParams.from_mapping({"threshold": "0.4"}, allow_server_owned=False).threshold == 0.4


# --- argparse, from the same table ---------------------------------------------------------------
def _parser(only=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetsegment segment")
    add_arguments(parser, only=only)
    return parser


def test_defaults_round_trip_through_argparse():
    assert params_from_args(_parser().parse_args([])) == SegmentParams()


def test_options_round_trip_through_argparse():
    argv = ["--threshold", "0.4", "--no-tta", "--heatmap", "none", "--engine", "plain", "--batch-size", "2",
            "--connectivity", "6", "--overlap", "0", "--min-lesion-ml", "0.05", "--precision", "fp32", "--device", "cpu",
            "--threads", "3", "--gradcam-layer", "decoder.1", "--cam-method", "gradcam"]
    p = params_from_args(_parser().parse_args(argv))
    assert p == SegmentParams(threshold=0.4, tta=False, heatmaps=(), engine="plain", batch_size=2, connectivity=6,
                              overlap=0.0, min_lesion_ml=0.05, precision="fp32", device="cpu", threads=3,
                              gradcam_layer="decoder.1", cam_method="gradcam")
    assert params_from_args(_parser().parse_args(["--tta", "--heatmap", "uncertainty,gradcam"])).heatmaps == (
        "uncertainty", "gradcam")


def test_every_field_is_an_option_and_only_limits_them():
    text = _parser().format_help()
    assert all(f.option in text for f in FIELDS)
    only = _parser(only=("threshold",))
    assert "--threshold" in only.format_help() and "--overlap" not in only.format_help()
    assert vars(only.parse_args([])) == {"threshold": None}


def test_bad_option_values_exit_with_a_message_naming_the_value(capsys):
    with pytest.raises(SystemExit) as err:
        _parser().parse_args(["--threshold", "2"])
    assert err.value.code == 2
    assert "threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--engine", "turbo"])
    assert "engine='turbo'" in capsys.readouterr().err


def test_help_with_a_percent_sign_in_a_help_text_does_not_crash(capsys):
    with pytest.raises(SystemExit) as err:
        _parser().parse_args(["--help"])
    assert err.value.code == 0
    assert "99.99 %" in capsys.readouterr().out
