"""medfm's own LLaVA-style models (``medfm-vlm-small``): a frozen image tower, a trained connector
and a language model with an optional trained LoRA, kept in a folder that holds only what medfm
trained (``model.safetensors``: ``connector.*``, ``lora.*``, and ``encoder.*`` only for a tower
that is not a frozen registered one) and a ``config.json`` naming the rest:

* ``encoder``: an encoder spec (`medfm.vlm.encoders`), e.g. ``{"kind": "medfm-clip", "clip":
  "medfm-clip-small", "grid": 2}``; ``preprocess`` when the encoder has none of its own;
* ``connector``: a connector spec (LLaVA-1.5's ``{"kind": "mlp", "depth": 2}``);
* ``language_model``: a `medfm.lm.load` name or folder (``smollm2-135m``: the PyPI wheel);
* ``lora``: peft's LoRA settings (``r``, ``alpha``, ``target_modules``), or null (stage 1).

Prompted in ChatML without a system turn (SmolLM2's own turn markers, short sequences).
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medfm.errors import CheckpointError, MedfmError
from medfm.lm.prompting import PromptFormat
from medfm.vlm.model import ImagePromptFormat, VisionLanguageModel

TASK = "vision-language"
FORMAT_VERSION = 1
CHATML = ImagePromptFormat("chatml", PromptFormat(
    "chatml", user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
    reply="<|im_start|>assistant\n", stop=("<|im_end|>",),
))
#: encoders whose weights come from elsewhere (frozen, registered), so a folder does not store them
EXTERNAL_ENCODERS = ("medfm-clip", "litemedsam")
#: where a shipped model's folder is (registered as ``bundled:vlm/weights/<name>``)
WEIGHTS_DIR = Path(__file__).parent / "weights"


def read_config(folder: str | PathLike[str]) -> dict[str, Any]:
    """A small VLM folder's ``config.json``; `CheckpointError` naming it when unreadable or another kind."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict) or config.get("task") != TASK:
            raise ValueError(f"task is {config.get('task') if isinstance(config, dict) else None!r}, not {TASK!r}")
        for key in ("encoder", "connector", "language_model"):
            if key not in config:
                raise ValueError(f"no {key!r}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise CheckpointError(path, f"not a medfm vision-language model config ({error})") from error
    return config


def add_lora(language_model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """``language_model`` wrapped by peft with LoRA adapters (only they train)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), target_modules=list(lora["target_modules"]),
                        lora_dropout=float(lora.get("dropout", 0.0)), bias="none")
    return get_peft_model(language_model, config)


def build(config: dict[str, Any], state: dict[str, Tensor] | None = None, *, source: str | Path = "config",
          merge: bool = True, language_model: Any = None, encoder: nn.Module | None = None,
          new_lora: bool = False) -> VisionLanguageModel:
    """The model ``config`` describes, its trained parts from ``state`` (random when None); the LoRA
    merged into the LM when ``merge`` (inference), else kept as peft adapters (training).
    ``language_model`` / ``encoder``: already loaded parts to reuse (a `medfm.lm.LanguageModel`);
    ``new_lora``: the LoRA starts fresh (training stage 2 from a stage-1 folder, which has none)."""
    from medfm.clip.preprocess import ImagePreprocess
    from medfm.lm import load as load_lm
    from medfm.safe_load import load_strict
    from medfm.vlm.connectors import build_connector
    from medfm.vlm.encoders import build_encoder

    lm = language_model if language_model is not None else load_lm(config["language_model"])
    network = lm.model
    network.requires_grad_(False)
    encoder = encoder if encoder is not None else build_encoder(config["encoder"])
    encoder.requires_grad_(False)
    if "preprocess" in config:
        preprocess = ImagePreprocess.from_dict(config["preprocess"])
    elif hasattr(encoder, "preprocess"):
        preprocess = encoder.preprocess
    else:
        raise CheckpointError(source, "its encoder has no preprocessing of its own and the config gives none")
    connector = build_connector(config["connector"], encoder.out_dim, network.config.hidden_size)
    if config.get("lora"):
        network = add_lora(network, config["lora"])
    if state is not None:
        parts = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")}
                 for name in ("connector", "lora", "encoder")}
        unknown = [k for k in state if k.split(".")[0] not in parts]
        if unknown:
            raise CheckpointError(source, f"unexpected weights {unknown[:3]} (connector.*, lora.*, encoder.* only)")
        load_strict(connector, parts["connector"], source, "connector")
        if config["encoder"]["kind"] not in EXTERNAL_ENCODERS:
            load_strict(encoder, parts["encoder"], source, "encoder")
        if config.get("lora") and not (new_lora and not parts["lora"]):
            _load_lora(network, parts["lora"], source)
        elif parts["lora"]:
            raise CheckpointError(source, "holds LoRA weights but its config has no lora settings")
    if config.get("lora") and merge:
        network = network.merge_and_unload()
    model = VisionLanguageModel(config.get("name", "medfm-vlm"), encoder, connector, network, lm.tokenizer, CHATML,
                                preprocess)
    model.encoder_spec = dict(config["encoder"])  # what the tower is (a feature cache's key)
    return model.eval()


def _load_lora(network: nn.Module, lora: dict[str, Tensor], source: str | Path) -> None:
    """Load the adapters strictly: every LoRA tensor of ``network`` must be in ``lora``."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(network))
    if set(lora) != expected:
        missing, extra = sorted(expected - set(lora)), sorted(set(lora) - expected)
        raise CheckpointError(source, f"its LoRA weights do not fit the model (missing {missing[:2]}, unexpected {extra[:2]})")
    set_peft_model_state_dict(network, lora)


def trained_state(model: VisionLanguageModel, config: dict[str, Any]) -> dict[str, Tensor]:
    """What medfm trained (and so what a folder stores): the connector, the LoRA adapters of a
    peft-wrapped LM, the encoder when it is not a frozen registered one."""
    state = {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    if config.get("lora"):
        from peft import get_peft_model_state_dict

        state |= {f"lora.{k}": v for k, v in get_peft_model_state_dict(model.language_model).items()}
    if config["encoder"]["kind"] not in EXTERNAL_ENCODERS:
        state |= {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    return state


def save(model: VisionLanguageModel, folder: str | PathLike[str], config: dict[str, Any]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (the trained parts, float32) atomically."""
    from medfm.io.writers import write_model_folder

    config = {**config, "task": TASK, "medfm_format": FORMAT_VERSION}
    return write_model_folder(folder, config, {k: v.float() for k, v in trained_state(model, config).items()})


def load(folder: str | PathLike[str], *, merge: bool = True, language_model: Any = None,
         encoder: nn.Module | None = None, dtype: torch.dtype | None = None) -> VisionLanguageModel:
    """A folder written by `save` (weights checked against the SHA-256 in its config)."""
    from medfm.safe_load import MODEL_WEIGHTS, read_folder_weights

    folder = Path(folder)
    config = read_config(folder)
    state = read_folder_weights(folder, config)
    model = build(config, state, source=folder / MODEL_WEIGHTS, merge=merge, language_model=language_model,
                  encoder=encoder)
    if dtype is not None:
        model.language_model.to(dtype)
        model.connector.to(dtype)
    return model


def build_bundled(entry: Any, *, weights: str | PathLike[str] | None = None, vision_tower: object = None,
                  device: str = "cpu", dtype: Any = None) -> VisionLanguageModel:
    """A small VLM shipped in the package (``bundled:vlm/weights/<name>``), or ``weights=`` a folder
    `medfm train-vlm` wrote."""
    from medfm.hub import resolve

    if vision_tower is not None:
        raise MedfmError(f"'{entry.name}' uses its registered image tower: it takes no vision_tower=")
    folder = Path(weights) if weights is not None else resolve(entry.name, entry.weights, None, None)
    return load(folder, dtype=dtype).to(device)


def is_small_vlm_folder(folder: Path) -> bool:
    """True for a folder `save` wrote."""
    try:
        return json.loads((folder / "config.json").read_text()).get("task") == TASK
    except (OSError, ValueError, AttributeError):
        return False
