"""Published contrastive checkpoints in their original layouts, mapped onto transformers' classes.

* BiomedCLIP (open_clip ``hf-hub:`` folder): ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``
  (or ``open_clip_model.safetensors``) + the tokenizer files. The image tower is timm's ViT
  (``visual.trunk.*``, class-token pooling after the final norm) with a linear ``visual.head.proj``;
  the text tower is a Hugging Face BERT (``text.transformer.*``, PubMedBERT) read at the class
  token, with an MLP ``text.proj``; context 256, 224 px, CLIP's mean/std. open_clip (and its
  torchvision dependency) is not needed: timm's ViT becomes transformers' ``ViTModel``.
* CheXzero: an OpenAI CLIP ViT state dict (``visual.conv1.weight``, ``visual.transformer.resblocks.N.*``,
  ``token_embedding``, ``ln_final``, ``text_projection``, ``logit_scale``) becomes
  ``CLIPVisionModel`` + ``CLIPTextModel`` + projections; 320 px, longest side + centred padding,
  CheXzero's own mean/std, OpenAI CLIP's BPE tokenizer (context 77).

Architecture sizes are read from the weights (widths, depths, patch and image size); the head
counts, which weights cannot tell, follow the 64-channel heads of both families.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from medfm.clip.model import DualEncoder, load_tokenizer, load_weights
from medfm.clip.preprocess import (
    CHEXZERO_PREPROCESS,
    CLIP_MEAN,
    CLIP_STD,
    ImagePreprocess,
)
from medfm.errors import CheckpointError
from medfm.hub import hub_snapshot
from medfm.safe_load import read_tensors

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: open_clip's text poolers medfm maps onto `HFTextBackbone` poolings.
OPEN_CLIP_POOLERS = {"cls_last_hidden_state_pooler": "cls", "mean_pooler": "mean"}
HEAD_WIDTH = 64


def hub_folder(repo_id: str, patterns: tuple[str, ...] = (OPEN_CLIP_CONFIG, *OPEN_CLIP_WEIGHTS, "*.json", "*.txt")) -> Path:
    """A Hugging Face hub folder, by default an open_clip one (see `medfm.hub.hub_snapshot`)."""
    return hub_snapshot(repo_id, patterns)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (`medfm.safe_load.read_tensors`:
    no pickled code runs, TorchScript is refused), unwrapping ``{'state_dict': ...}`` and
    DataParallel's ``module.`` prefixes."""
    state, _ = read_tensors(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise CheckpointError(path, "not a state dict of tensors")
    return tensors


def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# BiomedCLIP / open_clip


def load_open_clip(folder: Path) -> DualEncoder:
    """An open_clip hub folder with a timm ViT image tower and a Hugging Face BERT text tower."""
    try:
        settings = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        model_cfg = settings["model_cfg"]
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(folder / OPEN_CLIP_CONFIG, f"not a valid open_clip config ({error})") from error
    pool = OPEN_CLIP_POOLERS.get(text.get("hf_pooler_type", ""))
    if "timm_model_name" not in vision or "hf_model_name" not in text or pool is None or vision.get("timm_pool", ""):
        raise CheckpointError(folder / OPEN_CLIP_CONFIG, "medfm reads open_clip models with a timm ViT (class-token pooling) "
                              f"and a Hugging Face text tower pooled by {sorted(OPEN_CLIP_POOLERS)}, as BiomedCLIP")
    weights = next((folder / name for name in OPEN_CLIP_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(folder, f"no {' or '.join(OPEN_CLIP_WEIGHTS)} in the folder")
    state = read_state_dict(weights)
    try:
        image_state, vit = _timm_vit_to_transformers(state, "visual.trunk.")
        text_state, bert = _bert_from_state(state, "text.transformer.")
    except KeyError as error:
        raise CheckpointError(weights, f"not an open_clip timm-ViT + BERT layout (no {error})") from error
    text_projection = "mlp" if "text.proj.0.weight" in state else "linear"
    image_size = int(vision.get("image_size", vit["image_size"]))
    preprocess = settings.get("preprocess_cfg", {})
    config = {
        "name": folder.name,
        "image_backbone": {"kind": "vit", "config": vit},
        "text_backbone": {"kind": "bert", "config": bert, "pool": pool},
        "image_projection": "linear",
        "text_projection": text_projection,
        "embed_dim": int(model_cfg["embed_dim"]),
        "context_length": int(text.get("context_length", 256)),
        "tokenizer": "folder",
        "preprocess": ImagePreprocess(image_size=image_size, mean=tuple(preprocess.get("mean", CLIP_MEAN)),
                                      std=tuple(preprocess.get("std", CLIP_STD))).to_dict(),
    }
    model = DualEncoder(config, load_tokenizer(folder))
    converted = {**{f"image_backbone.model.{k}": v for k, v in image_state.items()},
                 **{f"text_backbone.model.{k}": v for k, v in text_state.items()},
                 "image_projection.weight": state["visual.head.proj.weight"], "logit_scale": state["logit_scale"]}
    converted.update({f"text_projection.{k.removeprefix('text.proj.')}": v for k, v in state.items() if k.startswith("text.proj.")})
    load_weights(model, converted, weights)
    return model


def _timm_vit_to_transformers(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """timm ViT keys -> transformers ``ViTModel`` keys, and the ``ViTConfig`` the weights imply."""
    get = lambda key: state[prefix + key]
    hidden = get("pos_embed").shape[-1]
    patch = get("patch_embed.proj.weight").shape[-1]
    depth = _count(state, re.escape(prefix) + r"blocks\.(\d+)\.")
    grid = round((get("pos_embed").shape[1] - 1) ** 0.5)
    config = {"hidden_size": hidden, "num_hidden_layers": depth, "num_attention_heads": hidden // HEAD_WIDTH,
              "intermediate_size": get("blocks.0.mlp.fc1.weight").shape[0], "image_size": grid * patch,
              "patch_size": patch, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": prefix + "blocks.0.attn.qkv.bias" in state}
    out = {"embeddings.cls_token": get("cls_token"), "embeddings.position_embeddings": get("pos_embed"),
           "embeddings.patch_embeddings.projection.weight": get("patch_embed.proj.weight"),
           "embeddings.patch_embeddings.projection.bias": get("patch_embed.proj.bias"),
           "layernorm.weight": get("norm.weight"), "layernorm.bias": get("norm.bias")}
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"layers.{i}."
        for name in ("weight", "bias"):
            for q, part in zip("qkv", get(block + f"attn.qkv.{name}").chunk(3)):
                out[layer + f"attention.{q}_proj.{name}"] = part
            for timm_name, hf_name in (("attn.proj", "attention.o_proj"), ("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                out[f"{layer}{hf_name}.{name}"] = get(f"{block}{timm_name}.{name}")
    return out, config


def _bert_from_state(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A Hugging Face BERT's own keys under ``prefix`` (pooler and position-id buffers dropped) and
    the ``BertConfig`` they imply."""
    inner = {k.removeprefix(prefix): v for k, v in state.items()
             if k.startswith(prefix) and not k.startswith(prefix + "pooler.") and not k.endswith("position_ids")}
    hidden = inner["embeddings.word_embeddings.weight"].shape[1]
    config = {"vocab_size": inner["embeddings.word_embeddings.weight"].shape[0], "hidden_size": hidden,
              "num_hidden_layers": _count(inner, r"encoder\.layer\.(\d+)\."), "num_attention_heads": hidden // HEAD_WIDTH,
              "intermediate_size": inner["encoder.layer.0.intermediate.dense.weight"].shape[0],
              "max_position_embeddings": inner["embeddings.position_embeddings.weight"].shape[0],
              "type_vocab_size": inner["embeddings.token_type_embeddings.weight"].shape[0]}
    return inner, config


# CheXzero / OpenAI CLIP


def load_chexzero(path: Path, tokenizer: str | Path | Any) -> DualEncoder:
    """CheXzero's OpenAI-CLIP ViT state dict with CheXzero's preprocessing; ``tokenizer`` is OpenAI
    CLIP's BPE tokenizer (a folder / hub id, or a loaded transformers tokenizer)."""
    state = read_state_dict(path)
    if "visual.conv1.weight" not in state or "visual.proj" not in state:
        raise CheckpointError(path, "not an OpenAI CLIP ViT state dict (no visual.conv1.weight / visual.proj); "
                              "the ResNet CLIP variants are not supported")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _clip_tokenizer(tokenizer)
    try:
        vision, text, converted = _openai_clip_to_transformers(state, tokenizer)
    except KeyError as error:
        raise CheckpointError(path, f"incomplete OpenAI CLIP state dict (no {error})") from error
    config = {
        "name": "chexzero",
        "image_backbone": {"kind": "clip-vision", "config": vision},
        "text_backbone": {"kind": "clip-text", "config": text, "pool": "eos"},
        "image_projection": "linear",
        "text_projection": "linear",
        "embed_dim": int(state["text_projection"].shape[1]),
        "context_length": text["max_position_embeddings"],
        "tokenizer": "folder",
        "preprocess": {**CHEXZERO_PREPROCESS.to_dict(), "image_size": vision["image_size"]},
    }
    model = DualEncoder(config, tokenizer)
    load_weights(model, converted, path)
    return model


def _clip_tokenizer(source: str | Path) -> Any:
    """OpenAI CLIP's tokenizer from a folder, or from a hub id (the hub cache when offline)."""
    if not Path(source).exists():
        source = hub_folder(str(source), ("*.json", "*.txt"))
    try:
        return load_tokenizer(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(source, f"not a tokenizer folder ({error}); CheXzero needs OpenAI CLIP's BPE tokenizer "
                              "(vocab.json and merges.txt)") from error


def _openai_clip_to_transformers(state: dict[str, Tensor], tokenizer: Any) -> tuple[dict, dict, dict[str, Tensor]]:
    """OpenAI CLIP keys -> ``CLIPVisionModel`` / ``CLIPTextModel`` keys (under the DualEncoder's
    backbones), the two configs, and the projections."""
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    vision = {"hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": width // HEAD_WIDTH,
              "num_hidden_layers": _count(state, r"visual\.transformer\.resblocks\.(\d+)\."), "image_size": grid * patch,
              "patch_size": patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    text = {"vocab_size": state["token_embedding.weight"].shape[0], "hidden_size": text_width,
            "intermediate_size": 4 * text_width, "num_attention_heads": text_width // HEAD_WIDTH,
            "num_hidden_layers": _count(state, r"transformer\.resblocks\.(\d+)\."),
            "max_position_embeddings": state["positional_embedding"].shape[0], "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    out = {"image_backbone.model.embeddings.class_embedding": state["visual.class_embedding"],
           "image_backbone.model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           "image_backbone.model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "text_backbone.model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_backbone.model.embeddings.position_embedding.weight": state["positional_embedding"],
           "image_projection.weight": state["visual.proj"].T, "text_projection.weight": state["text_projection"].T,
           "logit_scale": state["logit_scale"]}
    for original, hf in (("visual.ln_pre", "image_backbone.model.pre_layrnorm"),
                         ("visual.ln_post", "image_backbone.model.post_layernorm"),
                         ("ln_final", "text_backbone.model.final_layer_norm")):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = state[f"{original}.weight"], state[f"{original}.bias"]
    for source, target, depth in (("visual.transformer", "image_backbone.model.encoder", vision["num_hidden_layers"]),
                                  ("transformer", "text_backbone.model.encoder", text["num_hidden_layers"])):
        for i in range(depth):
            block, layer = f"{source}.resblocks.{i}.", f"{target}.layers.{i}."
            for name in ("weight", "bias"):
                for q, part in zip("qkv", state[f"{block}attn.in_proj_{name}"].chunk(3)):
                    out[f"{layer}self_attn.{q}_proj.{name}"] = part
                for original, hf in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{layer}{hf}.{name}"] = state[f"{block}{original}.{name}"]
    return vision, text, out
