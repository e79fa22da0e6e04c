"""Shared fixtures: small synthetic volumes and throw-away model bundles with random weights."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UNetSegment"))

from UNetSegmentLib.models.bundle import sha256_file  # noqa: E402
from UNetSegmentLib.image import Image, make_ijk_to_ras  # noqa: E402
from UNetSegmentLib.phantom import head_with_blob, oblique_direction  # noqa: E402,F401  (tests import it from here)


def ct_phantom(shape_kji=(24, 64, 64), spacing=(1.5, 1.5, 3.0), direction=None, origin=(10.0, -20.0, 5.0), seed=0,
               blob=True) -> tuple[Image, np.ndarray]:
    """A CT-like head (skull, brain, optional bright blob) and the blob mask."""
    return head_with_blob(shape_kji, spacing, direction, origin, seed, blob)


def write_bundle(folder: Path, *, channels=("CT",), dims="2d", patch=(32, 32), base=4, depth=2, n_labels=1,
                 target_spacing=(1.5, 1.5, 3.0), seed=0, context=0, extra_meta: dict | None = None,
                 input_extra: dict | None = None) -> Path:
    """A valid bundle with random weights (deterministic per seed)."""
    import torch
    from safetensors.torch import save_file

    from UNetSegmentLib.models.networks import build_network

    torch.manual_seed(seed)
    in_ch = len(channels) * (2 * context + 1 if dims == "2.5d" else 1)
    kwargs = {"spatial_dims": 3 if dims == "3d" else 2, "in_channels": in_ch, "out_channels": 1 + n_labels,
              "base_channels": base, "depth": depth, "norm": "instance"}
    net = build_network("unet", **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {
        "schema_version": 1, "name": "test-model", "version": "0.0.1", "description": "random weights for tests",
        "architecture": {"name": "unet", "kwargs": kwargs},
        "dimensions": dims,
        "inputs": [{"name": c, "modality": "CT", "normalization": {"type": "ct", "clip": [-20, 120], "mean": 40, "std": 40},
                    **(input_extra or {})} for c in channels],
        "target_spacing": list(target_spacing), "patch_size": list(patch),
        "labels": [{"value": v, "name": f"lesion{v}", "color": [1, 0, 0]} for v in range(1, n_labels + 1)],
        "threshold": 0.5, "inference": {"overlap": 0.25, "batch_size": 2},
        "weights": {"file": "model.safetensors", "sha256": sha256_file(folder / "model.safetensors")},
        "license": "Apache-2.0",
    }
    if dims == "2.5d":
        meta["context_slices"] = context
    meta.update(extra_meta or {})
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


#: the labels of :func:`write_compartment_bundle` (ct-hemorrhage 2.x's); 4 is context (``"lesion": false``)
COMPARTMENT_NAMES = {1: "intraparenchymal hemorrhage", 2: "extra-axial hemorrhage", 3: "intraventricular hemorrhage",
                     4: "perilesional oedema"}


def write_compartment_bundle(folder: Path) -> Path:
    """tiny-blob (trained) widened to IPH/EAH/IVH + oedema (``"lesion": false``): the blob is IPH, EAH and
    IVH never win the vote, and the oedema output is the mean of the blob and background outputs plus a
    margin, so it wins on the blob's rim — a multi-class bundle with real, deterministic outputs."""
    from safetensors.torch import save_file

    from UNetSegmentLib.models.bundle import load_weights
    from UNetSegmentLib.models.networks import build_network
    from UNetSegmentLib.models.training.trainer import expand_output_classes

    src = REPO / "Resources" / "Models" / "tiny-blob"
    meta = json.loads((src / "model.json").read_text())
    meta["architecture"]["kwargs"]["out_channels"] = 5
    net = build_network(meta["architecture"]["name"], **meta["architecture"]["kwargs"])
    st = expand_output_classes(load_weights(src / "model.safetensors"), net.state_dict(), [0, 1, 1, 1, 0])
    w, b = st["out_conv.weight"], st["out_conv.bias"]
    b[2] -= 2.0
    b[3] -= 2.0
    w[4] = 0.5 * (w[0] + w[1])
    b[4] = 0.5 * (b[0] + b[1]) + 1.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in st.items()}, str(folder / "model.safetensors"))
    colors = {1: [0.86, 0.08, 0.08], 2: [0.98, 0.55, 0.05], 3: [0.62, 0.18, 0.82], 4: [0.35, 0.8, 0.35]}
    meta["labels"] = [{"value": v, "name": n, "color": colors[v], **({"lesion": False} if v == 4 else {})}
                      for v, n in COMPARTMENT_NAMES.items()]
    meta["name"], meta["version"] = "test-compartments", "0.0.1"
    meta["weights"] = {"file": "model.safetensors", "sha256": sha256_file(folder / "model.safetensors")}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session")
def head_ct():
    """The real sample head CT (fetched once per machine into the default cache)."""
    import SimpleITK as sitk

    from UNetSegmentLib.errors import InputError
    from UNetSegmentLib.image import from_sitk
    from UNetSegmentLib.io.sample import fetch_sample

    try:
        path = fetch_sample()  # default cache: fetched once per machine
    except InputError as err:  # a failure, never a skip
        pytest.fail(f"fetching the sample head CT failed: {err}")
    return from_sitk(sitk.ReadImage(str(path)))
