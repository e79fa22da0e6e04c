"""Temperature scaling: ECE as defined, the fit recovers a known temperature (two-class and multi-class),
and the engine applies the bundle's temperature to the softmax."""
from __future__ import annotations

import numpy as np
import pytest

from UNetSegmentLib.errors import UsageError
from UNetSegmentLib.models.training.calibrate import ece, fit_temperature, lesion_ece, scaled, truth_channels
from UNetSegmentLib.settings import ModelSettings


def test_ece_of_perfect_and_overconfident_predictions():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = rng.uniform(0, 1, p.size) < p  # outcomes drawn with the stated probability: calibrated
    assert ece(p, y) < 0.01
    assert ece(np.where(p > 0.5, 0.99, 0.01), y) > 0.2  # overconfident


def test_fit_recovers_the_temperature_that_made_the_data():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, 200_000)
    y = rng.uniform(0, 1, z.size) < 1 / (1 + np.exp(-z))  # calibrated at logits z
    p_over = 1 / (1 + np.exp(-2.0 * z))  # the model's logits are twice too large
    t = fit_temperature(p_over, y)
    assert t == pytest.approx(2.0, rel=0.05)
    assert ece(scaled(p_over, t), y) < ece(p_over, y) / 3


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_class_probabilities_rescale_as_the_softmax_of_divided_logits():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, (1000, 5))  # probabilities above the 1e-6 clip that stands in for the map's floor
    assert np.allclose(scaled(_softmax(z), 2.5), _softmax(z / 2.5), atol=1e-6)
    p = rng.uniform(0.01, 0.99, 1000)  # two classes as a matrix agree with the foreground form
    assert np.allclose(scaled(np.stack([1 - p, p], 1), 1.7)[:, 1], scaled(p, 1.7), atol=1e-9)


def test_multiclass_fit_recovers_the_temperature_and_lowers_the_lesion_ece():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (100_000, 5))
    p_true = _softmax(z)
    y = (rng.uniform(0, 1, (z.shape[0], 1)) > np.cumsum(p_true, 1)).sum(1)  # a class drawn from p_true
    p_over = _softmax(2.0 * z)  # logits twice too large
    t = fit_temperature(p_over, y)
    assert t == pytest.approx(2.0, rel=0.05)
    lesion = (1, 2, 3)  # channel 4 is context (oedema): not a lesion
    assert lesion_ece(scaled(p_over, t), y, lesion) < lesion_ece(p_over, y, lesion) / 3


def test_truth_channels_map_label_values_and_refuse_unknown_ones():
    truth = np.array([0, 1, 2, 4, 4])
    assert truth_channels(truth, (1,)).tolist() == [0, 1, 1, 1, 1]  # one label: any non-zero
    assert truth_channels(truth, (1, 2, 3, 4)).tolist() == [0, 1, 2, 4, 4]
    assert truth_channels(np.array([0, 5, 7]), (5, 7)).tolist() == [0, 1, 2]
    assert truth_channels(np.array([0, 0]), (1, 2, 3, 4)).tolist() == [0, 0]  # a case without lesion
    assert truth_channels(np.array([0, 1, 2]), (1, 2, 3, 4)).tolist() == [0, 1, 2]  # without the highest label
    with pytest.raises(UsageError, match=r"\[9\]"):
        truth_channels(np.array([0, 9]), (1, 2))


def test_a_multiclass_fit_refuses_cases_that_do_not_declare_the_model_labels(tmp_path):
    from UNetSegmentLib.models.training.calibrate import check_case_labels

    check_case_labels(tmp_path, (1,))  # one label: any non-zero truth is the lesion
    with pytest.raises(UsageError, match="labels.json"):
        check_case_labels(tmp_path, (1, 2, 3, 4))
    (tmp_path / "labels.json").write_text('{"labels": {"1": "a", "2": "b"}, "lesion_values": [1, 2]}')
    with pytest.raises(UsageError, match=r"declares labels \[1, 2\]"):
        check_case_labels(tmp_path, (1, 2, 3, 4))
    check_case_labels(tmp_path, (2, 1))


def test_engine_divides_the_logits_by_the_bundle_temperature():
    import torch

    from UNetSegmentLib.engine.inference import softmax_predictor

    logits = torch.tensor([[[[0.0]], [[2.0]]]])  # background 0, lesion 2
    net = lambda x: logits  # noqa: E731
    p1 = softmax_predictor(net, 2).fn(torch.zeros(1, 1, 1, 1))[0, 1, 0, 0].item()
    p2 = softmax_predictor(net, 2, temperature=2.0).fn(torch.zeros(1, 1, 1, 1))[0, 1, 0, 0].item()
    assert p1 == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-5) and p2 == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-5)
    with pytest.raises(ValueError):
        softmax_predictor(net, 2, temperature=0.0)


def test_model_settings_read_the_calibration():
    from UNetSegmentLib.models.bundle import load_bundle

    meta = dict(load_bundle("ct-hemorrhage").meta)
    assert ModelSettings.from_meta({**meta, "calibration": {"temperature": 1.7}}).temperature == 1.7
    assert ModelSettings.from_meta({k: v for k, v in meta.items() if k != "calibration"}).temperature == 1.0
