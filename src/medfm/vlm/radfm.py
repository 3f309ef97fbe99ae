"""RadFM (Wu et al. 2023, github.com/chaoyi-wu/RadFM): a 3D ViT over whole volumes, a perceiver
resampler to 32 tokens per scan, a linear map to the width of a LLaMA-13B, the tokens placed at the
prompt's ``<image0>...<image31>`` placeholders. Loaded from its published ``pytorch_model.bin``
(``torch.load(weights_only=True)``; a ``.safetensors`` copy also works) in its own key layout:

* ``embedding_layer.vision_encoder.*``: the 3D ViT (`RadFMViT3D`): a (C, H, W, D) volume cut into
  32 x 32 x 4 patches (flattened ``(p1 p2 pf c)``), LayerNorm - Linear - LayerNorm, plus a learned
  3D position embedding (row, column and depth tables of ``dim / 3`` each), 12 pre-norm blocks, no
  final norm and no class token;
* ``embedding_layer.perceiver.*``: the Flamingo perceiver (`medfm.vlm.flamingo.PerceiverResampler`,
  the same parameter names), 32 latents;  ``embedding_layer.fc.*``: Linear to the LM width;
* ``embedding_layer.weight`` (tied to ``lang_model.model.embed_tokens.weight``) and
  ``embedding_layer.figure_token_weight``: the embeddings of ``<image>`` and ``</image>``, the two
  tokens after LLaMA's 32000; the image's tokens follow them (``<image0>`` is 32002), so RadFM's
  lookup in ``cat([vocabulary, figure tokens, image tokens])`` is what `RadFMModel.embed` does;
* ``lang_model.*``: the LLaMA (config and tokenizer from the repository's ``Quick_demo/Language_files``).

The training-only parts in the file (Med-KEBERT ``bert_model``, ``transformer_decoder``,
``output_upscaling``, ``cls_head``, ...) are left out: RadFM's generation never uses them.

Preprocessing, as RadFM's data pipeline feeds the model (``src/Dataset``: ``radiopaedia.py``'s
``resize_image``, then ``multi_dataset_test.stack_images``):

* a volume (medfm's ``(Z, Y, X)``; RadFM's depth axis is the slice axis, so ``(Y, X, Z)``): each
  slice resized to 512 x 512 (OpenCV bilinear), more than 64 slices zoomed to 64 (SciPy order-0
  ``ndimage.zoom``), min-max scaled to [0, 1] over the volume (a constant volume gives zeros, where
  RadFM would put random noise), repeated to 3 channels, then the depth nearest-resized (torch) to
  the multiple of 4 in 4..64 closest to it (ties to the smaller);
* a 2D image (RadFM's ``Quick_demo/test.py``): RGB, 512 x 512 bicubic (PIL), ``/ 255``, repeated
  to a depth of 4. The demo takes a ``RandomResizedCrop`` (area 0.8-1.0) there; medfm resizes the
  whole image (the crop's deterministic limit), so an answer does not change from run to run.

The prompt is RadFM's: ``<image>`` + the 32 placeholders + ``</image>`` before the question, no
template; its answers were trained as ``question + " " + answer + "</s>"``. Text between special
tokens is tokenized piece by piece with the whitespace beside them stripped, as transformers 4.28's
LLaMA tokenizer (RadFM's) did. The bundled config names token 1 as end of sequence (an early LLaMA
conversion's slip); medfm stops at ``</s>`` (2), the token RadFM's training appends.
"""

from __future__ import annotations

import json
import re
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.clip.preprocess import ImageLike, image_rgb
from medfm.errors import CheckpointError, InputFileError, PromptError
from medfm.io import MedicalImage, read_image
from medfm.lm.prompting import PromptFormat
from medfm.vlm.flamingo import PerceiverResampler
from medfm.vlm.model import ImagePromptFormat, VisionLanguageModel

#: RadFM's fixed geometry: 32 x 32 pixel patches 4 slices deep over 3 channels, 512 px slices,
#: at most 64 slices, depth a multiple of 4, 64-wide attention heads (ViT and perceiver)
PATCH, FRAME_PATCH, CHANNELS, IMAGE_SIZE, MAX_DEPTH, HEAD_DIM = 32, 4, 3, 512, 64, 64
#: the checkpoint's training-only parts, unused by generation
UNUSED_PREFIXES = ("embedding_layer.bert_model.", "embedding_layer.bert_projection_fc.", "embedding_layer.output_upscaling.",
                   "embedding_layer.transformer_decoder.", "embedding_layer.transformer_decoder_mlp.",
                   "embedding_layer.cls_head.")


