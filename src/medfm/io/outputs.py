"""The output contract, checked before any pixel is read or any model loaded.

Every command hands `check_outputs` all of its outputs and all of its inputs, named as the user
named them (``-o``, ``--overlay``, ``--reference``...). It refuses, in one line, an output that
is the same file as an input or as another output however it is spelled (relative, absolute,
through a symlink, or a hard link: resolved paths and ``(st_dev, st_ino)`` are compared), one
that lies inside an input folder (a DICOM series, a dataset, a model folder), a folder that
would hold an input, a folder that cannot be created or written, a name longer than the file
system allows (temporary name included) and an extension the output's kind cannot be written as.
It only looks: nothing is created, so a refused call leaves the disk as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from medfm.errors import OutputFileError

#: The extensions each kind of output is written as (see `medfm.io.writers`).
OUTPUT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "mask": (".png", ".nii", ".nii.gz", ".npz", ".dcm"),
    "picture": (".png", ".jpg", ".jpeg"),
    "map": (".nii", ".nii.gz", ".png", ".npz"),
    "folder": (),
}

#: Marks a temporary file of `medfm.io.writers.atomic_path`: ``.NAME.medfm-tmp-<pid>-<token><suffix>``
#: beside the output NAME. One left behind (the process was killed) is safe to delete.
TEMPORARY_MARK = ".medfm-tmp-"
#: The longest temporary name beyond the output's own name: dot, mark, pid (7 digits), token, suffix.
_TEMPORARY_OVERHEAD = 1 + len(TEMPORARY_MARK) + 7 + 1 + 8 + len(".nii.gz")


@dataclass(frozen=True)
class Output:
    """One output of a command: the option that names it, its path and its kind (a key of
    `OUTPUT_EXTENSIONS`; ``"folder"`` for a folder the command fills, such as a training run)."""

    option: str
    path: Path
    kind: str


def check_outputs(
    outputs: Mapping[str, tuple[str | PathLike[str] | None, str]],
    inputs: Mapping[str, str | PathLike[str] | None],
) -> list[Output]:
    """Raise `OutputFileError` unless every output can be written without touching an input.

    ``outputs`` maps an option to ``(path or None, kind)``; ``inputs`` maps an option to a path
    (or None when not given, or a name that is not a path, such as a registry model name: inputs
    that do not exist on disk are skipped). Returns the outputs that were given.
    """
    given = [Output(option, Path(path), kind) for option, (path, kind) in outputs.items() if path is not None]
    sources = {option: Path(path) for option, path in inputs.items() if path is not None and Path(path).exists()}
    for index, output in enumerate(given):
        _check_name(output)
        for option, source in sources.items():
            _check_apart(output, option, source)
        for other in given[index + 1:]:
            if same_file(output.path, other.path):
                raise OutputFileError(output.path, f"{output.option} and {other.option} name the same file; give each output its own path")
        _check_writable(output)
    return given


def _check_name(output: Output) -> None:
    extensions = OUTPUT_EXTENSIONS[output.kind]
    name = output.path.name.lower()
    if extensions and not name.endswith(extensions):
        raise OutputFileError(output.path, f"{output.option} must end in {', '.join(extensions)}")
    limit = _name_max(output.path)
    overhead = 0 if output.kind == "folder" else _TEMPORARY_OVERHEAD
    for part, extra in [(part, 0) for part in output.path.parts[:-1]] + [(output.path.name, overhead)]:
        if len(os.fsencode(part)) + extra > limit:
            raise OutputFileError(output.path, f"{output.option}: the name '{part[:40]}...' is too long for this file "
                                  f"system ({limit} bytes, {extra} of them kept for the temporary file)")


def _check_apart(output: Output, option: str, source: Path) -> None:
    """The output must not be the input, lie inside an input folder, or (a folder) hold an input."""
    where, resolved = output.path.resolve(), source.resolve()
    if same_file(output.path, source):
        raise OutputFileError(output.path, f"{output.option} is the same file as {option} ({source}); "
                              "outputs never replace inputs: choose another path")
    if source.is_dir() and where.is_relative_to(resolved):
        raise OutputFileError(output.path, f"{output.option} lies inside the {option} folder ({source}); "
                              "outputs never go into an input: choose another folder")
    if output.kind == "folder" and resolved.is_relative_to(where):
        raise OutputFileError(output.path, f"{output.option} holds {option} ({source}); "
                              "a command's output folder must not contain its inputs")


def _check_writable(output: Output) -> None:
    path = output.path
    if output.kind == "folder":
        if path.exists() and not path.is_dir():
            raise OutputFileError(path, f"{output.option} must be a folder, and this is a file")
        folder = path
    else:
        if path.is_dir():
            raise OutputFileError(path, f"{output.option} is a folder; give a file name")
        folder = path.parent
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputFileError(path, f"{output.option}: {existing} is not a folder, so the output cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFileError(path, f"{output.option}: the folder {existing} is not writable")


def same_file(first: Path, second: Path) -> bool:
    """The same file however spelled: equal resolved paths, or the same inode (hard links)."""
    if first.resolve() == second.resolve():
        return True
    try:
        one, two = first.stat(), second.stat()
    except OSError:
        return False
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _name_max(path: Path) -> int:
    try:
        return os.pathconf(_nearest_existing(path.parent), "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
