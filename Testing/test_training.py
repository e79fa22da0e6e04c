"""Training machinery: a complete bundle, reproducibility, and resume after an interruption."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from UNetSegmentLib.models.bundle import load_bundle
from UNetSegmentLib.analysis.evaluate import evaluate, format_table, hu_baseline, score_case
from UNetSegmentLib.image import Image, make_ijk_to_ras
from UNetSegmentLib.models.training import trainer
from UNetSegmentLib.models.training.cases import phantom_case, write_case_folder


def _config(tmp: Path, steps=6) -> Path:
    cfg = yaml.safe_load((Path(__file__).parents[1] / "Resources" / "Training" / "ct-hemorrhage.yaml").read_text())
    cfg["bundle"].update(name="phantom-test", patch_size=[64, 64], target_spacing=[1.0, 1.0, 1.0])
    cfg["bundle"]["architecture"]["kwargs"].update(base_channels=4, depth=2)
    cfg["data"].update(generator="phantom", train_cases=3, val_cases=1, train_seed=10, val_seed=500,
                       tune_cases=1, tune_seed=700, cache_dir=str(tmp / "cache"))
    cfg["train"].update(steps=steps, batch_size=2, crop=[32, 32], val_every=3, checkpoint_every=2, precision="fp32")
    cfg["train"].pop("init_from", None)
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_fine_tuning_starts_from_the_named_weights_and_refuses_others(tmp_path):
    from UNetSegmentLib.errors import UsageError
    from UNetSegmentLib.models.bundle import sha256_file

    first = _config(tmp_path, steps=2)
    trainer.train(first, tmp_path / "a", log=lambda m: None)
    weights = tmp_path / "a" / "model.safetensors"
    cfg = yaml.safe_load(first.read_text())
    cfg["train"]["init_from"] = {"file": "a/model.safetensors", "sha256": sha256_file(weights), "version": "0.1"}
    tuned = tmp_path / "tune.yaml"
    tuned.write_text(yaml.safe_dump(cfg))
    logs: list[str] = []
    meta = trainer.train(tuned, tmp_path / "b", log=logs.append)
    assert any(l.startswith("initialised from") for l in logs)
    assert meta["training"]["init_from"] == {"version": "0.1", "sha256": sha256_file(weights)}
    cfg["train"]["init_from"]["sha256"] = "0" * 64
    tuned.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match="not the ones the config names"):
        trainer.train(tuned, tmp_path / "c", log=lambda m: None)


def test_train_writes_a_valid_bundle_and_is_reproducible(tmp_path):
    cfg = _config(tmp_path)
    old = os.umask(0o022)
    try:
        meta = trainer.train(cfg, tmp_path / "a", log=lambda m: None)
    finally:
        os.umask(old)
    # a bundle is for sharing: its files get 0666 & ~umask (safetensors' own save_file made 0600 weights)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "a").iterdir() if f.is_file()} == {
        f.name: "0o644" for f in (tmp_path / "a").iterdir() if f.is_file()}
    b = load_bundle(tmp_path / "a")
    assert b.name == "phantom-test" and meta["training"]["steps"] == 6 and len(meta["training"]["history"]) == 2
    # the checkpoint is chosen on the tune split: the reported validation cases are never generated here
    assert meta["training"]["selection_split"] == "tune"
    assert (tmp_path / "cache" / "tune").is_dir() and not (tmp_path / "cache" / "val").exists()
    b.build_network()
    trainer.train(cfg, tmp_path / "b", log=lambda m: None)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    trainer.train(cfg, tmp_path / "straight", log=lambda m: None)
    real_save = trainer._save_checkpoint
    calls = []

    def die_after_first_checkpoint(path, state):
        real_save(path, state)
        calls.append(state["step"])
        if state["step"] == 4:
            raise KeyboardInterrupt  # the process is killed right after the step-4 checkpoint

    monkeypatch.setattr(trainer, "_save_checkpoint", die_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, tmp_path / "resumed", log=lambda m: None)
    monkeypatch.setattr(trainer, "_save_checkpoint", real_save)
    logs = []
    trainer.train(cfg, tmp_path / "resumed", log=logs.append)
    assert any("resumed from" in m and "step 4" in m for m in logs)
    wa = load_file(str(tmp_path / "straight" / "model.safetensors"))
    wb = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(np.allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-6) for k in wa)


def test_score_case_definitions():
    g = make_ijk_to_ras((1.0, 1.0, 1.0))
    truth = np.zeros((10, 40, 40), np.uint8)
    truth[2:6, 5:15, 5:15] = 1  # 400 mm3 = 0.4 mL, detected
    truth[2:6, 25:35, 25:35] = 1  # missed
    pred = np.zeros_like(truth)
    pred[2:6, 6:15, 5:15] = 1
    pred[8, 30:33, 2:5] = 1  # false lesion
    r = score_case("c", Image(truth, g), Image(pred, g))
    assert [l["detected"] for l in r.true_lesions] == [True, False]
    assert r.false_lesions == 1
    assert r.dice == pytest.approx(2 * 360 / (800 + 369))
    assert r.true_lesions[0]["centroid_err_mm"] == pytest.approx(0.5)
    assert r.true_lesions[0]["dice"] == pytest.approx(2 * 360 / (400 + 360)) and r.true_lesions[1]["dice"] == 0.0


def test_lesions_are_binned_by_their_measured_density():
    from UNetSegmentLib.analysis.evaluate import by_density

    g = make_ijk_to_ras((1.0, 1.0, 1.0))
    truth = np.zeros((12, 40, 40), np.uint8)
    truth[1:11, 2:14, 2:14] = 1  # 1.44 mL, faint (52 HU), half found
    truth[1:11, 22:34, 22:34] = 1  # 1.44 mL, dense (82 HU), found whole
    ct = np.full(truth.shape, 30.0, np.float32)
    ct[1:11, 2:14, 2:14] = 52.0
    ct[1:11, 22:34, 22:34] = 82.0
    ct[1:11, 2:14, 2] = 20.0  # a partial-volume edge: the eroded core ignores it
    pred = truth.copy()
    pred[1:6, 2:14, 2:14] = 0
    r = score_case("c", Image(truth, g), Image(pred, g), intensity=Image(ct, g))
    assert [l["density"] for l in r.true_lesions] == [52.0, 82.0]
    bins = by_density(r.true_lesions)
    assert bins["45-60 HU"] == {"n": 1, "sensitivity": 1.0, "lesion_dice_median": pytest.approx(2 * 720 / (1440 + 720))}
    assert bins["75-90 HU"]["lesion_dice_median"] == 1.0 and bins["60-75 HU"]["n"] == 0


def test_per_lesion_dice_and_density_equal_their_whole_volume_definitions():
    """score_case measures each true lesion on a box around it; the figures are those of the definitions
    on the whole volume (lesions touching the volume's faces, several predicted lesions per true one)."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    g = make_ijk_to_ras((0.8, 0.8, 2.0))
    s26 = np.ones((3, 3, 3), bool)
    for _ in range(6):
        field = ndimage.gaussian_filter(rng.normal(size=(14, 40, 36)), 1.5)
        truth = (field > 0.12).astype(np.uint8)
        pred = ((field + ndimage.gaussian_filter(rng.normal(size=field.shape), 1.5) * 0.6) > 0.15).astype(np.uint8)
        ct = rng.normal(50, 15, field.shape).astype(np.float32)
        r = score_case("c", Image(truth, g), Image(pred, g), intensity=Image(ct, g))
        tm, nt = ndimage.label(truth, s26)
        pm, _ = ndimage.label(pred, s26)
        assert len(r.true_lesions) == nt > 1
        by_size = sorted(range(1, nt + 1), key=lambda n: (-(tm == n).sum()))
        for entry in r.true_lesions:  # matched by volume and density: rows need not follow scipy's numbering
            candidates = [n for n in by_size if np.isclose((tm == n).sum() * 0.8 * 0.8 * 2.0 / 1000, entry["volume_ml"])]
            expected = []
            for n in candidates:
                lesion = tm == n
                ids = np.unique(pm[lesion & (pm > 0)])
                pred_n = np.isin(pm, ids)
                dice = 2 * (lesion & pred_n).sum() / (lesion.sum() + pred_n.sum())
                core = ndimage.binary_erosion(lesion)
                expected.append((pytest.approx(dice), float(np.median(ct[core if core.any() else lesion]))))
            assert (entry["dice"], entry["density"]) in expected


def test_evaluate_on_case_folders_with_baseline(tmp_path):
    folder = tmp_path / "cases"
    for seed in (3, 4, 5):
        ch, lab = phantom_case(seed)
        write_case_folder(folder / f"case-{seed}", ch, lab, ["CT"])
    cfg = _config(tmp_path)
    trainer.train(cfg, tmp_path / "m", log=lambda m: None)
    res = evaluate(load_bundle(tmp_path / "m"), folder)
    assert res["model_metrics"]["n_cases"] == 3 and "baseline" in res
    text = format_table(res)
    assert "HU baseline" in text and "Dice" in text
    json.dumps(res, default=str)
    base = hu_baseline(phantom_case(3)[0][0])
    assert base.array.dtype == np.uint8
    # the post-processing sweep (one inference per case) scores each pair as a run with those settings would
    from UNetSegmentLib.analysis.evaluate import sweep_postprocessing
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.settings import resolve

    bundle = load_bundle(tmp_path / "m")
    defaults = resolve(SegmentParams(heatmaps=()), bundle)
    t0, m0 = defaults.threshold, defaults.min_lesion_ml
    other = 0.3 if t0 != 0.3 else 0.4
    rows = sweep_postprocessing(bundle, folder, [m0, m0 + 0.5, m0], [other, t0, other])  # repeats scored once
    assert [(r["threshold"], r["min_lesion_ml"]) for r in rows] == [(other, m0), (other, m0 + 0.5), (t0, m0), (t0, m0 + 0.5)]
    assert rows[2]["n_cases"] == 3
    keys = ("dice_mean", "sensitivity_ge_0.5ml", "false_lesions_per_scan", "volume_error_median", "by_density")
    assert {k: rows[2][k] for k in keys} == {k: res["model_metrics"][k] for k in keys}
    at_03 = evaluate(bundle, folder, SegmentParams(threshold=other, heatmaps=()), baseline=False)["model_metrics"]
    assert {k: rows[0][k] for k in keys} == {k: at_03[k] for k in keys}


def test_3d_and_multipath_configs_train_to_valid_bundles(tmp_path):
    """The 3D patch sampler and the multi-path network go through the same trainer to loadable bundles."""
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    c3 = {**cfg, "bundle": {**cfg["bundle"], "dimensions": "3d", "patch_size": [8, 32, 32]},
          "train": {**cfg["train"], "crop": [8, 32, 32]}}
    c3["bundle"]["architecture"] = {**cfg["bundle"]["architecture"],
                                    "kwargs": {**cfg["bundle"]["architecture"]["kwargs"], "spatial_dims": 3, "in_channels": 1}}
    c3["bundle"].pop("context_slices", None)
    c3["bundle"].pop("slice_plane", None)
    c3["data"] = {**cfg["data"], "cache_dir": str(tmp_path / "cache3d")}
    mp = {**cfg, "bundle": {**cfg["bundle"], "architecture": {**cfg["bundle"]["architecture"], "name": "multipath_unet",
                                                              "kwargs": {**cfg["bundle"]["architecture"]["kwargs"], "paths": 3}}}}
    for name, c in (("3d", c3), ("multipath", mp)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(c))
        meta = trainer.train(p, tmp_path / name, log=lambda m: None)
        b = load_bundle(tmp_path / name)
        assert meta["training"]["steps"] == 6 and b.build_network() is not None


def test_choose_min_lesion_prefers_sensitivity():
    from UNetSegmentLib.analysis.evaluate import choose_min_lesion

    row = lambda ml, fp, sens: {"min_lesion_ml": ml, "false_lesions_per_scan": fp, "sensitivity_ge_0.5ml": sens}  # noqa: E731
    assert choose_min_lesion([row(0.1, 0.5, 1.0), row(0.2, 0.1, 1.0), row(0.3, 0.0, 1.0)]) == 0.2, "smallest meeting both"
    # none meets both: the fewest false lesions that keeps the sensitivity (here 0.2, not 0.3)
    assert choose_min_lesion([row(0.1, 0.6, 1.0), row(0.2, 0.25, 1.0), row(0.3, 0.08, 0.93)]) == 0.2
    assert choose_min_lesion([row(0.1, 0.6, 0.9)]) is None


def test_choose_operating_point_prefers_targets_then_sensitivity_then_dice():
    from UNetSegmentLib.analysis.evaluate import choose_operating_point

    def row(t, ml, fp, sens, dice):
        return {"threshold": t, "min_lesion_ml": ml, "false_lesions_per_scan": fp, "sensitivity_ge_0.5ml": sens, "dice_mean": dice}

    rows = [row(0.5, 0.1, 0.5, 0.97, 0.88), row(0.5, 0.3, 0.1, 0.96, 0.89),
            row(0.4, 0.1, 0.9, 0.99, 0.87), row(0.4, 0.3, 0.15, 0.98, 0.86)]
    assert choose_operating_point(rows) == (0.4, 0.3), "both pairs meet the targets: the more sensitive"
    rows[3]["sensitivity_ge_0.5ml"] = 0.96
    assert choose_operating_point(rows) == (0.5, 0.3), "equally sensitive: the better Dice"
    rows[1]["false_lesions_per_scan"], rows[3]["false_lesions_per_scan"] = 0.3, 0.35
    assert choose_operating_point(rows) == (0.5, 0.3), "none meets both: the fewest false lesions keeping sensitivity"
    tie = [row(0.5, 0.3, 0.3, 0.96, 0.9), row(0.4, 0.3, 0.3, 0.97, 0.8)]  # none meets both, equal false lesions
    assert choose_operating_point(tie) == choose_operating_point(tie[::-1]) == (0.4, 0.3), "then the more sensitive"
    assert choose_operating_point([row(0.5, 0.3, 0.0, None, None)]) == (0.5, 0.3), "cases without lesions ≥ 0.5 mL"
    assert choose_operating_point([row(0.5, 0.3, 0.1, 0.9, 0.9)]) is None
    assert choose_operating_point([]) is None
    assert choose_operating_point([row(0.5, 0.1, 0.5, 0.97, 0.88), row(0.5, 0.3, 0.1, 0.96, 0.89)]) == (0.5, 0.3)


def test_validation_scores_sampled_slices_as_full_inference_would(tmp_path):
    """``trainer.validate`` runs only the sampled slices (``WindowPlan.on_slices``, with their 2.5D
    context) yet scores exactly what a whole-volume run with the threshold rule gives on them."""
    from conftest import ct_phantom, write_bundle

    from UNetSegmentLib.engine.inference import sliding_window, softmax_predictor
    from UNetSegmentLib.engine.labels import labels_from_probabilities
    from UNetSegmentLib.engine.preprocess import normalize
    from UNetSegmentLib.engine.windows import plan_windows
    from UNetSegmentLib.params import SegmentParams
    from UNetSegmentLib.settings import resolve

    b = load_bundle(write_bundle(tmp_path / "b", dims="2.5d", context=1, patch=(32, 32)))
    s = resolve(SegmentParams(device="cpu", precision="fp32", threshold=0.3), b)
    net = b.build_network().eval()
    img, mask = ct_phantom(shape_kji=(13, 40, 40))
    x = normalize(img.array, b.meta["inputs"][0]["normalization"])[None]
    np.savez(tmp_path / "case.npz", x=x, y=mask.astype(np.uint8))
    score = trainer.validate(net, [tmp_path / "case.npz"], s, every=6)

    m = s.model
    plan = plan_windows(x, spatial_dims=m.spatial_dims, patch=m.patch, context=m.context, overlap=s.overlap, fast=False,
                        size_divisor=net.size_divisor)
    probs = sliding_window(x, softmax_predictor(net, m.out_channels), plan, batch_size=s.batch_size)
    ks = sorted({0, 6, 12} | set(np.flatnonzero(mask.any(axis=(1, 2))).tolist()))
    pred = labels_from_probabilities({1: probs[1]}, 0.3)[ks] > 0
    truth = mask[ks]
    expected = 1.0 if pred.sum() + truth.sum() == 0 else 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert len(ks) < mask.shape[0], "validation really samples"
    assert score == pytest.approx(expected, abs=1e-6)


def _two_lesion_case(tmp: Path) -> Path:
    """One network-grid case (normalised as the CT model: (HU − 40) / 40) with a bright large bleed and a
    faint small one, as the trainer's cache stores it."""
    hu = np.full((1, 20, 96, 96), 30.0, np.float32)
    y = np.zeros((20, 96, 96), np.uint8)
    y[2:12, 10:40, 10:40] = 1  # 900 mm² cross-section, 80 HU
    hu[0][y == 1] = 80.0
    y[8:14, 70:78, 70:78] = 1  # 64 mm², 50 HU, 384 voxels
    hu[0, 8:14, 70:78, 70:78] = 50.0
    y[16, 50, 50] = 1  # a one-voxel speck: never a training target of its own
    hu[0, 16, 50, 50] = 50.0
    f = tmp / "case-1.npz"
    np.savez(f, x=(hu - 40.0) / 40.0, y=y)
    return f


def test_hard_lesions_are_the_faint_small_ones_and_get_their_share_of_crops(tmp_path):
    norm = {"type": "ct", "clip": [-20.0, 120.0], "mean": 40.0, "std": 40.0}
    hard = trainer.HardLesions.from_config({"max_hu": 60, "max_area_mm2": 150, "min_voxels": 100, "share": 1.0}, norm)
    f = _two_lesion_case(tmp_path)
    found = hard.find(np.load(f)["x"], np.load(f)["y"])
    assert [len(v) for v in found] == [384]
    assert set(map(tuple, found[0][:, 1:].tolist())) == {(j, i) for j in range(70, 78) for i in range(70, 78)}
    # every lesion crop (lesion_fraction 1, share 1) contains the faint lesion's centre voxel column
    s = trainer._Sampler([f], 1, (32, 32), np.random.default_rng(0), 1.0, hard)
    for _ in range(20):
        _, yp = s.patch()
        assert yp.sum() and yp.sum() <= 64
    # without hard lesions most lesion crops land on the large bleed
    plain = trainer._Sampler([f], 1, (32, 32), np.random.default_rng(0), 1.0)
    assert sum(plain.patch()[1].sum() > 64 for _ in range(40)) > 20
    with pytest.raises(trainer.UsageError):
        trainer.HardLesions.from_config({"max_hu": 60, "max_area_mm2": 150, "share": 0}, norm)
    with pytest.raises(trainer.UsageError):
        trainer.HardLesions.from_config({"max_hu": 60, "max_area_mm2": 150, "share": 0.3}, {"type": "zscore"})


def test_extra_training_cases_come_from_their_own_settings_and_seeds(tmp_path):
    from UNetSegmentLib.errors import UsageError
    from UNetSegmentLib.models.training.cases import TRAINING, ExtraCases

    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["data"]["extra_train"] = [{"cases": 2, "seed": 40, "settings": {"noise_hu": [0.0, 0.0], "negative_fraction": 0.0}}]
    train, select = trainer._prepare_cases(cfg, tmp_path / "work", lambda m: None)
    assert [f.name for f in train] == ["case-10.npz", "case-11.npz", "case-12.npz", "case-40.npz", "case-41.npz"]
    assert train[-1].parent.name.startswith("train-extra-40-") and len(select) == 1
    extra = ExtraCases.from_config(cfg["data"]["extra_train"][0])
    assert extra.settings.noise_hu == (0.0, 0.0) and extra.settings.negative_fraction == 0.0
    assert extra.settings.rotation_deg == TRAINING.rotation_deg  # the rest as the training settings
    assert extra.record() == {"cases": 2, "seed": 40, "settings": {"negative_fraction": 0.0, "noise_hu": [0.0, 0.0]}}
    # other settings, same seeds: other cases in another folder, never the cached ones
    cfg["data"]["extra_train"][0]["settings"]["noise_hu"] = [0.0, 5.0]
    train2, _ = trainer._prepare_cases(cfg, tmp_path / "work", lambda m: None)
    assert train2[-1].parent != train[-1].parent and train2[-1].is_file()
    for bad, match in (({"cases": 2, "seed": 11}, "overlap other training seeds"),
                       ({"cases": 2, "seed": 700}, "overlap the tune or validation"),
                       ({"cases": 2, "seed": 40, "settings": {"bleed": 1}}, "unknown settings"),
                       ({"cases": 0, "seed": 40}, "bad data.extra_train entry"),
                       ({"cases": 2.7, "seed": 40}, "bad data.extra_train entry"),
                       ("cases", "bad data.extra_train entry"),
                       ({"cases": 2, "seed": 40, "settings": {"bleed_hu": [60, 45]}}, "reversed"),
                       ({"cases": 2, "seed": 40, "settings": {"scale": 5}}, "not 2 numbers"),
                       ({"cases": 2, "seed": 40, "settings": {"max_lesions": "many"}}, "not a int")):
        cfg["data"]["extra_train"] = [bad]
        with pytest.raises(UsageError, match=match):
            trainer._prepare_cases(cfg, tmp_path / "work", lambda m: None)


def test_extra_validation_sets_use_validation_settings_and_their_own_seeds(tmp_path):
    from UNetSegmentLib.errors import UsageError
    from UNetSegmentLib.models.training.cases import VALIDATION
    from UNetSegmentLib.models.training.cases import extra_validation_sets

    data = {"train_seed": 10, "train_cases": 3, "val_seed": 500, "val_cases": 2, "tune_seed": 700, "tune_cases": 2,
            "extra_train": [{"cases": 2, "seed": 50, "settings": {}}],
            "extra_val": [{"name": "faint", "cases": 3, "seed": 900, "settings": {"bleed_hu": [45, 60], "negative_fraction": 0.0}}]}
    faint = extra_validation_sets(data)["faint"]
    assert faint.seeds == (900, 901, 902)
    assert faint.settings.bleed_hu == (45.0, 60.0) and faint.settings.negative_fraction == 0.0
    assert faint.settings.rotation_deg == VALIDATION.rotation_deg and faint.settings.max_lesions == VALIDATION.max_lesions
    assert faint.folder("phantom", {}, "val-extra").startswith("val-extra-900-")
    for seed in (11, 51, 501, 701):  # meets training, extra training, validation, tune seeds
        with pytest.raises(UsageError, match="overlaps the"):
            extra_validation_sets({**data, "extra_val": [{"name": "x", "cases": 1, "seed": seed}]})
    # a tuning set of the same kind (data.extra_tune): same settings rule, its own seeds, names unique across both
    from UNetSegmentLib.models.training.cases import extra_sets

    tune = {**data, "extra_tune": [{"name": "faint-tune", "cases": 2, "seed": 950, "settings": {"bleed_hu": [45, 60]}}]}
    both = extra_sets(tune)
    assert set(both["extra_val"]) == set(extra_validation_sets(tune)) == {"faint"}, "a tuning set is never a validation set"
    assert set(both["extra_tune"]) == {"faint-tune"} and both["extra_tune"]["faint-tune"].seeds == (950, 951)
    assert both["extra_tune"]["faint-tune"].settings.rotation_deg == VALIDATION.rotation_deg
    with pytest.raises(UsageError, match="overlaps the extra set 'faint'"):
        extra_validation_sets({**data, "extra_tune": [{"name": "t", "cases": 2, "seed": 902}]})
    with pytest.raises(UsageError, match="repeated"):
        extra_validation_sets({**data, "extra_tune": [{"name": "faint", "cases": 1, "seed": 990}]})
    for bad in ([{"cases": 1, "seed": 900}], [{"name": "a b", "cases": 1, "seed": 900}],
                [{"name": "a", "cases": 1, "seed": 900}, {"name": "a", "cases": 1, "seed": 950}],
                [{"name": "a", "cases": 1, "seed": 900, "settings": {"no_such": 1}}],
                [{"name": "a", "cases": 1, "seed": 900, "settings": {"bleed_contrast_hu": 10}}],  # not a range
                [{"name": "a", "cases": 1, "seed": 900, "settings": {"bleed_contrast_hu": [-5, 10]}}],
                [{"name": "a", "cases": 1, "seed": 900, "settings": {"bleed_hu": [60, 45]}}]):
        with pytest.raises(UsageError):
            extra_validation_sets({**data, "extra_val": bad})
    # the trainer refuses an overlapping set before it prepares any case
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["data"]["extra_val"] = [{"name": "faint", "cases": 1, "seed": cfg["data"]["val_seed"]}]
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match="overlaps"):
        trainer.train(bad_cfg, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "cache").exists()