# -- the 3D vision transformer ----------------------------------------------------------------------


class VolumePatches(nn.Module):
    """(B, C, H, W, D) -> (B, h*w*f, p1*p2*pf*C): non-overlapping patches in (h, w, f) order, each
    flattened (p1, p2, pf, C) as RadFM's einops ``Rearrange`` does."""

    def __init__(self, patch: int, frame_patch: int) -> None:
        super().__init__()
        self.patch, self.frame_patch = patch, frame_patch

    def forward(self, volume: Tensor) -> Tensor:
        b, c, height, width, depth = volume.shape
        p, pf = self.patch, self.frame_patch
        x = volume.reshape(b, c, height // p, p, width // p, p, depth // pf, pf)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (height // p) * (width // p) * (depth // pf), p * p * pf * c)


class RadFMPositionEmbedding3D(nn.Module):
    """Learned row, column and depth tables (``dim / 3`` wide each), concatenated per patch. A grid
    smaller than the tables takes every (table / grid)-th entry, ending at the last one."""

    def __init__(self, width: int, rows: int, cols: int, depths: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(rows, width)
        self.col_embed = nn.Embedding(cols, width)
        self.dep_embed = nn.Embedding(depths, width)

    def forward(self, h: int, w: int, d: int) -> Tensor:
        """(h*w*d, 3*width) in the patches' (h, w, d) order."""
        device = self.row_embed.weight.device

        def picks(n: int, table: nn.Embedding) -> Tensor:
            if n > table.num_embeddings:
                raise PromptError(f"RadFM's position table has {table.num_embeddings} entries, the input needs {n}")
            return table((torch.arange(n, device=device) + 1) * (table.num_embeddings // n) - 1)

        rows, cols, deps = picks(h, self.row_embed), picks(w, self.col_embed), picks(d, self.dep_embed)
        grid = torch.cat([rows[:, None, None].expand(h, w, d, -1), cols[None, :, None].expand(h, w, d, -1),
                          deps[None, None, :].expand(h, w, d, -1)], dim=-1)
        return grid.reshape(h * w * d, -1)


class PreNorm(nn.Module):
    """LayerNorm, then ``fn``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: ``to_qkv`` without bias, ``to_out`` (Linear with bias, index 0)."""

    def __init__(self, dim: int, heads: int, dim_head: int = HEAD_DIM) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """``net``: Linear, GELU, (dropout), Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class RadFMViT3D(nn.Module):
    """RadFM's 3D vision transformer (``vision_encoder``): (B, 3, H, W, D) -> (B, N, dim) patch
    tokens, N = (H/32)(W/32)(D/4); parameter names as in RadFM's ``vit_3d.py``."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int, rows: int = 16, cols: int = 16, depths: int = 128,
                 patch: int = PATCH, frame_patch: int = FRAME_PATCH, channels: int = CHANNELS) -> None:
        super().__init__()
        if dim % 3:
            raise ValueError(f"RadFM's 3D position embedding needs a width divisible by 3, got {dim}")
        patch_dim = channels * patch * patch * frame_patch
        self.patch, self.frame_patch = patch, frame_patch
        self.to_patch_embedding = nn.Sequential(VolumePatches(patch, frame_patch), nn.LayerNorm(patch_dim),
                                                nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = RadFMPositionEmbedding3D(dim // 3, rows, cols, depths)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            nn.ModuleList([PreNorm(dim, SelfAttention(dim, heads)),
                           PreNorm(dim, FeedForward(dim, mlp_dim))])
            for _ in range(depth))
        self.out_dim = dim

    def forward(self, volume: Tensor) -> Tensor:
        _, _, height, width, depth = volume.shape
        p, pf = self.patch, self.frame_patch
        if height % p or width % p or depth % pf:
            raise PromptError(f"RadFM takes volumes of whole {p}x{p}x{pf} patches, got {height}x{width}x{depth}")
        x = self.to_patch_embedding(volume) + self.pos_embedding(height // p, width // p, depth // pf)
        for attention, feed_forward in self.transformer.layers:
            x = attention(x) + x
            x = feed_forward(x) + x
        return x

    @classmethod
    def from_state(cls, state: dict[str, Tensor], source: Path) -> RadFMViT3D:
        """The ViT the tensors' shapes describe (heads from ``to_qkv`` at 64 per head)."""
        try:
            patch_linear = state["to_patch_embedding.2.weight"]
            qkv = state["transformer.layers.0.0.fn.to_qkv.weight"]
            tables = [state[f"pos_embedding.{name}_embed.weight"].shape[0] for name in ("row", "col", "dep")]
            mlp = state["transformer.layers.0.1.fn.net.3.weight"].shape[1]
        except KeyError as missing:
            raise CheckpointError(source, f"the 3D ViT lacks {missing.args[0]}: not RadFM's vision_encoder") from None
        expected = CHANNELS * PATCH * PATCH * FRAME_PATCH
        if patch_linear.shape[1] != expected:
            raise CheckpointError(source, f"the 3D ViT's patches have {patch_linear.shape[1]} values, RadFM's "
                                  f"{CHANNELS}x{PATCH}x{PATCH}x{FRAME_PATCH} have {expected}")
        depth = len({k.split(".")[2] for k in state if k.startswith("transformer.layers.")})
        return cls(patch_linear.shape[0], depth, qkv.shape[0] // 3 // HEAD_DIM, mlp, *tables)


class RadFMConnector(nn.Module):
    """The perceiver resampler (RadFM's ``perceiver``: each scan's tokens to ``num_latents``) and
    ``fc`` to the LM width: (B, N, dim) -> (B, num_latents, width)."""

    def __init__(self, perceiver: PerceiverResampler, fc: nn.Linear) -> None:
        super().__init__()
        self.perceiver = perceiver
        self.fc = fc

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.perceiver(features))


# -- preprocessing -----------------------------------------------------------------------------------


def nearest_depth(depth: int) -> int:
    """RadFM's target depth: the multiple of 4 in 4..64 closest to ``depth`` (ties to the smaller)."""
    target = FRAME_PATCH
    for candidate in range(FRAME_PATCH, MAX_DEPTH + 1, FRAME_PATCH):
        if abs(candidate - depth) < abs(target - depth):
            target = candidate
    return target


def volume_pixels(volume: np.ndarray, size: int = IMAGE_SIZE) -> Tensor:
    """A ``(Z, Y, X)`` volume as RadFM's (3, size, size, D) input (see the module docstring)."""
    import cv2
    from scipy import ndimage

    slices = np.asarray(volume, dtype=np.float32)
    resized = np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_LINEAR) for s in slices], axis=-1)  # (Y, X, Z)
    if resized.shape[-1] > MAX_DEPTH:  # ndimage.zoom order 0 along the depth: the slices it keeps
        keep = ndimage.zoom(np.arange(resized.shape[-1], dtype=np.float64), MAX_DEPTH / resized.shape[-1], order=0)
        resized = resized[..., keep.astype(np.int64)]
    low, high = float(resized.min()), float(resized.max())
    scaled = (resized - low) / (high - low) if high > low else np.zeros_like(resized)
    tensor = torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[None, None]
    tensor = F.interpolate(tensor, size=(size, size, nearest_depth(tensor.shape[-1])))  # torch's default: nearest
    return tensor[0].expand(CHANNELS, -1, -1, -1)


