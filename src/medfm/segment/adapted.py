"""The adapted SAMs of the survey, loaded from the files their authors publish or their code saves.

==================  =====================================================================
``sam-med2d``       OpenGVLab's ``sam-med2d_b.pth``: ``{'model': state_dict, 'optimizer': ...}``
                    (``train.py`` pickles the optimizer *object*), segment-anything keys plus
                    ``image_encoder.blocks.N.Adapter.*``; ViT-B at 256 px (16x16 ``pos_embed``).
``msa``             Medical SAM Adapter's ``{'state_dict': ..., 'optimizer': ..., 'model': 'sam'}``
                    (``train.py``'s ``save_checkpoint``), segment-anything keys plus
                    ``image_encoder.blocks.N.{MLP,Space,Depth}_Adapter.D_fc{1,2}.*``.
``samed``           Meta's SAM ViT-B checkpoint plus SAMed's separate LoRA file
                    (``LoRA_Sam.save_lora_parameters``): ``w_a_000``... ``w_b_...`` and the
                    fine-tuned ``prompt_encoder.*`` and ``mask_decoder.*`` (num_classes + 1 masks).
==================  =====================================================================

The architecture is read off the weights (widths, depth, heads from the relative-position
tables, window size, global blocks, decoder widths, number of masks); only what weights cannot
tell comes from the registry (MSA's and SAMed's input size). See :mod:`medfm.segment.adapters`
for the modules and the exact key layouts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.errors import CheckpointError
from medfm.intensity import IntensityPreset
from medfm.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD, PreprocessConfig
from medfm.segment.adapters import LoRAViTConfig, MSAViTConfig, SamMed2DViTConfig
from medfm.segment.checkpoints import (
    convert_hf_sam_to_medfm,
    convert_medfm_to_segment_anything,
    convert_segment_anything_to_medfm,
    detect_layout,
    load_state_dict_file,
)
from medfm.segment.sam import SamCore, SamCoreConfig, ViTConfig, build_registered, build_sam, with_overrides

_VIT_B = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))

#: Architectures of the adapted models, as SamCore configs (ViT-B, as published).
ADAPTED_CONFIGS: dict[str, SamCoreConfig] = {
    "sam_med2d_vit_b": SamCoreConfig(encoder=SamMed2DViTConfig(**_VIT_B), image_size=256),
    "msa_vit_b": SamCoreConfig(encoder=MSAViTConfig(**_VIT_B), image_size=1024),
    "samed_vit_b": SamCoreConfig(encoder=LoRAViTConfig(**_VIT_B), image_size=512, num_multimask_outputs=8),
}

#: SAM-Med2D's ``SammedPredictor``: BGR channel order (``cv2.imread``), stretch to 256 x 256 with
#: OpenCV's INTER_NEAREST, ImageNet mean/std on 0-255, low-res logits bilinearly to 256 then to the
#: input.
SAM_MED2D_PREPROCESS = PreprocessConfig(
    image_size=256,
    resize="stretch",
    interpolation="nearest",
    channel_order="bgr",
    normalization="mean-std",
    pixel_mean=SAM_PIXEL_MEAN,
    pixel_std=SAM_PIXEL_STD,
    box_rounding="none",
    upsampling="pad-resize-crop-resize",
)
#: MSA's 2D datasets: torchvision ``Resize((S, S))`` on the PIL image (bilinear) then ``ToTensor``
#: (x / 255, no mean/std: ``function.py`` feeds the encoder directly); S = ``-image_size`` (the
#: README trains with 1024; ``cfg.py``'s default is 256, which the weights cannot tell).
MSA_PREPROCESS = PreprocessConfig(
    image_size=1024,
    resize="stretch",
    interpolation="pil-bilinear",
    normalization="mean-std",
    pixel_mean=(0.0, 0.0, 0.0),
    pixel_std=(255.0, 255.0, 255.0),
    box_rounding="none",
    upsampling="pad-resize-crop-resize",
)
#: SAMed: inputs in [0, 1] (CT clipped to [-125, 275] HU), ``pixel_mean`` 0 and ``pixel_std`` 1,
#: 512 px. Its prompt-free path (:class:`~medfm.segment.adapted_predictor.SemanticPredictor`)
#: reproduces the test script's resizing itself; this config serves the prompted predictor.
SAMED_PREPROCESS = PreprocessConfig(
    image_size=512,
    resize="stretch",
    interpolation="skimage-cubic-aa",
    normalization="mean-std",
    pixel_mean=(0.0, 0.0, 0.0),
    pixel_std=(255.0, 255.0, 255.0),
    box_rounding="none",
    upsampling="pad-resize-crop-resize",
)

#: SAMed's Synapse labels (``test.py``'s ``class_to_name``), 0 being background.
SYNAPSE_CLASSES = ("background", "spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "pancreas")


@dataclass(frozen=True)
class SemanticSettings:
    """What a prompt-free multi-class checkpoint needs beyond its `PreprocessConfig`; a model with
    these gets `medfm.segment.adapted_predictor.SemanticPredictor` and its ``predict_classes()``.

    ``input_size``: the resolution it was trained at (SAMed: 224 x 224 slices, zoomed to 512);
    every slice passes through it first, as in SAMed's test script. ``ct_window``: the default
    intensity mapping for CT.
    """

    class_names: tuple[str, ...]
    input_size: int | None
    ct_window: IntensityPreset

    def to_dict(self) -> dict:
        """JSON-ready form for a model's ``config.json``."""
        return {"class_names": list(self.class_names), "input_size": self.input_size,
                "ct_window": dataclasses.asdict(self.ct_window)}

    @classmethod
    def from_dict(cls, values: dict) -> SemanticSettings:
        """Inverse of `to_dict`."""
        return cls(tuple(values["class_names"]), values["input_size"], IntensityPreset(**values["ct_window"]))


