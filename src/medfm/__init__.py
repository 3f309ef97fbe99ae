"""medfm: medical-imaging foundation models behind one small, typed API and one CLI."""

from medfm.errors import (
    CheckpointError,
    InputFileError,
    MedfmError,
    MissingDependencyError,
    ModelOutputError,
    OptionError,
    OutputFileError,
    PromptError,
)
from medfm.io import MedicalImage, read_image, write_image, write_mask
from medfm.prompts import Box, Points

__version__ = "0.1.0"

__all__ = [
    "Box",
    "CheckpointError",
    "InputFileError",
    "MedfmError",
    "MedicalImage",
    "MissingDependencyError",
    "ModelOutputError",
    "OptionError",
    "OutputFileError",
    "Points",
    "PromptError",
    "__version__",
    "ask",
    "classify",
    "list_models",
    "load",
    "read_image",
    "report",
    "write_image",
    "write_mask",
]


def load(name_or_path: str | None = None, **options):  # noqa: ANN201 - SegmentationModel, imported lazily
    """Load a segmentation model: a registry name, a medfm model folder, or a name plus ``weights=``;
    without one, medfm's default (``medfm-litemedsam-ft``, `medfm.segment.model.DEFAULT_MODEL`).

    See `medfm.segment.model.load`; imported on first use so that ``import medfm`` stays light.
    """
    from medfm.segment.model import load as _load

    return _load(name_or_path, **options)


def classify(image, labels, model=None, **options) -> dict[str, float]:  # noqa: ANN001 - see medfm.clip.classify
    """Zero-shot probabilities of ``labels`` (class names, e.g. ``["pneumonia", "normal"]``) for a
    2D image (a path or a `MedicalImage`), with ``model`` (default ``medfm-clip-small``, offline).

    See `medfm.clip.classify` (``templates=``, ``method="pos-neg"``); imported on first use.
    """
    from medfm.clip.zeroshot import classify as _classify

    return _classify(image, labels, model, **options)


def ask(image, question: str, model=None, choices=None, **options) -> str:  # noqa: ANN001 - see medfm.vlm.api.ask
    """The answer to ``question`` about ``image`` (a path or a `MedicalImage`); with ``choices``, the
    one the model scores highest by log-likelihood. Default model ``medfm-vlm-small``: medfm-clip-small's
    image tower, a connector and SmolLM2-135M with LoRA trained here (offline; research use).

    See `medfm.vlm.api.ask` (``slice_index=``, ``max_new_tokens=``, ``stream=``); imported on first use.
    """
    from medfm.vlm.api import ask as _ask

    return _ask(image, question, model, choices, **options)


def report(image, model=None, **options) -> str:  # noqa: ANN001 - see medfm.vlm.api.report
    """A findings-style draft for ``image`` (a draft to check, not a report); see `medfm.vlm.api.report`."""
    from medfm.vlm.api import report as _report

    return _report(image, model, **options)


def list_models(**filters: str | None) -> list:
    """The catalog's model cards (see `medfm.catalog.list_models` for the filters)."""
    from medfm.catalog import list_models as _list_models

    return _list_models(**filters)
