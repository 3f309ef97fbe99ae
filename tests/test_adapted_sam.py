"""The adapted SAMs (SAM-Med2D, Medical SAM Adapter, SAMed), each loaded from a tiny random checkpoint
that the test writes in the layout the original code saves, then run end to end on a bundled image.

The blocks are also checked against literal re-implementations of the original forward passes
(window partition, adapter placement, MSA's depth regrouping written out index by index, SAMed's
LoRA), on the same random weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom
from torch import nn

import medfm
from medfm.errors import CheckpointError, MedfmError
from medfm.io import MedicalImage
from medfm.io.image import image_geometry_2d
from medfm.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from medfm.segment.adapted import (
    ADAPTED_CONFIGS,
    build_adapted,
    encode_volume_chunk,
)
from medfm.segment.adapted_predictor import SemanticPredictor
from medfm.segment.predictor import Predictor
from medfm.segment.adapters import LoRAQKVLinear, MSALayer, SamMed2DLayer, closest_factors
from medfm.segment.checkpoints import convert_medfm_to_segment_anything, load_state_dict_file
from medfm.catalog.registry import get
from medfm.segment.model import SegmentationModel
from medfm.segment.sam import SamCore, build_sam
from tests.conftest import EXAMPLES

BUSI = EXAMPLES / "busi_benign_001.png"  # 416 x 416 grey ultrasound
SMALL_HEADS = dict(prompt_embed_dim=32, decoder_mlp_dim=64, iou_head_hidden_dim=32)
# window 3 on an 8x8 grid exercises the window padding; block 1 is global
TINY_ENCODER = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), patch_size=8, window_size=3)


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=g))
    return model.eval()


def tiny(arch: str, seed: int = 0, encoder: dict | None = None, **overrides) -> SamCore:
    encoder = {**TINY_ENCODER, **(encoder or {})}
    return randomise(build_adapted(arch, image_size=64, encoder=encoder, **SMALL_HEADS, **overrides), seed)


def zero(model: nn.Module, fragment: str) -> nn.Module:
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if fragment in name:
                tensor.zero_()
    return model


def encode(model: SamCore, seed: int = 1) -> torch.Tensor:
    size = model.config.image_size
    with torch.no_grad():
        return model.encode(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)))


# -- literal re-implementations of the original forward passes ------------------------------------


def ref_window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)
    return x, (hp, wp)


def ref_window_unpartition(x: torch.Tensor, ws: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = pad_hw
    b = x.shape[0] // (hp * wp // ws // ws)
    x = x.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1], :].contiguous()


def ref_sam_med2d_adapter(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SAM-Med2D's Adapter_Layer.forward, as written there (pool, channel gate, spatial, skip, norm)."""
    x = x.permute(0, 3, 1, 2)
    b, c = x.shape[:2]
    gate = adapter.channel(nn.AdaptiveAvgPool2d(1)(x).view(b, c)).view(b, c, 1, 1)
    x = x + adapter.spatial(gate * x)
    return adapter.norm(x.permute(0, 2, 3, 1))


def ref_bottleneck(adapter: nn.Module, x: torch.Tensor, skip: bool) -> torch.Tensor:
    out = adapter.D_fc2(F.gelu(adapter.D_fc1(x)))
    return x + out if skip else out


