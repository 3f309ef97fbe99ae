"""Data for training a LLaVA-style model (`medfm.train.vlm`): image-text pairs (stage 1) and
instructions (stage 2) from the shared image-text collections, split by patient, with the frozen
image tower's features computed once and cached.

**Split.** ``test``: `medfm.clip.data.is_held_out` (SHA-256 of dataset and patient / lesion id,
20 %), the same split medfm-clip-small was trained against, so its tower never saw a test image;
``val``: 10 % of the remaining patients by a second hash (``val:`` salt); ``train``: the rest.
The group is ``patient_id`` (COVID-19 notes), ``lesion_id`` (HAM10000), else the image id
(PneumoniaMNIST and ISIC 2017 publish no patient id: split by image).

**Stage 1 pairs**: "Describe the image briefly." answered by the image's clinical note or caption,
or a sentence made from its labels. **Stage 2 instructions**: the records' templated closed
questions (see `SKIPPED_QUESTIONS` for those left out) with their answers, and a findings draft
(`medfm.vlm.api.REPORT_REQUESTS`) answered by the clinical note / caption. Sampling is balanced:
every task (dataset and question) gets the same share of an epoch and, within a task, every answer
class too, so a rare "no" is seen as often as a common "yes" (a model trained on the natural mix
learns to answer the majority class).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medfm.errors import InputFileError

CAPTION_REQUEST = "Describe the image briefly."
#: templated questions left out of stage 2: not answerable from the pixels (sex), or too few
#: examples per class to learn here (the 14 COVID-19 collection findings, body location, view)
SKIPPED_QUESTIONS = ("What is the sex of the patient?", "What is the diagnosis / finding for this patient?",
                     "Where on the body is this lesion located?", "What is the view / plane of this image?")
#: answers of at most this many words are classes (balanced per answer); longer ones are free text
CLASS_ANSWER_WORDS = 12
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One training example: an image (index into `VLData.images`), a question, its answer, the
    task it belongs to (dataset and question) and the class it balances as."""

    image: int
    question: str
    answer: str
    task: str
    group: str


@dataclass
class VLData:
    """Images (absolute paths, with modality) and the samples of each split."""

    images: list[Path]
    modalities: list[str]
    samples: dict[str, list[Sample]]


