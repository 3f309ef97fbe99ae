"""The default model's masks must not hinge on the resize kernel (issue 19): on held-out chest X-rays
of the shared collection, box Dice under INTER_AREA, bilinear, bicubic and antialiased bilinear stays
within 0.02. Few images, each encoded once per kernel, so that it stays quick;
benchmarks/prompts_and_kernels.py measures the same gap on more cases, side by side with LiteMedSAM."""

from __future__ import annotations

import dataclasses

import numpy as np

from medfm.data.datasets import discover_cases, split_cases
from medfm.evaluate.runner import evaluate
from medfm.segment.model import DEFAULT_MODEL, load
from tests.test_predictor import needs_litemedsam

KERNELS = ("area", "bilinear", "bicubic", "torch-bilinear-aa")
CASES = 3
MAX_GAP = 0.02


@needs_litemedsam
def test_the_default_is_robust_to_the_resize_kernel_on_chest_xrays(seg_data) -> None:
    # the held-out split of the default's model card (100 cases per dataset, 20% by patient, >= 4, seed 0)
    held_out = split_cases(discover_cases(seg_data, ["covid_cxr_lungs_v7"], 100), 0.2, 0, 4)[1][:CASES]
    assert len(held_out) == CASES
    model = load(DEFAULT_MODEL)
    variants = []
    for kernel in KERNELS:
        variant = dataclasses.replace(model, preprocess=dataclasses.replace(model.preprocess, interpolation=kernel))
        variant.name = kernel
        variants.append(variant)
    rows = evaluate(variants, held_out, prompt="box").rows
    means = {k: float(np.mean([r.dice for r in rows if r.model == k and r.note is None])) for k in KERNELS}
    assert all(len([r for r in rows if r.model == k]) >= CASES for k in KERNELS)
    assert min(means.values()) > 0.7, means  # a real segmentation, not an agreement on failure
    assert max(means.values()) - min(means.values()) < MAX_GAP, means
