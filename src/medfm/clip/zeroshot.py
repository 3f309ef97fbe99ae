"""Zero-shot classification and retrieval with any `DualEncoder`.

* Softmax over classes: each class is embedded through a prompt ensemble (every template filled
  with the class name, embeddings averaged and re-normalised, as CLIP does) and the image's
  similarities to the classes go through a softmax at the model's temperature.
* CheXzero's positive/negative scoring (``method="pos-neg"``): each finding is scored on its own by
  a softmax over "{finding}" and "no {finding}" (each through the templates), so several findings
  can be present at once and one finding can be asked about alone.
* Retrieval both ways: images for a text, texts for an image, by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from medfm.clip.model import DEFAULT_MODEL, DualEncoder, cached
from medfm.clip.preprocess import ImageLike
from medfm.errors import InputFileError, PromptError
from medfm.io import MedicalImage, read_image

METHODS = ("softmax", "pos-neg")
NEGATIVE = "no {}"
#: Files `retrieve_images` reads from a folder.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}


def resolve_model(model: DualEncoder | str | None) -> DualEncoder:
    """A loaded model, or a registry name / folder loaded once per process (default medfm-clip-small)."""
    return model if isinstance(model, DualEncoder) else cached(str(model or DEFAULT_MODEL))


def class_embeddings(model: DualEncoder, classes: Sequence[str], templates: Sequence[str] = ("{}",)) -> Tensor:
    """(K, D): each class's prompt-ensemble embedding (templates averaged, re-normalised)."""
    texts = [template.format(name) for name in classes for template in templates]
    embeddings = model.encode_text(texts).reshape(len(classes), len(templates), -1).mean(1)
    return F.normalize(embeddings, dim=-1)


@torch.inference_mode()
def zero_shot_probabilities(
    model: DualEncoder,
    image_embeds: Tensor,
    labels: Sequence[str],
    templates: Sequence[str] = ("{}",),
    method: str = "softmax",
    negative: str = NEGATIVE,
) -> Tensor:
    """(N, K) probabilities of ``labels`` for N image embeddings: a softmax over the labels, or
    (``pos-neg``) per label the softmax of "{label}" against ``negative`` ("no {label}")."""
    _check_labels(labels, method)
    scale = model.logit_scale.exp()
    positive = class_embeddings(model, labels, templates)
    if method == "softmax":
        return torch.softmax(scale * image_embeds @ positive.T, dim=-1)
    negatives = class_embeddings(model, [negative.format(label) for label in labels], templates)
    pair = torch.stack([image_embeds @ positive.T, image_embeds @ negatives.T], dim=-1)
    return torch.softmax(scale * pair, dim=-1)[..., 0]


def _check_labels(labels: Sequence[str], method: str) -> None:
    if method not in METHODS:
        raise PromptError(f"unknown zero-shot method '{method}'; choose one of {', '.join(METHODS)}")
    if not labels or any(not str(label).strip() for label in labels):
        raise PromptError("zero-shot classification needs non-empty labels")
    if len(set(labels)) != len(labels):
        raise PromptError(f"labels repeat: {list(labels)}")
    if method == "softmax" and len(labels) < 2:
        raise PromptError("a softmax over one label is always 1: give two or more labels, or use method='pos-neg' "
                          "(CheXzero's '{label}' vs 'no {label}')")


def classify(
    image: ImageLike,
    labels: Sequence[str],
    model: DualEncoder | str | None = None,
    *,
    templates: Sequence[str] | None = None,
    method: str = "softmax",
) -> dict[str, float]:
    """Zero-shot probabilities of ``labels`` for one image (a path, a `MedicalImage` or an array).

    ``model``: a loaded `DualEncoder`, a name or folder (default ``medfm-clip-small``).
    ``templates``: the prompt ensemble; default the model's templates for the image's modality.
    ``method``: ``softmax`` over the labels, or ``pos-neg`` (each label against "no {label}").
    """
    _check_labels(labels, method)
    model = resolve_model(model)
    if isinstance(image, (str, PathLike)):
        image = read_image(image)
    if templates is None:
        templates = model.templates(image.modality if isinstance(image, MedicalImage) else None)
    probabilities = zero_shot_probabilities(model, model.encode_image(image), labels, templates, method)[0]
    return {label: float(p) for label, p in zip(labels, probabilities)}


def image_files(folder: str | PathLike[str]) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputFileError(folder, f"holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def retrieve_images(
    text: str, images: str | PathLike[str] | Sequence[ImageLike], model: DualEncoder | str | None = None, top_k: int = 5
) -> list[tuple[ImageLike, float]]:
    """The ``top_k`` images most similar to ``text`` (a folder, or a list of images), with their
    cosine similarities, best first."""
    model = resolve_model(model)
    candidates = image_files(images) if isinstance(images, (str, PathLike)) else list(images)
    scores = (model.encode_image([read_image(c) if isinstance(c, (str, PathLike)) else c for c in candidates])
              @ model.encode_text(text)[0])
    return _top(candidates, scores, top_k)


def retrieve_texts(
    image: ImageLike, texts: Sequence[str], model: DualEncoder | str | None = None, top_k: int = 5
) -> list[tuple[str, float]]:
    """The ``top_k`` texts most similar to ``image``, with their cosine similarities, best first."""
    model = resolve_model(model)
    if not texts:
        raise PromptError("retrieval needs at least one text")
    scores = model.encode_text(list(texts)) @ model.encode_image(image)[0]
    return _top(list(texts), scores, top_k)


def _top(items: list, scores: Tensor, top_k: int) -> list[tuple]:
    if top_k < 1:
        raise PromptError(f"top_k must be at least 1, got {top_k}")
    order = torch.argsort(scores, descending=True)[:top_k]
    return [(items[i], float(scores[i])) for i in order]