def test_dice_loss_is_the_one_label_formula_and_the_mean_over_classes():
    """Two outputs: the soft Dice of the lesion channel; more (compartments + oedema): the mean over the
    foreground classes, each against its own voxels."""
    import torch

    from UNetSegmentLib.models.training.trainer import _dice_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, generator=g)
    target = (torch.rand(2, 16, 16, generator=g) > 0.7).long()
    p = torch.softmax(logits, 1)[:, 1]
    one_label = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert torch.allclose(_dice_loss(logits, target), one_label)
    logits = torch.randn(2, 5, 16, 16, generator=g)
    target = torch.randint(0, 5, (2, 16, 16), generator=g)
    target[0] = 0  # one class missing from part of the batch still counts once
    p = torch.softmax(logits, 1)
    per_class = [1 - (2 * (p[:, c] * (target == c)).sum() + 1) / (p[:, c].sum() + (target == c).sum() + 1) for c in range(1, 5)]
    assert torch.allclose(_dice_loss(logits, target), torch.stack(per_class).mean())
    assert not torch.allclose(_dice_loss(logits, target), per_class[0])


def test_lesion_dice_loss_weighs_every_lesion_alike_and_leaves_the_others_out():
    """Blob loss: per sample the mean over lesions of each lesion's soft Dice, other lesions' voxels
    excluded, then the mean over samples holding a lesion; a missed small lesion beside a found large one
    costs half the sample's loss, not its share of the voxels."""
    import torch

    from UNetSegmentLib.models.training.trainer import _dice_loss, _lesion_dice_loss

    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, 2:18, 2:18] = 1  # large, found
    target[0, 25:27, 25:27] = 1  # small, missed
    logits = torch.full((2, 2, 32, 32), -20.0)
    logits[:, 0] = 20.0
    logits[0, :, 2:18, 2:18] = torch.tensor([-20.0, 20.0])[:, None, None]
    assert float(_lesion_dice_loss(logits, target)) == pytest.approx((0 + (1 - 1 / 5)) / 2, abs=1e-6)
    assert float(_dice_loss(logits, target)) < 0.05  # the batch Dice barely sees the miss
    target[1, 5:7, 5:7] = 1  # a missed lesion alone in the second sample: that sample's loss is 0.8
    assert float(_lesion_dice_loss(logits, target)) == pytest.approx((0.4 + 0.8) / 2, abs=1e-6)

    # the definition on random probabilities: a lesion is the union of the lesion classes (here 1 and 2,
    # not 3, an oedema-like class that counts as background), 8-connected in 2D
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 12, 12, generator=g, requires_grad=True)
    target = torch.zeros(2, 12, 12, dtype=torch.long)
    target[0, 1:4, 1:4], target[0, 3:6, 4:6], target[0, 8:11, 8:10], target[0, 6, 6] = 1, 2, 1, 2  # (6,6) touches (5,5) diagonally
    target[0, 0, 10:12] = 3
    sm = torch.softmax(logits, 1)
    p = sm[:, 1] + sm[:, 2]
    a = torch.zeros(12, 12)
    a[1:4, 1:4] = 1
    a[3:6, 4:6] = 1
    a[6, 6] = 1
    b = torch.zeros(12, 12)
    b[8:11, 8:10] = 1

    def dice(pred, t):
        return 1 - (2 * (pred * t).sum() + 1) / (pred.sum() + t.sum() + 1)

    want = (dice(p[0] * (1 - b), a) + dice(p[0] * (1 - a), b)) / 2  # sample 1 has no lesion: not counted
    got = _lesion_dice_loss(logits, target, (1, 2))
    assert torch.allclose(got, want)
    got.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    empty = _lesion_dice_loss(logits, torch.zeros_like(target), (1, 2))
    assert float(empty.detach()) == 0.0 and empty.requires_grad

    # 3D: 26-connected (two voxels touching at a corner are one lesion)
    t3 = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    t3[0, 0, 0, 0] = t3[0, 1, 1, 1] = 1
    l3 = torch.randn(1, 2, 4, 4, 4, generator=g)
    p3 = torch.softmax(l3, 1)[0, 1]
    assert torch.allclose(_lesion_dice_loss(l3, t3), dice(p3, t3[0].float()))