#: SAMed's Synapse model: training slices of 224 px, CT clipped to [-125, 275] HU.
SAMED_SEMANTIC = SemanticSettings(SYNAPSE_CLASSES, 224, IntensityPreset("window", level=75.0, width=400.0))


def build_adapted(arch: str, **overrides: Any) -> SamCore:
    """Build an adapted architecture with random weights; ``overrides`` as in :func:`build_sam`."""
    return build_registered(ADAPTED_CONFIGS, "adapted SAM architecture", arch, **overrides)


def build_any(arch: str, **overrides: Any) -> SamCore:
    """:func:`build_adapted` for an adapted architecture, else :func:`build_sam`."""
    return build_adapted(arch, **overrides) if arch in ADAPTED_CONFIGS else build_sam(arch, **overrides)


# ---------------------------------------------------------------------------------------------
# Reading the architecture off the weights
# ---------------------------------------------------------------------------------------------

_ENC = "image_encoder."


def _count(keys: Any, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _dim(state: Mapping[str, Tensor], key: str, axis: int, default: int) -> int:
    return int(state[key].shape[axis]) if key in state else default


def infer_vit(state: Mapping[str, Tensor], base: ViTConfig, source: str | PathLike[str]) -> tuple[dict[str, Any], int]:
    """ViT fields (SamCore key layout) and the ``pos_embed`` grid, read off the weights.

    Heads come from the relative-position tables (their width is the head size), the window
    from the windowed blocks' tables (2w - 1 long), the global blocks from the tables that span
    the whole ``pos_embed`` grid (2g - 1 long).
    """
    proj = state.get(_ENC + "patch_embed.projection.weight")
    pos = state.get(_ENC + "pos_embed")
    depth = _count(state, _ENC + "layers.")
    if proj is None or pos is None or depth == 0:
        raise CheckpointError(source, "has no SAM ViT image encoder (image_encoder.patch_embed.proj.weight, "
                              "image_encoder.pos_embed, image_encoder.blocks.N.*)")
    embed_dim, patch, grid = int(proj.shape[0]), int(proj.shape[-1]), int(pos.shape[1])
    tables = [state.get(f"{_ENC}layers.{i}.attn.rel_pos_h") for i in range(depth)]
    if any(t is None for t in tables):
        missing = [f"image_encoder.blocks.{i}.attn.rel_pos_h" for i, t in enumerate(tables) if t is None]
        raise CheckpointError(source, f"has no relative-position table for {', '.join(missing[:3])}")
    head_dim = int(tables[0].shape[1])
    if head_dim == 0 or embed_dim % head_dim:
        raise CheckpointError(source, f"relative-position width {head_dim} does not divide the embedding width {embed_dim}")
    lengths = [int(t.shape[0]) for t in tables]
    windowed = sorted({n for n in lengths if n != 2 * grid - 1})
    if len(windowed) > 1:
        raise CheckpointError(source, f"has windowed blocks of different sizes (relative-position lengths {windowed})")
    if windowed:
        window = (windowed[0] + 1) // 2
        global_blocks = tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1)
    else:  # the window spans the whole grid: the tables cannot tell global blocks apart
        window, global_blocks = base.window_size, base.global_attn_indexes
    mlp = _dim(state, f"{_ENC}layers.0.mlp.lin1.weight", 0, int(embed_dim * base.mlp_ratio))
    fields = dict(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim, global_attn_indexes=global_blocks,
        patch_size=patch, window_size=window, mlp_ratio=mlp / embed_dim,
    )
    return fields, grid


