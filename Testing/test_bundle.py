"""Model bundles: schema validation, hashes, weight shapes, safe loading, zips, import."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_bundle

from UNetSegmentLib.models.bundle import available_models, import_model, load_bundle, sha256_file
from UNetSegmentLib.errors import ModelError


def _edit(folder: Path, fn) -> None:
    meta = json.loads((folder / "model.json").read_text())
    fn(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def test_valid_bundle_loads_and_builds(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.name == "test-model" and b.channel_names == ["CT"]
    net = b.build_network()
    assert not net.training


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda m: m.pop("labels"), "'labels' is a required property"),
        (lambda m: m.__setitem__("threshold", 2), "threshold"),
        (lambda m: m.__setitem__("dimensions", "4d"), "dimensions"),
        (lambda m: m["inputs"][0]["normalization"].__setitem__("type", "magic"), "inputs/0/normalization"),
        (lambda m: m.__setitem__("patch_size", [30, 30]), "not divisible"),
        (lambda m: m.__setitem__("patch_size", [32, 32, 32]), "does not fit a 2d model"),
        (lambda m: m["labels"].append(dict(m["labels"][0])), "duplicate label values"),
        (lambda m: m["weights"].__setitem__("file", "../../etc/passwd.pt"), "weights/file"),
        (lambda m: m.__setitem__("surprise", 1), "Additional properties"),
    ],
)
def test_schema_errors_name_the_problem(tiny_bundle, mutate, match):
    _edit(tiny_bundle, mutate)
    with pytest.raises(ModelError, match=match):
        load_bundle(tiny_bundle)


def test_missing_model_json_and_bad_json(tmp_path, tiny_bundle):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no model.json"):
        load_bundle(empty)
    (tiny_bundle / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_bundle(tiny_bundle)


def test_wrong_sha256_is_refused(tiny_bundle):
    w = tiny_bundle / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(tiny_bundle)


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    folder = write_bundle(tmp_path / "b", base=4)
    other = write_bundle(tmp_path / "c", base=8)
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    _edit(folder, lambda m: m["weights"].__setitem__("sha256", sha256_file(folder / "model.safetensors")))
    with pytest.raises(ModelError, match="wrong shape"):
        load_bundle(folder).build_network()


class _Marker:
    """Unpickling this runs os.system — the payload a malicious model file would carry."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_payload_never_runs(tmp_path):
    folder = write_bundle(tmp_path / "b")
    marker = tmp_path / "PWNED"
    state = torch.nn.Module().state_dict()
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"evil": _Marker(str(marker)), **state}, f)
    _edit(folder, lambda m: m["weights"].update(file="model.pt", sha256=sha256_file(folder / "model.pt")))
    with pytest.raises(ModelError, match="cannot load weights"):
        load_bundle(folder).build_network()
    assert not marker.exists()
    # torch.save'd archives go through the same weights-only loader
    torch.save({"evil": _Marker(str(marker))}, folder / "model.pt")
    _edit(folder, lambda m: m["weights"].update(sha256=sha256_file(folder / "model.pt")))
    with pytest.raises(ModelError, match="cannot load weights"):
        load_bundle(folder).build_network()
    assert not marker.exists()


def test_plain_state_dict_pt_loads(tmp_path):
    folder = write_bundle(tmp_path / "b")
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "model.pt")
    _edit(folder, lambda m: m["weights"].update(file="model.pt", sha256=sha256_file(folder / "model.pt")))
    load_bundle(folder).build_network()


def test_zip_bundles_load_with_or_without_a_top_folder(tmp_path, tiny_bundle):
    for prefix in ("", "my-model/"):
        z = tmp_path / f"m{len(prefix)}.zip"
        with zipfile.ZipFile(z, "w") as zf:
            for f in tiny_bundle.iterdir():
                zf.write(f, prefix + f.name)
        assert load_bundle(z).name == "test-model"
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../escape.txt", "x")
        zf.writestr("model.json", "{}")
    with pytest.raises(ModelError, match="unsafe path"):
        load_bundle(bad)
    assert not (tmp_path.parent / "escape.txt").exists()


def test_import_and_name_lookup(tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setenv("UNETSEGMENT_MODELS", str(tmp_path / "models"))
    b = import_model(tiny_bundle)
    assert b.root == (tmp_path / "models" / "test-model").resolve()
    assert "test-model" in available_models() and "tiny-blob" in available_models()
    assert load_bundle("test-model").name == "test-model"
    with pytest.raises(ModelError, match="already imported"):
        import_model(tiny_bundle)
    import_model(tiny_bundle, overwrite=True)
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        load_bundle("nope")


def test_shipped_tiny_blob_verifies():
    b = load_bundle("tiny-blob")
    assert b.dimensions == "2d" and b.labels[0]["name"] == "blob"
    b.build_network()
