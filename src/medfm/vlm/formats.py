"""Published vision-language layouts, loaded from the files their authors ship:

* **LLaVA-Med v1.5** (and LLaVA v1 / v1.5): a folder with LLaVA's ``config.json``
  (``mm_projector_type``, ``mm_vision_tower``, ``mm_vision_select_layer``), the LM's weights with
  ``model.mm_projector.*`` beside them and the tokenizer; the CLIP tower comes from the folder
  (``model.vision_tower.vision_tower.*``) or from ``mm_vision_tower`` (a hub id, or ``vision_tower=``
  a local CLIP folder). Prompted ``[INST] <image>\\n... [/INST]`` (``mistral_instruct``).
* **transformers' llava folder** (``model_type: llava``, ``vision_config`` + ``text_config``), in
  both the transformers 4 and 5 key layouts. Prompted ``USER: <image>\\n... ASSISTANT:``.

Weights are read with safetensors or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medfm.clip.preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess
from medfm.errors import CheckpointError
from medfm.safe_load import load_strict
from medfm.vlm.connectors import build_connector
from medfm.vlm.encoders import build_encoder
from medfm.vlm.model import LLAVA, LLAVA_MED, VisionLanguageModel

#: LLaVA's model types and the transformers LM each wraps
LLAVA_LM_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama", "llava_mpt": "mpt"}
#: LLaVA's projector names (``mm_projector_type``) and medfm's connector specs
LLAVA_PROJECTORS = {"linear": {"kind": "linear"}, "mlp2x_gelu": {"kind": "mlp", "depth": 2}}


def read_folder_state(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a model folder: its ``*.safetensors`` files, else its ``pytorch_model*.bin``
    (``weights_only``); sharded checkpoints are merged."""
    from medfm.segment.checkpoints import load_state_dict_file

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(folder, "holds no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_state_dict_file(file))
    return state


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(folder / "config.json", f"cannot read the model config ({error})") from error


def is_llava_folder(folder: Path) -> bool:
    """True for a folder in LLaVA's own layout or transformers' llava layout."""
    if not (folder / "config.json").is_file():
        return False
    config = _read_config(folder)
    return "mm_vision_tower" in config or config.get("model_type") == "llava"


def load_llava_folder(folder: str | PathLike[str], *, vision_tower: str | PathLike[str] | None = None,
                      dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """A LLaVA-Med v1.5 / LLaVA folder, or a transformers llava folder (see the module docstring)."""
    folder = Path(folder)
    config = _read_config(folder)
    if "mm_vision_tower" in config:
        return _load_original_llava(folder, config, vision_tower, dtype)
    if config.get("model_type") == "llava":
        return _load_transformers_llava(folder, config, dtype)
    raise CheckpointError(folder, "is neither a LLaVA folder (mm_vision_tower in config.json) nor a transformers llava folder")


def _language_model(config: dict[str, Any], state: dict[str, Tensor], source: Path, dtype: torch.dtype | None) -> nn.Module:
    """A transformers causal LM built from ``config`` and loaded strictly from ``state``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    lm_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(lm_config, dtype=dtype or torch.float32)
    if getattr(lm_config, "tie_word_embeddings", False):  # a tied output layer may be saved once, under either name
        embedding = model.get_input_embeddings().weight
        tied = [name for name, value in model.named_parameters(remove_duplicate=False) if value is embedding]
        saved = next((name for name in tied if name in state), None)
        if saved is not None:
            state = {**state, **{name: state[saved] for name in tied}}
    _load_strict(model, state, source, "language model")
    return model.eval()


def _load_strict(module: nn.Module, state: dict[str, Tensor], source: Path, part: str) -> None:
    """`load_strict` of one part; rotary inverse frequencies are computed, not stored."""
    load_strict(module, state, source, part, may_miss=lambda key: key.endswith("rotary_emb.inv_freq"))


def _split(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix``, without it (removed from ``state``)."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state.pop(k) for k in keys}


def _clip_vision_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CLIP vision tower's tensors as transformers 5's ``CLIPVisionModel`` names them (published
    files, and transformers 4, put them under ``vision_model.``)."""
    return {k.removeprefix("vision_model."): v for k, v in state.items()}


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise CheckpointError(folder, f"holds no tokenizer transformers can read ({error})") from error


def _clip_tower_folder(name: str, vision_tower: str | PathLike[str] | None) -> Path:
    """The CLIP folder of LLaVA's ``mm_vision_tower``: ``vision_tower`` when given, else the hub."""
    from medfm.hub import hub_snapshot

    if vision_tower is not None:
        return Path(vision_tower)
    if Path(name).is_dir():
        return Path(name)
    return hub_snapshot(name, ("config.json", "*.safetensors", "preprocessor_config.json"))


def _load_original_llava(folder: Path, config: dict[str, Any], vision_tower: str | PathLike[str] | None,
                         dtype: torch.dtype | None) -> VisionLanguageModel:
    projector = config.get("mm_projector_type", "linear")
    if projector not in LLAVA_PROJECTORS or config.get("model_type") not in LLAVA_LM_TYPES:
        raise CheckpointError(folder, f"LLaVA model type {config.get('model_type')!r} with projector {projector!r} "
                              f"is not supported (projectors: {', '.join(LLAVA_PROJECTORS)})")
    if config.get("mm_use_im_start_end"):
        raise CheckpointError(folder, "wraps the image in <im_start>/<im_end> tokens (LLaVA v0), which medfm does not support")
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError(folder, "selects CLIP features other than 'patch', which medfm does not support")
    state = read_folder_state(folder)
    projector_state = _split(state, "model.mm_projector.")
    tower_state = _split(state, "model.vision_tower.vision_tower.")
    if not tower_state:
        tower_folder = _clip_tower_folder(config["mm_vision_tower"], vision_tower)
        tower_config = _read_config(tower_folder)
        vision_config = tower_config.get("vision_config", tower_config)
        tower_state = _split(read_folder_state(tower_folder), "vision_model.")
    else:
        vision_config = config.get("mm_vision_config")
        if vision_config is None:
            raise CheckpointError(folder, "holds CLIP tower weights but no mm_vision_config describing them; pass vision_tower=")
    vision_config = {k: v for k, v in vision_config.items() if k not in {"model_type", "architectures", "transformers_version"}}
    encoder = build_encoder({"kind": "clip-vision", "config": vision_config,
                             "select_layer": config.get("mm_vision_select_layer", -2), "select_feature": "patch"})
    _load_strict(encoder.model, _clip_vision_keys(tower_state), folder, "CLIP vision tower")
    lm_config = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in {"architectures", "image_aspect_ratio"}}
    lm_config["model_type"] = LLAVA_LM_TYPES[config["model_type"]]
    language_model = _language_model(lm_config, state, folder, dtype)
    connector = build_connector(LLAVA_PROJECTORS[projector], encoder.out_dim, language_model.config.hidden_size)
    _load_strict(connector, projector_state, folder, "projector")
    size = vision_config.get("image_size", 224)
    resize = "longest-side-center" if config.get("image_aspect_ratio") == "pad" else "shortest-side-crop"
    preprocess = ImagePreprocess(image_size=size, resize=resize, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    prompt_format = LLAVA_MED if config["model_type"] == "llava_mistral" else LLAVA
    return _assemble(folder.name, encoder, connector, language_model, _tokenizer(folder), prompt_format, preprocess, dtype)


def _load_transformers_llava(folder: Path, config: dict[str, Any], dtype: torch.dtype | None) -> VisionLanguageModel:
    vision_config = dict(config["vision_config"])
    if vision_config.pop("model_type", "clip_vision_model") not in {"clip_vision_model", "clip"}:
        raise CheckpointError(folder, "its vision tower is not CLIP; medfm reads llava folders with a CLIP tower")
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(folder, "concatenates several vision layers, which medfm does not support")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(folder, f"projector activation {config['projector_hidden_act']!r} is not GELU")
    state = read_folder_state(folder)
    if any(k.startswith("model.multi_modal_projector.") for k in state):  # transformers >= 5
        prefixes = ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.")
    else:  # transformers 4
        prefixes = ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")
    tower, projector, lm_body, lm_head = (_split(state, p) for p in prefixes)
    if state:
        raise CheckpointError(folder, f"unexpected weights for a llava model: {', '.join(sorted(state)[:4])}")
    strategy = config.get("vision_feature_select_strategy", "default")
    encoder = build_encoder({"kind": "clip-vision", "config": {k: v for k, v in vision_config.items() if k != "architectures"},
                             "select_layer": layer, "select_feature": "patch" if strategy == "default" else "cls_patch"})
    _load_strict(encoder.model, _clip_vision_keys(tower), folder, "CLIP vision tower")
    lm_state = {f"model.{k}": v for k, v in lm_body.items()} | {f"lm_head.{k}": v for k, v in lm_head.items()}
    language_model = _language_model(dict(config["text_config"]), lm_state, folder, dtype)
    connector = build_connector({"kind": "mlp", "depth": 2}, encoder.out_dim, language_model.config.hidden_size)
    _load_strict(connector, {k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in projector.items()},
                 folder, "projector")
    preprocess = _clip_processor(folder, vision_config.get("image_size", 224))
    return _assemble(folder.name, encoder, connector, language_model, _tokenizer(folder), LLAVA, preprocess, dtype)


def _clip_processor(folder: Path, size: int) -> ImagePreprocess:
    """The folder's CLIPImageProcessor settings (shortest-side resize, centre crop, mean/std)."""
    path = folder / "preprocessor_config.json"
    values = json.loads(path.read_text()) if path.is_file() else {}
    mean, std = tuple(values.get("image_mean", CLIP_MEAN)), tuple(values.get("image_std", CLIP_STD))
    return ImagePreprocess(image_size=size, resize="shortest-side-crop", interpolation="bicubic", mean=mean, std=std)


def _assemble(name: str, encoder: nn.Module, connector: nn.Module, language_model: nn.Module, tokenizer: Any,
              prompt_format: Any, preprocess: ImagePreprocess, dtype: torch.dtype | None) -> VisionLanguageModel:
    model = VisionLanguageModel(name, encoder, connector, language_model, tokenizer, prompt_format, preprocess)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


# XrayGPT (MiniGPT-4's layout)

#: EVA-CLIP ViT-g's and BERT's head widths: the head counts are not in the tensors' shapes
EVA_HEAD_DIM, QFORMER_HEAD_DIM = 88, 64
#: BLIP-2's eval processor: both sides to 224 px (bicubic), CLIP's mean/std
BLIP2_PREPROCESS = ImagePreprocess(image_size=224, resize="stretch", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)


def load_xraygpt(checkpoint: str | PathLike[str], blip2: str | PathLike[str], language_model: str | PathLike[str], *,
                 eva: str | PathLike[str] | None = None, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """XrayGPT as MiniGPT-4 assembles it: EVA-CLIP ViT-g and ``ln_vision`` and the Q-Former with its
    32 queries from the BLIP-2 checkpoint ``blip2`` (LAVIS' ``blip2_pretrained_flant5xxl.pth``; the
    ViT from ``eva``, ``eva_vit_g.pth``, when the BLIP-2 file lacks it), ``llama_proj`` from
    XrayGPT's ``checkpoint`` (``{'model': ...}``; any key there overrides BLIP-2's, as MiniGPT-4
    loads it), and the LM (XrayGPT's fine-tuned Vicuna folder) through `medfm.lm.load`."""
    from medfm.lm import load as load_lm
    from medfm.segment.checkpoints import load_state_dict_file

    state = load_state_dict_file(blip2) | load_state_dict_file(checkpoint)
    if eva is not None:
        state |= {f"visual_encoder.{k}": v for k, v in load_state_dict_file(eva).items()}
    for prefix, source in (("visual_encoder.", eva or blip2), ("Qformer.bert.", blip2), ("llama_proj.", checkpoint)):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(source, f"holds no {prefix}* weights: is it the right file of XrayGPT's three?")
    lm = load_lm(language_model, dtype=dtype)
    vision_state, vision_config = _eva_to_transformers(_split(state, "visual_encoder."), _split(state, "ln_vision."))
    encoder = build_encoder({"kind": "blip2-vision", "config": vision_config})
    _load_strict(encoder.model, vision_state, Path(blip2), "EVA ViT")
    query_tokens = state.pop("query_tokens")
    qformer_state, qformer_config = _lavis_qformer_to_transformers(_split(state, "Qformer.bert."))
    connector = build_connector({"kind": "qformer", "config": qformer_config, "num_query_tokens": query_tokens.shape[1]},
                                encoder.out_dim, lm.model.config.hidden_size)
    connector_state = {f"qformer.{k}": v for k, v in qformer_state.items()} | {"query_tokens": query_tokens}
    connector_state |= {f"projection.{k}": v for k, v in _split(state, "llama_proj.").items()}
    _load_strict(connector, connector_state, Path(checkpoint), "Q-Former and llama_proj")
    from medfm.vlm.model import XRAYGPT

    preprocess = ImagePreprocess(**{**BLIP2_PREPROCESS.to_dict(), "image_size": vision_config["image_size"]})
    return _assemble("xraygpt", encoder, connector, lm.model, lm.tokenizer, XRAYGPT, preprocess, dtype)


def _eva_to_transformers(vit: dict[str, Tensor], norm: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """LAVIS' EVA ViT (``blocks.N.attn.qkv`` + ``q_bias``/``v_bias``) and ``ln_vision`` as
    transformers' ``Blip2VisionModel``, with the config its shapes say."""
    hidden = vit["cls_token"].shape[-1]
    patch = vit["patch_embed.proj.weight"].shape[-1]
    layers = len({k.split(".")[1] for k in vit if k.startswith("blocks.")})
    out = {"embeddings.class_embedding": vit["cls_token"], "embeddings.position_embedding": vit["pos_embed"],
           "embeddings.patch_embedding.weight": vit["patch_embed.proj.weight"],
           "embeddings.patch_embedding.bias": vit["patch_embed.proj.bias"],
           "post_layernorm.weight": norm["weight"], "post_layernorm.bias": norm["bias"]}
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2", "attn.qkv": "self_attn.qkv"}
    for i in range(layers):
        for old, new in names.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{old}.{kind}" in vit:
                    out[f"encoder.layers.{i}.{new}.{kind}"] = vit[f"blocks.{i}.{old}.{kind}"]
        q_bias, v_bias = vit[f"blocks.{i}.attn.q_bias"], vit[f"blocks.{i}.attn.v_bias"]
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    config = {"hidden_size": hidden, "intermediate_size": vit["blocks.0.mlp.fc1.weight"].shape[0],
              "num_hidden_layers": layers, "num_attention_heads": hidden // EVA_HEAD_DIM, "patch_size": patch,
              "image_size": int(round((vit["pos_embed"].shape[1] - 1) ** 0.5)) * patch, "layer_norm_eps": 1e-6,
              "qkv_bias": True, "hidden_act": "gelu"}
    return out, config


def _lavis_qformer_to_transformers(bert: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """LAVIS' Q-Former (a BERT with cross-attention every few layers; its text-only parts unused by
    MiniGPT-4 dropped) as transformers' ``Blip2QFormerModel``, with the config its shapes say."""
    out = {}
    for key, value in bert.items():
        if key.startswith("embeddings.LayerNorm."):
            out[key.replace("embeddings.LayerNorm.", "layernorm.")] = value
        elif key.startswith("encoder.layer.") and key.split(".")[3] not in {"intermediate", "output"}:  # text-only FFN
            out[key.replace(".attention.self.", ".attention.attention.").replace(".crossattention.self.", ".crossattention.attention.")] = value
    hidden = out["layernorm.weight"].shape[0]
    layers = len({k.split(".")[2] for k in out if k.startswith("encoder.layer.")})
    cross = sorted({int(k.split(".")[2]) for k in out if ".crossattention." in k})
    config = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // QFORMER_HEAD_DIM,
              "intermediate_size": out["encoder.layer.0.intermediate_query.dense.weight"].shape[0],
              "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else layers, "layer_norm_eps": 1e-12,
              "vocab_size": bert["embeddings.word_embeddings.weight"].shape[0] if "embeddings.word_embeddings.weight" in bert else 2}
    return out, config


# Med-Flamingo (OpenFlamingo's model.pt over LLaMA)

#: OpenFlamingo's attention head width (perceiver and gated cross-attention)
FLAMINGO_HEAD_DIM = 64
#: open_clip's ViT-L/14 transform as OpenFlamingo uses it: shortest side to 224 (bicubic), centre crop
OPEN_CLIP_PREPROCESS = ImagePreprocess(image_size=224, resize="shortest-side-crop", interpolation="bicubic",
                                       mean=CLIP_MEAN, std=CLIP_STD)


def load_med_flamingo(checkpoint: str | PathLike[str], language_model: str | PathLike[str], vision_tower: str | PathLike[str],
                      *, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """Med-Flamingo as OpenFlamingo builds it: CLIP ViT-L/14 (``vision_tower``: a transformers CLIP
    folder or hub id; frozen in training, so OpenAI's weights), its ln_post'ed patch tokens through
    the ``perceiver``, and ``lang_encoder.gated_cross_attn_layers`` before every N-th layer of the
    LLaMA in ``language_model``, whose tokenizer gains ``<|endofchunk|>`` and ``<image>`` (and
    ``<PAD>``) as OpenFlamingo adds them; any ``lang_encoder`` weights in ``checkpoint`` (``model.pt``)
    replace the LLaMA's (the trained embeddings of the new tokens)."""
    from medfm.lm import load as load_lm
    from medfm.segment.checkpoints import load_state_dict_file
    from medfm.vlm.flamingo import FlamingoModel, PerceiverResampler, add_flamingo_layers, gated_indices
    from medfm.vlm.model import MED_FLAMINGO

    state = load_state_dict_file(checkpoint)
    perceiver_state = _split(state, "perceiver.")
    gated_state = _split(state, "lang_encoder.gated_cross_attn_layers.")
    if not perceiver_state or not gated_state:
        raise CheckpointError(checkpoint, "holds no perceiver.* or lang_encoder.gated_cross_attn_layers.* weights: "
                              "not an OpenFlamingo / Med-Flamingo model.pt")
    tower_folder = _clip_tower_folder(str(vision_tower), None)
    tower_config = _read_config(tower_folder)
    vision_config = {k: v for k, v in tower_config.get("vision_config", tower_config).items()
                     if k not in {"model_type", "architectures", "transformers_version"}}
    encoder = build_encoder({"kind": "clip-vision", "config": vision_config, "select_layer": -1, "post_norm": True})
    tower_state = read_folder_state(tower_folder)
    _load_strict(encoder.model, _clip_vision_keys(_split(tower_state, "vision_model.") or tower_state), tower_folder,
                 "CLIP vision tower")

    lm = load_lm(language_model, dtype=dtype)
    tokenizer, network = lm.tokenizer, lm.model
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    lang_state = {k.removeprefix("lang_encoder.").replace(".decoder_layer.", "."): v for k, v in _split(state, "lang_encoder.").items()
                  if ".gated_cross_attn_layer." not in k}
    rows = lang_state.get("model.embed_tokens.weight", torch.empty(len(tokenizer))).shape[0]
    if rows == len(tokenizer) + 1:  # OpenFlamingo added a pad token to LLaMA's tokenizer
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    network.resize_token_embeddings(len(tokenizer))
    if lang_state:
        result = network.load_state_dict(lang_state, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(checkpoint, f"lang_encoder weights that the LM does not have: {result.unexpected_keys[:4]}")

    indices = sorted({int(k.split(".")[0]) for k in gated_state})
    every = indices[0] + 1
    if indices != gated_indices(len(network.model.layers), every):
        raise CheckpointError(checkpoint, f"gated cross-attention before layers {indices} is not every {every}-th of "
                              f"the LM's {len(network.model.layers)} layers: is it the LM it was trained on?")
    heads = gated_state[f"{indices[0]}.attn.to_q.weight"].shape[0] // FLAMINGO_HEAD_DIM
    add_flamingo_layers(network, encoder.out_dim, every, heads)
    for index in indices:
        block = network.model.layers[index].gated_cross_attn_layer
        _load_strict(block, {k.removeprefix(f"{index}."): v for k, v in gated_state.items() if k.startswith(f"{index}.")},
                     Path(checkpoint), f"gated cross-attention {index}")
    depth = len({k.split(".")[1] for k in perceiver_state if k.startswith("layers.")})
    perceiver = PerceiverResampler(encoder.out_dim, depth, perceiver_state["layers.0.0.to_q.weight"].shape[0] // FLAMINGO_HEAD_DIM,
                                   perceiver_state["latents"].shape[0])
    _load_strict(perceiver, perceiver_state, Path(checkpoint), "perceiver")
    preprocess = ImagePreprocess(**{**OPEN_CLIP_PREPROCESS.to_dict(), "image_size": vision_config.get("image_size", 224)})
    model = FlamingoModel("med-flamingo", encoder, perceiver, network, tokenizer, MED_FLAMINGO, preprocess)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
