"""Weight-space interpolation of a bundle with its fine-tuned copy (models/training/interpolate.py)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_bundle
from UNetSegmentLib.errors import ModelError, UsageError
from UNetSegmentLib.models.bundle import load_bundle, load_weights, save_weights, sha256_file
from UNetSegmentLib.models.training.interpolate import interpolate_bundle, interpolate_states, main

TINY = REPO / "Resources" / "Models" / "tiny-blob"


def _fine_tuned_copy(folder: Path, seed: int = 1) -> Path:
    """tiny-blob with every float weight moved and its counters advanced, recorded as fine-tuned from it."""
    shutil.copytree(TINY, folder)
    g = torch.Generator().manual_seed(seed)
    state = load_weights(TINY / "model.safetensors")
    for k, v in state.items():
        state[k] = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + 7
    save_weights(state, folder / "model.safetensors")
    meta = json.loads((folder / "model.json").read_text())
    meta.setdefault("training", {})["init_from"] = {"version": meta["version"], "sha256": sha256_file(TINY / "model.safetensors")}
    meta["training"]["steps"] = 123
    meta["version"] = "9.9.9"
    meta["weights"]["sha256"] = sha256_file(folder / "model.safetensors")
    meta["calibration"] = {"temperature": 1.7}
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_states_follow_the_line_between_the_ends():
    start = load_weights(TINY / "model.safetensors")
    end = {k: (v * 3 + 1 if v.is_floating_point() else v + 5) for k, v in start.items()}
    for alpha in (0.0, 0.25, 1.0):
        mixed = interpolate_states(start, end, alpha)
        assert set(mixed) == set(start)
        for k, v in mixed.items():
            assert v.dtype == end[k].dtype and v.shape == end[k].shape
            if v.is_floating_point():
                want = (1 - alpha) * start[k].double() + alpha * end[k].double()
                assert torch.allclose(v.double(), want, atol=1e-5), k
            else:  # BatchNorm's num_batches_tracked: a counter, taken from the fine-tuned end
                assert torch.equal(v, end[k]), k
    assert any("num_batches_tracked" in k for k in start)  # the counter case is exercised


@pytest.mark.parametrize("alpha", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_a_bad_alpha_is_refused(alpha):
    s = {"w": torch.zeros(2)}
    with pytest.raises(UsageError, match="alpha"):
        interpolate_states(s, s, alpha)


def test_different_networks_are_refused(tmp_path):
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ModelError, match="differ in their tensors"):
        interpolate_states(a, {"w": torch.zeros(2)}, 0.5)
    with pytest.raises(ModelError, match="in start and"):
        interpolate_states(a, {"w": torch.zeros(3), "b": torch.zeros(1)}, 0.5)
    with pytest.raises(ModelError, match="in start and"):
        interpolate_states(a, {"w": torch.zeros(2, dtype=torch.int64), "b": torch.zeros(1)}, 0.5)
    other = write_bundle(tmp_path / "other", base=8)
    with pytest.raises(ModelError, match="differ in architecture"):
        interpolate_bundle(TINY, other, 0.5, tmp_path / "out", "1.0.0")
    assert not (tmp_path / "out").exists()


def test_bundle_is_written_recorded_and_loads(tmp_path):
    end = _fine_tuned_copy(tmp_path / "end")
    out = tmp_path / "mix"
    assert main(["--start", str(TINY), "--end", str(end), "--alpha", "0.5", "--version", "2.0.0",
                 "--output-dir", str(out)]) == 0
    b = load_bundle(out)  # the digest in model.json matches the written weights
    assert b.version == "2.0.0"
    assert "calibration" not in b.meta  # a temperature of either end does not hold for the mix
    rec = b.meta["training"]["interpolation"]
    assert rec["alpha"] == 0.5
    assert rec["start"]["sha256"] == sha256_file(TINY / "model.safetensors")
    assert rec["end"]["sha256"] == sha256_file(end / "model.safetensors")
    assert set(b.meta["training"]) == {"interpolation"}  # the mix was not trained: the fine-tune's record is the end's
    assert rec["end"]["training"]["steps"] == 123
    mixed, s, e = (load_weights(p / "model.safetensors") for p in (out, TINY, end))
    k = next(k for k, v in s.items() if v.is_floating_point() and v.numel() > 1)
    np.testing.assert_allclose(mixed[k].numpy(), 0.5 * (s[k].numpy() + e[k].numpy()), atol=1e-6)
    net = b.build_network()  # the mix is a working network
    net.load_state_dict(mixed)


def test_existing_output_and_a_foreign_start_are_refused(tmp_path):
    end = _fine_tuned_copy(tmp_path / "end")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty folder"):
        interpolate_bundle(TINY, end, 0.5, busy, "2.0.0")
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(UsageError, match="not an empty folder"):
        interpolate_bundle(TINY, end, 0.5, a_file, "2.0.0")
    assert a_file.read_text() == "mine"
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    other_start = _fine_tuned_copy(tmp_path / "other-start", seed=2)  # same network, not the fine-tune's origin
    with pytest.raises(ModelError, match="fine-tuned from"):
        interpolate_bundle(other_start, end, 0.5, tmp_path / "out", "2.0.0")
    assert not (tmp_path / "out").exists()


def test_an_end_with_no_recorded_origin_is_refused(tmp_path):
    end = _fine_tuned_copy(tmp_path / "end")
    meta = json.loads((end / "model.json").read_text())
    del meta["training"]["init_from"]
    (end / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="no recorded weights"):
        interpolate_bundle(TINY, end, 0.5, tmp_path / "out", "2.0.0")
    assert not (tmp_path / "out").exists()


def test_a_refused_version_writes_nothing_and_the_cli_says_why(tmp_path, capsys):
    end = _fine_tuned_copy(tmp_path / "end")
    out = tmp_path / "out"
    rc = main(["--start", str(TINY), "--end", str(end), "--alpha", "0.5", "--version", "not a version", "--output-dir", str(out)])
    assert rc != 0 and "error:" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["end"]  # no half-written folder left
    assert main(["--start", str(TINY), "--end", str(end), "--alpha", "0.5", "--version", "2.0.0", "--output-dir", str(out)]) == 0
    assert load_bundle(out).version == "2.0.0"


def test_the_bundle_folder_and_files_get_the_umask_modes(tmp_path):
    import os
    import stat

    end = _fine_tuned_copy(tmp_path / "end")
    old = os.umask(0o027)
    try:
        interpolate_bundle(TINY, end, 0.5, tmp_path / "out", "2.0.0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {0o640}
