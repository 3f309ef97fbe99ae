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
    "classify",
    "list_models",
    "load",
    "read_image",
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


def list_models(**filters: str | None) -> list:
    """The catalog's model cards (see `medfm.catalog.list_models` for the filters)."""
    from medfm.catalog import list_models as _list_models

    return _list_models(**filters)
