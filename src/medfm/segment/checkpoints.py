"""Read SAM-family checkpoints as their authors ship them and turn them into a :class:`SamCore`.

Key layouts medfm reads:

- ``segment-anything``: Meta's ``sam_vit_{b,l,h}_*.pth`` and its fine-tunes (MedSAM, ...):
  ``image_encoder.blocks.*``, ``prompt_encoder.pe_layer.*``, ``mask_decoder.output_upscaling.*``;
- ``litemedsam``: the same prompt encoder / mask decoder keys with a TinyViT ``image_encoder``;
- ``hf-sam``: transformers' ``SamModel`` (``vision_encoder.*``, ``shared_image_embedding.*``);
- ``medfm``: :class:`SamCore`'s own names (what medfm saves).

SamCore's names are transformers' for the ViT encoder, the prompt encoder and the mask decoder, and
LiteMedSAM's for TinyViT, so only segment-anything's ViT / prompt / decoder keys need renaming.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers.initialization import no_init_weights

from medfm.errors import CheckpointError
from medfm.safe_load import read_tensors
from medfm.segment.sam import SAM_CONFIGS, SamCore, TinyViTConfig, ViTConfig, build_sam

# (segment-anything prefix, medfm prefix); "#" stands for a block index. First match wins.
_VIT_RULES = [
    ("image_encoder.patch_embed.proj.", "image_encoder.patch_embed.projection."),
    ("image_encoder.blocks.#.norm1.", "image_encoder.layers.#.layer_norm1."),
    ("image_encoder.blocks.#.norm2.", "image_encoder.layers.#.layer_norm2."),
    ("image_encoder.blocks.#.", "image_encoder.layers.#."),
    ("image_encoder.neck.0.", "image_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "image_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "image_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "image_encoder.neck.layer_norm2."),
]
_PROMPT_DECODER_RULES = [
    (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    ("prompt_encoder.point_embeddings.#.", "prompt_encoder.point_embed.#."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    *[
        (f"mask_decoder.transformer.layers.#.norm{i}.", f"mask_decoder.transformer.layers.#.layer_norm{i}.")
        for i in (1, 2, 3, 4)
    ],
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    # segment-anything's 3-layer MLP (layers.0-2) is transformers' proj_in / layers.0 / proj_out.
    *[
        (f"mask_decoder.{mlp}.layers.{src}.", f"mask_decoder.{mlp}.{dst}.")
        for mlp in ("output_hypernetworks_mlps.#", "iou_prediction_head")
        for src, dst in (("0", "proj_in"), ("1", "layers.0"), ("2", "proj_out"))
    ],
]

_PE_KEY = "prompt_encoder.shared_embedding.positional_embedding"
_HF_PE_KEY = "shared_image_embedding.positional_embedding"


def _compile(src: str, dst: str) -> tuple[re.Pattern[str], str]:
    return re.compile(r"(\d+)".join(re.escape(part) for part in src.split("#"))), dst


_TO_MEDFM = [_compile(s, d) for s, d in _VIT_RULES + _PROMPT_DECODER_RULES]
_TO_META = [_compile(d, s) for s, d in _VIT_RULES + _PROMPT_DECODER_RULES]
_TO_MEDFM_TINYVIT = [_compile(s, d) for s, d in _PROMPT_DECODER_RULES]
_TO_META_TINYVIT = [_compile(d, s) for s, d in _PROMPT_DECODER_RULES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in rules:
        match = pattern.match(key)
        if match:
            new_prefix = template.replace("#", match.group(1)) if match.groups() else template
            return new_prefix + key[match.end() :]
    return key


def _is_tinyvit(keys: Iterable[str]) -> bool:
    return any(k.startswith("image_encoder.patch_embed.seq.") for k in keys)


def convert_segment_anything_to_medfm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename segment-anything (or LiteMedSAM) keys to SamCore's; TinyViT keys stay as they are."""
    rules = _TO_MEDFM_TINYVIT if _is_tinyvit(state_dict) else _TO_MEDFM
    return {_rename(k, rules): v for k, v in state_dict.items()}


