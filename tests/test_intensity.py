"""Intensity presets: values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.intensity import IntensityPreset, apply_window, default_preset, min_max, normalize, percentile_clip, preset


def test_soft_tissue_window_by_hand() -> None:
    # W400/L40 spans -160..240 HU: -1000 -> 0, -160 -> 0, 40 -> 0.5, 140 -> 0.75, 240 -> 1, 3000 -> 1
    hu = np.array([-1000, -160, 40, 140, 240, 3000], dtype=np.int16)
    np.testing.assert_allclose(normalize(hu, "soft_tissue"), [0, 0, 0.5, 0.75, 1, 1], atol=1e-7)
    assert normalize(hu, "ct:soft-tissue").dtype == np.float32


@pytest.mark.parametrize("name,level,width", [("lung", -600, 1500), ("bone", 400, 1800), ("brain", 40, 80)])
def test_named_ct_windows(name, level, width) -> None:
    spec = preset(name)
    assert (spec.level, spec.width) == (level, width)
    np.testing.assert_allclose(apply_window(np.array([level - width / 2, level, level + width / 2]), level, width), [0, 0.5, 1])


def test_percentile_clip_ignores_background_and_outliers() -> None:
    values = np.concatenate([np.zeros(1000), np.arange(1, 1001, dtype=float), [1e6]])
    scaled = percentile_clip(values, 0.5, 99.5)
    foreground = values[values != 0]
    low, high = np.percentile(foreground, [0.5, 99.5])
    np.testing.assert_allclose(scaled[1000 + 499], (500 - low) / (high - low), rtol=1e-6)
    assert scaled[-1] == 1.0 and scaled[0] == 0.0


def test_min_max_and_constant_image() -> None:
    np.testing.assert_allclose(min_max(np.array([2.0, 4.0, 6.0])), [0, 0.5, 1])
    assert not min_max(np.full((3, 3), 7.0)).any()


def test_defaults_per_modality_and_bad_names() -> None:
    assert default_preset("CT") == preset("soft_tissue")
    assert default_preset("MR").kind == "percentile"
    assert default_preset(None).kind == "minmax"
    with pytest.raises(ValueError, match="unknown intensity preset"):
        preset("spleen")
    with pytest.raises(ValueError, match="positive width"):
        IntensityPreset("window", level=40, width=0)
    assert IntensityPreset("window", level=40, width=400).to_dict() == {"kind": "window", "level": 40, "width": 400, "lower": 0.5, "upper": 99.5}


def test_window_for_target_by_name() -> None:
    from medfm.intensity import window_for_target

    assert window_for_target("lung_upper_lobe_left") == preset("lung")
    assert window_for_target("vertebrae_L2") == window_for_target("rib_left_7") == preset("bone")
    assert window_for_target("liver") == window_for_target(None) == preset("soft_tissue")