@pytest.mark.parametrize("key,value", [("lesion_dice_weight", v) for v in (-1, float("inf"), float("nan"), True, "1")]
                         + [("skull_edge_negatives", v) for v in (-0.1, 1.5, float("nan"), True, "0.5")])
def test_a_bad_loss_weight_or_crop_share_is_refused_before_the_cases_are_made(tmp_path, key, value):
    from UNetSegmentLib.errors import UsageError

    cfg = yaml.safe_load(_config(tmp_path, steps=2).read_text())
    cfg["train"][key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match=f"{key} is"):
        trainer.train(bad, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "cache").exists()


def test_the_lesion_dice_term_trains_and_is_recorded(tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, steps=2).read_text())
    cfg["train"].update(lesion_dice_weight=0.5, lr=0.002)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    meta = trainer.train(good, tmp_path / "out", log=lambda m: None)
    assert meta["training"]["loss"] == "cross-entropy + soft Dice + 0.5 x lesion-wise Dice"
    assert meta["training"]["lr"] == 0.002
    cfg["train"].pop("lesion_dice_weight")
    good.write_text(yaml.safe_dump(cfg))
    assert trainer.train(good, tmp_path / "plain", log=lambda m: None)["training"]["loss"] == "cross-entropy + soft Dice"


CT_NORM = {"type": "ct", "clip": [-20.0, 120.0], "mean": 40.0, "std": 40.0}


