"""The family's training objectives on L2-normalised embeddings.

* `infonce_loss`: CLIP's and CheXzero's symmetric InfoNCE; the i-th image and i-th text are the
  only positives of each other.
* `semantic_matching_loss`: MedCLIP's decoupled objective. Images and texts need not be paired:
  each side carries a multi-hot label vector (findings extracted from the report, or the labels of
  a label-only image and of its prompt sentences), and the targets are soft, from the cosine
  similarity of the label vectors. Two images of the same finding are then not pushed apart as
  false negatives, and unpaired images, unpaired texts and label-only images all train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def infonce_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric cross-entropy of the (B, B) image-text similarity matrix against the diagonal."""
    logits = logit_scale * image_embeds @ text_embeds.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def semantic_targets(image_labels: Tensor, text_labels: Tensor, temperature: float = 0.1) -> Tensor:
    """(N_images, N_texts) soft targets: row-wise softmax of the label vectors' cosine similarity
    divided by ``temperature``. MedCLIP's code softmaxes the raw similarity (temperature 1), which
    with batches of mostly unrelated labels leaves the targets nearly uniform; 0.1 keeps them sharp."""
    similarity = F.normalize(image_labels.float(), dim=-1) @ F.normalize(text_labels.float(), dim=-1).T
    return torch.softmax(similarity / temperature, dim=-1)


def semantic_matching_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    image_labels: Tensor,
    text_labels: Tensor,
    logit_scale: Tensor | float,
    temperature: float = 0.1,
) -> Tensor:
    """MedCLIP's semantic-matching loss between N images and M texts (N and M may differ).

    ``image_labels`` (N, L) and ``text_labels`` (M, L) are multi-hot label vectors over one
    vocabulary; rows without any label take no part (they have no semantics to match).
    """
    logits = logit_scale * image_embeds @ text_embeds.T
    has_image, has_text = image_labels.sum(-1) > 0, text_labels.sum(-1) > 0
    logits, image_labels, text_labels = logits[has_image][:, has_text], image_labels[has_image], text_labels[has_text]
    image_loss = -(semantic_targets(image_labels, text_labels, temperature) * logits.log_softmax(-1)).sum(-1).mean()
    text_loss = -(semantic_targets(text_labels, image_labels, temperature) * logits.T.log_softmax(-1)).sum(-1).mean()
    return (image_loss + text_loss) / 2
