"""MedBLIP (Chen et al. 2023, github.com/Qybc/MedBLIP) in its original checkpoint layout: a whole
3D volume through BLIP-2's EVA ViT-g whose 2D patch embedding is replaced by a 3D one, the Q-Former
with its 32 queries, a linear ``proj`` and a causal LM (BioMedLM, GPT-2 layout; BioGPT loads the same way),
or ``t5_proj`` and FLAN-T5 (the encoder-decoder variant, `MedBlipT5Model`).

What its code does, and medfm reproduces:

* **Input** (``medblip/dataset.py``): the voxel array in file storage order ``(Z, Y, X)`` (SimpleITK's
  ``GetArrayFromImage``; medfm's NIfTI reader gives the same order, no reorientation, no resampling
  to the spacing), min-max scaled to [0, 1] over the whole volume, resized with its aspect ratio
  kept so that its longest side is 224 (each side ``int(224 * side / longest)``, trilinear,
  ``align_corners=True``), zero-padded to a centred 224^3 cube (offset ``int((224 - side) / 2)``):
  `MedBlipVolumePreprocess`.
* **Encoder** (``medblip/eva_vit.py``): ``patch_embed_3d`` (a ``Conv3d``, 1 channel, 32^3 patches:
  7^3 = 343 tokens), a class token, ``pos_embed_3d``, then the EVA ViT-g blocks (39, width 1408,
  head width 88, ``q_bias``/``v_bias``), and ``ln_vision`` (a LayerNorm with PyTorch's eps 1e-5):
  `MedBlipVolumeEncoder` (the 3D embedding is `MedBlipPatchEmbed3D`; the blocks are transformers'
  BLIP-2 vision encoder, the keys converted by `medfm.vlm.formats._eva_to_transformers`).
* **Connector**: LAVIS' Q-Former on the image tokens (``Qformer.bert``, ``query_tokens``), then
  ``proj`` into the LM's width (`medfm.vlm.connectors.QFormerConnector`).
* **Prompt and generation** (``modeling_medblip_biomedlm.py``): the LM reads the embedded text
  ``Question: ... Answer: `` and *then* the 32 image tokens, and continues greedily (`MEDBLIP`).
  FLAN-T5 (``modeling_medblip_t5.py``): its encoder reads the same (the prompt's tokens end with
  T5's ``</s>``), its decoder answers greedily; MedBLIP sets ``dense_act_fn = "gelu"`` over
  FLAN-T5's config, and so does medfm.

The checkpoint is what MedBLIP's trainer saves, ``model.state_dict()`` as ``epochN.pth``:
``visual_encoder.*``, ``ln_vision.*``, ``Qformer.bert.*``, ``query_tokens``, ``proj.*``, the frozen LM
as ``lm_model.*`` (fp16; GPT-2's ``attn.bias``/``attn.masked_bias`` buffers among them) and the
contrastive heads (``vision_proj``, ``text_proj``, ``qa_proj``, ``temp``, unused to answer). The LM's
``config.json`` and tokenizer come from its folder (e.g. stanford-crfm/BioMedLM); when the
checkpoint lacks ``lm_model.*``, that folder's weights are used. The FLAN-T5 variant saves
``t5_model.*`` (bf16) and ``t5_proj.*`` instead (its LM folder: google/flan-t5-xl). Weights are read
with ``weights_only=True`` or safetensors only. The author's code runs the ViT and the LM in fp16
(T5: bf16) on a GPU; medfm runs float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.errors import CheckpointError, InputFileError
from medfm.io import MedicalImage, read_image
from medfm.vlm.model import MEDBLIP, VisionLanguageModel

#: MedBLIP's ``create_eva_vit_g(img_size=224, patch_size=32)``: the cube side the volume is padded to
MEDBLIP_VOLUME_SIZE = 224
#: GPT-2's causal-mask buffers, persistent in the transformers copy MedBLIP ships, absent from today's
GPT2_MASK_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
#: what a MedBLIP checkpoint must hold (and ``proj.weight`` or ``t5_proj.weight``), and the parts medfm reads
REQUIRED_KEYS = ("visual_encoder.patch_embed_3d.proj.weight", "visual_encoder.pos_embed_3d", "visual_encoder.cls_token",
                 "ln_vision.weight", "ln_vision.bias", "Qformer.bert.embeddings.LayerNorm.weight", "query_tokens")
KNOWN_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.bert.", "query_tokens")
#: the contrastive (ITC) heads of MedBLIP's training loss: in the checkpoint, not used to answer
UNUSED_PREFIXES = ("vision_proj.", "text_proj.", "qa_proj.", "temp", "Qformer.cls.")


@dataclass(frozen=True)
class MedBlipVolumePreprocess:
    """MedBLIP's volume preparation (``dataset.py``: ``norm_img`` then ``pad_img``), see the module
    docstring: min-max over the volume, longest side to ``size`` (trilinear, corners aligned),
    centred zero padding to a ``size``^3 cube. Gives ``(1, 1, size, size, size)``."""

    size: int = MEDBLIP_VOLUME_SIZE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": "medblip-volume", **asdict(self)}

    def __call__(self, volume: np.ndarray, source: Any = "the volume") -> Tensor:
        array = np.asarray(volume)
        if array.ndim != 3:
            raise InputFileError(source, f"has shape {array.shape}: MedBLIP reads a 3D volume (Z, Y, X)")
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise InputFileError(source, f"holds {array.dtype} voxels, not real numbers")
        image = torch.from_numpy(array.astype(np.float64)).float()  # as torch.FloatTensor(array.astype(float))
        if not torch.isfinite(image).all():
            raise InputFileError(source, "holds NaN or infinite voxels")
        low, high = image.min(), image.max()
        if low == high:
            raise InputFileError(source, f"is constant ({float(low):g}): MedBLIP's min-max scaling needs contrast")
        image = (image - low) / (high - low)
        longest = max(array.shape)
        shape = tuple(int(self.size * side / longest) for side in array.shape)
        if min(shape) < 1:
            raise InputFileError(source, f"of shape {array.shape} is too thin: scaled to a longest side of {self.size}, "
                                 f"a side becomes {shape} voxels (MedBLIP reads volumes, not single slices)")
        image = F.interpolate(image[None, None], size=shape, mode="trilinear", align_corners=True)
        cube = torch.zeros((1, 1, self.size, self.size, self.size))
        start = [int((self.size - side) / 2) for side in shape]
        cube[:, :, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1], start[2]:start[2] + shape[2]] = image
        return cube


class MedBlipPatchEmbed3D(nn.Module):
    """MedBLIP's 3D front of the EVA ViT: ``patch_embed_3d`` (a ``Conv3d`` with kernel = stride =
    patch), the class token in front, ``pos_embed_3d`` added. ``(B, C, S, S, S)`` -> ``(B, 1 + N, D)``.
    Kept apart from other 3D patch embeddings (RadFM's) because MedBLIP's has a class token and
    one learned position per patch of a fixed cube."""

    def __init__(self, hidden_size: int, volume_size: int, patch_size: int, in_channels: int = 1) -> None:
        super().__init__()
        if volume_size % patch_size:
            raise ValueError(f"the volume side {volume_size} is not a multiple of the patch side {patch_size}")
        self.volume_size = volume_size
        self.patch_embedding = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + (volume_size // patch_size) ** 3, hidden_size))

    def forward(self, volume: Tensor) -> Tensor:
        if tuple(volume.shape[2:]) != (self.volume_size,) * 3:
            raise ValueError(f"MedBLIP's encoder takes {self.volume_size}^3 volumes, got {tuple(volume.shape[2:])}")
        tokens = self.patch_embedding(volume).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(len(tokens), -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens + self.position_embedding.to(tokens.dtype)


class MedBlipVolumeEncoder(nn.Module):
    """MedBLIP's image encoder: `MedBlipPatchEmbed3D`, the EVA ViT blocks (transformers'
    ``Blip2Encoder``), ``ln_vision``: every token, ``(B, 1 + N, D)``."""

    def __init__(self, config: dict[str, Any], volume_size: int, patch_size: int, in_channels: int = 1) -> None:
        super().__init__()
        from transformers import Blip2VisionConfig
        from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder

        vision_config = Blip2VisionConfig(**config)
        vision_config._attn_implementation = "sdpa"  # built outside a PreTrainedModel, so set here
        self.embeddings = MedBlipPatchEmbed3D(vision_config.hidden_size, volume_size, patch_size, in_channels)
        self.encoder = Blip2Encoder(vision_config)
        self.ln_vision = nn.LayerNorm(vision_config.hidden_size)  # LAVIS' LayerNorm: PyTorch's eps 1e-5
        self.out_dim = vision_config.hidden_size

    def forward(self, volume: Tensor) -> Tensor:
        return self.ln_vision(self.encoder(inputs_embeds=self.embeddings(volume)).last_hidden_state)


class MedBlipModel(VisionLanguageModel):
    """A `VisionLanguageModel` that reads whole 3D volumes (``volumetric``), prepared by
    `MedBlipVolumePreprocess`."""

    volumetric = True

    def pixels(self, image: Any) -> Tensor:
        """(1, 1, S, S, S) encoder input of a volume (file, `MedicalImage` or ``(Z, Y, X)`` array)."""
        source: Any = "the volume"
        if isinstance(image, (str, PathLike)):
            source, image = image, read_image(image)
        if isinstance(image, MedicalImage):
            source = image.path or source
            if not image.is_volume:
                raise InputFileError(source, f"is a 2D image: {self.name} reads whole 3D volumes (NIfTI, DICOM series)")
            image = image.array
        return self.preprocess(image, source).to(self.device)


class MedBlipT5Model(MedBlipModel):
    """MedBLIP's FLAN-T5 variant (``modeling_medblip_t5.py``): T5's encoder reads the embedded prompt
    (with the ``</s>`` T5's tokenizer ends it with) and then the image tokens; the decoder answers."""

    def logits(self, embeds: Tensor, decoder_ids: Tensor | None = None) -> Tensor:
        """(1, T, vocabulary) decoder logits over the encoder's ``embeds`` (default: the first step)."""
        if decoder_ids is None:
            decoder_ids = torch.tensor([[self.language_model.config.decoder_start_token_id]], device=embeds.device)
        return self.language_model(inputs_embeds=embeds, decoder_input_ids=decoder_ids).logits

    @torch.inference_mode()
    def score(self, turns: Any, image: Any, continuations: Any) -> list[float]:
        """The log-likelihood of each continuation as the decoder's answer (its tokens without
        ``</s>``); the encoder runs once, the decoder on a right-padded batch of them."""
        from medfm.errors import PromptError

        prompt = self.prompt_format.render(turns, image is not None, self.tokenizer)
        tokens = None if image is None else self.image_tokens(self.pixels(image))
        encoded = self.language_model.get_encoder()(inputs_embeds=self.embed(prompt, tokens))
        answers = [self.tokenizer(self.prompt_format.answer_opening + text, add_special_tokens=False).input_ids
                   for text in continuations]
        if not all(answers):
            raise PromptError(f"a choice has no tokens: {list(continuations)}")
        start, longest = self.language_model.config.decoder_start_token_id, max(map(len, answers))
        batch = torch.tensor([[start, *ids] + [start] * (longest - len(ids)) for ids in answers], device=self.device)
        hidden = encoded.last_hidden_state.expand(len(answers), -1, -1)
        logits = self.language_model(encoder_outputs=(hidden,), decoder_input_ids=batch[:, :-1]).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return [float(log_probs[row, torch.arange(len(ids)), batch[row, 1:len(ids) + 1]].sum()) for row, ids in enumerate(answers)]


def load_medblip(checkpoint: str | PathLike[str], language_model: str | PathLike[str], *,
                 dtype: torch.dtype | None = None) -> MedBlipModel:
    """MedBLIP from its trainer's ``checkpoint`` (``epochN.pth``) and the folder of its causal LM
    (``config.json`` + tokenizer; its weights only when the checkpoint lacks ``lm_model.*``)."""
    from medfm.segment.checkpoints import load_state_dict_file
    from medfm.vlm.connectors import build_connector
    from medfm.vlm.formats import (_eva_to_transformers, _language_model, _lavis_qformer_to_transformers, _load_strict,
                                   _read_config, _split, _tokenizer, read_folder_state)

    checkpoint, lm_folder = Path(checkpoint), Path(language_model)
    state = load_state_dict_file(checkpoint)
    t5 = any(k.startswith(("t5_model.", "t5_proj.")) for k in state)
    lm_prefix, proj = ("t5_model.", "t5_proj.") if t5 else ("lm_model.", "proj.")
    variant = "FLAN-T5" if t5 else "causal-LM"
    for key in (*REQUIRED_KEYS, f"{proj}weight"):
        if key not in state:
            raise CheckpointError(checkpoint, f"holds no {key}: not a checkpoint of MedBLIP's {variant} model "
                                  "(its trainer's epochN.pth)")
    left = sorted(k for k in state if not k.startswith((*KNOWN_PREFIXES, lm_prefix, proj, *UNUSED_PREFIXES)))
    if left:
        raise CheckpointError(checkpoint, f"unexpected weights for MedBLIP's {variant} model: {', '.join(left[:4])}")
    lm_config = {k: v for k, v in _read_config(lm_folder).items() if k not in {"architectures", "transformers_version"}}
    width = _lm_width(lm_config, lm_folder)
    if width != state[f"{proj}weight"].shape[0]:
        raise CheckpointError(checkpoint, f"{proj}weight maps into {state[f'{proj}weight'].shape[0]} dimensions, the LM in "
                              f"{lm_folder} has {width}: is it the LM MedBLIP was trained with?")

    vit = _split(state, "visual_encoder.")
    patch_weight, positions = vit.pop("patch_embed_3d.proj.weight"), vit.pop("pos_embed_3d")
    patch_bias = vit.pop("patch_embed_3d.proj.bias", None)
    if patch_weight.dim() != 5 or len(set(patch_weight.shape[2:])) != 1:
        raise CheckpointError(checkpoint, f"visual_encoder.patch_embed_3d.proj.weight has shape {tuple(patch_weight.shape)}, "
                              "not a cubic Conv3d kernel")
    patch = patch_weight.shape[-1]
    grid = round((positions.shape[1] - 1) ** (1 / 3))
    if grid**3 != positions.shape[1] - 1:
        raise CheckpointError(checkpoint, f"visual_encoder.pos_embed_3d holds {positions.shape[1] - 1} patch positions, "
                              "not a cube's")
    # the blocks as BLIP-2's 2D EVA ViT names them; the 2D embedding keys it makes are set aside below
    planar = {"patch_embed.proj.weight": patch_weight, "patch_embed.proj.bias": patch_bias, "pos_embed": positions}
    try:
        vision_state, vision_config = _eva_to_transformers(vit | planar, _split(state, "ln_vision."))
    except KeyError as error:
        raise CheckpointError(checkpoint, f"the 3D EVA ViT lacks visual_encoder.{error.args[0]}") from error
    for key in ("image_size", "patch_size"):
        vision_config.pop(key)
    encoder = MedBlipVolumeEncoder(vision_config, grid * patch, patch, patch_weight.shape[1])
    encoder_state = {"embeddings.patch_embedding.weight": patch_weight, "embeddings.position_embedding": positions,
                     "embeddings.class_embedding": vision_state["embeddings.class_embedding"],
                     "ln_vision.weight": vision_state["post_layernorm.weight"], "ln_vision.bias": vision_state["post_layernorm.bias"]}
    if patch_bias is not None:
        encoder_state["embeddings.patch_embedding.bias"] = patch_bias
    encoder_state |= {k: v for k, v in vision_state.items() if k.startswith("encoder.")}  # the blocks
    _load_strict(encoder, encoder_state, checkpoint, "3D EVA ViT")

    query_tokens = state.pop("query_tokens")
    try:
        qformer_state, qformer_config = _lavis_qformer_to_transformers(_split(state, "Qformer.bert."))
    except KeyError as error:
        raise CheckpointError(checkpoint, f"the Q-Former lacks Qformer.bert.{error.args[0]}") from error
    projection = state[f"{proj}weight"]  # (LM width, Q-Former width)
    connector = build_connector({"kind": "qformer", "config": qformer_config, "num_query_tokens": query_tokens.shape[1]},
                                encoder.out_dim, projection.shape[0])
    connector_state = {f"qformer.{k}": v for k, v in qformer_state.items()} | {"query_tokens": query_tokens}
    connector_state |= {f"projection.{k}": v for k, v in _split(state, proj).items()}
    _load_strict(connector, connector_state, checkpoint, f"Q-Former and {proj.rstrip('.')}")

    lm_state = _split(state, lm_prefix)
    lm_source = checkpoint if lm_state else lm_folder
    if not lm_state:
        lm_state = read_folder_state(lm_folder)
    if t5:
        lm = _t5_model(lm_config, lm_state, lm_source, dtype)
    else:
        lm_state = {k: v for k, v in lm_state.items() if not GPT2_MASK_BUFFERS.search(k)}
        lm = _language_model(lm_config, lm_state, lm_source, dtype)

    kind = MedBlipT5Model if t5 else MedBlipModel
    model = kind("medblip", encoder, connector, lm, _tokenizer(lm_folder), MEDBLIP,
                 MedBlipVolumePreprocess(grid * patch))  # type: ignore[arg-type]
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _lm_width(config: dict[str, Any], folder: Path) -> int:
    """The hidden width of the causal LM ``config`` describes (read before anything is built)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.for_model(**config).hidden_size)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(folder / "config.json", f"is not a transformers LM config ({error})") from error


def _t5_model(config: dict[str, Any], state: dict[str, Tensor], source: Path, dtype: torch.dtype | None) -> nn.Module:
    """FLAN-T5 as MedBLIP builds it (``dense_act_fn = "gelu"`` set over the folder's config: exact
    GELU in the gated feed-forward, not FLAN-T5's tanh approximation), loaded strictly from ``state``."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from medfm.vlm.formats import _load_strict

    lm_config = AutoConfig.for_model(**config)
    lm_config.dense_act_fn = "gelu"
    model = AutoModelForSeq2SeqLM.from_config(lm_config, dtype=dtype or torch.float32)
    embedding = model.get_input_embeddings().weight
    head = state.get("lm_head.weight")
    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if head is not None and shared is not None and not torch.equal(head, shared):  # FLAN-T5's head is its own
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
    tied = [name for name, value in model.named_parameters(remove_duplicate=False) if value is embedding]
    saved = next((name for name in tied if name in state), None)
    if saved is not None:
        state = {**state, **{name: state[saved] for name in tied if name not in state}}
    _load_strict(model, state, source, "language model")
    return model.eval()