def image_pixels(rgb: np.ndarray, size: int = IMAGE_SIZE) -> Tensor:
    """A uint8 (H, W, 3) image as RadFM's (3, size, size, 4) input: PIL bicubic, /255, 4 deep."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)[None, ..., None]
    return F.interpolate(tensor, size=(size, size, FRAME_PATCH))[0]


# -- the model ---------------------------------------------------------------------------------------


def radfm_prompt_format(image_tokens: int) -> ImagePromptFormat:
    """RadFM's prompt: the image block first, then the question; answers after a space, ending in ``</s>``."""
    placeholder = "".join(f"<image{i}>" for i in range(image_tokens))
    return ImagePromptFormat("radfm", PromptFormat("radfm", user="{content}", assistant=" {content}</s>"),
                             image=f"<image>{placeholder}</image>", placeholder=placeholder)


class RadFMModel(VisionLanguageModel):
    """3D ViT -> perceiver + fc -> LLaMA, the image tokens looked up past the vocabulary and the
    two figure tokens. Takes whole volumes (``takes_volumes``) and 2D images."""

    takes_volumes = True

    def __init__(self, name: str, encoder: RadFMViT3D, connector: RadFMConnector, language_model: nn.Module,
                 tokenizer: Any, figure_tokens: Tensor, image_size: int = IMAGE_SIZE) -> None:
        prompt_format = radfm_prompt_format(connector.perceiver.latents.shape[0])
        super().__init__(name, encoder, connector, language_model, tokenizer, prompt_format, preprocess=None)
        self.figure_tokens = nn.Parameter(figure_tokens, requires_grad=False)
        self.image_size = image_size
        placeholders = re.findall(r"<image\d+>", prompt_format.placeholder)
        self.image_ids = tokenizer.convert_tokens_to_ids(["<image>", *placeholders, "</image>"])
        specials = sorted((t for t in tokenizer.all_special_tokens if t), key=len, reverse=True)
        self._special = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def pixels(self, image: ImageLike) -> Tensor:
        """(1, 3, 512, 512, D): a volume (file or `MedicalImage`) whole, a 2D image 4 deep."""
        if isinstance(image, (str, PathLike)):
            image = read_image(image)
        if isinstance(image, MedicalImage) and image.is_volume:
            if image.channels != 1:
                raise InputFileError(image.path, f"is a volume with {image.channels} channels per voxel; "
                                     "RadFM takes a grey volume")
            return volume_pixels(image.array, self.image_size).unsqueeze(0).to(self.device)
        return image_pixels(image_rgb(image), self.image_size).unsqueeze(0).to(self.device)

    def token_ids(self, prompt: str) -> list[int]:
        """BOS, then the special tokens whole and the text between them tokenized piece by piece,
        stripped beside them (transformers 4.28's slow LLaMA tokenizer, which RadFM used)."""
        ids = [self.tokenizer.bos_token_id]
        for piece in self._special.split(prompt):
            if piece in self.tokenizer.all_special_tokens:
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
            elif piece.strip():
                ids.extend(self.tokenizer(piece.strip(), add_special_tokens=False).input_ids)
        return ids

    def embed(self, prompt: str, image_tokens: Tensor | None) -> Tensor:
        """(1, L, D): each id's row of ``cat([vocabulary, figure tokens, image tokens])``, RadFM's lookup."""
        ids = torch.tensor(self.token_ids(prompt), device=self.device)
        counts = [int((ids == i).sum()) for i in self.image_ids[1:-1]]
        if image_tokens is None and any(counts):
            raise PromptError("the prompt holds RadFM's image tokens but no image was given")
        if image_tokens is not None and counts != [1] * len(counts):
            raise PromptError("the prompt must hold RadFM's image tokens <image0>... exactly once")
        vocabulary = self.language_model.get_input_embeddings().weight
        rows = [vocabulary, self.figure_tokens.to(vocabulary.dtype)]
        if image_tokens is not None:
            rows.append(image_tokens[0].to(vocabulary.dtype))
        embeds = torch.cat(rows)[ids].unsqueeze(0)
        self._check_context(embeds.shape[1])
        return embeds


