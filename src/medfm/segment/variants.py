"""The survey's adaptation variants of a SAM: which parts a recipe trains, and the modules some add.

==============  ===================================================================================
``full``        MedSAM: image encoder and mask decoder train; the prompt encoder stays frozen.
``decoder``     the mask decoder only (image encoder frozen: embeddings can be cached).
``lora``        SAMed: LoRA (peft) on the image encoder's attention projections + the mask decoder.
                Both of medfm's encoders (TinyViT, SAM's ViT) compute q, k and v with one fused
                ``qkv`` Linear, and peft adapts a Linear's whole output, so the default target
                ``qkv`` puts one rank-r update on q, k and v together (SAMed updates q and v only;
                :class:`medfm.segment.adapters.LoRAQKVLinear` is that layer for loading SAMed's
                files). ``lora_targets`` names other Linear layers by their last name part, e.g.
                ``("qkv", "proj")``.
``adapter``     Medical SAM Adapter / SAM-Med2D style: MSA's bottleneck adapter (Linear down to
                ``adapter_ratio * C``, GELU, Linear up, zero-initialised, residual) after every
                transformer block of the image encoder (TinyViT's attention blocks; every ViT
                block) + the mask decoder.
``autoprompt``  AutoSAM: a small CNN turns the image embedding into the sparse and dense prompt
                embeddings; SAM stays frozen. Prompt-free: the model segments the foreground (all
                labels merged) and ignores prompts given to it.
==============  ===================================================================================

Every recipe but ``autoprompt`` may also train the prompt encoder (``prompt_encoder``): LiteMedSAM
learnt from boxes only, so its click embeddings need training before clicks mean anything to it.

Only the tensors a recipe trains are saved for the partial recipes (`delta_keys`), and `apply_recipe`
rebuilds the same structure on the base when such a folder is loaded (`rebuild_from_delta`). This
module lives in the segmentation family so that loading a fine-tuned folder needs nothing of
`medfm.train`, which holds the training loop and `blend_with_base`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import Tensor, nn
from transformers.models.sam.modeling_sam import SamVisionLayer

from medfm.errors import CheckpointError, MedfmError
from medfm.segment.adapters import BottleneckAdapter
from medfm.segment.sam import SamCore
from medfm.segment.tinyvit import TinyViTBlock

RECIPES = ("full", "decoder", "lora", "adapter", "autoprompt")
#: recipes whose image encoder is frozen, so image embeddings can be computed once and cached
FROZEN_ENCODER = {"decoder", "autoprompt"}
DEFAULT_LORA_TARGETS = ("qkv",)


@dataclass(frozen=True)
class Recipe:
    """A recipe and its options (the ones of other recipes are ignored)."""

    name: str
    lora_rank: int = 4
    lora_alpha: float | None = None  #: default: the rank (scaling 1, as SAMed)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    adapter_ratio: float = 0.25
    prompt_tokens: int = 4  #: autoprompt: sparse prompt tokens generated per image
    prompt_encoder: bool = False  #: train the prompt encoder too (clicks: LiteMedSAM's point embeddings never trained)

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise MedfmError(f"unknown recipe '{self.name}'; choose one of {', '.join(RECIPES)}")
        if self.lora_rank < 1 or self.adapter_ratio <= 0 or self.prompt_tokens < 1:
            raise MedfmError("lora rank, adapter ratio and prompt tokens must be positive")

    @property
    def frozen_encoder(self) -> bool:
        return self.name in FROZEN_ENCODER

    @property
    def saves_delta(self) -> bool:
        """Partial recipes save only their trained tensors, to be loaded on top of the base."""
        return self.name != "full"

    def to_dict(self) -> dict:
        """The options that matter for this recipe, JSON-ready."""
        keys = {"lora": ("lora_rank", "lora_alpha", "lora_targets"), "adapter": ("adapter_ratio",),
                "autoprompt": ("prompt_tokens",)}.get(self.name, ())
        values = {"name": self.name} | {key: getattr(self, key) for key in keys}
        if self.prompt_encoder:  # only when set, so the recipes of earlier runs and folders read as before
            values["prompt_encoder"] = True
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict) -> Recipe:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _zero_adapter(dim: int, ratio: float) -> BottleneckAdapter:
    """MSA's bottleneck adapter without its skip (the hook adds it), its up-projection zeroed so that
    training starts from the base model."""
    adapter = BottleneckAdapter(dim, ratio, skip_connect=False)
    nn.init.zeros_(adapter.D_fc2.weight)
    nn.init.zeros_(adapter.D_fc2.bias)
    return adapter


def _add_adapter(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """Forward hook of an adapted block: its output plus the adapter of that output."""
    return output + module.adapter(output)


class PromptGenerator(nn.Module):
    """AutoSAM's prompt network, from the image embedding (B, C, E, E): two 3x3 conv blocks, then a
    1x1 conv to the dense prompt embedding and, from the pooled features, ``tokens`` sparse ones."""

    def __init__(self, dim: int, tokens: int, hidden: int = 64) -> None:
        super().__init__()
        self.tokens = tokens
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1), nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8 if hidden % 8 == 0 else 1, hidden), nn.GELU(),
        )
        self.dense = nn.Conv2d(hidden, dim, 1)
        self.sparse = nn.Linear(hidden, tokens * dim)

    def forward(self, embedding: Tensor) -> tuple[Tensor, Tensor]:
        """-> sparse (B, 1, tokens, C), dense (B, C, E, E)."""
        features = self.body(embedding)
        sparse = self.sparse(features.mean(dim=(2, 3))).reshape(len(embedding), 1, self.tokens, -1)
        return sparse, self.dense(features)


class AutoPromptSam(SamCore):
    """A SAM whose prompt embeddings come from a `PromptGenerator` of the image embedding."""

    def __init__(self, config, tokens: int) -> None:
        super().__init__(config)
        self.prompt_generator = PromptGenerator(config.prompt_embed_dim, tokens)

    def prompt_embeddings(self, image_embedding: Tensor, sparse: Tensor | None, dense: Tensor) -> tuple[Tensor, Tensor]:
        """The generated embeddings, one set per prompt given (all alike: the prompts are ignored)."""
        generated_sparse, generated_dense = self.prompt_generator(image_embedding)
        count = len(sparse) if sparse is not None else len(image_embedding)
        return generated_sparse.expand(count, -1, -1, -1), generated_dense


def _lora(encoder: nn.Module, recipe: Recipe) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, module in encoder.named_modules() if isinstance(module, nn.Linear)}
    missing = [target for target in recipe.lora_targets if target not in names]
    if missing:
        raise MedfmError(f"LoRA target(s) {', '.join(missing)} name no Linear layer of this image encoder; "
                         f"its Linear layers are named {', '.join(sorted(names))}")
    alpha = recipe.lora_alpha if recipe.lora_alpha is not None else recipe.lora_rank
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=alpha, target_modules=list(recipe.lora_targets), lora_dropout=0.0)
    inject_adapter_in_model(config, encoder)


def _blocks(encoder: nn.Module) -> list[nn.Module]:
    blocks = [m for m in encoder.modules() if isinstance(m, (TinyViTBlock, SamVisionLayer))]
    if not blocks:
        raise MedfmError(f"the adapter recipe knows no transformer blocks in a {type(encoder).__name__} encoder")
    return blocks


def _block_width(block: nn.Module) -> int:
    return block.layer_norm1.normalized_shape[0] if isinstance(block, SamVisionLayer) else block.attn.norm.normalized_shape[0]


def apply_recipe(network: SamCore, recipe: Recipe) -> SamCore:
    """Add the recipe's modules to a base network (in place, except autoprompt, which returns a new
    network holding the base's weights) and set which parameters train."""
    if recipe.name == "lora":
        _lora(network.image_encoder, recipe)
    elif recipe.name == "adapter":
        for block in _blocks(network.image_encoder):
            block.adapter = _zero_adapter(_block_width(block), recipe.adapter_ratio)
            block.register_forward_hook(_add_adapter)
    elif recipe.name == "autoprompt":
        base = network
        network = AutoPromptSam(base.config, recipe.prompt_tokens)
        network.load_state_dict(base.state_dict(), strict=False)
        network.to(next(base.parameters()).device)
    trained = delta_keys(network, recipe)
    for name, parameter in network.named_parameters():
        parameter.requires_grad_(name in trained or (recipe.name == "full" and name.startswith("image_encoder.")))
    return network