def split_of(dataset: str, group: str) -> str:
    """``train``, ``val`` or ``test`` for a patient / lesion / image group (module docstring)."""
    from medfm.clip.data import VLRecord, is_held_out

    if is_held_out(VLRecord(dataset, "", Path(), "", (), group)):
        return "test"
    digest = hashlib.sha256(f"val:{dataset}:{group}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < 0.1 else "train"


def dataset_folders(folders: Sequence[str | Path]) -> list[Path]:
    """The dataset folders (each with ``records.jsonl``) named by ``--data``: a dataset folder, or
    a collection root holding dataset folders. `InputFileError` for a folder with neither."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputFileError(folder, "is not a folder (--data takes a dataset folder or a collection root)")
        if (folder / "records.jsonl").is_file():
            found.append(folder)
            continue
        inside = sorted(p for p in folder.iterdir() if (p / "records.jsonl").is_file())
        if not inside:
            raise InputFileError(folder, "holds no records.jsonl, nor dataset folders with one")
        found += inside
    return found


def label_sentence(modality: str, labels: Sequence[str]) -> str:
    """A caption from labels, for images without a note or caption."""
    from medfm.clip.data import TEMPLATES

    template = TEMPLATES.get(modality, ("{}", "an image of {}"))[1]
    return template.format(" and ".join(labels)).capitalize() + "."


def read_vl_data(folders: Sequence[str | Path], stage: int, limit: int | None = None) -> VLData:
    """The training and validation images and samples of ``folders`` for ``stage`` (1: pairs, 2:
    instructions), split by patient; held-out (test) images are left out entirely. ``limit``: at
    most this many training images per dataset (and a tenth as many, at least 8, for validation),
    the first in file order."""
    from medfm.clip.data import read_records
    from medfm.vlm.api import REPORT_REQUESTS

    images: list[Path] = []
    modalities: list[str] = []
    samples: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    caps = {"train": limit, "val": None if limit is None else max(8, limit // 10), "test": 0}
    for folder in dataset_folders(folders):
        taken = {split: 0 for split in SPLITS}
        records = read_records(folder.parent, folder.name)
        raw = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
        for record, item in zip(records, raw):
            if not record.image.is_file():
                raise InputFileError(record.image, f"is listed in {folder / 'records.jsonl'} but missing")
            split = split_of(record.dataset, record.group)
            if caps[split] is not None and taken[split] >= caps[split]:
                continue
            taken[split] += 1
            index = len(images)
            images.append(record.image)
            modalities.append(record.modality)
            text = record.texts[0] if record.texts else None
            if stage == 1:
                caption = text or label_sentence(record.modality, record.labels)
                samples[split].append(Sample(index, CAPTION_REQUEST, caption, f"{record.dataset}:caption", "text"))
                continue
            for pair in item.get("qa") or ():
                question, answer = str(pair.get("question", "")), str(pair.get("answer", ""))
                if question and answer and question not in SKIPPED_QUESTIONS:
                    group = answer.lower() if len(answer.split()) <= CLASS_ANSWER_WORDS else "text"
                    samples[split].append(Sample(index, question, answer, f"{record.dataset}:{question}", group))
            if text:
                request = REPORT_REQUESTS.get(record.modality if record.modality == "dermoscopy" else None)
                samples[split].append(Sample(index, request, text, f"{record.dataset}:report", "text"))
    if not samples["train"]:
        raise InputFileError(Path(folders[0]), f"gives no stage-{stage} training samples")
    return VLData(images, modalities, samples)


def balanced_weights(samples: Sequence[Sample]) -> Tensor:
    """Sampling weights: each task the same total, each class within a task the same share."""
    per_class = Counter((s.task, s.group) for s in samples)
    classes_per_task = Counter(task for task, _ in per_class)
    return torch.tensor([1.0 / (classes_per_task[s.task] * per_class[(s.task, s.group)]) for s in samples],
                        dtype=torch.float64)


def epoch_order(samples: Sequence[Sample], size: int, seed: int, epoch: int, balanced: bool) -> list[int]:
    """The sample indices of one epoch: ``size`` draws by `balanced_weights` (with replacement),
    or a shuffle; a function of (seed, epoch) only, so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if balanced:
        return torch.multinomial(balanced_weights(samples), size, replacement=True, generator=generator).tolist()
    return torch.randperm(len(samples), generator=generator).tolist()[:size]


def feature_cache_key(encoder_spec: dict[str, Any], images: Sequence[Path]) -> str:
    """A key for the tower's features of ``images``: the encoder spec and each file's path, size and mtime."""
    digest = hashlib.sha256(json.dumps(encoder_spec, sort_keys=True).encode())
    for path in images:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def image_features(encoder: Any, preprocess: Any, images: Sequence[Path], modalities: Sequence[str], cache: Path | None,
                   log: Any = print, batch_size: int = 32) -> Tensor:
    """(N, T, C) frozen-tower features of ``images``, from ``cache`` (a safetensors file) when it
    exists, else computed once and written there atomically."""
    from safetensors.torch import load_file, save_file

    from medfm.clip.preprocess import image_rgb
    from medfm.io import read_image
    from medfm.io.writers import atomic_path

    if cache is not None and cache.is_file():
        return load_file(str(cache))["features"]
    dtype = next(encoder.parameters()).dtype
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [preprocess(image_rgb(read_image(path, modality=modality)))
                 for path, modality in zip(images[start : start + batch_size], modalities[start : start + batch_size])]
        chunks.append(encoder(torch.stack(batch).to(dtype)).float())
        if start // batch_size % 20 == 0:
            log(f"image features: {min(start + batch_size, len(images))}/{len(images)}")
    features = torch.cat(chunks)
    if cache is not None:
        with atomic_path(cache) as temporary:
            save_file({"features": features.contiguous()}, str(temporary))
    return features