# -- loading -----------------------------------------------------------------------------------------


def _language_files(folder: Path) -> Path:
    """Where the LLaMA config and tokenizer are: ``Language_files/`` (the repository's name) or the folder."""
    for candidate in (folder / "Language_files", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(folder, "holds no Language_files/config.json: copy RadFM's Quick_demo/Language_files "
                          "(the LLaMA-13B config and tokenizer) beside pytorch_model.bin")


def _radfm_tokenizer(folder: Path, vocabulary: int, image_tokens: int) -> Any:
    """The LLaMA tokenizer with RadFM's special tokens added in its order (``<image>``, ``</image>``,
    ``<image0>``...), at the ids after the LM's vocabulary. Its config's empty BOS/EOS/UNK are
    replaced by LLaMA's, as RadFM sets ids 1 and 2."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    except (OSError, ValueError, ImportError) as error:
        hint = " (a tokenizer.model needs the sentencepiece package: pip install 'medfm[radfm]')" * (
            (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file())
        raise CheckpointError(folder, f"holds no tokenizer transformers can read{hint}: {str(error).splitlines()[0]}") from None
    if len(tokenizer) != vocabulary:
        raise CheckpointError(folder, f"its tokenizer has {len(tokenizer)} tokens, the LM {vocabulary}: "
                              "RadFM's image tokens must follow the vocabulary")
    tokens = ["<image>", "</image>", *(f"<image{i}>" for i in range(image_tokens))]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if tokenizer.convert_tokens_to_ids(tokens) != list(range(vocabulary, vocabulary + len(tokens))):
        raise CheckpointError(folder, "its tokenizer already has RadFM's <image> tokens elsewhere; use the plain LLaMA tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # RadFM's pad id 0
    return tokenizer


def load_radfm(folder: str | PathLike[str], *, dtype: torch.dtype | None = None) -> RadFMModel:
    """RadFM from a folder holding its ``pytorch_model.bin`` (or ``*.safetensors``) and the
    repository's ``Language_files`` (in a subfolder of that name, or beside the weights)."""
    from medfm.vlm.formats import _language_model, _load_strict, _split, read_folder_state

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "no such folder (RadFM needs a folder with pytorch_model.bin and Language_files)")
    language_files = _language_files(folder)
    try:
        lm_config = json.loads((language_files / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(language_files / "config.json", f"cannot read the LLaMA config ({error})") from None
    state = read_folder_state(folder)
    source = next(iter(sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))))
    for prefix in ("embedding_layer.vision_encoder.", "embedding_layer.perceiver.", "embedding_layer.fc.", "lang_model."):
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(source, f"holds no {prefix}* weights: not RadFM's pytorch_model.bin")
    for key in [k for k in state if k.startswith(UNUSED_PREFIXES) or k.endswith("rotary_emb.inv_freq")]:
        del state[key]
    encoder_state = _split(state, "embedding_layer.vision_encoder.")
    encoder = RadFMViT3D.from_state(encoder_state, source)
    _load_strict(encoder, encoder_state, source, "3D ViT")
    perceiver_state = _split(state, "embedding_layer.perceiver.")
    if "latents" not in perceiver_state or "layers.0.0.to_q.weight" not in perceiver_state:
        raise CheckpointError(source, "the perceiver lacks its latents or first layer")
    perceiver = PerceiverResampler(encoder.out_dim, len({k.split(".")[1] for k in perceiver_state if k.startswith("layers.")}),
                                   perceiver_state["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM,
                                   perceiver_state["latents"].shape[0])
    fc_state = _split(state, "embedding_layer.fc.")
    if "weight" not in fc_state:
        raise CheckpointError(source, "lacks embedding_layer.fc.weight")
    connector = RadFMConnector(perceiver, nn.Linear(*reversed(fc_state["weight"].shape)))
    _load_strict(connector, {f"perceiver.{k}": v for k, v in perceiver_state.items()} | {f"fc.{k}": v for k, v in fc_state.items()},
                 source, "perceiver and fc")
    figure = state.pop("embedding_layer.figure_token_weight", None)
    tied = state.pop("embedding_layer.weight", None)
    lm_state = {k.removeprefix("lang_model."): v for k, v in _split(state, "lang_model.").items()}
    if state:
        raise CheckpointError(source, f"unexpected weights for RadFM: {', '.join(sorted(state)[:4])}")
    if figure is None:
        raise CheckpointError(source, "lacks embedding_layer.figure_token_weight (the <image> and </image> embeddings)")
    if tied is not None:
        lm_state.setdefault("model.embed_tokens.weight", tied)
        if not torch.equal(lm_state["model.embed_tokens.weight"], tied):
            raise CheckpointError(source, "embedding_layer.weight differs from lang_model.model.embed_tokens.weight (RadFM ties them)")
    vocabulary = lm_config.get("vocab_size", 32000)
    tokenizer = _radfm_tokenizer(language_files, vocabulary, perceiver.latents.shape[0])
    lm_config = {k: v for k, v in lm_config.items() if k not in {"architectures", "_name_or_path", "transformers_version"}}
    lm_config |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "model_type": lm_config.get("model_type", "llama")}
    language_model = _language_model(lm_config, lm_state, source, dtype)
    if figure.shape != (2, language_model.config.hidden_size) or connector.fc.out_features != language_model.config.hidden_size:
        raise CheckpointError(source, f"figure tokens {tuple(figure.shape)} and fc width {connector.fc.out_features} "
                              f"do not fit the LM width {language_model.config.hidden_size}")
    size = encoder.pos_embedding.row_embed.num_embeddings * PATCH
    model = RadFMModel("radfm", encoder, connector, language_model, tokenizer, figure.to(torch.float32), size)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