def infer_heads(state: Mapping[str, Tensor], base: SamCoreConfig) -> dict[str, int]:
    """Prompt-encoder and mask-decoder widths and the number of masks, read off the weights."""
    pe = "prompt_encoder.shared_embedding.positional_embedding"
    return dict(
        prompt_embed_dim=2 * _dim(state, pe, 1, base.prompt_embed_dim // 2),
        mask_in_chans=_dim(state, "prompt_encoder.mask_embed.conv2.weight", 0, base.mask_in_chans),
        decoder_depth=_count(state, "mask_decoder.transformer.layers.") or base.decoder_depth,
        decoder_mlp_dim=_dim(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 0, base.decoder_mlp_dim),
        iou_head_hidden_dim=_dim(state, "mask_decoder.iou_prediction_head.proj_in.weight", 0, base.iou_head_hidden_dim),
        num_multimask_outputs=_dim(state, "mask_decoder.mask_tokens.weight", 0, base.num_multimask_outputs + 1) - 1,
    )


def _adapter_ratio(state: Mapping[str, Tensor], key: str, embed_dim: int, default: float) -> float:
    return state[key].shape[0] / embed_dim if key in state else default


def _apply_overrides(config: SamCoreConfig, overrides: dict[str, Any]) -> SamCoreConfig:
    try:
        return with_overrides(config, **overrides)
    except TypeError as error:
        raise CheckpointError("overrides", f"not an architecture field: {error}") from error


def _to_medfm(raw: dict[str, Tensor], source: str | PathLike[str]) -> dict[str, Tensor]:
    layout = detect_layout(raw, source)
    if layout in ("segment-anything", "medfm"):
        return convert_segment_anything_to_medfm(raw) if layout == "segment-anything" else dict(raw)
    if layout == "hf-sam":
        return convert_hf_sam_to_medfm(raw)
    raise CheckpointError(source, f"holds a {layout} checkpoint, not a SAM ViT one")


def _file_name(key: str) -> str:
    """A SamCore key as segment-anything (and so SAM-Med2D, MSA, SAMed) names it."""
    return next(iter(convert_medfm_to_segment_anything({key: torch.empty(0)})))


def _first(keys: list[str], n: int = 5) -> str:
    more = f", ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strictly(model: SamCore, state: dict[str, Tensor], source_of: Any, what: str) -> SamCore:
    """Load ``state`` into ``model``; any missing, unexpected or misshapen key is a CheckpointError
    naming the file it belongs to (``source_of(key)``) and the key as that file names it."""
    expected = model.state_dict()
    problems: dict[str, list[str]] = {}

    def note(key: str, text: str) -> None:
        problems.setdefault(str(source_of(key)), []).append(text)

    for key in expected:
        if key not in state:
            note(key, f"missing {_file_name(key)}")
    for key, value in state.items():
        if key not in expected:
            note(key, f"unexpected {_file_name(key)}")
        elif value.shape != expected[key].shape:
            note(key, f"{_file_name(key)} is {tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}")
    if problems:
        source, texts = next(iter(problems.items()))
        raise CheckpointError(source, f"does not fit {what}: {_first(texts)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# SAM-Med2D and MSA: one file
# ---------------------------------------------------------------------------------------------

SAMED_LORA_HINT = "load it with medfm.load('samed', weights=<SAM ViT-B>, lora=<this file>)"
_ADAPTER_KEYS = {
    "sam_med2d_vit_b": ("Adapter.channel.0.weight", "SAM-Med2D", "image_encoder.blocks.N.Adapter.*"),
    "msa_vit_b": (
        "MLP_Adapter.D_fc1.weight", "Medical SAM Adapter", "image_encoder.blocks.N.MLP_Adapter/Space_Adapter/Depth_Adapter.*"
    ),
}


def detect_adapted_layout(state: Mapping[str, Tensor]) -> str | None:
    """``"sam_med2d_vit_b"``, ``"msa_vit_b"``, ``"samed_lora"`` for those files, else None."""
    if any(re.fullmatch(r"w_[ab]_\d{3}", k) for k in state):
        return "samed_lora"
    for arch, (suffix, _, _) in _ADAPTER_KEYS.items():
        if any(k.startswith("image_encoder.blocks.") and k.endswith(suffix) for k in state):
            return arch
    return None


def load_adapted_checkpoint(path: str | PathLike[str], arch: str, **overrides: Any) -> SamCore:
    """A SAM-Med2D or MSA checkpoint in its published layout -> SamCore (eval mode).

    The architecture is read off the weights; ``overrides`` (e.g. ``image_size=256`` for an MSA
    model trained at 256 px) replace fields of the result.
    """
    suffix, name, pattern = _ADAPTER_KEYS[arch]
    raw = load_state_dict_file(path)
    if detect_adapted_layout(raw) == "samed_lora":
        raise CheckpointError(path, f"is SAMed's LoRA file; {SAMED_LORA_HINT}")
    if not any(k.endswith(suffix) for k in raw):
        raise CheckpointError(
            path, f"holds no {name} adapter weights ({pattern}); a plain SAM checkpoint loads as 'sam-vit-b' or 'medsam'"
        )
    state = _to_medfm(raw, path)
    base = ADAPTED_CONFIGS[arch]
    vit, grid = infer_vit(state, base.encoder, path)
    if arch == "sam_med2d_vit_b":
        ratio = _adapter_ratio(state, f"{_ENC}layers.0.Adapter.channel.0.weight", vit["embed_dim"], 0.25)
        encoder = SamMed2DViTConfig(**vit, adapter_ratio=ratio)
        image_size = grid * vit["patch_size"]  # SAM-Med2D trains pos_embed at its own input size
    else:
        ratio = _adapter_ratio(state, f"{_ENC}layers.0.MLP_Adapter.D_fc1.weight", vit["embed_dim"], 0.25)
        encoder = MSAViTConfig(**vit, adapter_ratio=ratio, pretrain_grid=grid)
        image_size = base.image_size  # MSA keeps SAM's 64x64 pos_embed whatever the input size
    config = dataclasses.replace(base, encoder=encoder, image_size=image_size, **infer_heads(state, base))
    model = SamCore(_apply_overrides(config, overrides))
    return load_strictly(model, state, lambda key: path, f"the {name} architecture read off its weights")


def encode_volume_chunk(network: SamCore, pixel_values: Tensor) -> Tensor:
    """MSA's 3D path: D normalised slices (D, 3, S, S) of one chunk -> embeddings (D, C, E, E),
    with every block's Depth adapter attending across the D slices. 2D images use ``encode``."""
    if not isinstance(network.config.encoder, MSAViTConfig):
        raise ValueError("only Medical SAM Adapter (msa) networks have a depth adapter")
    size = network.config.image_size
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
        raise ValueError(f"expected a chunk of shape (D, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
    return network.image_encoder(pixel_values, depth=pixel_values.shape[0])


# ---------------------------------------------------------------------------------------------
# SAMed: base SAM + LoRA file
# ---------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"w_([ab])_(\d{3})")


def _resize_table(table: Tensor, length: int) -> Tensor:
    """SAMed's ``load_from``: bilinear (align_corners=False) along the table's length only."""
    return F.interpolate(table[None, None], (length, table.shape[1]), mode="bilinear", align_corners=False)[0, 0]


def _samed_encoder(state: dict[str, Tensor], vit: dict[str, Any], grid: int, target_grid: int) -> dict[str, Tensor]:
    """The base image encoder at SAMed's input size: ``pos_embed`` and the global blocks'
    relative-position tables bilinearly resized, as SAMed's ``load_from`` does."""
    encoder = {k: v for k, v in state.items() if k.startswith(_ENC)}
    if grid == target_grid:
        return encoder
    pos = encoder[_ENC + "pos_embed"].permute(0, 3, 1, 2)
    pos = F.interpolate(pos, (target_grid, target_grid), mode="bilinear", align_corners=False)
    encoder[_ENC + "pos_embed"] = pos.permute(0, 2, 3, 1)
    for i in vit["global_attn_indexes"]:
        for axis in ("h", "w"):
            key = f"{_ENC}layers.{i}.attn.rel_pos_{axis}"
            encoder[key] = _resize_table(encoder[key], 2 * target_grid - 1)
    return encoder


def _samed_lora(lora: dict[str, Tensor], depth: int, embed_dim: int, rank: int, path: str | PathLike[str]) -> dict[str, Tensor]:
    """SAMed's ``w_a_NNN``/``w_b_NNN`` -> SamCore's ``layers.N.attn.qkv.w_{a,b}_{q,v}``, checked."""
    found: dict[str, dict[int, Tensor]] = {"a": {}, "b": {}}
    for key, value in lora.items():
        if m := _LORA_KEY.fullmatch(key):
            found[m.group(1)][int(m.group(2))] = value
    for kind, tensors in found.items():
        if sorted(tensors) != list(range(len(tensors))):
            raise CheckpointError(path, f"w_{kind}_NNN tensors are not numbered 000..{len(tensors) - 1:03d}")
    if len(found["a"]) != len(found["b"]):
        raise CheckpointError(path, f"holds {len(found['a'])} w_a but {len(found['b'])} w_b tensors")
    if len(found["a"]) != 2 * depth:
        raise CheckpointError(
            path, f"holds LoRA for {len(found['a']) / 2:g} blocks ({len(found['a'])} w_a tensors, q and v per block), "
            f"but the base image encoder has {depth} blocks"
        )
    ranks = {tuple(t.shape) for t in found["a"].values()} | {tuple(t.shape)[::-1] for t in found["b"].values()}
    if len(ranks) != 1:
        raise CheckpointError(path, f"LoRA tensors disagree on their shapes: w_a {sorted(ranks)}")
    file_rank, width = next(iter(ranks))
    if width != embed_dim:
        raise CheckpointError(path, f"LoRA width {width} does not match the base image encoder's {embed_dim}")
    if file_rank != rank:
        raise CheckpointError(
            path, f"holds LoRA of rank {file_rank}, but this model has rank {rank} "
            f"(pass lora_rank={file_rank} if the file is right)",
        )
    out = {}
    for block in range(depth):
        for offset, proj in enumerate(("q", "v")):
            prefix = f"{_ENC}layers.{block}.attn.qkv."
            out[prefix + f"w_a_{proj}"] = found["a"][2 * block + offset]
            out[prefix + f"w_b_{proj}"] = found["b"][2 * block + offset]
    return out


def load_samed(
    weights: str | PathLike[str], lora: str | PathLike[str], *, lora_rank: int | None = None, **overrides: Any
) -> SamCore:
    """SAMed: SAM ViT-B's image encoder (``weights``, e.g. Meta's ``sam_vit_b_01ec64.pth``) with
    the LoRA, prompt encoder and mask decoder of SAMed's LoRA file (``lora``), at 512 px.

    ``lora_rank`` defaults to the registry's (4, as published); a file of another rank or of
    LoRA for another number of blocks is a CheckpointError naming it.
    """
    base_raw = load_state_dict_file(weights)
    if detect_adapted_layout(base_raw) == "samed_lora":
        raise CheckpointError(weights, "is SAMed's LoRA file: pass it as lora=, and SAM ViT-B (sam_vit_b_01ec64.pth) as weights=")
    lora_raw = load_state_dict_file(lora)
    if detect_adapted_layout(lora_raw) != "samed_lora":
        raise CheckpointError(
            lora, "is not a SAMed LoRA file (no w_a_000 / w_b_000 tensors); weights= takes the base SAM, lora= the LoRA file"
        )
    base_state = _to_medfm(base_raw, weights)
    default = ADAPTED_CONFIGS["samed_vit_b"]
    vit, grid = infer_vit(base_state, default.encoder, weights)
    rank = lora_rank if lora_rank is not None else default.encoder.lora_rank

    heads_raw = {k: v for k, v in lora_raw.items() if not _LORA_KEY.fullmatch(k)}
    heads = convert_segment_anything_to_medfm(heads_raw)
    config = dataclasses.replace(
        default, encoder=LoRAViTConfig(**vit, lora_rank=rank), **infer_heads(heads, default)
    )
    config = _apply_overrides(config, overrides)
    target_grid = config.image_size // config.encoder.patch_size
    state = {
        **_samed_encoder(base_state, vit, grid, target_grid),
        **_samed_lora(lora_raw, vit["depth"], vit["embed_dim"], rank, lora),
        **heads,
    }
    model = SamCore(config)
    from_lora = lambda key: lora if not key.startswith(_ENC) or ".qkv.w_" in key else weights  # noqa: E731
    return load_strictly(model, state, from_lora, "SAMed (SAM ViT image encoder + LoRA file)")


def decode_all_masks(network: SamCore, image_embedding: Tensor) -> Tensor:
    """Prompt-free logits of every mask token (1, num_multimask_outputs + 1, 4E, 4E).

    SAMed trains token 0 as background and tokens 1..C as its classes; segment-anything (and
    transformers) return either token 0 or tokens 1.., so both are asked for and joined.
    """
    single, _ = network.decode(image_embedding, multimask=False)
    rest, _ = network.decode(image_embedding, multimask=True)
    return torch.cat([single, rest], dim=1)
