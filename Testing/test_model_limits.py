"""Absurd or hostile model bundles (issue 14, item 13): bounded architectures (schema, parameter count,
activation estimate — all before the network is built), ``models import`` = ``models verify``'s checks,
and no symbolic links inside a bundle (folder or zip). Refusals exit 4 with one line naming the limit.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import ct_phantom, write_bundle
from test_memory_guard import MAX_RSS_MB, run_cli_measured

from UNetSegmentLib.models.bundle import (MAX_PATCH_ACTIVATION_BYTES, MAX_PARAMETERS, bundled_models_dir, load_bundle,
                                   patch_activation_bytes, sha256_file)
from UNetSegmentLib.errors import ModelError
from UNetSegmentLib.image import to_sitk


def _tiny_copy(tmp: Path, edit=None) -> Path:
    """The shipped tiny-blob bundle, copied, with ``edit(meta)`` applied to its model.json."""
    b = tmp / "bundle"
    shutil.copytree(bundled_models_dir() / "tiny-blob", b)
    if edit:
        meta = json.loads((b / "model.json").read_text())
        edit(meta)
        (b / "model.json").write_text(json.dumps(meta))
    return b


def _kwargs(**kw):
    return lambda m: m["architecture"]["kwargs"].update(kw)


def _patch(*size):
    return lambda m: m.update(patch_size=list(size))


ABSURD = {
    "base_channels 2000": (_kwargs(base_channels=2000), f"more than the limit of {MAX_PARAMETERS:,}"),
    "depth 40": (_kwargs(depth=40), "architecture/kwargs/depth: 40 is greater than the maximum of 8"),
    "patch 32768": (_patch(32768, 32768), "patch_size/0: 32768 is greater than the maximum of 2048"),
    "base_channels 100000": (_kwargs(base_channels=100000), "base_channels: 100000 is greater than the maximum of 4096"),
}


def _store_env(tmp: Path) -> dict:
    return {"UNETSEGMENT_MODELS": str(tmp / "store"), "XDG_CACHE_HOME": str(tmp / "cache")}


def _run(tmp: Path, *args: str) -> tuple[int, str, float]:
    old = dict(os.environ)
    os.environ.update(_store_env(tmp))
    try:
        return run_cli_measured(list(args))
    finally:
        os.environ.clear()
        os.environ.update(old)


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak RSS of a child needs wait4")
@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_architectures_are_refused_by_verify_import_and_segment(tmp_path, case):
    edit, words = ABSURD[case]
    b = _tiny_copy(tmp_path, edit)
    img, _ = ct_phantom(shape_kji=(4, 32, 32))
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(to_sitk(img), str(ct))
    for cmd in (["models", "verify", str(b)], ["models", "import", str(b)],
                ["segment", str(ct), "-o", str(tmp_path / "out"), "--model", str(b), "-q"]):
        code, err, rss_mb = _run(tmp_path, *cmd)
        assert code == 4 and err.count("\n") == 1 and words in err, (cmd, err)
        assert rss_mb < MAX_RSS_MB, f"{cmd[:2]}: peak RSS {rss_mb:.0f} MB"
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_activation_memory_is_bounded_before_building(tmp_path):
    b = write_bundle(tmp_path / "b3d", dims="3d", patch=(16, 16, 16), base=4, depth=2)
    meta = json.loads((b / "model.json").read_text())
    meta["patch_size"] = [512, 512, 512]
    assert patch_activation_bytes(meta) > MAX_PATCH_ACTIVATION_BYTES
    (b / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"one 512×512×512 patch needs about .* GiB of activations, more than the limit of 8 GiB"):
        load_bundle(b).build_network()


class _Payload:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_import_refuses_pickled_weights(tmp_path):
    b = write_bundle(tmp_path / "b")
    with open(b / "model.pt", "wb") as f:
        pickle.dump({"w": _Payload()}, f)
    meta = json.loads((b / "model.json").read_text())
    meta["weights"] = {"file": "model.pt", "sha256": sha256_file(b / "model.pt")}
    (b / "model.json").write_text(json.dumps(meta))
    code, err, _ = _run(tmp_path, "models", "import", str(b))
    assert code == 4 and "pickled Python objects" in err and err.count("\n") == 1, err
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_import_refuses_a_symlinked_model_card_in_a_folder_or_zip(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private notes of the person importing")
    b = _tiny_copy(tmp_path)
    (b / "MODEL_CARD.md").unlink()
    (b / "MODEL_CARD.md").symlink_to(secret)
    code, err, _ = _run(tmp_path, "models", "import", str(b))
    assert code == 4 and "contains a symbolic link: MODEL_CARD.md" in err, err
    z = tmp_path / "bundle.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in ("model.json", "model.safetensors"):
            zf.write(b / f, f)
        link = zipfile.ZipInfo("MODEL_CARD.md")
        link.external_attr = (0o120777 << 16)  # a symlink entry, as `zip --symlinks` stores it
        zf.writestr(link, str(secret))
    code, err, _ = _run(tmp_path, "models", "import", str(z))
    assert code == 4 and "bundle.zip contains a symbolic link: MODEL_CARD.md" in err, err
    store = tmp_path / "store"
    assert not store.exists() or not os.listdir(store)
    assert not any("private notes" in p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret)


def test_import_of_a_valid_bundle_still_works(tmp_path):
    code, err, _ = _run(tmp_path, "models", "import", str(_tiny_copy(tmp_path)))
    assert code == 0, err
    assert (tmp_path / "store" / "tiny-blob" / "model.json").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in bundled_models_dir().iterdir() if (p / "model.json").is_file()))
def test_shipped_bundles_pass_every_check(name):
    b = load_bundle(bundled_models_dir() / name)
    net = b.build_network()
    assert sum(p.numel() for p in net.parameters()) == b.meta["architecture"]["parameters"] < MAX_PARAMETERS
    assert patch_activation_bytes(b.meta) < MAX_PATCH_ACTIVATION_BYTES / 100
