"""What training adds to the adaptation variants of `medfm.segment.variants`: counting and freezing
parameters, and WiSE-FT blends of a finished run with its base."""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

from torch import nn

from medfm.errors import CheckpointError, OptionError
from medfm.segment.variants import Recipe

__all__ = ["BLENDABLE", "blend_with_base", "freeze_frozen_norms", "trainable_parameters"]


def freeze_frozen_norms(network: nn.Module) -> None:
    """Put batch norms without trainable parameters in eval mode, so a frozen encoder's running
    statistics do not drift while the rest trains (call after ``network.train()``)."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def trainable_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


#: recipes whose training starts from the base's own weights, so that blending back is defined
BLENDABLE = {"full", "decoder"}


def blend_with_base(run: str | PathLike[str], alpha: float, out: str | PathLike[str]) -> Path:
    """WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): a trained
    model folder moved back towards its base in weight space, ``base + alpha * (trained - base)``
    for every tensor it trained, written to ``out`` as a model folder of the same kind.

    ``alpha`` 1 is the run, 0 the base. In between, much of the gain on the training data usually
    stays while what the base did well elsewhere comes back: the cheap guard against forgetting.
    Only for ``full`` and ``decoder`` runs, whose trained tensors start as the base's own (LoRA,
    adapters and prompt generators start from random factors, where a blend means nothing).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from medfm.io.writers import write_model_folder
    from medfm.segment.model import load

    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"the blend weight alpha must lie in [0, 1], got {alpha}")
    run = Path(run)
    try:
        config = json.loads((run / "config.json").read_text())
        recipe = Recipe.from_dict(config["recipe"])
        trained = load_file(str(run / "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(run, f"is not a model folder written by medfm train ({error})") from error
    if recipe.name not in BLENDABLE:
        raise OptionError(f"{run}: a {recipe.name} run cannot be blended with its base; only {sorted(BLENDABLE)} runs")
    start = load(config["base"]).network.state_dict()
    missing = sorted(set(trained) - set(start))
    if missing:
        raise CheckpointError(run, f"holds tensors its base {config['base']} lacks, e.g. {missing[0]}")
    blended = {key: (start[key].float() + alpha * (value.float() - start[key].float())).to(value.dtype)
               for key, value in trained.items()}
    config["blend"] = {"alpha": alpha, "run": str(run)}
    return write_model_folder(out, config, blended)
