"""The fast inference paths (medfm.segment.fast) compute what the plain modules compute.

Correctness only: no timing here (benchmarks/litemedsam_speed.py measures speed). Tiny random
networks for every code path, the real LiteMedSAM weights where installed.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import medfm
from medfm.preprocess import LITEMEDSAM_PREPROCESS, prepare, to_uint8_rgb
from medfm.prompts import Box, Points
from medfm.segment.fast import (
    FastDecoder,
    FastTinyViT,
    InferenceEngine,
    bf16_supported,
    check_precision,
    fast_decoder_supported,
    fast_tinyvit_supported,
)
from medfm.segment.model import SegmentationModel, load
from medfm.segment.predictor import Predictor
from medfm.segment.sam import build_sam
from tests.conftest import EXAMPLES
from tests.test_predictor import needs_litemedsam
from tests.test_sam_core import TINY_VIT, prompts, randomise

#: windows 7 on 32 and 14 on 16 cells: both need padding; the last merge keeps the resolution
TINY_TINYVIT = dict(embed_dims=(16, 24, 32, 40), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_sizes=(7, 7, 14, 7))
needs_bf16 = pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16/AMX)")


def assert_close(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg: str = "") -> None:
    """Equal up to float32 re-association: differences within ``rel`` of the largest magnitude."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(expected.abs().max()) + 1e-6
    difference = float((got - expected).abs().max())
    assert difference <= rel * scale, f"{msg}: max difference {difference:.3g} at magnitude {scale:.3g}"


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_litemedsam(seed: int = 0):
    torch.manual_seed(seed)
    return randomise(build_sam("litemedsam", image_size=64, encoder=TINY_TINYVIT, decoder_mlp_dim=64), seed)


@pytest.fixture(scope="module")
def tiny():
    return tiny_litemedsam()


def test_fast_tinyvit_equals_the_plain_encoder(tiny) -> None:
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = tiny.image_encoder(pixels)
    fast = FastTinyViT(tiny.image_encoder)(pixels)
    assert_close(fast, plain)


@needs_bf16
def test_fast_tinyvit_in_bf16_stays_close(tiny) -> None:
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = tiny.image_encoder(pixels)
    fast = FastTinyViT(tiny.image_encoder, "bf16")(pixels)
    assert fast.dtype == torch.float32
    assert (fast - plain).abs().max() < 0.1 * plain.abs().max()


def test_building_fast_paths_leaves_the_network_untouched(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    engine = InferenceEngine(tiny)
    engine.encode(torch.rand(1, 3, 64, 64))
    after = tiny.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def assert_as_exact_as_plain(fast: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, msg: str) -> None:
    """float32 re-association moves results: the fast path may err from the float64 result at most
    a few times as much as the plain float32 modules do, plus 1e-5 of the largest magnitude (about
    80 float32 roundings: the plain error alone is a noisy yardstick, and CPUs with other vector
    widths sum in other orders; a wrong formula errs by orders of magnitude more)."""
    assert fast.shape == plain.shape == exact.shape and fast.dtype == plain.dtype == torch.float32
    fast_error = float((fast.double() - exact).abs().max())
    plain_error = float((plain.double() - exact).abs().max())
    assert fast_error <= 3 * plain_error + 1e-5 * float(exact.abs().max()), f"{msg}: {fast_error:.3g} vs plain {plain_error:.3g}"


@pytest.mark.parametrize("arch", ["litemedsam", "sam_vit_b"])
def test_fast_decoder_equals_the_plain_decoder_for_every_prompt_kind(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "litemedsam":
        core = tiny_litemedsam(1)
    else:
        core = randomise(build_sam(arch, **TINY_VIT), 1)
    exact = copy.deepcopy(core).double()
    p = prompts(core)
    e = core.config.embedding_size
    g = torch.Generator().manual_seed(5)
    many = dict(points=torch.rand(3, 20, 2, generator=g) * 60, point_labels=torch.randint(-1, 2, (3, 20), generator=g))
    decoder = FastDecoder(core)
    kinds = [("boxes",), ("points", "point_labels"), ("boxes", "points", "point_labels"), ("boxes", "mask_input"), ("mask_input",)]
    with torch.no_grad():
        embedding = core.encode(torch.randn(1, 3, 64, 64, generator=g))
        cache = decoder.prepare(embedding)

        def check(prompt: dict, multimask: bool, msg: str) -> None:
            as_double = {k: v.double() if v.is_floating_point() else v for k, v in prompt.items()}
            expected = exact.decode(embedding.double(), **as_double, multimask=multimask)
            plain = core.decode(embedding, **prompt, multimask=multimask)
            got = decoder.decode(cache, **prompt, multimask=multimask)
            assert got[0].shape == (3, 3 if multimask else 1, 4 * e, 4 * e)
            for name, index in (("masks", 0), ("IoU", 1)):
                assert_as_exact_as_plain(got[index], plain[index], expected[index], f"{name} {msg}")

        for kind, multimask in itertools.product(kinds, (False, True)):
            check({k: p[k] for k in kind}, multimask, f"{kind} multimask={multimask}")
        # 20 clicks per prompt: products with the image tokens are cheaper than re-association
        check(many, False, "20 clicks")
        check({**many, "mask_input": p["mask_input"]}, False, "20 clicks and a mask")
        # one prompt at a time, in chunks, or all at once: the same masks
        decoder.chunk_size = 1
        one_by_one = decoder.decode(cache, boxes=p["boxes"])[0]
        decoder.chunk_size = 8
        # a batch of 8 and a batch of 1 take different matmul kernels (AMX tiles on Intel CPUs with
        # AMX), which sum in another order: 1.06e-5 of the largest logit measured on one, so 1e-4
        assert_close(decoder.decode(cache, boxes=p["boxes"])[0], one_by_one, rel=1e-4, msg="chunks")


def test_thread_count_is_restored_and_does_not_change_results(tiny) -> None:
    decoder = FastDecoder(tiny)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0], [10.0, 0.0, 60.0, 30.0], [0.0, 0.0, 63.0, 63.0]])
    torch.set_num_threads(2)
    with torch.no_grad():
        cache = decoder.prepare(tiny.encode(torch.rand(1, 3, 64, 64)))
        toggled = decoder.decode(cache, boxes=boxes)[0]
        assert torch.get_num_threads() == 2
        decoder.single_thread_tokens = False
        assert_close(decoder.decode(cache, boxes=boxes)[0], toggled, msg="token side on all threads")


