"""Asking about an image: `load` a vision-language model by name or folder, `ask` a question (free
text, or the most likely of given choices), draft a `report`, hold a `Conversation`.

The default, ``medfm-vlm-small``, is the small LLaVA-style model trained here (`medfm.vlm.small`):
medfm-clip-small's image tower, an MLP connector and SmolLM2-135M-Instruct with LoRA. It runs
offline from the package and the PyPI wheels; it is a small research model, not a diagnostic tool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

from medfm.catalog import registry
from medfm.catalog.registry import ModelEntry
from medfm.errors import InputFileError, MedfmError, PromptError
from medfm.io import MedicalImage, read_image

DEFAULT_MODEL = registry.DEFAULTS["vlm"]
REPORT_REQUESTS = {
    "dermoscopy": "Describe this skin lesion in a short findings-style report.",
    None: "Write a short findings section of a radiology report for this image.",
}

#: a loaded model that `ask` / `report` / `Conversation` accept
Model = Any  # VisionLanguageModel | ExpertPipeline


def load(name_or_path: str | PathLike[str] | None = None, *, weights: str | PathLike[str] | None = None,
         vision_tower: str | PathLike[str] | None = None, device: str = "cpu", dtype: Any = None) -> Model:
    """A model to ask about images: ``medfm-vlm-small`` (default, offline), ``medfm-experts-smollm2``
    (medfm-clip-small's findings as text, answered by SmolLM2), ``llava-med``
    (``weights=`` a local copy of microsoft/llava-med-v1.5-mistral-7b, else the hub when online),
    ``xraygpt``, ``med-flamingo``, ``medblip`` or ``radfm`` (``weights=`` a folder of its files; medblip
    and radfm read whole volumes), or a LLaVA / LLaVA-Med / transformers llava folder, or a folder
    `medfm train-vlm` wrote. ``vision_tower``: a local CLIP folder for a LLaVA folder whose tower is not inside it."""
    from medfm.vlm.formats import load_llava_folder

    name = str(name_or_path or DEFAULT_MODEL)
    entry = registry.lookup(name, "vlm")
    if entry is not None:
        return entry.build(weights=weights, vision_tower=vision_tower, device=device, dtype=dtype)
    check_name(name, weights is not None)
    from medfm.vlm import small

    if small.is_small_vlm_folder(Path(name)):  # a folder `medfm train-vlm` wrote (RUN/best)
        return small.load(name, dtype=dtype).to(device)
    return load_llava_folder(name, vision_tower=vision_tower, dtype=dtype).to(device)


def check_name(name: str, has_weights: bool = False) -> None:
    """`MedfmError` unless `load` can find ``name``: a registered name (one whose weights are not
    published as one download only with a weights folder) or a LLaVA / transformers llava folder.
    Cheap: a server checks its ``--ask-model`` with it before it starts."""
    from medfm.vlm.formats import is_llava_folder
    from medfm.vlm.small import is_small_vlm_folder

    entry = registry.lookup(name, "vlm")
    if entry is not None and (entry.weights_kind != "none" or has_weights):
        return
    if entry is not None:
        raise MedfmError(f"'{name}' needs a folder of its published downloads (weights=, --weights)")
    if not (Path(name).is_dir() and (is_llava_folder(Path(name)) or is_small_vlm_folder(Path(name)))):
        raise MedfmError(f"unknown vision-language model '{name}'{registry.other_family_hint(name, 'vlm')}: not "
                         f"{', '.join(registry.names('vlm'))}, "
                         "or a LLaVA / transformers llava folder or one medfm train-vlm wrote")


# -- the builders the registry names (``builder=``) ------------------------------------------------


def build_llava(entry: ModelEntry, *, weights: str | PathLike[str] | None = None,
                vision_tower: str | PathLike[str] | None = None, device: str = "cpu", dtype: Any = None) -> Model:
    """A LLaVA-style model: ``weights=`` a local copy of its files, else its folder in the package
    (``bundled:``) or its hub repository (``hub:``)."""
    from medfm.hub import hub_snapshot, resolve
    from medfm.vlm.formats import load_llava_folder

    if weights is not None:
        folder = Path(weights)
    elif entry.weights_kind == "bundled":
        folder = resolve(entry.name, entry.weights, None, None)
    else:
        folder = hub_snapshot(entry.weights_location, ("*.json", "*.safetensors", "*.model"))
    return load_llava_folder(folder, vision_tower=vision_tower, dtype=dtype).to(device)


def build_xraygpt(entry: ModelEntry, *, weights: str | PathLike[str] | None = None, vision_tower: object = None,
                  device: str = "cpu", dtype: Any = None) -> Model:
    """XrayGPT from a folder holding its three parts as its README names them: the BLIP-2 checkpoint
    (``blip2_pretrained*.pth``), XrayGPT's own ``.pth`` (``llama_proj``), the Vicuna folder, and
    optionally ``eva_vit_g.pth``."""
    from medfm.vlm.formats import load_xraygpt

    folder = Path(weights) if weights is not None else None
    if folder is None or not folder.is_dir():
        raise MedfmError(entry.weights_location)
    blip2 = sorted(folder.glob("blip2_pretrained*.pth"))
    eva = folder / "eva_vit_g.pth"
    own = [p for p in sorted(folder.glob("*.pth")) if p not in blip2 and p != eva]
    lms = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "config.json").is_file()]
    if len(blip2) != 1 or len(own) != 1 or len(lms) != 1:
        raise InputFileError(folder, f"needs exactly one blip2_pretrained*.pth ({len(blip2)} found), one other .pth "
                             f"(XrayGPT's, {len(own)} found) and one LM folder with config.json ({len(lms)} found)")
    return load_xraygpt(own[0], blip2[0], lms[0], eva=eva if eva.is_file() else None, dtype=dtype).to(device)


def build_med_flamingo(entry: ModelEntry, *, weights: str | PathLike[str] | None = None, vision_tower: object = None,
                       device: str = "cpu", dtype: Any = None) -> Model:
    """Med-Flamingo from a folder holding its ``model.pt``, the LLaMA-7B folder it was trained on
    and the CLIP ViT-L/14 folder (transformers layout), told apart by their ``config.json``."""
    import json

    from medfm.vlm.formats import load_med_flamingo

    folder = Path(weights) if weights is not None else None
    if folder is None or not (folder / "model.pt").is_file():
        raise MedfmError(entry.weights_location)
    kinds: dict[str, list[Path]] = {"clip": [], "llama": []}
    for part in sorted(p for p in folder.iterdir() if (p / "config.json").is_file()):
        kind = json.loads((part / "config.json").read_text()).get("model_type")
        kinds.setdefault(kind, []).append(part)
    if len(kinds["clip"]) != 1 or len(kinds["llama"]) != 1:
        raise InputFileError(folder, f"needs one CLIP folder ({len(kinds['clip'])} found) and one LLaMA folder "
                             f"({len(kinds['llama'])} found) beside model.pt")
    return load_med_flamingo(folder / "model.pt", kinds["llama"][0], kinds["clip"][0], dtype=dtype).to(device)


def build_radfm(entry: ModelEntry, *, weights: str | PathLike[str] | None = None, vision_tower: object = None,
                device: str = "cpu", dtype: Any = None) -> Model:
    """RadFM from a folder holding its ``pytorch_model.bin`` and the repository's ``Language_files``."""
    from medfm.vlm.radfm import load_radfm

    if weights is None:
        raise MedfmError(entry.weights_location)
    return load_radfm(weights, dtype=dtype).to(device)


def build_medblip(entry: ModelEntry, *, weights: str | PathLike[str] | None = None, vision_tower: object = None,
                  device: str = "cpu", dtype: Any = None) -> Model:
    """MedBLIP from a folder holding the checkpoint its trainer saved (one ``.pth`` or
    ``.safetensors``: ``epochN.pth``) and its LM's folder (``config.json`` + tokenizer, e.g.
    stanford-crfm/BioMedLM, or google/flan-t5-xl for the FLAN-T5 variant)."""
    from medfm.vlm.medblip import load_medblip

    folder = Path(weights) if weights is not None else None
    if folder is None or not folder.is_dir():
        raise MedfmError(entry.weights_location)
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in {".pth", ".pt", ".bin", ".safetensors"}]
    lms = [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / "config.json").is_file()]
    if len(files) != 1 or len(lms) != 1:
        raise InputFileError(folder, f"needs exactly one MedBLIP checkpoint (.pth/.safetensors, {len(files)} found) and one "
                             f"LM folder with config.json ({len(lms)} found)")
    return load_medblip(files[0], lms[0], dtype=dtype).to(device)