def delta_keys(network: SamCore, recipe: Recipe) -> set[str]:
    """State-dict keys the recipe trains (for ``full``: the encoder and decoder's parameters)."""
    def trains(key: str) -> bool:
        if recipe.name == "autoprompt":
            return key.startswith("prompt_generator.")
        if key.startswith("mask_decoder.") or (recipe.prompt_encoder and key.startswith("prompt_encoder.")):
            return True
        return {
            "full": key.startswith("image_encoder."),
            "lora": ".lora_" in key,
            "adapter": ".adapter." in key,
        }.get(recipe.name, False)

    return {key for key in network.state_dict() if trains(key)}


def merge_for_inference(network: SamCore) -> SamCore:
    """Fold peft LoRA layers into their base Linear layers: same outputs, plain modules (fast paths)."""
    if "peft" not in sys.modules:  # no LoRA layer exists before peft is imported: skip its 0.1-1 s import
        return network
    from peft.tuners.lora import LoraLayer

    for name, module in list(network.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent_name), child, module.get_base_layer())
    return network


def rebuild_from_delta(config: dict, state: dict[str, Tensor], source: str) -> SamCore:
    """The network a partial recipe saved: its base (``config['base']``, loaded with `medfm.load`),
    the recipe's modules, then the saved tensors, which must be exactly the ones the recipe trains."""
    from medfm.segment.model import load

    recipe = Recipe.from_dict(config["recipe"])
    network = apply_recipe(load(config["base"]).network, recipe)
    expected = delta_keys(network, recipe)
    shapes = network.state_dict()
    problems = [f"missing {k}" for k in sorted(expected - set(state))][:3]
    problems += [f"unexpected {k}" for k in sorted(set(state) - expected)][:3]
    problems += [f"{k} is {tuple(v.shape)}, needs {tuple(shapes[k].shape)}" for k, v in state.items()
                 if k in shapes and v.shape != shapes[k].shape][:3]
    if problems:
        raise CheckpointError(source, f"does not fit the {recipe.name} recipe on {config['base']}: " + ", ".join(problems))
    network.load_state_dict(state, strict=False)
    return merge_for_inference(network).eval()