def test_engine_follows_weight_changes(tiny) -> None:
    core = tiny_litemedsam(2)
    engine = InferenceEngine(core)
    pixels = torch.rand(1, 3, 64, 64)
    boxes = torch.tensor([[5.0, 5.0, 40.0, 50.0]])
    with torch.no_grad():
        engine.decode(engine.encode(pixels), boxes=boxes)
        core.load_state_dict(tiny.state_dict())  # in place, as a checkpoint load or a training step
        core.mask_decoder.iou_token.weight.mul_(1.5)
        embedding = engine.encode(pixels)
        assert_close(embedding, core.encode(pixels))
        assert_close(engine.decode(embedding, boxes=boxes)[0], core.decode(embedding, boxes=boxes)[0])


class Adapter(nn.Module):
    """Stands for an adapter or LoRA wrapped into the encoder, which the fast encoder does not know."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_unknown_modules_and_training_mode_fall_back_to_the_plain_path() -> None:
    core = tiny_litemedsam(3)
    assert fast_tinyvit_supported(core.image_encoder)
    block = core.image_encoder.layers[1].blocks[0]
    block.mlp.fc2 = Adapter(block.mlp.fc2)
    assert not fast_tinyvit_supported(core.image_encoder)
    engine = InferenceEngine(core)
    pixels = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(engine.encode(pixels), core.encode(pixels))
    core.train()
    assert not fast_tinyvit_supported(core.image_encoder) and engine.fast_decoder() is None
    with torch.no_grad():
        embedding = engine.encode(pixels)
        assert torch.equal(engine.decode(embedding, boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]]))[0],
                           core.decode(embedding, boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]]))[0])
    core.eval()
    # a LoRA-like wrapper on a decoder projection: the plain decoder runs
    attention = core.mask_decoder.transformer.layers[1].cross_attn_token_to_image
    attention.q_proj = Adapter(attention.q_proj)
    assert not fast_decoder_supported(core) and engine.fast_decoder() is None
    with torch.no_grad():
        embedding = core.encode(pixels)
        boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0]])
        assert torch.equal(engine.decode(embedding, boxes=boxes)[0], core.decode(embedding, boxes=boxes)[0])


def test_vit_encoder_runs_plain_with_the_fast_decoder() -> None:
    core = randomise(build_sam("sam_vit_b", **TINY_VIT), 4)
    engine = InferenceEngine(core)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert engine.fast_encoder(pixels.device) is None
        assert torch.equal(engine.encode(pixels), core.encode(pixels))
        assert engine.fast_decoder() is not None


def tiny_model(seed: int) -> SegmentationModel:
    return SegmentationModel(tiny_litemedsam(seed), dataclasses.replace(LITEMEDSAM_PREPROCESS, image_size=64), "tiny", "litemedsam")


def test_predictor_optimised_and_plain_agree() -> None:
    model = tiny_model(5)
    image = np.random.default_rng(0).integers(0, 255, (90, 160), dtype=np.uint8)
    results = []
    for optimize in (False, True):
        predictor = Predictor(model, optimize=optimize)
        predictor.set_image(image)
        boxes = predictor.predict(boxes=[Box(10, 10, 60, 50), Box(80, 20, 150, 80)], multimask=True)
        clicks = predictor.predict(points=[[30, 30], [100, 60]], point_labels=[1, 0])
        refined = predictor.predict(boxes=[Box(10, 10, 60, 50)], points=Points.positive((30, 30)), mask_input=clicks)
        results.append((predictor.embedding, boxes, clicks, refined))
    (e0, *plain), (e1, *fast) = results
    assert_close(e1, e0)  # encoder and decoder differences compound: 1e-4 of the magnitude below
    for a, b in zip(plain, fast):
        assert_close(torch.from_numpy(b.low_res_logits), torch.from_numpy(a.low_res_logits), rel=1e-4, msg="low-res logits")
        assert_close(torch.from_numpy(b.scores), torch.from_numpy(a.scores), rel=1e-4, msg="scores")
        assert (a.masks != b.masks).sum() <= 2


def test_volume_slices_encode_alike_batched_or_one_by_one() -> None:
    volume = medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz", modality="CT")
    predictor = Predictor(tiny_model(6))
    indices = [3, 4, 5]
    batched = {index: embedding for index, embedding, _ in predictor.encode_slices(volume, indices, batch_size=3)}
    for index in indices:
        predictor.set_image(volume, slice_index=index)
        torch.testing.assert_close(batched[index], predictor.embedding, atol=1e-5, rtol=1e-5)
        plain = Predictor(predictor.model, optimize=False)
        plain.set_image(volume, slice_index=index)
        torch.testing.assert_close(predictor.embedding, plain.embedding, atol=1e-4, rtol=1e-4)


def test_precision_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        check_precision("fp8")
    with pytest.raises(ValueError):
        Predictor(tiny_model(7), optimize=False, precision="bf16")


# ----------------------------------------------------------------- real LiteMedSAM weights
@pytest.fixture(scope="module")
def litemedsam():
    return load("litemedsam")


def _ultrasound():
    image = medfm.read_image(EXAMPLES / "busi_benign_001.png")
    truth = medfm.read_image(EXAMPLES / "busi_benign_001_mask.png").array
    return image, truth


@needs_litemedsam
def test_real_litemedsam_fast_paths_match_the_plain_modules(litemedsam) -> None:
    torch.set_num_threads(2)
    image, truth = _ultrasound()
    pixels, _ = prepare(to_uint8_rgb(image.array), litemedsam.preprocess)
    network = litemedsam.network
    engine = InferenceEngine(network)
    with torch.no_grad():
        plain = network.encode(pixels)
        fast = engine.encode(pixels)
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
        box = torch.tensor([[float(v) for v in Box.from_mask(truth).as_array()]]) * 256 / max(truth.shape)
        for kwargs in (dict(boxes=box), dict(boxes=box.repeat(3, 1) + torch.tensor([[0.0], [4.0], [8.0]]), multimask=True),
                       dict(points=torch.tensor([[[120.0, 100.0], [30.0, 30.0]]]), point_labels=torch.tensor([[1, 0]]))):
            expected = network.decode(plain, **kwargs)
            got = engine.decode(plain, **kwargs)
            torch.testing.assert_close(got[0], expected[0], atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)


@needs_litemedsam
@needs_bf16
def test_real_litemedsam_bf16_keeps_the_masks(litemedsam) -> None:
    torch.set_num_threads(2)
    image, truth = _ultrasound()
    box = [Box.from_mask(truth)]
    masks = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(litemedsam, precision=precision)
        predictor.set_image(image)
        masks[precision] = predictor.predict(boxes=box).masks[0]
    a, b = masks["fp32"], masks["bf16"]
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.995, f"bf16 mask agrees with the fp32 one at Dice {dice:.4f}"


def test_model_predictor_forwards_options() -> None:
    from medfm.preprocess import LITEMEDSAM_PREPROCESS
    from medfm.segment.model import SegmentationModel
    from medfm.segment.sam import build_sam

    network = build_sam("litemedsam", encoder=dict(embed_dims=(16, 24, 32, 40), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 2),
                                                   window_sizes=(7, 7, 7, 7)), decoder_mlp_dim=64).eval()
    model = SegmentationModel(network, LITEMEDSAM_PREPROCESS, "tiny", "litemedsam")
    assert model.predictor(optimize=False).engine is None and model.predictor().engine is not None
