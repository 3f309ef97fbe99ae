"""medfm: medical-imaging foundation models behind one small, typed API and one CLI."""

from medfm.errors import (
    CheckpointError,
    InputFileError,
    MedfmError,
    MissingDependencyError,
    OutputFileError,
    PromptError,
)
from medfm.io import MedicalImage, read_image, write_mask

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "InputFileError",
    "MedfmError",
    "MedicalImage",
    "MissingDependencyError",
    "OutputFileError",
    "PromptError",
    "__version__",
    "list_models",
    "read_image",
    "write_mask",
]


def list_models(**filters: str | None) -> list:
    """The catalog's model cards (see `medfm.catalog.list_models` for the filters)."""
    from medfm.catalog import list_models as _list_models

    return _list_models(**filters)