def attention(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.attn(hidden_states=x)[0]


def ref_msa_block(layer: MSALayer, x: torch.Tensor, depth: int | None) -> torch.Tensor:
    """MSA's AdapterBlock.forward, the rearranges written out index by index."""
    ws = layer.window_size
    shortcut = x
    if ws > 0:
        hw = x.shape[1], x.shape[2]
        x, pad_hw = ref_window_partition(x, ws)
    if depth:
        rows, hh, ww, c = x.shape
        chunks = rows // depth
        dh, dw = closest_factors(depth)
        # '(b d) h w c -> (b h w) d c'
        xd = torch.stack([
            torch.stack([x[b * depth + d, i, j] for d in range(depth)])
            for b in range(chunks) for i in range(hh) for j in range(ww)
        ])
        xd = layer.layer_norm1(xd)
        # 'bhw (dh dw) c -> bhw dh dw c'
        xd = torch.stack([
            torch.stack([torch.stack([xd[n, a * dw + e] for e in range(dw)]) for a in range(dh)]) for n in range(len(xd))
        ])
        xd = ref_bottleneck(layer.Depth_Adapter, attention(layer, xd), skip=False)
        # '(b n) dh dw c -> (b dh dw) n c' with n = hh * ww, then 'b (hh ww) c -> b hh ww c'
        n = hh * ww
        xd = torch.stack([
            torch.stack([xd[b * n + k, a, e] for k in range(n)])
            for b in range(chunks) for a in range(dh) for e in range(dw)
        ]).view(rows, hh, ww, c)
    x = ref_bottleneck(layer.Space_Adapter, attention(layer, layer.layer_norm1(x)), skip=True)
    if depth:
        x = x + xd
    if ws > 0:
        x = ref_window_unpartition(x, ws, pad_hw, hw)
    x = shortcut + x
    xn = layer.layer_norm2(x)
    return x + layer.mlp(xn) + 0.5 * ref_bottleneck(layer.MLP_Adapter, xn, skip=False)


def ref_sam_block(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's Block.forward up to the attention residual (norm1, partition, attn)."""
    ws = layer.window_size
    y = layer.layer_norm1(x)
    if ws > 0:
        hw = y.shape[1], y.shape[2]
        y, pad_hw = ref_window_partition(y, ws)
    y = attention(layer, y)
    if ws > 0:
        y = ref_window_unpartition(y, ws, pad_hw, hw)
    return x + y


# -- the registry and the architectures ------------------------------------------------------------


def test_registry_entries_carry_their_preprocessing() -> None:
    med2d, msa, samed = get("sam-med2d"), get("msa"), get("samed")
    assert (med2d.options["arch"], med2d.card, med2d.filename) == ("sam_med2d_vit_b", "sam-med2d", "sam-med2d_b.pth")
    assert med2d.weights.startswith("url:") and "1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl" in med2d.weights
    p = med2d.preprocessing()
    assert (p.image_size, p.resize, p.normalization) == (256, "stretch", "mean-std")
    assert (p.pixel_mean, p.pixel_std, p.box_rounding) == (SAM_PIXEL_MEAN, SAM_PIXEL_STD, "none")
    assert msa.weights.startswith("none:") and msa.preprocessing().image_size == 1024
    assert msa.preprocessing().pixel_mean == (0.0, 0.0, 0.0) and msa.preprocessing().pixel_std == (255.0, 255.0, 255.0)
    assert samed.preprocessing().image_size == 512 and samed.sha256 == get("sam-vit-b").sha256
    [lora] = samed.extra
    assert lora.role == "lora" and "1P0Bm-05l-rfeghbrT1B62v5eN-3A-uOr" in lora.source
    full = {arch: config for arch, config in ADAPTED_CONFIGS.items()}
    assert full["sam_med2d_vit_b"].image_size == 256 and full["sam_med2d_vit_b"].embedding_size == 16
    assert full["samed_vit_b"].embedding_size == 32 and full["samed_vit_b"].num_multimask_outputs == 8


@pytest.mark.parametrize("arch", sorted(ADAPTED_CONFIGS))
def test_every_adapted_architecture_runs_at_tiny_size(arch: str) -> None:
    model = tiny(arch)
    with torch.no_grad():
        embedding = model.encode(torch.randn(2, 3, 64, 64))
        assert embedding.shape == (2, 32, 8, 8)
        masks, iou = model.decode(embedding[:1], boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0]]), multimask=True)
    m = model.config.num_multimask_outputs
    assert masks.shape == (1, m, 32, 32) and iou.shape == (1, m)


