"""Input scaling and fixed-point rounding, the score formulas and the threshold calibration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware.calibrate import calibrate, calibrate_threshold
from firmware.config import FixedType, LayerQuantization, QuantizationConfig, VAEConfig
from firmware.inputs import (
    FIXED_SCALING,
    PT_SCALE_GEV,
    InputScaling,
    input_mask,
    read_l1_objects,
    round_to_fixed,
    scale_l1_objects,
)
from firmware.scores import kl_divergence, masked_mse, r_z, sum_mu2
from stream.batch import EventBatch
from stream.eventfile import CacheWriter
from stream.testing import synthetic_batch
from tests.firmware.conftest import l1_like_objects


def test_scaling_divides_pt_keeps_eta_phi_and_flattens_object_by_object() -> None:
    objects = l1_like_objects(50, seed=1)
    x = scale_l1_objects(objects)
    assert x.shape == (50, 57) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0::3], objects[:, :, 0] / np.float32(PT_SCALE_GEV))
    np.testing.assert_array_equal(x[:, 1::3], objects[:, :, 1])
    np.testing.assert_array_equal(x[:, 2::3], objects[:, :, 2])
    mask = input_mask(objects)
    np.testing.assert_array_equal(mask[:, 0::3] > 0, objects[:, :, 0] > 0)
    np.testing.assert_array_equal(mask[:, 0::3], mask[:, 2::3])
    with pytest.raises(ValueError, match="shape"):
        scale_l1_objects(np.zeros((3, 18, 3)))


def test_fixed_type_parsing_and_range() -> None:
    t = FixedType.parse("ap_fixed<16,7,AP_RND_CONV,AP_SAT>")
    assert (t.width, t.integer, t.signed, t.rounding, t.saturation) == (
        16,
        7,
        True,
        "AP_RND_CONV",
        "AP_SAT",
    )
    assert t.lsb == 2.0**-9 and t.max == 64 - 2.0**-9 and t.min == -64
    assert str(t) == "ap_fixed<16,7,AP_RND_CONV,AP_SAT>"
    u = FixedType.parse("ap_ufixed<8,3>")
    assert not u.signed and u.min == 0 and u.max == 8 - 2.0**-5
    with pytest.raises(ValueError, match="not an ap_fixed"):
        FixedType.parse("float")


def test_rounding_is_convergent_and_saturating() -> None:
    t = FixedType.parse("ap_fixed<16,7,AP_RND_CONV,AP_SAT>")
    lsb = t.lsb
    # Ties go to the even neighbour; others to the nearest grid point.
    x = np.array([0.5 * lsb, 1.5 * lsb, 2.5 * lsb, -0.5 * lsb, -1.5 * lsb, 0.26 * lsb, 100, -100])
    want = np.array([0.0, 2 * lsb, 2 * lsb, 0.0, -2 * lsb, 0.0, t.max, t.min], np.float32)
    np.testing.assert_array_equal(round_to_fixed(x, t), want)
    grid = round_to_fixed(np.random.default_rng(0).normal(0, 20, 10_000), t)
    np.testing.assert_array_equal(round_to_fixed(grid, t), grid)  # idempotent
    np.testing.assert_array_equal(grid / lsb, np.round(grid / lsb))
    trn = FixedType.parse("ap_fixed<8,3,AP_TRN,AP_SAT>")
    np.testing.assert_array_equal(round_to_fixed(np.array([0.06, -0.01]), trn), [0.03125, -0.03125])
    with pytest.raises(ValueError, match="saturate"):
        round_to_fixed(np.zeros(2), FixedType.parse("ap_fixed<8,3>"))


def test_configs_validate_and_round_trip() -> None:
    quant = QuantizationConfig()
    again = QuantizationConfig(**quant.to_dict())
    assert again == quant
    assert str(quant.enc_dense1.weight_type) == "ap_fixed<8,4>"  # quantized_bits(8,3) + sign
    assert str(quant.enc_dense1.activation_type) == "ap_ufixed<8,3,AP_RND_CONV,AP_SAT>"
    with pytest.raises(ValueError, match="linear"):
        QuantizationConfig(z_mean=LayerQuantization())
    with pytest.raises(ValueError, match="ap_fixed"):
        LayerQuantization(accum="int")
    assert VAEConfig(**VAEConfig().to_dict()) == VAEConfig()
    one_layer: Any = (32,)  # the annotation forbids it; a config file can still hold it
    with pytest.raises(ValueError, match=r"(?m)^hidden\.1$"):
        VAEConfig(hidden=one_layer)


@pytest.mark.parametrize(
    ("make", "where"),
    [
        (lambda: FixedType(width=0, integer=0), "width"),
        (lambda: LayerQuantization(weight_bits=1), "weight_bits"),
        (lambda: LayerQuantization(weight_bits=33), "weight_bits"),
        (lambda: LayerQuantization(weight_integer=-1), "weight_integer"),
        (lambda: LayerQuantization(result="ap_fixed<8>"), "result"),
        (lambda: QuantizationConfig(input_type="float"), "input_type"),
        (lambda: QuantizationConfig(output="ap_fixed<8,9>"), "output"),
        (lambda: QuantizationConfig(z_log_var=LayerQuantization()), "z_log_var"),
        (
            lambda: QuantizationConfig(**dict[str, Any](enc_dense2={"weight_bits": 64})),
            "enc_dense2.weight_bits",
        ),
        (lambda: VAEConfig(hidden=(32, 0)), "hidden.1"),
        (lambda: VAEConfig(latent=0), "latent"),
        (lambda: VAEConfig(beta=-1.0), "beta"),
        (lambda: VAEConfig(learning_rate=0.0), "learning_rate"),
        (lambda: VAEConfig(epochs=0), "epochs"),
        (lambda: VAEConfig(batch_size=0), "batch_size"),
        (lambda: VAEConfig(validation_fraction=1.0), "validation_fraction"),
    ],
)
def test_bad_firmware_configs_name_the_field(make: Callable[[], object], where: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{where}$"):
        make()


def test_firmware_configs_check_fields_together() -> None:
    with pytest.raises(ValueError, match=r"bad fixed-point type: width 4, integer 8"):
        FixedType.parse("ap_fixed<4,8>")
    with pytest.raises(ValueError, match=r"bad weight quantizer \(8, 8\)"):
        LayerQuantization(weight_integer=8)
    with pytest.raises(ValueError, match=r"bad activation quantizer \(8, 9\)"):
        LayerQuantization(activation_integer=9)


def test_score_formulas_against_explicit_sums() -> None:
    rng = np.random.default_rng(3)
    mu, log_var = rng.normal(0, 2, (100, 3)), rng.normal(0, 1, (100, 3))
    want_rz = [
        sum(m**2 / np.exp(v) for m, v in zip(mr, vr, strict=True))
        for mr, vr in zip(mu, log_var, strict=True)
    ]
    np.testing.assert_allclose(r_z(mu, log_var), want_rz, rtol=1e-12)
    np.testing.assert_allclose(sum_mu2(mu), (mu**2).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(
        kl_divergence(mu, log_var),
        0.5 * (mu**2 + np.exp(log_var) - 1 - log_var).sum(axis=1),
        rtol=1e-12,
    )
    # R_z is bigger where sigma is small: the score of a confident, displaced encoding.
    assert r_z(np.array([[1.0, 0, 0]]), np.array([[-4.0, 0, 0]]))[0] == pytest.approx(np.exp(4))
    # Extreme log sigma^2 gives inf, not a warning; mu = 0 contributes 0 even then.
    out = r_z(np.array([[1.0, 0.0]]), np.array([[-2000.0, -2000.0]]))
    assert out[0] == np.inf
    x, rec = rng.normal(size=(4, 57)), rng.normal(size=(4, 57))
    mask = np.zeros((4, 57))
    mask[0, :6] = 1
    mask[1] = 1
    got = masked_mse(x, rec, mask)
    assert got[0] == pytest.approx(((x[0, :6] - rec[0, :6]) ** 2).mean())
    assert got[1] == pytest.approx(((x[1] - rec[1]) ** 2).mean())
    assert got[2] == 0.0


def test_empirical_calibration_hits_the_true_quantile_within_its_interval() -> None:
    rng = np.random.default_rng(5)
    scores = rng.exponential(1.0, 400_000)
    result = calibrate(scores, rate_hz=400.0, input_rate_hz=4e5)  # FPR 1e-3
    truth = np.log(1e3)
    assert result.method == "empirical-quantile" and result.reliable
    assert result.threshold_low < truth < result.threshold_high
    assert result.threshold_low < result.threshold < result.threshold_high
    assert result.achieved_fpr == pytest.approx(1e-3, rel=0.01)
    assert result.n_above == 400
    # The interval shrinks like 1/sqrt(N) (expected ratio 3.2 for 10x the events).
    small = calibrate(scores[:40_000], rate_hz=400.0, input_rate_hz=4e5)
    width = result.threshold_high - result.threshold_low
    assert 1.5 * width < small.threshold_high - small.threshold_low


def test_calibration_too_small_a_sample_is_extrapolated_and_flagged() -> None:
    rng = np.random.default_rng(6)
    scores = rng.exponential(2.0, 20_000)
    result = calibrate(scores, rate_hz=1000.0, input_rate_hz=4e7)  # FPR 2.5e-5: 0.5 expected
    assert result.method == "exponential-tail-extrapolation"
    assert not result.reliable
    assert "extrapolated" in result.note and "0.5" in result.note
    truth = 2.0 * np.log(1 / 2.5e-5)
    assert result.threshold_low < result.threshold_high
    assert abs(result.threshold - truth) < 3 * (result.threshold_high - result.threshold_low)
    assert "NOT RELIABLE" in result.summary()
    with pytest.raises(ValueError, match="rate_hz"):
        calibrate(scores, rate_hz=5e7)
    with pytest.raises(ValueError, match="only 10"):
        calibrate(scores[:10], rate_hz=1e3)


def test_calibrate_threshold_measures_the_rate_on_weighted_events() -> None:
    rng = np.random.default_rng(2)
    values = rng.exponential(10.0, 200_000)
    # Keep the tail (> 30) whole and 10% of the rest, weighted 10: a biased sample of the
    # 200k crossings, each standing for 40 MHz / 200k.
    keep = (values > 30) | (rng.random(values.size) < 0.1)
    v, w = values[keep], np.where(values[keep] > 30, 1.0, 10.0)
    hz_per_event = 40e6 / values.size
    total = hz_per_event * w.sum()
    target = 0.01 * total
    cal = calibrate_threshold(v, w, hz_per_event=hz_per_event, target_hz=target)
    exact = 10.0 * np.log(100)  # exponential: 1% above 10 ln 100
    assert abs(cal.threshold - exact) < 1.0
    assert abs(cal.rate_hz - target) < 2 * cal.error_hz + 0.01 * target
    assert cal.low <= cal.threshold <= cal.high and cal.n_effective > 100
    with pytest.raises(ValueError, match="larger or more biased sample"):
        calibrate_threshold(v, w, hz_per_event=hz_per_event, target_hz=1e-6)
    with pytest.raises(ValueError, match="below the target"):
        calibrate_threshold(v, w, hz_per_event=hz_per_event, target_hz=2 * total)


def test_weighted_calibration_is_the_measured_one_and_never_extrapolated() -> None:
    """``calibrate`` with weights (``trigfarm firmware calibrate`` on weighted crossings)
    is ``calibrate_threshold`` at input_rate / N per unit weight, and refuses a target
    beyond the sample instead of extrapolating it."""
    rng = np.random.default_rng(7)
    values = rng.exponential(10.0, 200_000)
    keep = (values > 30) | (rng.random(values.size) < 0.1)
    v, w = values[keep], np.where(values[keep] > 30, 1.0, 10.0)
    input_rate = 40e6 * v.size / values.size  # so that input_rate / len(v) = 40 MHz / 200k
    result = calibrate(v, rate_hz=4e4, input_rate_hz=input_rate, weights=w)
    measured = calibrate_threshold(v, w, hz_per_event=input_rate / v.size, target_hz=4e4)
    assert result.method == "weighted-quantile" and result.reliable
    assert result.threshold == measured.threshold
    assert (result.threshold_low, result.threshold_high) == (measured.low, measured.high)
    assert result.n_above == measured.n_above == int((v > result.threshold).sum())
    assert abs(result.threshold - 10.0 * np.log(1000)) < 2.0  # 0.1% above 10 ln 1000
    with pytest.raises(ValueError, match="larger or more biased sample"):
        calibrate(v, rate_hz=1.0, input_rate_hz=input_rate, weights=w)
    with pytest.raises(ValueError, match="weights for"):
        calibrate(v, rate_hz=4e4, input_rate_hz=input_rate, weights=w[:-1])


def test_read_l1_objects_returns_the_crossing_weights(tmp_path: Path) -> None:
    plain, base = synthetic_batch(4, first_event=6), synthetic_batch(6)
    weighted = EventBatch(
        base.columns, truth={**base.truth, "weight": np.arange(1, 7, dtype="<f4")}
    )
    with CacheWriter(tmp_path / "w.h5") as writer:
        writer.append(weighted)
    with CacheWriter(tmp_path / "p.h5") as writer:
        writer.append(plain)
    _, weights = read_l1_objects([tmp_path / "w.h5", tmp_path / "p.h5"])
    assert weights is not None
    np.testing.assert_array_equal(weights, [1, 2, 3, 4, 5, 6, 1, 1, 1, 1])
    objects, none = read_l1_objects(tmp_path / "p.h5")
    assert none is None and len(objects) == 4


def test_fitted_standardisation_floors_constant_inputs_and_round_trips_the_card() -> None:
    objects = l1_like_objects(2000, seed=3)
    objects[:, 8] = 0.0  # 4th muon slot: always padding, std 0 on this sample
    scaling = InputScaling.fit(objects, min_std=0.1)
    x = scale_l1_objects(objects, scaling)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    spread = scale_l1_objects(objects).std(axis=0) >= 0.1
    np.testing.assert_allclose(x.std(axis=0)[spread], 1.0, rtol=1e-3)
    # The empty slot keeps its floor: a 32 GeV muon there is 10 standard units out.
    assert scaling.std[8 * 3] == pytest.approx(0.1 * PT_SCALE_GEV)
    assert InputScaling.from_card(scaling.to_card()) == scaling
    assert InputScaling.from_card({"pt": "pT / 32 GeV"}) == FIXED_SCALING
    with pytest.raises(ValueError, match=r"(?m)^std\.0$"):
        InputScaling(mean=(0.0,) * 57, std=(0.0,) * 57)
    with pytest.raises(ValueError, match=r"(?m)^mean\.3$"):
        InputScaling(mean=(0.0,) * 3 + (float("nan"),) * 54, std=(1.0,) * 57)
    with pytest.raises(ValueError, match=r"(?m)^std\n.*at least 57 items"):
        InputScaling(mean=(0.0,) * 57, std=(1.0,) * 56)
    with pytest.raises(ValueError, match="min_std"):
        InputScaling.fit(objects, min_std=0.0)