def build_expert_pipeline(entry: ModelEntry, *, weights: object = None, vision_tower: object = None,
                          device: str = "cpu", dtype: Any = None) -> Model:
    """The experts-to-text pipeline over the registered models its ``parts:`` name."""
    from medfm.clip import load as load_classifier
    from medfm.lm import load as load_lm
    from medfm.vlm.experts import ExpertPipeline

    if weights is not None:
        raise MedfmError(f"'{entry.name}' is built from medfm-clip-small and smollm2-135m: it takes no weights=")
    classifier, lm = entry.weights_location.split("+")
    return ExpertPipeline(load_classifier(classifier, device=device), load_lm(lm, device=device), name=entry.name)


@functools.lru_cache(maxsize=2)
def cached(name: str) -> Model:
    """A named model loaded once per process (for `ask` / `report` without ``model=``)."""
    return load(name)


def resolve_model(model: Model | str | None, weights: str | PathLike[str] | None = None) -> Model:
    """A loaded model, or a name / folder (default medfm-vlm-small) loaded once per process,
    or with ``weights`` (a local copy of a published model's files)."""
    if hasattr(model, "answer"):
        return model
    return cached(str(model or DEFAULT_MODEL)) if weights is None else load(model, weights=weights)


def takes_volumes(model: Model | str | None) -> bool:
    """True for a model that reads whole 3D volumes (MedBLIP, RadFM): a loaded one that says so, or a
    registered name whose entry says so (``input: volume``: volumes only; ``volumes``: 2D images too).
    Cheap: no model is loaded."""
    if hasattr(model, "answer"):
        return bool(getattr(model, "volumetric", False) or getattr(model, "takes_volumes", False))
    entry = registry.lookup(str(model or DEFAULT_MODEL), "vlm")
    return entry is not None and (entry.options.get("input") == "volume" or bool(entry.options.get("volumes")))


