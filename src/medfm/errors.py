"""The few exception types medfm raises for user mistakes.

Each names the file (or the prompt, or the checkpoint) and what is wrong with it, so the CLI can
print it in one line and the API caller can catch the family with ``MedfmError``.
"""

from __future__ import annotations

from os import PathLike


class MedfmError(Exception):
    """Base of every error medfm raises on purpose."""


class InputFileError(MedfmError, ValueError):
    """A file the user handed in is missing, unreadable, corrupt or of an unsupported kind."""

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputFileError(MedfmError, ValueError):
    """An output could not be written where asked (would overwrite an input, bad extension, ...)."""

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class PromptError(MedfmError, ValueError):
    """A box, point or mask prompt does not make sense for the image it is given with."""


class OptionError(MedfmError, ValueError):
    """An option's value is not one medfm accepts, or not on this machine (e.g. bf16 without bfloat16)."""


class CheckpointError(MedfmError, ValueError):
    """A checkpoint is missing, corrupt, or not in a layout medfm knows."""

    def __init__(self, source: str | PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ModelOutputError(MedfmError, RuntimeError):
    """A model gave output that cannot be a result (NaN or infinite logits, scores or embeddings),
    usually from corrupt weights: an error, never an empty mask or a meaningless probability."""

    def __init__(self, model: str, what: str) -> None:
        self.model = model
        super().__init__(f"model '{model}' gave non-finite {what} (NaN or infinite), so there is no result; "
                         "its weights are most likely corrupt")

    @classmethod
    def unless_finite(cls, model: str, what: str, *tensors: object) -> None:
        """Raise for ``model`` unless every torch tensor in ``tensors`` is finite throughout."""
        if not all(bool(tensor.isfinite().all()) for tensor in tensors):  # type: ignore[attr-defined]
            raise cls(model, what)


class MissingDependencyError(MedfmError, ImportError):
    """An optional dependency is needed for this feature; the message says which extra installs it."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs the optional package '{package}': pip install 'medfm[{extra}]'"
        )