@pytest.mark.parametrize("arch", sorted(ADAPTED_CONFIGS))
def test_full_size_architectures_have_the_published_shapes(arch: str) -> None:
    with torch.device("meta"):
        state = build_adapted(arch).state_dict()
    meta = convert_medfm_to_segment_anything(state)
    assert meta["image_encoder.patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    if arch == "sam_med2d_vit_b":
        assert meta["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
        assert meta["image_encoder.blocks.2.attn.rel_pos_h"].shape == (31, 64)  # global block at 256 px
        assert meta["image_encoder.blocks.0.Adapter.channel.0.weight"].shape == (192, 768)
        assert meta["image_encoder.blocks.0.Adapter.spatial.2.weight"].shape == (768, 768, 4, 4)
    elif arch == "msa_vit_b":
        assert meta["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
        assert meta["image_encoder.blocks.11.attn.rel_pos_h"].shape == (127, 64)
        for name in ("MLP_Adapter", "Space_Adapter", "Depth_Adapter"):
            assert meta[f"image_encoder.blocks.5.{name}.D_fc1.weight"].shape == (192, 768)
            assert meta[f"image_encoder.blocks.5.{name}.D_fc2.bias"].shape == (768,)
    else:
        assert meta["image_encoder.pos_embed"].shape == (1, 32, 32, 768)
        assert meta["image_encoder.blocks.0.attn.qkv.w_a_q"].shape == (4, 768)
        assert meta["image_encoder.blocks.0.attn.qkv.w_b_v"].shape == (768, 4)
        assert meta["mask_decoder.mask_tokens.weight"].shape == (9, 256)


# -- SAM-Med2D ---------------------------------------------------------------------------------------


def write_sam_med2d(model: SamCore, path: Path) -> Path:
    """As SAM-Med2D's train.py saves: {'model': state_dict, 'optimizer': the Adam object itself}."""
    state = convert_medfm_to_segment_anything(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.save({"model": state, "optimizer": optimizer}, path)
    return path


def test_sam_med2d_block_matches_the_original_forward() -> None:
    model = tiny("sam_med2d_vit_b")
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        for layer in model.image_encoder.layers:
            assert isinstance(layer, SamMed2DLayer)
            after_attention = ref_sam_block(layer, x)
            normed = layer.layer_norm2(after_attention)
            expected = after_attention + layer.mlp(normed) + ref_sam_med2d_adapter(layer.Adapter, normed)
            torch.testing.assert_close(layer(x), expected)


def test_sam_med2d_checkpoint_loads_and_segments_the_bundled_image(tmp_path: Path) -> None:
    original = tiny("sam_med2d_vit_b")
    path = write_sam_med2d(original, tmp_path / "sam-med2d_b.pth")
    raw = torch.load(path, weights_only=False)
    assert isinstance(raw["optimizer"], torch.optim.Adam)
    assert raw["model"]["image_encoder.blocks.1.Adapter.channel.0.weight"].shape == (8, 32)
    assert raw["model"]["image_encoder.blocks.1.Adapter.spatial.0.weight"].shape == (32, 32, 3, 3)

    model = medfm.load("sam-med2d", weights=path)
    assert model.network.config == original.config  # widths, heads, window, global blocks read off the weights
    assert model.preprocess.image_size == 64  # follows the network (the published one is 256)
    torch.testing.assert_close(encode(model.network), encode(original), rtol=0, atol=0)

    predictor = model.predictor()
    assert type(predictor) is Predictor  # its pipeline is all data: no predictor of its own
    assert (model.preprocess.interpolation, model.preprocess.channel_order) == ("nearest", "bgr")
    predictor.set_image(BUSI)
    boxes = [[120, 100, 300, 280], [10, 20, 200, 220]]
    points = np.array([[[200, 190], [50, 50]], [[100, 120], [300, 300]]])
    prediction = predictor.predict(boxes=boxes, points=points, point_labels=[[1, 0], [1, 0]], multimask=True)
    assert prediction.masks.shape == (2, 416, 416) and prediction.logits.shape == (2, 416, 416)
    assert prediction.low_res_logits.shape == (2, 32, 32) and prediction.candidates.shape == (2, 3, 416, 416)
    refined = predictor.predict(boxes=boxes, mask_input=prediction)
    assert refined.masks.shape == (2, 416, 416)
    # a bare path is recognised by its adapter keys
    assert medfm.load(path).name == "sam-med2d"


def test_sam_med2d_preprocessing_is_sammed_predictors(tmp_path: Path) -> None:
    """BGR order (SAM-Med2D reads with cv2.imread), INTER_NEAREST to the model size, SAM's mean/std."""
    model = medfm.load("sam-med2d", weights=write_sam_med2d(tiny("sam_med2d_vit_b"), tmp_path / "m.pth"))
    rgb = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    seen = []
    hook = model.network.image_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    predictor = model.predictor()
    predictor.set_image(rgb)
    hook.remove()
    bgr = rgb[..., ::-1].astype(np.float64)
    normalised = (bgr - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)  # SAM-Med2D: normalise, then resize
    expected = cv2.resize(normalised, (64, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_allclose(seen[0][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    box = predictor.geometry.boxes_to_model(np.array([[15.0, 9.0, 75.0, 45.0]]))
    np.testing.assert_allclose(box, [[15 * 64 / 150, 9 * 64 / 90, 75 * 64 / 150, 45 * 64 / 90]])
    # saved and loaded, the folder states that pipeline, and a folder from before it was data gets it too
    folder = model.save_pretrained(tmp_path / "saved")
    config = json.loads((folder / "config.json").read_text())
    assert config["preprocess"]["interpolation"] == "nearest" and config["preprocess"]["channel_order"] == "bgr"
    del config["preprocess"]["channel_order"]
    config["preprocess"]["interpolation"] = "area"  # what medfm wrote before (format 1)
    config["medfm_format"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    assert medfm.load(folder).preprocess == model.preprocess


def test_sam_med2d_adapters_change_the_output(tmp_path: Path) -> None:
    model = tiny("sam_med2d_vit_b")
    plain = randomise(build_sam("sam_vit_b", image_size=64, encoder=TINY_ENCODER, **SMALL_HEADS))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".Adapter." not in k})
    zeroed = zero(tiny("sam_med2d_vit_b"), ".Adapter.")
    assert not torch.allclose(encode(model), encode(plain), atol=1e-3)
    assert not torch.allclose(encode(model), encode(zeroed), atol=1e-3)


def test_a_missing_sam_med2d_adapter_key_is_a_checkpoint_error(tmp_path: Path) -> None:
    state = convert_medfm_to_segment_anything(tiny("sam_med2d_vit_b").state_dict())
    del state["image_encoder.blocks.1.Adapter.spatial.2.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing image_encoder\.blocks\.1\.Adapter\.spatial\.2\.weight") as err:
        medfm.load("sam-med2d", weights=path)
    assert str(path) in str(err.value)

    plain = tmp_path / "plain_sam.pth"
    torch.save(convert_medfm_to_segment_anything(build_sam("sam_vit_b", image_size=64, encoder=TINY_ENCODER).state_dict()), plain)
    with pytest.raises(CheckpointError, match="no SAM-Med2D adapter weights") as err:
        medfm.load("sam-med2d", weights=plain)
    assert str(plain) in str(err.value)


def test_pickled_objects_other_than_an_optimizer_are_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"model": torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)


# -- Medical SAM Adapter ----------------------------------------------------------------------------


MSA_TINY = dict(pretrain_grid=8)


def write_msa(model: SamCore, path: Path) -> Path:
    """As MSA's train.py saves (save_checkpoint of its states dict)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = convert_medfm_to_segment_anything(model.state_dict())
    torch.save({"epoch": 5, "model": "sam", "state_dict": state, "optimizer": optimizer.state_dict(),
                "best_tol": 0.25, "path_helper": {"ckpt_path": "logs/msa/Model"}}, path)
    return path


def test_msa_block_matches_the_original_forward_in_2d_and_3d() -> None:
    model = tiny("msa_vit_b", encoder=MSA_TINY)
    x = torch.randn(8, 8, 8, 32)  # 2 chunks of 4 slices
    with torch.no_grad():
        for layer in model.image_encoder.layers:
            assert isinstance(layer, MSALayer)
            torch.testing.assert_close(layer(x), ref_msa_block(layer, x, None))
            torch.testing.assert_close(layer(x, depth=4), ref_msa_block(layer, x, 4))


def test_msa_checkpoint_loads_and_segments_the_bundled_image(tmp_path: Path) -> None:
    original = tiny("msa_vit_b", encoder=MSA_TINY)
    path = write_msa(original, tmp_path / "best_checkpoint")
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert raw["image_encoder.blocks.0.MLP_Adapter.D_fc1.weight"].shape == (8, 32)
    assert raw["image_encoder.blocks.0.Depth_Adapter.D_fc2.weight"].shape == (32, 8)
    with pytest.raises(CheckpointError, match="image_size"):
        medfm.load(path)  # a bare MSA file does not tell its input size

    model = medfm.load("msa", weights=path, image_size=64)
    assert model.network.config == original.config
    torch.testing.assert_close(encode(model.network), encode(original), rtol=0, atol=0)
    predictor = model.predictor()
    predictor.set_image(BUSI)
    prediction = predictor.predict(points=[[200, 190]], point_labels=[1])
    assert prediction.masks.shape == (1, 416, 416) and prediction.low_res_logits.shape == (1, 32, 32)

    # another input size: pos_embed (kept at its 8x8 grid) is bicubically resized, as in MSA
    smaller = medfm.load("msa", weights=path, image_size=32)
    assert smaller.network.image_encoder.pos_embed.shape == (1, 8, 8, 32)
    assert smaller.network.image_encoder.layers[1].attn.rel_pos_h.shape == (15, 16)
    assert encode(smaller.network).shape == (1, 32, 4, 4)


def test_msa_with_zeroed_adapters_is_plain_sam_and_the_adapters_matter() -> None:
    # window 4 divides the 8x8 grid (no padding) and the input is at the pretrain grid (no resizing):
    # then only the adapters tell MSA from SAM
    exact = dict(MSA_TINY, window_size=4)
    model = tiny("msa_vit_b", encoder=exact)
    zeroed = zero(zero(tiny("msa_vit_b", encoder=exact), "D_fc2"), "Depth_Adapter")
    plain = build_sam("sam_vit_b", image_size=64, encoder=dict(TINY_ENCODER, window_size=4), **SMALL_HEADS).eval()
    plain.load_state_dict({k: v for k, v in zeroed.state_dict().items() if "_Adapter." not in k})
    torch.testing.assert_close(encode(zeroed), encode(plain), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(encode(model), encode(zeroed), atol=1e-3)


def test_msa_depth_adapter_works_across_the_slices_of_a_chunk() -> None:
    model = tiny("msa_vit_b", encoder=MSA_TINY)
    chunk = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        flat = model.encode(chunk)
        volume = encode_volume_chunk(model, chunk)
        assert volume.shape == flat.shape == (4, 32, 8, 8)
        assert not torch.allclose(volume, flat, atol=1e-3)
        zero(model, "Depth_Adapter")
        torch.testing.assert_close(encode_volume_chunk(model, chunk), flat)
    with pytest.raises(ValueError, match="at least 2 slices"):
        encode_volume_chunk(model, chunk[:1])
    with pytest.raises(ValueError, match="depth adapter"):
        encode_volume_chunk(tiny("sam_med2d_vit_b"), chunk)


def test_a_missing_msa_adapter_key_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = write_msa(tiny("msa_vit_b", encoder=MSA_TINY), tmp_path / "msa.pth")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["image_encoder.blocks.0.Space_Adapter.D_fc1.bias"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"missing image_encoder\.blocks\.0\.Space_Adapter\.D_fc1\.bias") as err:
        medfm.load("msa", weights=path, image_size=64)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="publishes no adapted weights"):
        medfm.load("msa")


# -- SAMed -------------------------------------------------------------------------------------------


def write_samed(tmp_path: Path, rank: int = 4, blocks: int = 2, seed: int = 0) -> tuple[Path, Path, SamCore]:
    """Meta's layout for the base SAM (64 px) and SAMed's save_lora_parameters layout for the rest:
    w_a_000.. (q, v of each block in turn), w_b_000.., then the prompt encoder and mask decoder."""
    base = randomise(build_sam("sam_vit_b", image_size=64, encoder=TINY_ENCODER, **SMALL_HEADS), seed)
    base_path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(convert_medfm_to_segment_anything(base.state_dict()), base_path)
    heads = build_sam("sam_vit_b", image_size=32, encoder=TINY_ENCODER, num_multimask_outputs=8, **SMALL_HEADS)
    heads = randomise(heads, seed + 1)
    meta = convert_medfm_to_segment_anything(heads.state_dict())
    g = torch.Generator().manual_seed(seed + 2)
    a = {f"w_a_{i:03d}": nn.Parameter(torch.randn(rank, 32, generator=g)) for i in range(2 * blocks)}
    b = {f"w_b_{i:03d}": nn.Parameter(0.1 * torch.randn(32, rank, generator=g)) for i in range(2 * blocks)}
    prompt = {k: v for k, v in meta.items() if "prompt_encoder" in k}
    decoder = {k: v for k, v in meta.items() if "mask_decoder" in k}
    lora_path = tmp_path / "epoch_159.pth"
    torch.save({**a, **b, **prompt, **decoder}, lora_path)
    return base_path, lora_path, base


def test_lora_qkv_matches_samed() -> None:
    layer = randomise(LoRAQKVLinear(32, 4))
    x = torch.randn(2, 5, 5, 32)
    with torch.no_grad():
        expected = F.linear(x, layer.weight, layer.bias)
        expected[..., :32] += (x @ layer.w_a_q.T) @ layer.w_b_q.T
        expected[..., -32:] += (x @ layer.w_a_v.T) @ layer.w_b_v.T
        torch.testing.assert_close(layer(x), expected)
    layer.reset_lora()
    assert torch.count_nonzero(layer.w_b_q) == 0 and torch.count_nonzero(layer.w_a_q) > 0


def test_samed_loads_base_and_lora_and_predicts_classes(tmp_path: Path) -> None:
    base_path, lora_path, base = write_samed(tmp_path)
    model = medfm.load("samed", weights=base_path, lora=lora_path, image_size=32)
    network = model.network
    assert network.config.num_multimask_outputs == 8 and network.config.encoder.lora_rank == 4
    lora = torch.load(lora_path, weights_only=True)
    for block in range(2):
        qkv = network.image_encoder.layers[block].attn.qkv
        assert torch.equal(qkv.w_a_q, lora[f"w_a_{2 * block:03d}"]) and torch.equal(qkv.w_a_v, lora[f"w_a_{2 * block + 1:03d}"])
        assert torch.equal(qkv.w_b_q, lora[f"w_b_{2 * block:03d}"]) and torch.equal(qkv.w_b_v, lora[f"w_b_{2 * block + 1:03d}"])
        assert torch.equal(qkv.weight, base.image_encoder.layers[block].attn.qkv.weight)
    assert torch.equal(network.mask_decoder.mask_tokens.weight, lora["mask_decoder.mask_tokens.weight"])
    # SAMed's load_from: pos_embed and the global block's relative positions resized to the 4x4 grid
    pos = F.interpolate(base.image_encoder.pos_embed.permute(0, 3, 1, 2), (4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(network.image_encoder.pos_embed, pos.permute(0, 2, 3, 1))
    rel = F.interpolate(base.image_encoder.layers[1].attn.rel_pos_h[None, None], (7, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(network.image_encoder.layers[1].attn.rel_pos_h, rel[0, 0])
    assert torch.equal(network.image_encoder.layers[0].attn.rel_pos_h, base.image_encoder.layers[0].attn.rel_pos_h)

    predictor = model.predictor()
    assert isinstance(predictor, SemanticPredictor) and predictor.class_names[1] == "spleen"
    predictor.set_image(BUSI)
    labels = predictor.predict_classes()
    assert labels.shape == (416, 416) and labels.dtype == np.uint8 and labels.max() <= 8
    logits = predictor.class_logits()
    assert logits.shape == (9, 16, 16)
    expected = F.interpolate(logits[None], (32, 32), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(labels, zoom(expected.astype(np.uint8), 416 / 32, order=0))
    with torch.no_grad():
        single, _ = network.decode(predictor.embedding)
    torch.testing.assert_close(logits[:1], single[0])  # token 0 is SAMed's background
    assert predictor.predict(boxes=[[40, 40, 300, 300]]).masks.shape == (1, 416, 416)  # prompts still work
    # the semantic settings are data: a saved folder states them and loads back the same predictor
    folder = model.save_pretrained(tmp_path / "saved")
    assert json.loads((folder / "config.json").read_text())["semantic"]["input_size"] == 224
    reloaded = medfm.load(folder).predictor()
    assert isinstance(reloaded, SemanticPredictor) and reloaded.settings == predictor.settings
    reloaded.set_image(BUSI)
    np.testing.assert_array_equal(reloaded.predict_classes(), labels)


def test_samed_lora_changes_the_output(tmp_path: Path) -> None:
    base_path, lora_path, _ = write_samed(tmp_path)
    model = medfm.load("samed", weights=base_path, lora=lora_path, image_size=32).network
    without = dataclasses.replace(model.config, encoder=model.config.encoder)
    zeroed = SamCore(without).eval()
    zeroed.load_state_dict(model.state_dict())
    zero(zeroed, ".qkv.w_b_")
    plain = build_sam("sam_vit_b", image_size=32, encoder=TINY_ENCODER, num_multimask_outputs=8, **SMALL_HEADS).eval()
    plain.load_state_dict({k: v for k, v in zeroed.state_dict().items() if ".qkv.w_" not in k})
    torch.testing.assert_close(encode(zeroed), encode(plain), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(encode(model), encode(zeroed), atol=1e-3)


def test_samed_preprocessing_is_its_test_script(tmp_path: Path) -> None:
    """CT clipped to [-125, 275] HU into [0, 1], zoom (order 3) to 224, then to the network size."""
    base_path, lora_path, _ = write_samed(tmp_path)
    model = medfm.load("samed", weights=base_path, lora=lora_path, image_size=32)
    hu = np.random.default_rng(1).uniform(-400, 600, (100, 120)).astype(np.float32)
    ct = MedicalImage(array=hu, modality="CT", metadata={"kind": "image"}, **image_geometry_2d())
    seen = []
    hook = model.network.image_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    predictor = model.predictor()
    predictor.set_image(ct)
    hook.remove()
    unit = np.clip((hu + 125.0) / 400.0, 0.0, 1.0)
    slice_224 = zoom(unit, (224 / 100, 224 / 120), order=3)
    expected = zoom(slice_224, (32 / 224, 32 / 224), order=3)
    for channel in range(3):
        np.testing.assert_allclose(seen[0][0, channel].numpy(), expected, atol=1e-5)
    assert predictor.predict_classes().shape == (100, 120)


def test_samed_lora_of_the_wrong_rank_or_block_count_is_a_clear_error(tmp_path: Path) -> None:
    base_path, _, _ = write_samed(tmp_path)
    rank8 = tmp_path / "rank8"
    rank8.mkdir()
    _, lora8, _ = write_samed(rank8, rank=8)
    with pytest.raises(CheckpointError, match="rank 8.*lora_rank=8") as err:
        medfm.load("samed", weights=base_path, lora=lora8, image_size=32)
    assert str(lora8) in str(err.value)
    assert medfm.load("samed", weights=base_path, lora=lora8, image_size=32, lora_rank=8).network.config.encoder.lora_rank == 8

    one_block = tmp_path / "one_block"
    one_block.mkdir()
    _, lora1, _ = write_samed(one_block, blocks=1)
    with pytest.raises(CheckpointError, match="LoRA for 1 blocks.*has 2 blocks") as err:
        medfm.load("samed", weights=base_path, lora=lora1, image_size=32)
    assert str(lora1) in str(err.value)


def test_samed_needs_both_files(tmp_path: Path, monkeypatch) -> None:
    base_path, lora_path, _ = write_samed(tmp_path)
    with pytest.raises(CheckpointError, match="pass it as lora="):
        medfm.load("samed", weights=lora_path, lora=base_path, image_size=32)
    with pytest.raises(CheckpointError, match="no such file") as err:
        medfm.load("samed", weights=base_path, lora=tmp_path / "absent.pth", image_size=32)
    assert "absent.pth" in str(err.value)
    with pytest.raises(CheckpointError, match="LoRA file; load it with medfm.load"):
        medfm.load(lora_path)
    with pytest.raises(MedfmError, match="no lora= file"):
        medfm.load("sam-med2d", weights=base_path, lora=lora_path)

    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDFM_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="lora file is not cached.*lora=<local file>"):
        medfm.load("samed", weights=base_path)
    with pytest.raises(CheckpointError, match="weights file is not cached.*weights=<local file>"):
        medfm.load("samed", lora=lora_path)


def test_adapted_models_round_trip_through_medfm_folders(tmp_path: Path) -> None:
    base_path, lora_path, _ = write_samed(tmp_path)
    samed = medfm.load("samed", weights=base_path, lora=lora_path, image_size=32)
    med2d = medfm.load("sam-med2d", weights=write_sam_med2d(tiny("sam_med2d_vit_b"), tmp_path / "m.pth"))
    for model in (samed, med2d):
        again = SegmentationModel.from_pretrained(model.save_pretrained(tmp_path / model.name))
        assert again.arch == model.arch and again.preprocess == model.preprocess
        assert type(again.predictor()) is type(model.predictor())
        torch.testing.assert_close(encode(again.network), encode(model.network), rtol=0, atol=0)


def test_adapted_predictors_prepare_volume_slices_their_own_way(tmp_path: Path) -> None:
    ct = dataclasses.replace(medfm.read_image(EXAMPLES / "totalseg_example_ct.nii.gz"), modality="CT")  # (30, 101, 122)
    base_path, lora_path, _ = write_samed(tmp_path)
    samed = medfm.load("samed", weights=base_path, lora=lora_path, image_size=32)
    med2d = medfm.load("sam-med2d", weights=write_sam_med2d(tiny("sam_med2d_vit_b"), tmp_path / "m.pth"))
    for model in (samed, med2d):
        predictor = model.predictor()
        predictor.set_image(ct, slice_index=12)
        [(index, embedding, geometry)] = list(predictor.encode_slices(ct, [12]))
        assert index == 12 and geometry == predictor.geometry and geometry.original_hw == (101, 122)
        torch.testing.assert_close(embedding, predictor.embedding)
    labels = samed.predictor()
    labels.set_image(ct, slice_index=12)
    assert labels.predict_classes().shape == (101, 122)
