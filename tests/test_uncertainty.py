"""SAM-U: jittered boxes, entropy, and the error-detection AUC, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.errors import PromptError
from medfm.prompts import Box
from medfm.segment.run import segment
from medfm.segment.uncertainty import binary_entropy, error_detection_auc, predict_with_uncertainty, sam_u_boxes
from tests.conftest import EXAMPLES
from tests.test_predictor import tiny_model  # noqa: F401 - fixture


def test_jittered_boxes_are_deterministic_bounded_and_start_with_the_box() -> None:
    box = Box(10, 20, 50, 60)
    boxes = sam_u_boxes(box, 64, 64, max_shift=5, seed=3)
    assert len(boxes) == 20 and boxes[0] == box
    assert boxes == sam_u_boxes(box, 64, 64, max_shift=5, seed=3)
    corners = np.stack([b.as_array() for b in boxes[1:]])
    assert np.all(np.abs(corners - box.as_array()) <= 5 + 1e-9) and corners.max() <= 63 and corners.min() >= 0
    assert len({tuple(c) for c in corners}) == 19


def test_binary_entropy_by_hand() -> None:
    np.testing.assert_allclose(binary_entropy(np.array([0.5, 0.0, 1.0, 0.25])), [1.0, 0.0, 0.0, 0.811278], atol=1e-5)


def test_error_detection_auc_by_hand() -> None:
    reference = np.array([[1, 1, 0, 0]], bool)
    mask = np.array([[1, 0, 0, 1]], bool)  # pixels 1 and 3 are wrong
    perfect = np.array([[0.1, 0.9, 0.2, 0.8]])  # wrong pixels ranked above all right ones
    assert error_detection_auc(perfect, mask, reference) == 1.0
    inverted = 1 - perfect
    assert error_detection_auc(inverted, mask, reference) == 0.0
    # ties count half: one wrong pixel ties with one right pixel -> (1 + 1 + 0.5 + 1) / 4
    tied = np.array([[0.5, 0.9, 0.1, 0.5]])
    assert error_detection_auc(tied, mask, reference) == pytest.approx(0.875)
    assert np.isnan(error_detection_auc(perfect, reference, reference))  # nothing wrong: undefined


def test_sam_u_on_a_real_image_with_a_tiny_model(tiny_model) -> None:
    predictor = tiny_model.predictor()
    predictor.set_image(EXAMPLES / "busi_benign_001.png")
    boxes = sam_u_boxes(Box(200, 100, 280, 140), 416, 416, max_shift=6)
    result = predict_with_uncertainty(predictor, boxes)
    assert result.probability.shape == result.entropy.shape == result.variance.shape == (416, 416)
    np.testing.assert_array_equal(result.mask, result.probability > 0.5)
    assert 0 <= result.entropy.min() and result.entropy.max() <= 1
    single = segment(EXAMPLES / "busi_benign_001.png", [Box(200, 100, 280, 140)], model=tiny_model, uncertainty=True)
    assert single.uncertainty.shape == (416, 416)
    with pytest.raises(PromptError, match="needs box prompts"):
        from medfm.prompts import Points

        segment(EXAMPLES / "busi_benign_001.png", points=Points.positive((240, 120)), model=tiny_model, uncertainty=True)