def _skull_slice(n=200, r_in=80, r_out=88, gap=False) -> np.ndarray:
    """A normalised axial slice: brain (30 HU) inside a bone ring (1000 HU, clipped), scalp (40 HU) 4 px
    around it, air outside; ``gap``: the ring open on one side (a craniectomy, the foramen magnum)."""
    jj, ii = np.mgrid[:n, :n]
    r = np.hypot(jj - n / 2, ii - n / 2)
    hu = np.where(r < r_in, 30.0, np.where(r < r_out, 1000.0, np.where(r < r_out + 4, 40.0, -1000.0)))
    if gap:
        hu[(r >= r_in) & (r < r_out) & (np.abs(jj - n / 2) < 10) & (ii > n / 2)] = 30.0
    return ((np.clip(hu, *CT_NORM["clip"]) - CT_NORM["mean"]) / CT_NORM["std"]).astype(np.float32)


def test_skull_edge_rim_is_the_unlabelled_brain_inside_the_skull_next_to_bone():
    from UNetSegmentLib.errors import UsageError

    SE = trainer.SkullEdgeNegatives
    assert SE.from_config(None, CT_NORM) is None and SE.from_config(0, CT_NORM) is None
    with pytest.raises(UsageError, match="reaches bone"):
        SE.from_config(0.5, {**CT_NORM, "clip": [-20.0, 100.0]})
    with pytest.raises(UsageError, match="CT input"):
        SE.from_config(0.5, {"type": "zscore"})
    edge = SE.from_config(0.5, CT_NORM)
    n, d = 200, SE.EDGE_PX + 1  # 8-connected dilation: up to EDGE_PX·√2 px away
    r = np.hypot(*(np.mgrid[:n, :n] - n / 2))
    rim = edge.rim(_skull_slice())
    assert rim.any() and np.all((r[rim] < 80) & (r[rim] >= 80 - d))  # the brain within EDGE_PX of the inner table
    assert not rim[r >= 80].any()  # neither bone nor the scalp outside the ring
    label = np.zeros((n, n), np.uint8)
    label[(r < 80) & (r >= 76) & (np.mgrid[:n, :n][0] < n / 2)] = 1  # a subdural bleed along half the table
    assert not (edge.rim(_skull_slice(), label) & (label > 0)).any() and edge.rim(_skull_slice(), label).any()
    open_rim = edge.rim(_skull_slice(gap=True))  # no closed ring: both sides of the bone
    assert open_rim[(r >= 88) & (r < 92)].any() and open_rim[r < 80].any()
    assert not edge.rim(np.full((20, 20), -0.25, np.float32)).any()  # no bone: no rim


