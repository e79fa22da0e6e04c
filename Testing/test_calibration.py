"""Temperature scaling: ECE as defined, the fit recovers a known temperature, and the engine applies
the bundle's temperature to the softmax."""
from __future__ import annotations

import numpy as np
import pytest

from UNetSegmentLib.models.training.calibrate import ece, fit_temperature, scaled
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
