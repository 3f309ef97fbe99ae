"""The shared image-text collections (``../shared/data/vl``): records, a deterministic held-out
split by patient or lesion, training texts with label vectors, and the zero-shot tasks.

Each ``<dataset>/records.jsonl`` line is one image: ``id``, ``image`` (relative path), ``modality``,
``labels`` and, where present, a free-text ``report`` (COVID-19 clinical notes) or a templated
``caption`` (HAM10000). The split hashes the patient (``patient_id``) or lesion (``lesion_id``),
so no patient or lesion is on both sides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from medfm.errors import InputFileError

DATASETS = ("covid_cxr_notes", "ham10000_skin", "isic2017_skin", "pneumoniamnist")
#: Clearer class names for the labels whose stored text is a sentence.
LABEL_NAMES = {"not melanoma (benign nevus or seborrheic keratosis)": "benign nevus or seborrheic keratosis"}
#: CheXzero-style findings scored by "{finding}" vs "no {finding}"; images without the finding get
#: the "no {finding}" label, so the negative prompt has something to match in training.
BINARY_FINDINGS = {
    "covid_cxr_notes": "COVID-19",
    "pneumoniamnist": "pneumonia",
    "isic2017_skin": "melanoma",
    "ham10000_skin": "melanoma",
}
#: Prompt templates per modality (prompt ensembles), for training texts and zero-shot classes.
TEMPLATES = {
    "X-ray": ("{}", "a chest x-ray showing {}", "chest radiograph with findings of {}", "an x-ray image of {}"),
    "CT": ("{}", "a chest CT showing {}", "computed tomography with findings of {}"),
    "dermoscopy": ("{}", "a dermoscopic image of {}", "a skin lesion diagnosed as {}", "dermoscopy showing {}"),
}
#: A wider dermoscopy ensemble (v2): more phrasings of the same diagnosis give the trained text
#: projection more than four points per class to fit, and average out any one wording at zero-shot time.
DERMOSCOPY_V2 = (
    *TEMPLATES["dermoscopy"],
    "a dermoscopy photo of a {}",
    "a close-up photograph of a skin lesion: {}",
    "a pigmented skin lesion, {}",
    "dermatoscopic image of a lesion diagnosed as {}",
    "skin cancer screening image: {}",
    "a mole examined by dermoscopy, {}",
)


@dataclass(frozen=True)
class VLRecord:
    """One image of a collection with its labels and free text."""

    dataset: str
    id: str
    image: Path
    modality: str
    labels: tuple[str, ...]
    group: str
    texts: tuple[str, ...] = field(default=())

    @property
    def targets(self) -> tuple[str, ...]:
        """The labels plus "no {finding}" for the dataset's binary finding when it is absent."""
        finding = BINARY_FINDINGS.get(self.dataset)
        return self.labels if finding is None or finding in self.labels else (*self.labels, f"no {finding}")


@dataclass(frozen=True)
class ZeroShotTask:
    """How a dataset is scored zero-shot: a softmax over ``classes``, or (``finding`` set)
    CheXzero's "{finding}" vs "no {finding}" per image."""

    dataset: str
    classes: tuple[str, ...] = ()
    finding: str | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        """The texts the image is scored against: the classes, or "{finding}" and "no {finding}"."""
        return (self.finding, f"no {self.finding}") if self.finding is not None else self.classes

    def target(self, record: VLRecord) -> int:
        """Index of ``record``'s class in `labels` (finding tasks: 0 present, 1 absent)."""
        if self.finding is not None:
            return 0 if self.finding in record.labels else 1
        return next(self.classes.index(label) for label in record.labels if label in self.classes)


TASKS = {
    "covid_cxr_notes": ZeroShotTask("covid_cxr_notes", finding="COVID-19"),
    "ham10000_skin": ZeroShotTask("ham10000_skin", classes=(
        "melanocytic nevus", "benign keratosis-like lesion", "melanoma", "basal cell carcinoma",
        "actinic keratosis or intraepithelial carcinoma (Bowen's disease)", "vascular lesion", "dermatofibroma")),
    "isic2017_skin": ZeroShotTask("isic2017_skin", classes=("melanoma", "benign nevus or seborrheic keratosis")),
    "pneumoniamnist": ZeroShotTask("pneumoniamnist", classes=("pneumonia", "normal")),
}


def read_records(folder: str | Path, dataset: str) -> list[VLRecord]:
    """The records of ``folder/dataset/records.jsonl``, image paths made absolute."""
    path = Path(folder) / dataset / "records.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InputFileError(path, f"cannot read the records ({error.strerror or error})") from error
    records = []
    for number, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
            labels = tuple(LABEL_NAMES.get(label, label) for label in item["labels"])
            group = str(item.get("patient_id") or item.get("lesion_id") or item["id"])
            texts = tuple(item[key] for key in ("report", "caption") if item.get(key))
            records.append(VLRecord(dataset, item["id"], path.parent / item["image"], item["modality"], labels, group, texts))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputFileError(path, f"line {number} is not a valid record ({error})") from error
    return records


def is_held_out(record: VLRecord, fraction: float = 0.2) -> bool:
    """Deterministic split: the SHA-256 of dataset and patient/lesion puts ``fraction`` aside."""
    digest = hashlib.sha256(f"{record.dataset}:{record.group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def is_validation(record: VLRecord, fraction: float = 0.2) -> bool:
    """Deterministic validation part of the *training* side (meaningless for held-out records): a
    second, salted SHA-256 of dataset and patient/lesion, so model choices never see the held-out 20%."""
    digest = hashlib.sha256(f"validation:{record.dataset}:{record.group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def training_texts(
    record: VLRecord, templates: dict[str, tuple[str, ...]] | None = None
) -> list[tuple[str, tuple[str, ...]]]:
    """The texts that may pair with a training image, each with its label set: the report or
    caption (all the image's targets), and each target in every template of the modality
    (``templates``: per modality, default `TEMPLATES`)."""
    templates = (templates or TEMPLATES).get(record.modality, ("{}",))
    texts = [(text, record.targets) for text in record.texts]
    texts += [(template.format(target), (target,)) for target in record.targets for template in templates]
    return texts