def test_skull_edge_negatives_centre_crops_on_the_rim(tmp_path):
    x = np.stack([_skull_slice()] * 3)[None]  # C=1, K=3
    f = tmp_path / "case.npz"
    np.savez(f, x=x, y=np.zeros(x.shape[1:], np.uint8))
    edge = trainer.SkullEdgeNegatives.from_config(1.0, CT_NORM)

    def centred_on_rim(skull_edge, n=40):
        """How many crops hold rim in their central half (where the sampler puts the voxel it drew)."""
        s = trainer._Sampler([f], 1, (16, 16), np.random.default_rng(0), 0.0, skull_edge=skull_edge)
        return sum(bool(edge.rim(c)[4:12, 4:12].any()) for c in (s.patch()[0][1] for _ in range(n)))

    assert centred_on_rim(edge) == 40
    assert centred_on_rim(None) < 25  # centred anywhere in the head, most crops miss the rim


def test_skull_edge_negatives_train_and_are_recorded(tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, steps=2).read_text())
    cfg["train"]["skull_edge_negatives"] = 0.5
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(cfg))
    assert trainer.train(good, tmp_path / "out", log=lambda m: None)["training"]["skull_edge_negatives"] == 0.5


def test_wider_context_starts_from_the_narrower_weights_with_the_same_output(tmp_path):
    """A 5-slice (context 2) network initialised from 3-slice weights answers as they do, whatever its
    new outer slices hold, and trains; a narrower or wrongly shaped start is refused."""
    import torch

    from UNetSegmentLib.errors import UsageError
    from UNetSegmentLib.models.bundle import sha256_file
    from UNetSegmentLib.models.networks import build_network

    kw = {"spatial_dims": 2, "out_channels": 2, "base_channels": 4, "depth": 2}
    narrow = build_network("unet", in_channels=3, **kw).eval()
    wide = build_network("unet", in_channels=5, **kw).eval()
    wide.load_state_dict(trainer.expand_input_context(narrow.state_dict(), wide.state_dict(), 1, 1))
    x = torch.randn(2, 5, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow(x[:, 1:4]), atol=1e-5)
    two = build_network("unet", in_channels=10, **kw).state_dict()  # two modalities, 5 slices each
    grown = trainer.expand_input_context(build_network("unet", in_channels=6, **kw).state_dict(), two, 2, 1)
    first = next(k for k, v in two.items() if v.ndim == 4 and v.shape[1] == 10)
    assert grown[first][:, [0, 4, 5, 9]].abs().sum() == 0 and grown[first][:, [1, 2, 3, 6, 7, 8]].abs().sum() > 0
    with pytest.raises(UsageError, match="only the context slices may differ"):
        trainer.expand_input_context(wide.state_dict(), narrow.state_dict(), 1, 2)

    first_cfg = _config(tmp_path, steps=2)
    trainer.train(first_cfg, tmp_path / "a", log=lambda m: None)
    cfg = yaml.safe_load(first_cfg.read_text())
    cfg["bundle"]["context_slices"] = 2
    cfg["bundle"]["architecture"]["kwargs"]["in_channels"] = 5
    weights = tmp_path / "a" / "model.safetensors"
    cfg["train"]["init_from"] = {"file": "a/model.safetensors", "sha256": sha256_file(weights), "context_slices": 1}
    wider = tmp_path / "wide.yaml"
    wider.write_text(yaml.safe_dump(cfg))
    logs: list[str] = []
    meta = trainer.train(wider, tmp_path / "b", log=logs.append)
    assert meta["context_slices"] == 2 and meta["training"]["init_from"]["context_slices"] == 1
    assert any("1 context slices each side widened to 2" in l for l in logs)
    cfg["train"]["init_from"]["context_slices"] = 3
    wider.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match="more than the 2 neighbouring slices"):
        trainer.train(wider, tmp_path / "c", log=lambda m: None)
    cfg["train"]["init_from"].update(context_slices=1, class_map=[0, 1])
    wider.write_text(yaml.safe_dump(cfg))
    with pytest.raises(UsageError, match="both class_map and context_slices"):
        trainer.train(wider, tmp_path / "d", log=lambda m: None)
    assert not (tmp_path / "d" / ".training" / "checkpoint.pt").exists()
