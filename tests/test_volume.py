"""3D segmentation by propagation: the mechanics on a tiny random network, quality with real weights."""

from __future__ import annotations

import numpy as np
import pytest

import medfm
from medfm.errors import PromptError
from medfm.prompts import Box3D
from medfm.segment.volume import VolumePrompt, prompts_from_labels, segment_volume
from tests.conftest import EXAMPLES
from tests.test_predictor import needs_litemedsam, tiny_model  # noqa: F401 - fixture

CT = EXAMPLES / "totalseg_example_ct.nii.gz"
CT_LABELS = EXAMPLES / "totalseg_example_ct_mask.nii.gz"


def test_prompts_from_labels_start_on_the_largest_slice() -> None:
    labels = np.zeros((6, 20, 30), np.uint8)
    labels[1:5, 2:8, 3:9] = 4
    labels[3, 1:12, 2:15] = 4
    labels[2, 10:12, 20:25] = 7
    prompts = {p.label: p for p in prompts_from_labels(labels)}
    assert sorted(prompts) == [4, 7]
    assert prompts[4].box == Box3D(2, 1, 1, 14, 11, 4) and prompts[4].start_slice == 3
    assert (prompts[4].start_box.x0, prompts[4].start_box.x1) == (2, 14)
    with pytest.raises(PromptError, match="no foreground"):
        prompts_from_labels(np.zeros((2, 3, 3)))


def test_propagation_stays_inside_each_box_and_encodes_each_slice_once(tiny_model) -> None:
    image = medfm.read_image(CT, modality="CT")
    boxes = [Box3D(10, 10, 5, 60, 50, 12), Box3D(40, 30, 8, 100, 90, 20)]
    result = segment_volume(tiny_model.predictor(), image, boxes, batch_size=3)
    assert result.label_map.shape == image.spatial_shape
    assert set(np.unique(result.label_map)) <= {0, 1, 2}
    for label, box in enumerate(boxes, start=1):
        z, y, x = np.nonzero(result.label_map == label)
        if len(z):
            assert z.min() >= box.z0 and z.max() <= box.z1
        assert set(result.slices[label]) <= set(range(box.z0, box.z1 + 1))
    union = set(result.slices[1]) | set(result.slices[2])
    assert len(union) <= result.encoded_slices <= len(union) + 2 * 3  # lazily encoded, batch look-ahead only


def test_volume_errors(tiny_model) -> None:
    predictor = tiny_model.predictor()
    image = medfm.read_image(CT, modality="CT")
    with pytest.raises(PromptError, match="outside the volume"):
        segment_volume(predictor, image, [Box3D(0, 0, 0, 200, 10, 5)])
    with pytest.raises(PromptError, match="start slice"):
        segment_volume(predictor, image, [VolumePrompt(Box3D(0, 0, 3, 10, 10, 5), 1, start_slice=9)])
    with pytest.raises(PromptError, match="not a volume"):
        segment_volume(predictor, medfm.read_image(EXAMPLES / "busi_benign_001.png"), [Box3D(0, 0, 0, 1, 1, 0)])
    with pytest.raises(PromptError, match="no 3D box"):
        segment_volume(predictor, image, [])


@needs_litemedsam
def test_real_litemedsam_segments_a_kidney_in_3d() -> None:
    image = medfm.read_image(CT, modality="CT")
    truth = medfm.read_image(CT_LABELS).array == 2
    result = segment_volume(medfm.load().predictor(), image, [Box3D.from_mask(truth)])
    ours = result.label_map == 1
    assert 2 * (ours & truth).sum() / (ours.sum() + truth.sum()) > 0.75