def volumes_only(model: Model | str | None) -> bool:
    """True for a 3D model that takes no 2D image and no single slice (MedBLIP)."""
    if hasattr(model, "answer"):
        return bool(getattr(model, "volumetric", False))
    entry = registry.lookup(str(model or DEFAULT_MODEL), "vlm")
    return entry is not None and entry.options.get("input") == "volume"


def model_image(image: str | PathLike[str] | MedicalImage, slice_index: int | None, model: Model | str | None) -> MedicalImage:
    """What ``model`` is asked about: the whole volume for a 3D model (RadFM also a 2D image or a
    slice), else `image_2d`."""
    if not takes_volumes(model):
        return image_2d(image, slice_index)
    if not volumes_only(model):
        return image_2d(image, slice_index, volumes=True)
    if not isinstance(image, MedicalImage):
        image = read_image(image)
    name = getattr(model, "name", model)
    if not image.is_volume:
        raise InputFileError(image.path, f"is a 2D image: {name} reads whole 3D volumes (NIfTI, DICOM series)")
    if slice_index is not None:
        raise InputFileError(image.path, f"{name} reads the whole volume: leave out --slice")
    return image


def image_2d(image: str | PathLike[str] | MedicalImage, slice_index: int | None = None,
             volumes: bool = False) -> MedicalImage:
    """The 2D image a question is about: a file or `MedicalImage`, a volume's slice ``slice_index``;
    with ``volumes`` (a model that `takes_volumes`), a volume without ``slice_index`` whole."""
    if not isinstance(image, MedicalImage):
        image = read_image(image)
    if image.is_volume:
        if slice_index is None and volumes:
            return image
        if slice_index is None:
            raise InputFileError(image.path, f"is a 3D volume ({image.array.shape[0]} slices); the image encoders "
                                 "here are 2D: pass a slice (--slice K)")
        try:
            return image.slice(slice_index)
        except IndexError as error:
            raise InputFileError(image.path, str(error)) from error
    if slice_index is not None:
        raise InputFileError(image.path, "is a 2D image: --slice is only for volumes")
    return image


