"""Textually prompted contrastive models (MedCLIP, CheXzero, BiomedCLIP, BioViL-T) behind one
dual-encoder API: zero-shot classification, retrieval, training losses, published formats."""

from medfm.clip.losses import infonce_loss, semantic_matching_loss
from medfm.clip.model import DEFAULT_MODEL, DualEncoder, load
from medfm.clip.preprocess import ImagePreprocess
from medfm.clip.zeroshot import (
    class_embeddings,
    classify,
    retrieve_images,
    retrieve_texts,
    zero_shot_probabilities,
)

__all__ = [
    "DEFAULT_MODEL",
    "DualEncoder",
    "ImagePreprocess",
    "class_embeddings",
    "classify",
    "infonce_loss",
    "load",
    "retrieve_images",
    "retrieve_texts",
    "semantic_matching_loss",
    "zero_shot_probabilities",
]
