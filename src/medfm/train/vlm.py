"""LLaVA's two training stages for a small vision-language model (`medfm.vlm.small`):

* **stage 1** trains the connector (LLaVA-1.5's 2-layer MLP) on image-text pairs, the image tower
  and the language model frozen;
* **stage 2** trains the connector and LoRA adapters on the LM (peft) on instructions: closed
  questions with templated answers, balanced per class, and findings drafts from clinical notes.

The frozen tower's features are computed once per image and cached (`medfm.train.vlm_data`), so a
step costs only the connector and the LM on short sequences (the image is ``1 + grid^2`` tokens).
The loss is the cross-entropy of the answer's tokens (and its end-of-turn marker), averaged per
sample so a long note weighs as much as a one-word answer; the LM head runs only at those positions.

A run folder holds ``state.pt`` (trained tensors, optimizer, scheduler, RNG, epoch and step;
written atomically, the trainer's format), ``best/`` (lowest validation loss) and ``last/`` (model
folders `medfm.vlm.small.load` and ``medfm ask --model`` read), ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medfm.errors import CheckpointError, InputFileError, MedfmError

DEFAULT_ENCODER = {"kind": "medfm-clip", "clip": "medfm-clip-small", "grid": 2}
DEFAULT_LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "dropout": 0.0}
DEFAULT_LR = {1: 1e-3, 2: 3e-4}


@dataclass
class VLMTrainConfig:
    """One `train_vlm` run (the CLI's ``medfm train-vlm`` options)."""

    stage: int
    data: list[Path]
    output: Path
    base: Path | None = None
    language_model: str = "smollm2-135m"
    encoder: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ENCODER))
    preprocess: dict[str, Any] | None = None
    lora: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LORA))
    epochs: int = 1
    epoch_size: int | None = None
    max_steps: int | None = None
    budget_minutes: float | None = None
    lr: float | None = None
    batch_size: int = 8
    bf16: bool = True
    resume: bool = False
    seed: int = 0
    max_answer_tokens: int = 48
    val_samples: int = 64
    warmup: float = 0.05
    save_every: int = 50
    name: str = "medfm-vlm"
    feature_cache: Path | None = None
    limit: int | None = None

    def check(self) -> None:
        """Refuse bad settings before anything loads."""
        if self.stage not in (1, 2):
            raise MedfmError(f"--stage must be 1 or 2, got {self.stage}")
        for number, what in ((self.epochs, "--epochs"), (self.batch_size, "--batch-size")):
            if number < 1:
                raise MedfmError(f"{what} must be at least 1, got {number}")
        if self.limit is not None and self.limit < 1:
            raise MedfmError(f"--limit must be at least 1, got {self.limit}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MedfmError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise MedfmError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        if self.base is not None and not Path(self.base).exists():
            raise InputFileError(Path(self.base), "does not exist (--base takes a run folder or a model folder)")


@dataclass
class VLMTrainResult:
    """Where a run wrote its model folders and how it went."""

    best: Path
    last: Path
    steps: int
    best_val_loss: float
    history: list[dict]


def base_folder(base: Path) -> Path:
    """The model folder of ``--base``: a folder with config.json, or a run folder's ``best/``."""
    base = Path(base)
    if (base / "config.json").is_file():
        return base
    if (base / "best" / "config.json").is_file():
        return base / "best"
    raise InputFileError(base, "is neither a model folder (config.json) nor a run folder with best/config.json")


class _Encoded:
    """A sample as token ids: before the image, after it (the prompt's tail), the answer."""

    __slots__ = ("image", "before", "after", "answer")

    def __init__(self, image: int, before: list[int], after: list[int], answer: list[int]) -> None:
        self.image, self.before, self.after, self.answer = image, before, after, answer


def encode_sample(tokenizer: Any, prompt_format: Any, question: str, answer: str, image: int, max_answer: int) -> _Encoded:
    """Token ids as `VisionLanguageModel.embed` and ``score`` tokenize them: the prompt split at the
    image placeholder (BOS in front), the answer after the prompt's tail, then the end-of-turn
    marker; an answer longer than ``max_answer`` tokens is cut (and has no end marker)."""
    from medfm.vlm.model import continuation_ids

    prompt = prompt_format.render([(question, None)], True, tokenizer)
    before, after = prompt.split(prompt_format.placeholder)
    end = prompt_format.stop[0] if prompt_format.stop else (tokenizer.eos_token or "")
    ids = continuation_ids(tokenizer, after, prompt_format.answer_opening + answer + end).tolist()
    if len(ids) > max_answer:
        ids = ids[:max_answer]
    return _Encoded(image, tokenizer(before, add_special_tokens=True).input_ids,
                    tokenizer(after, add_special_tokens=False).input_ids, ids)


def _decoder_and_head(language_model: Any) -> tuple[Any, Any]:
    """The LM's body (hidden states) and output head, through a peft wrapper if there is one."""
    network = language_model.get_base_model() if hasattr(language_model, "get_base_model") else language_model
    return network.get_decoder(), network.get_output_embeddings()


def batch_loss(model: Any, features: Tensor, batch: list[_Encoded], bf16: bool) -> Tensor:
    """Mean over samples of the mean answer-token cross-entropy."""
    embedding = model.language_model.get_input_embeddings()
    decoder, head = _decoder_and_head(model.language_model)
    device = embedding.weight.device
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        image_tokens = model.connector(features[[s.image for s in batch]].to(device))
        rows, targets, positions = [], [], []
        for index, sample in enumerate(batch):
            text = torch.tensor(sample.after + sample.answer, device=device)
            row = torch.cat([embedding(torch.tensor(sample.before, device=device)), image_tokens[index].to(embedding.weight.dtype),
                             embedding(text)])
            start = len(sample.before) + image_tokens.shape[1] + len(sample.after)
            positions.append(torch.arange(start - 1, start - 1 + len(sample.answer)))
            targets.append(torch.tensor(sample.answer))
            rows.append(row)
        length = max(len(row) for row in rows)
        width = rows[0].shape[1]
        embeds = torch.zeros(len(rows), length, width, dtype=rows[0].dtype, device=device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            embeds[index, : len(row)] = row
            mask[index, : len(row)] = 1
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        sample_index = torch.cat([torch.full((len(p),), i) for i, p in enumerate(positions)])
        logits = head(hidden[sample_index, torch.cat(positions)]).float()
    token_loss = torch.nn.functional.cross_entropy(logits, torch.cat(targets).to(device), reduction="none")
    per_sample = torch.zeros(len(batch), device=device).index_add(0, sample_index.to(device), token_loss)
    counts = torch.tensor([len(p) for p in positions], dtype=per_sample.dtype, device=device)
    return (per_sample / counts).mean()


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    connector = list(model.connector.parameters())
    for parameter in connector:
        parameter.requires_grad_(True)
    lora = [p for n, p in model.language_model.named_parameters() if "lora_" in n]
    for parameter in lora:
        parameter.requires_grad_(True)
    return connector + lora


def model_config(config: VLMTrainConfig) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """The model's config and its starting trained tensors: ``--base``'s (stage 2 adds LoRA), else new."""
    from medfm.safe_load import read_folder_weights
    from medfm.vlm import small

    if config.base is not None:
        folder = base_folder(config.base)
        base = small.read_config(folder)
        state = read_folder_weights(folder, base)
        model = {k: v for k, v in base.items() if k not in ("sha256", "training")}
        if config.stage == 2 and not model.get("lora"):
            model["lora"] = dict(config.lora)
        return model, state
    model = {"name": config.name, "encoder": dict(config.encoder), "connector": {"kind": "mlp", "depth": 2},
             "language_model": config.language_model, "lora": dict(config.lora) if config.stage == 2 else None}
    if config.preprocess is not None:
        model["preprocess"] = dict(config.preprocess)
    return model, None


def train_vlm(config: VLMTrainConfig, log: Callable[[str], None] = print) -> VLMTrainResult:
    """Run one stage (see the module docstring); resumable with ``resume``."""
    from medfm.hub import cache_dir
    from medfm.io.writers import atomic_path
    from medfm.train.trainer import lr_schedule, read_run_state
    from medfm.segment.fast import bf16_supported
    from medfm.train.vlm_data import epoch_order, feature_cache_key, image_features, read_vl_data
    from medfm.vlm import small

    config.check()
    output = Path(config.output)
    state_path = output / "state.pt"
    if config.resume and not state_path.is_file():
        raise InputFileError(state_path, "does not exist: nothing to resume (drop --resume to start a new run)")
    if not config.resume and state_path.is_file():
        raise InputFileError(state_path, "exists: pass --resume to continue that run, or choose another -o")
    data = read_vl_data(config.data, config.stage, config.limit)  # bad data fails before the models load
    torch.manual_seed(config.seed)
    spec, start_state = model_config(config)
    model = small.build(spec, start_state, source=config.base or "base", merge=False, new_lora=config.stage == 2)
    bf16 = config.bf16 and bf16_supported()
    cache = config.feature_cache or cache_dir() / "vlm-features" / f"{feature_cache_key(spec['encoder'], data.images)}.safetensors"
    features = image_features(model.encoder, model.preprocess, data.images, data.modalities, cache, log)
    encode = lambda s: encode_sample(model.tokenizer, model.prompt_format, s.question, s.answer, s.image,  # noqa: E731
                                     config.max_answer_tokens)
    train = [encode(s) for s in data.samples["train"]]
    val_samples = data.samples["val"] or data.samples["train"]
    val_order = epoch_order(val_samples, min(config.val_samples, len(val_samples)), config.seed, -1, balanced=True)
    val = [encode(val_samples[i]) for i in val_order]

    parameters = _trainable(model)
    epoch_size = config.epoch_size or len(train)
    per_epoch = max(1, epoch_size // config.batch_size)
    total = min(per_epoch * config.epochs, config.max_steps or math.inf)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr or DEFAULT_LR[config.stage], weight_decay=0.0)
    started = time.monotonic()
    seconds = 0.0
    budget = config.budget_minutes * 60 if config.budget_minutes else None
    spent = (lambda: (seconds + time.monotonic() - started) / budget) if budget else (lambda: 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(int(total), config.warmup, spent))
    step, best, history = 0, math.inf, []
    if config.resume:
        state = read_run_state(state_path)
        try:
            small_state = {k: v for k, v in state["model"].items()}
            _restore(model, spec, small_state, state_path)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(state_path, f"its optimizer, scheduler or RNG state does not fit this run ({error})") from error
        step, best, history, seconds = state["step"], state["best"], json.loads(state["history"]), state["seconds"]
        log(f"resumed at step {step}")

    def save_state(epoch: int) -> None:
        payload = {"model": {k: v.detach().cpu() for k, v in small.trained_state(model, spec).items()},
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step, "best": best,
                   "history": json.dumps(history), "seconds": seconds + time.monotonic() - started,
                   "recipe": {"stage": config.stage}, "base": str(config.base or "")}
        with atomic_path(state_path) as temporary:
            torch.save(payload, temporary)

    training = {"stage": config.stage, "data": [str(p) for p in config.data], "seed": config.seed,
                "batch_size": config.batch_size, "lr": config.lr or DEFAULT_LR[config.stage], "bf16": bf16}
    if config.base is not None:  # the weights it started from, so a continued model says which
        base = small.read_config(base_folder(config.base))
        training["base"] = {"name": base.get("name"), "step": base.get("training", {}).get("step"),
                            "sha256": base.get("sha256", {}).get("model.safetensors")}
    output.mkdir(parents=True, exist_ok=True)
    out_of_time = lambda: budget is not None and spent() >= 1.0  # noqa: E731
    model.train()
    for epoch in range(step // per_epoch, config.epochs):
        if step >= total or out_of_time():
            break
        order = epoch_order(data.samples["train"], per_epoch * config.batch_size, config.seed, epoch,
                            balanced=config.stage == 2)
        losses = []
        for index in range(step - epoch * per_epoch, per_epoch):
            batch = [train[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
            loss = batch_loss(model, features, batch, bf16)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                log(f"stage {config.stage} epoch {epoch + 1} step {step}/{int(total)} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
            if step % config.save_every == 0:
                save_state(epoch)
            if step >= total or out_of_time():
                break
        val_loss = evaluate_loss(model, features, val, config.batch_size, bf16)
        history.append({"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(1, len(losses)), "val_loss": val_loss})
        log(f"epoch {epoch + 1}: train loss {history[-1]['train_loss']:.3f}, val loss {val_loss:.3f}")
        small.save(model, output / "last", {**spec, "training": {**training, "step": step, "val_loss": val_loss}})
        if val_loss < best:
            best = val_loss
            small.save(model, output / "best", {**spec, "training": {**training, "step": step, "val_loss": val_loss}})
        save_state(epoch + 1)
    with atomic_path(output / "metrics.json") as temporary:
        temporary.write_text(json.dumps({"config": _jsonable(asdict(config)), "history": history}, indent=2) + "\n")
    if not (output / "best" / "config.json").is_file():
        raise MedfmError(f"{output}: the run ended before its first validation (raise --max-steps or --budget-minutes)")
    return VLMTrainResult(output / "best", output / "last", step, best, history)


def _restore(model: Any, spec: dict[str, Any], state: dict[str, Tensor], source: Path) -> None:
    """Put a run's saved trained tensors back into ``model`` (peft-wrapped LM)."""
    from medfm.safe_load import load_strict
    from medfm.vlm.small import _load_lora

    load_strict(model.connector, {k[10:]: v for k, v in state.items() if k.startswith("connector.")}, source, "connector")
    if spec.get("lora"):
        _load_lora(model.language_model, {k[5:]: v for k, v in state.items() if k.startswith("lora.")}, source)
    encoder = {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}
    if encoder:
        load_strict(model.encoder, encoder, source, "encoder")


@torch.no_grad()
def evaluate_loss(model: Any, features: Tensor, samples: list[_Encoded], batch_size: int, bf16: bool) -> float:
    """Mean `batch_loss` over ``samples`` (model in eval mode for it)."""
    model.eval()
    losses = [float(batch_loss(model, features, samples[i : i + batch_size], bf16)) * len(samples[i : i + batch_size])
              for i in range(0, len(samples), batch_size)]
    model.train()
    return sum(losses) / max(1, len(samples))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
