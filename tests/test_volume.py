"""3D segmentation by propagation: the mechanics on a tiny random network, quality with real weights."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import medfm
import medfm.evaluate.runner
import medfm.segment.model
import medfm.segment.run  # imported before a test patches medfm.segment.model.load, so it keeps the real one
import medfm.segment.volume
from medfm.cli import main
from medfm.errors import OptionError, PromptError
from medfm.data.datasets import Case
from medfm.io import MedicalImage
from medfm.prompts import Box, Box3D
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


# --- slice_step: key slices segmented by the model, logits interpolated between ---------------------

THRESHOLD = 0.5  # not 0, so the tests see that interpolated logits are cut at the model's threshold


class FakePredictor:
    """Stands in for `Predictor`: logits come from ``field(slice, prompt_box)``; it records what was
    encoded (one list per encoder call) and which box prompted each slice."""

    def __init__(self, field: Callable[[int, Box], np.ndarray]) -> None:
        self.field = field
        self.model = SimpleNamespace(preprocess=SimpleNamespace(mask_threshold=THRESHOLD))
        self.calls: list[list[int]] = []
        self.prompted: dict[int, list[Box]] = {}
        self.current: int | None = None

    @property
    def encoded(self) -> list[int]:
        return [z for call in self.calls for z in call]

    def encode_slices(
        self, image: MedicalImage, indices: list[int], intensity: None = None, batch_size: int = 1
    ) -> Iterator[tuple[int, int, None]]:
        self.calls.append(list(indices))
        for z in indices:
            yield z, z, None  # the "embedding" is the slice index itself

    def use_embedding(self, embedding: int, geometry: None) -> None:
        self.current = embedding

    def predict(self, boxes: list[Box]) -> SimpleNamespace:
        self.prompted.setdefault(self.current, []).append(boxes[0])
        logits = np.asarray(self.field(self.current, boxes[0]), np.float32)[None]
        return SimpleNamespace(masks=logits > THRESHOLD, logits=logits)


def _volume(depth: int = 20, size: int = 32) -> MedicalImage:
    """A volume for the fake predictor, which never looks at it: a ramp, since a constant one is refused."""
    ramp = np.broadcast_to(np.arange(size, dtype=np.int16), (depth, size, size)).copy()
    return MedicalImage(array=ramp, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=np.eye(3), modality="CT", metadata={"kind": "volume"})


def _disk(radius_by_slice: Callable[[int], float], size: int = 32) -> Callable[[int, Box], np.ndarray]:
    """Logits = radius - distance from the image centre: the mask is a disk of that radius."""
    y, x = np.mgrid[:size, :size]
    distance = np.hypot(y - size / 2, x - size / 2)
    return lambda z, box: radius_by_slice(z) - distance


def test_step_one_prompts_every_slice_from_the_previous_one() -> None:
    fake = FakePredictor(_disk(lambda z: 6.0))
    result = segment_volume(fake, _volume(), [Box3D(2, 2, 3, 29, 29, 8)], margin=1, slice_step=1)
    assert result.slices[1] == result.key_slices[1] == list(range(3, 9))
    assert fake.encoded == [5, 6, 7, 8, 4, 3] and result.encoded_slices == 6
    tight = Box.from_mask(fake.field(5, None) > THRESHOLD)
    assert fake.prompted[6] == [Box(tight.x0 - 1, tight.y0 - 1, tight.x1 + 1, tight.y1 + 1)]


def test_step_k_encodes_only_key_slices_and_always_the_ends_of_the_range() -> None:
    fake = FakePredictor(_disk(lambda z: 6.0))
    box = Box3D(8, 1, 2, 30, 30, 17)  # start (2 + 17) // 2 = 9; step 5: 14, then the end 17; 4, then the end 2
    result = segment_volume(fake, _volume(), [box], margin=1, slice_step=5, batch_size=2)
    assert result.key_slices[1] == [2, 4, 9, 14, 17] and result.encoded_slices == 5
    assert fake.calls == [[9, 14], [17], [4, 2]]  # the look-ahead runs along the key slices only
    assert result.slices[1] == list(range(2, 18))
    assert (result.label_map[2:18] == 1).any(axis=(1, 2)).all()
    assert not result.label_map[:2].any() and not result.label_map[18:].any()
    tight = Box.from_mask(fake.field(9, None) > THRESHOLD)
    grown = lambda m: Box(max(tight.x0 - m, 8), tight.y0 - m, tight.x1 + m, tight.y1 + m)  # kept inside the box
    assert tight.x0 - 5 < 8 and tight.x0 - 2 > 8  # the box's x0 = 8 clips the 5-slice growth only
    assert fake.prompted[14] == fake.prompted[4] == [grown(5)]  # margin x distance
    assert fake.prompted[17] == [grown(3)] and fake.prompted[2] == [grown(2)]


def test_interpolated_slices_threshold_the_linear_mix_of_the_key_logits() -> None:
    radius = lambda z: 2.0 + (7 * z) % 5  # jumps about, so no key mask equals its neighbours'
    fake = FakePredictor(_disk(radius))
    result = segment_volume(fake, _volume(), [Box3D(0, 0, 1, 31, 31, 18)], slice_step=4)
    keys = result.key_slices[1]
    assert keys == [1, 5, 9, 13, 17, 18] and result.slices[1] == list(range(1, 19))  # start (1 + 18) // 2 = 9
    for a, b in pairwise(keys):
        for z in range(a, b + 1):
            t = np.float32((z - a) / (b - a))
            logits = (1 - t) * fake.field(a, None).astype(np.float32) + t * fake.field(b, None).astype(np.float32)
            np.testing.assert_array_equal(result.label_map[z] == 1, logits > THRESHOLD, err_msg=f"slice {z}")


def test_a_vanishing_key_mask_stops_propagation_after_a_shrinking_interpolation() -> None:
    fake = FakePredictor(_disk(lambda z: 6.0 if z < 14 else -4.0))  # nothing left from slice 14 on
    result = segment_volume(fake, _volume(), [Box3D(0, 0, 9, 31, 31, 19)], slice_step=5)  # start 14 // ... = 14
    assert fake.encoded == [14] and result.slices[1] == [14]  # the start slice itself is empty: nothing else
    fake = FakePredictor(_disk(lambda z: 6.0 if z < 14 else -4.0))
    result = segment_volume(fake, _volume(), [VolumePrompt(Box3D(0, 0, 4, 31, 31, 19), 1, start_slice=9)], slice_step=5)
    assert 19 not in fake.encoded and result.key_slices[1] == [4, 9, 14]
    assert result.slices[1] == list(range(4, 15))  # up to the empty key slice, nothing beyond
    areas = (result.label_map == 1).sum(axis=(1, 2))
    assert areas[9] > areas[10] > areas[11] > 0 and areas[12:].sum() == 0  # radius 5.5 - 10 t: 3.5, 1.5, then gone


def test_interpolated_slices_take_part_in_the_overlap_rule() -> None:
    x = np.arange(16)[None, :].repeat(16, axis=0)
    left_value = {0: 9.0, 4: 1.0, 8: 9.0}  # key slices of label 1; between them 3, 5, 7 by interpolation

    def field(z: int, box: Box) -> np.ndarray:
        if box.x0 < 6:  # label 1's box is x 0..9, label 2's x 6..15
            return np.where(x <= 9, left_value[z], -5.0)
        return np.where(x >= 6, 4.0, -5.0)

    fake = FakePredictor(field)
    boxes = [Box3D(0, 0, 0, 9, 15, 8), Box3D(6, 0, 0, 15, 15, 8)]
    result = segment_volume(fake, _volume(9, 16), boxes, slice_step=4)
    assert result.key_slices == {1: [0, 4, 8], 2: [0, 4, 8]}
    overlap = result.label_map[:, 0, 6:10]
    expected = [1, 1, 1, 2, 2, 2, 1, 1, 1]  # label 1's (interpolated) logits 9 7 5 3 1 3 5 7 9 against label 2's 4
    assert [int(v) for v in overlap[:, 0]] == expected and (overlap == overlap[:, :1]).all()
    assert (result.label_map[:, :, :6] == 1).all() and (result.label_map[:, :, 10:] == 2).all()


def test_slice_step_below_one_is_an_option_error() -> None:
    fake = FakePredictor(_disk(lambda z: 6.0))
    for step in (0, -2, 1.5):
        with pytest.raises(OptionError, match="slice step must be a whole number >= 1"):
            segment_volume(fake, _volume(), [Box3D(0, 0, 0, 5, 5, 5)], slice_step=step)
    assert fake.calls == []


def test_tiny_model_with_a_slice_step_encodes_only_key_slices(tiny_model) -> None:
    image = medfm.read_image(CT, modality="CT")
    box = Box3D(10, 10, 2, 80, 70, 27)
    result = segment_volume(tiny_model.predictor(), image, [box], slice_step=4)
    keys, start = result.key_slices[1], (box.z0 + box.z1) // 2
    assert start in keys and result.encoded_slices == len(keys)
    assert all((z - start) % 4 == 0 or z in (box.z0, box.z1) for z in keys)
    assert result.slices[1] == list(range(keys[0], keys[-1] + 1))  # contiguous: every slice between keys has a value
    z = np.nonzero(result.label_map)[0]
    assert not len(z) or keys[0] <= z.min() <= z.max() <= keys[-1]


def _run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["medfm", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code


def test_cli_slice_step_reaches_segment_volume(tiny_model, monkeypatch, tmp_path, capsys) -> None:
    seen = []
    real = medfm.segment.volume.segment_volume
    monkeypatch.setattr(medfm.segment.run, "load", lambda *args, **kwargs: tiny_model)
    monkeypatch.setattr(medfm.segment.run, "segment_volume",
                        lambda *a, **k: seen.append((k["slice_step"], k["refine_below"])) or real(*a, **k))
    out = tmp_path / "m.nii.gz"
    volume_args = ["segment", str(CT), "--modality", "CT", "--box3d", "10", "10", "3", "60", "50", "7", "-o", str(out)]
    assert _run_cli(monkeypatch, *volume_args, "--slice-step", "3") == 0 and seen == [(3, None)] and out.exists()
    assert _run_cli(monkeypatch, *volume_args) == 0 and seen == [(3, None), (1, None)]
    assert _run_cli(monkeypatch, *volume_args, "--slice-step", "4", "--refine-below", "0.9") == 0
    assert seen[-1] == (4, 0.9)
    assert _run_cli(monkeypatch, *volume_args, "--slice-step", "0") == 2
    assert "slice step must be a whole number >= 1" in capsys.readouterr().err


def test_evaluate_slice_step_reaches_the_volume_path(tiny_model, monkeypatch, tmp_path) -> None:
    reference = medfm.read_image(CT_LABELS)
    kidney = tmp_path / "kidney.nii.gz"
    medfm.write_mask(np.where(reference.array == 2, 2, 0).astype(np.uint8), kidney, like=medfm.read_image(CT))
    case = Case("ct", "example", CT, kidney, "CT", {2: "kidney_right"}, is_volume=True)
    seen = []
    real = medfm.evaluate.runner.segment_volume
    monkeypatch.setattr(medfm.evaluate.runner, "segment_volume",
                        lambda *a, **k: seen.append((k["slice_step"], k["refine_below"])) or real(*a, **k))
    rows = medfm.evaluate.runner.evaluate([tiny_model], [case], slice_step=3, refine_below=0.8).rows
    assert seen == [(3, 0.8)] and [(r.label, r.prompt) for r in rows] == [(2, "box3d")]
    with pytest.raises(OptionError, match="slice step"):
        medfm.evaluate.runner.evaluate([tiny_model], [case], slice_step=0)
    with pytest.raises(OptionError, match="refine-below"):
        medfm.evaluate.runner.evaluate([tiny_model], [case], slice_step=3, refine_below=2.0)
    assert len(seen) == 1  # refused before any case
    captured = {}

    def fake_evaluate(models: list, data: Path, **options: object) -> None:
        captured.update(options)
        raise OptionError("stop here")

    monkeypatch.setattr(medfm.evaluate.runner, "evaluate", fake_evaluate)
    (tmp_path / "data").mkdir()
    assert _run_cli(monkeypatch, "evaluate", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "e"), "--slice-step", "5",
                    "--refine-below", "0.95") == 2
    assert captured["slice_step"] == 5 and captured["refine_below"] == 0.95


# --- refine_below: an adaptive step, bisecting between key slices whose masks disagree ---------------


def _exact(fake: FakePredictor, slices: range) -> np.ndarray:
    return np.stack([fake.field(z, None) > THRESHOLD for z in slices])


def test_refinement_adds_no_key_slices_where_neighbouring_keys_agree() -> None:
    box = Box3D(0, 0, 1, 31, 31, 18)
    even = segment_volume(FakePredictor(_disk(lambda z: 6.0)), _volume(), [box], slice_step=4)
    refined = segment_volume(FakePredictor(_disk(lambda z: 6.0)), _volume(), [box], slice_step=4, refine_below=0.9)
    assert refined.key_slices == even.key_slices and refined.encoded_slices == even.encoded_slices
    np.testing.assert_array_equal(refined.label_map, even.label_map)


def test_refinement_bisects_down_to_the_slice_where_the_shape_jumps() -> None:
    radius = lambda z: 9.0 if z < 12 else 3.0  # a step in z: keys on either side disagree (Dice 0.2)
    box = Box3D(0, 0, 0, 31, 31, 19)  # start 9, step 8: keys 17, 19 upwards, 1, 0 downwards
    even = segment_volume(FakePredictor(_disk(radius)), _volume(), [box], slice_step=8)
    fake = FakePredictor(_disk(radius))
    refined = segment_volume(fake, _volume(), [box], slice_step=8, refine_below=0.9)
    assert refined.key_slices[1] == [0, 1, 9, 11, 12, 13, 17, 19]  # 9 -> 17 bisected at 13, 11, 12
    assert sorted(fake.encoded) == refined.key_slices[1] and refined.slices[1] == list(range(20))
    exact = _exact(fake, range(20))
    np.testing.assert_array_equal(refined.label_map == 1, exact)  # every slice as if segmented one by one
    assert not np.array_equal(even.label_map == 1, exact)  # which the even step misses


def test_refinement_finds_where_the_structure_ends() -> None:
    fake = FakePredictor(_disk(lambda z: 6.0 if z < 14 else -4.0))
    prompt = VolumePrompt(Box3D(0, 0, 4, 31, 31, 19), 1, start_slice=9)
    result = segment_volume(fake, _volume(), [prompt], slice_step=8, refine_below=0.9)
    assert result.key_slices[1] == [4, 9, 13, 14, 15, 17]  # 17 is empty: bisected at 13, 15, then 14
    areas = (result.label_map == 1).sum(axis=(1, 2))
    assert (areas[4:14] == areas[9]).all() and areas[14:].sum() == 0  # full disks up to the last slice, then nothing


def test_a_middle_slice_is_prompted_by_the_box_of_the_interpolated_mask() -> None:
    radius = lambda z: 4.0 if z < 10 else 10.0
    fake = FakePredictor(_disk(radius))
    segment_volume(fake, _volume(), [VolumePrompt(Box3D(3, 0, 6, 31, 31, 14), 1, start_slice=6)], margin=1,
                   slice_step=8, refine_below=0.9)  # keys 6 and 14 disagree: 10 is segmented, prompted from their mix
    mix = 0.5 * fake.field(6, None) + 0.5 * fake.field(14, None)  # radius 7
    guess = Box.from_mask(mix > THRESHOLD)
    assert fake.prompted[10] == [Box(guess.x0 - 1, guess.y0 - 1, guess.x1 + 1, guess.y1 + 1)]
    assert Box.from_mask(fake.field(6, None) > THRESHOLD).x0 > guess.x0 > Box.from_mask(fake.field(14, None) > THRESHOLD).x0


@pytest.mark.parametrize(("refine_below", "slice_step", "message"), [
    (0, 4, "Dice in"), (1.5, 4, "Dice in"), ("0.9", 4, "Dice in"), (0.9, 1, "slice step above 1")])
def test_refine_below_out_of_range_is_an_option_error(refine_below, slice_step, message) -> None:
    fake = FakePredictor(_disk(lambda z: 6.0))
    with pytest.raises(OptionError, match=message):
        segment_volume(fake, _volume(), [Box3D(0, 0, 0, 5, 5, 5)], slice_step=slice_step, refine_below=refine_below)
    assert fake.calls == []