def check_question(question: str) -> str:
    """The question, stripped; an empty one is refused."""
    if not question or not question.strip():
        raise PromptError("the question is empty")
    return question.strip()


def check_choices(choices: Sequence[str]) -> list[str]:
    """At least two distinct, non-empty choices."""
    options = [str(choice).strip() for choice in choices]
    if len(options) < 2:
        raise PromptError(f"a closed question needs at least two choices, got {len(options)}")
    if any(not option for option in options) or len(set(options)) != len(options):
        raise PromptError(f"the choices must be distinct and non-empty, got {list(choices)}")
    return options


def ask(image: str | PathLike[str] | MedicalImage, question: str, model: Model | str | None = None,
        choices: Sequence[str] | None = None, *, weights: str | PathLike[str] | None = None,
        slice_index: int | None = None, max_new_tokens: int = 128, stream: Callable[[str], None] | None = None) -> str:
    """The model's answer to ``question`` about ``image`` (a 2D file or `MedicalImage`; a volume
    with ``slice_index``, or whole for a 3D model such as medblip). With ``choices``: the choice the
    model gives the highest log-likelihood, exactly as given. Bad input is refused before the model loads."""
    question = check_question(question)
    options = check_choices(choices) if choices is not None else None
    picture = model_image(image, slice_index, model)
    network = resolve_model(model, weights)
    if options is not None:
        scores = network.score([(question, None)], picture, options)
        answer = list(choices)[max(range(len(options)), key=scores.__getitem__)]  # as given, not stripped
        if stream is not None:
            stream(answer)
        return answer
    return network.answer([(question, None)], picture, max_new_tokens=max_new_tokens, stream=stream)


def report(image: str | PathLike[str] | MedicalImage, model: Model | str | None = None, *,
           weights: str | PathLike[str] | None = None, slice_index: int | None = None, max_new_tokens: int = 200,
           stream: Callable[[str], None] | None = None) -> str:
    """A findings-style draft for ``image`` (research use: a draft to check, not a report)."""
    picture = model_image(image, slice_index, model)
    request = REPORT_REQUESTS.get(picture.modality if picture.modality == "dermoscopy" else None)
    return resolve_model(model, weights).answer([(request, None)], picture, max_new_tokens=max_new_tokens, stream=stream)


class Conversation:
    """A multi-turn conversation about one image: each `say` adds a question and the model's reply."""

    def __init__(self, image: str | PathLike[str] | MedicalImage, model: Model | str | None = None, *,
                 weights: str | PathLike[str] | None = None, slice_index: int | None = None) -> None:
        self.image = model_image(image, slice_index, model)
        self.model = resolve_model(model, weights)
        self.turns: list[tuple[str, str | None]] = []

    def say(self, question: str, *, max_new_tokens: int = 128, stream: Callable[[str], None] | None = None) -> str:
        """The model's reply to ``question``, given the turns so far."""
        question = check_question(question)
        reply = self.model.answer([*self.turns, (question, None)], self.image, max_new_tokens=max_new_tokens, stream=stream)
        self.turns.append((question, reply))
        return reply