def convert_medfm_to_segment_anything(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename SamCore's keys to segment-anything's (LiteMedSAM's for a TinyViT encoder)."""
    rules = _TO_META_TINYVIT if _is_tinyvit(state_dict) else _TO_META
    return {_rename(k, rules): v for k, v in state_dict.items()}


def convert_hf_sam_to_medfm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename transformers' ``SamModel`` keys to SamCore's.

    SamModel holds the positional-encoding matrix twice (tied); SamCore holds it once.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("vision_encoder."):
            out["image_encoder." + key.removeprefix("vision_encoder.")] = value
        elif key == _HF_PE_KEY:
            out.setdefault(_PE_KEY, value)
        else:
            out[key] = value  # the prompt encoder's own copy wins over the tied one
    return out


def detect_layout(state_dict: Mapping[str, Tensor], source: str | PathLike[str] = "state dict") -> str:
    """Name the key layout: "segment-anything", "litemedsam", "hf-sam" or "medfm".

    Raises CheckpointError (naming ``source``) for a state dict that is none of them.
    """
    keys = set(state_dict)
    if any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in keys):
        return "hf-sam"
    meta_heads = any(k.startswith(("prompt_encoder.pe_layer.", "mask_decoder.output_upscaling.")) for k in keys)
    medfm_heads = any(k.startswith(("prompt_encoder.shared_embedding.", "mask_decoder.upscale_conv1.")) for k in keys)
    meta_vit = "image_encoder.patch_embed.proj.weight" in keys
    medfm_vit = "image_encoder.patch_embed.projection.weight" in keys
    tinyvit = _is_tinyvit(keys)
    if medfm_heads or medfm_vit:
        return "medfm"
    if tinyvit:
        return "litemedsam"
    if meta_heads or meta_vit:
        return "segment-anything"
    raise CheckpointError(
        source, f"is not a SAM checkpoint in a layout medfm knows (first keys: {_first(sorted(keys))})"
    )


_TO_MEDFM_CONVERTERS: dict[str, Callable[[Mapping[str, Tensor]], dict[str, Tensor]]] = {
    "segment-anything": convert_segment_anything_to_medfm,
    "litemedsam": convert_segment_anything_to_medfm,
    "hf-sam": convert_hf_sam_to_medfm,
    "medfm": dict,
}


def infer_arch(state_dict: Mapping[str, Tensor], source: str | PathLike[str] = "state dict") -> str:
    """Name the registered architecture of a SamCore-layout state dict from its encoder's shapes.

    ViTs are told apart by embedding width and depth, TinyViTs by stage widths and depths.
    """
    if "image_encoder.patch_embed.projection.weight" in state_dict:
        width = state_dict["image_encoder.patch_embed.projection.weight"].shape[0]
        depth = _count_indices(state_dict, "image_encoder.layers.")
        for arch, config in SAM_CONFIGS.items():
            enc = config.encoder
            if isinstance(enc, ViTConfig) and (enc.embed_dim, enc.depth) == (width, depth):
                return arch
        found = f"a ViT encoder of width {width} and depth {depth}"
    elif _is_tinyvit(state_dict):
        stages = _count_indices(state_dict, "image_encoder.layers.")
        depths = tuple(_count_indices(state_dict, f"image_encoder.layers.{i}.blocks.") for i in range(stages))
        width_keys = [_tinyvit_width_key(i) for i in range(stages)]
        if any(k not in state_dict for k in width_keys):
            raise CheckpointError(source, f"has an incomplete TinyViT encoder (one of {_first(width_keys)} is missing)")
        widths = tuple(state_dict[k].shape[1] for k in width_keys)
        for arch, config in SAM_CONFIGS.items():
            enc = config.encoder
            if isinstance(enc, TinyViTConfig) and (enc.embed_dims, enc.depths) == (widths, depths):
                return arch
        found = f"a TinyViT encoder of widths {widths} and depths {depths}"
    else:
        raise CheckpointError(source, "has no image encoder weights medfm recognises")
    raise CheckpointError(source, f"holds {found}, which is no registered SAM architecture; pass arch= and overrides")


def _tinyvit_width_key(stage: int) -> str:
    prefix = f"image_encoder.layers.{stage}.blocks.0."
    return prefix + ("conv1.c.weight" if stage == 0 else "attn.qkv.weight")


def _count_indices(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def load_state_dict_file(path: str | PathLike[str]) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or PyTorch (``.pth``/``.pt``/...) checkpoint as a flat state dict.

    PyTorch files go through `medfm.safe_load.read_torch_file` (``weights_only=True``, TorchScript
    refused, training objects such as SAM-Med2D's pickled optimizer stood in for, so no pickled
    code runs). ``{'model': ...}`` and ``{'state_dict': ...}`` wrappers and DataParallel's
    ``module.`` prefix are removed.
    """
    path = Path(path)
    obj, stood_in = read_tensors(path)
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("model", "state_dict") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if stood_in and not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CheckpointError(path, f"holds pickled objects that weights_only=True refuses ({_first(stood_in)}) "
                              "and no state dict of tensors beside them; medfm does not run pickled code")
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(path, f"is not a state dict of tensors (entries {_first([str(k) for k in bad])})")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return dict(obj)


def load_sam_checkpoint(path: str | PathLike[str], arch: str | None = None, **overrides: Any) -> SamCore:
    """Build the SamCore a checkpoint file describes and load its weights strictly (eval mode).

    ``arch`` (a key of ``SAM_CONFIGS``) is inferred from the weights when not given; ``overrides``
    go to :func:`build_sam`. Missing, unexpected or misshapen keys raise CheckpointError naming
    the file and the first offending keys in the file's own layout.
    """
    raw = load_state_dict_file(path)
    layout = detect_layout(raw, path)
    state_dict = _TO_MEDFM_CONVERTERS[layout](raw)
    arch = arch or infer_arch(state_dict, path)
    with no_init_weights():  # every weight is loaded strictly below: random init is wasted (~0.3 s)
        model = build_sam(arch, **overrides)

    expected = model.state_dict()
    to_file = _file_key_namer(layout, state_dict)
    missing = [to_file(k) for k in expected if k not in state_dict]
    unexpected = [to_file(k) for k in state_dict if k not in expected]
    misshapen = [
        f"{to_file(k)} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"{len(keys)} {what} ({_first(keys)})"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys of the wrong shape (file vs model)", misshapen),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(path, f"does not fit architecture {arch!r} ({layout} layout): " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _file_key_namer(layout: str, state_dict: Mapping[str, Tensor]) -> Callable[[str], str]:
    """Map a SamCore key back to the name it has in a file of ``layout``, for error messages."""
    if layout in ("segment-anything", "litemedsam"):
        rules = _TO_META_TINYVIT if _is_tinyvit(state_dict) else _TO_META
        return lambda key: _rename(key, rules)
    if layout == "hf-sam":
        return lambda key: re.sub(r"^image_encoder\.", "vision_encoder.", key)
    return lambda key: key


def _first(keys: list[str], n: int = 5) -> str:
    more = f", ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
