"""PMC-LLaMA's recipe on medfm's trainer conventions (``medfm train-lm``): continued causal-LM
training on medical text, then instruction tuning on question -> answer pairs, full or LoRA (peft).

* ``continue``: next-token loss over every token of each text (reports, abstracts, questions with
  their answers; `medfm.train.lm_data`), one text per sequence, cut at ``max_length``.
* ``instruct``: the question in the model's prompt format, exactly as the QA harness asks it
  (`medfm.qa.strategies.question_text` in ``LanguageModel.chat_prompt``), then the correct option's
  text and the end-of-sequence token; the loss covers only that answer (prompt tokens are masked).
  Sequences are left-padded so the answers line up at the end and the output layer runs only over
  the answer positions. Items longer than ``max_length`` are skipped and counted.
* the loop: AdamW, `medfm.train.trainer.lr_schedule` (linear warm-up, cosine decay; a time budget
  moves it on), bf16 autocast (default: on where the CPU has AMX-bf16 or CUDA has bf16), batches of
  similar lengths drawn from (seed, epoch) only. Before training (the base) and after each epoch:
  validation loss and zero-shot accuracy on the validation questions, scored by the harness's own
  `medfm.qa.strategies.answer`; ``RUN/last`` and, when validation improved, ``RUN/best``.
* resumable: ``RUN/state.pt`` (trained tensors, optimizer, scheduler, torch RNG, epoch, batch,
  step, history) is written atomically every ``save_every`` steps and after each epoch; ``resume``
  continues at the next batch, so a resumed run sees the batches an uninterrupted one would.

Output: a LoRA delta folder (``model.safetensors`` with each adapted layer's ``lora_A``/``lora_B``
and a ``config.json`` naming the base, `medfm.lm.loading.DELTA_KEY`) or, without LoRA, a full
transformers folder; both load with ``medfm.lm.load(PATH)`` and ``medfm qa --model PATH``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from medfm.catalog import registry
from medfm.errors import CheckpointError, MedfmError, OptionError, PromptError
from medfm.io.writers import atomic_path, jsonable, write_model_folder
from medfm.lm import LanguageModel
from medfm.lm import load as load_lm
from medfm.lm.loading import DELTA_KEY
from medfm.qa.datasets import QAItem
from medfm.qa.strategies import Strategy, answer, question_text
from medfm.safe_load import read_torch_file
from medfm.train.lm_data import LMSource, read_sources
from medfm.train.trainer import TrainResult, lr_schedule

STATE_NAME = "state.pt"
#: LoRA targets per layout (others: peft's default for the model type)
LORA_TARGETS = {"llama": ("q_proj", "k_proj", "v_proj", "o_proj")}
IGNORE = -100


@dataclass
class LMTrainConfig:
    """Everything a ``train-lm`` run needs; recorded in ``RUN/run.json``."""

    recipe: str
    base: str
    data: tuple[Path, ...]
    out: Path
    lora: bool = True
    val_fraction: float = 0.2
    val_items: int | None = 100  #: validation questions (and texts) per dataset scored each epoch; None: all
    epochs: int = 1
    max_steps: int | None = None
    budget_minutes: float | None = None
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 512
    lora_rank: int = 8
    lora_alpha: float | None = None  #: default 2 x rank
    warmup: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool | None = None
    save_every: int = 25  #: optimizer steps between state.pt writes (and after every epoch)
    validate_base: bool = True  #: score the base before training (history's epoch 0)
    resume: bool = False
    progress: bool = False


@dataclass(frozen=True)
class Sequence_:
    """One tokenised training example: ``ids`` and the index of its first token that counts in the loss."""

    ids: list[int]
    start: int
    dataset: str


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Intel AMX), where bf16 autocast pays off."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _check(config: LMTrainConfig) -> None:
    """Option errors, one line each, before any data or model is read."""
    for name in ("epochs", "batch_size", "max_length", "lora_rank", "save_every"):
        if getattr(config, name) < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise OptionError(f"--max-steps must be at least 1, got {config.max_steps}")
    if config.lr <= 0:
        raise OptionError(f"--lr must be positive, got {config.lr}")
    state = config.out / STATE_NAME
    if config.resume and not state.is_file():
        raise OptionError(f"{config.out}: nothing to resume (no {STATE_NAME})")
    if not config.resume and state.is_file():
        raise OptionError(f"{config.out}: holds a run already; pass --resume to continue it, or another -o")


def fit_causal_lm(config: LMTrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``config.recipe`` on ``config.base``; see the module docstring."""
    _check(config)
    sources = read_sources(list(config.data), config.recipe, config.val_fraction)  # before the model loads
    for source in sources:
        for problem in source.problems[:5]:
            log(f"skipped {problem}")
        if len(source.problems) > 5:
            log(f"... and {len(source.problems) - 5} more unusable items in {source.folder}")
    resume_state = _read_state(config) if config.resume else None
    torch.manual_seed(config.seed)
    lm = load_lm(config.base)
    bf16 = config.bf16 if config.bf16 is not None else (
        torch.cuda.is_available() and torch.cuda.is_bf16_supported() if lm.device.type == "cuda" else cpu_has_amx_bf16())
    train_set, skipped = _tokenise(lm, sources, config, validation=False)
    val_set, _ = _tokenise(lm, sources, config, validation=True)
    val_questions = [item for source in sources for item in source.val_items[: config.val_items]]
    if not train_set:
        raise MedfmError(f"every training example is over --max-length {config.max_length} tokens")
    if skipped:
        log(f"skipped {skipped} training example(s) over --max-length {config.max_length} tokens")
    model = _trainable(lm, config)
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    params = [parameter for parameter in model.parameters() if parameter.requires_grad]
    batches_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = batches_per_epoch * config.epochs if config.max_steps is None else min(batches_per_epoch * config.epochs, config.max_steps)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    budget = 60 * config.budget_minutes if config.budget_minutes else None
    started = time.monotonic()
    spent = (lambda: (time.monotonic() - started) / budget) if budget else (lambda: 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, config.warmup, spent))
    epoch, next_batch, step, best, history, seconds = 0, 0, 0, -math.inf, [], 0.0
    if resume_state is not None:
        state = resume_state
        missing = sorted(set(trained) - set(state["model"]))
        if missing:
            raise CheckpointError(config.out / STATE_NAME, f"lacks trained tensors of this run, e.g. {missing[0]}")
        model.load_state_dict(state["model"], strict=False)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(config.out / STATE_NAME, f"its optimizer, scheduler or RNG state does not fit this run ({error})") from error
        epoch, next_batch, step, best, seconds = state["epoch"], state["batch"], state["step"], state["best"], state["seconds"]
        history = json.loads(state["history"])
        log(f"resuming {config.out} at epoch {epoch + 1}, batch {next_batch} (step {step})")
    config.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(config.out / "run.json") as temporary:
        temporary.write_text(json.dumps(jsonable(asdict(config)), indent=2) + "\n")
    log(f"{config.recipe}{' (LoRA)' if config.lora else ''} on {config.base}: {sum(p.numel() for p in params):,} trainable "
        f"parameters, {len(train_set)} training / {len(val_set)} validation texts, {len(val_questions)} validation "
        f"questions, {total} steps{', bf16' if bf16 else ''}")
    autocast = lambda: torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if resume_state is None and config.validate_base:
        record = {"epoch": 0, "step": 0, **_validate(lm, model, val_set, val_questions, config, autocast)}
        history.append(record)
        log(f"base: {_describe(record)}")
    started = time.monotonic() - seconds
    stop = step >= total

    def save_state(epoch_: int, batch_: int) -> None:
        _save_state(config, model, trained, optimizer, scheduler, epoch_, batch_, step, best, history,
                    time.monotonic() - started)

    while epoch < config.epochs and not stop:
        batches = _batches(train_set, config.batch_size, config.seed, epoch)
        model.train()
        epoch_start, running, seen = time.monotonic(), 0.0, 0
        for index in range(next_batch, len(batches)):
            with autocast():
                loss = _loss(model, [train_set[i] for i in batches[index]], lm.tokenizer.pad_token_id, lm.device)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running, seen = running + loss.item(), seen + 1
            if config.progress:
                print(f"\repoch {epoch + 1} step {step}/{total}: loss {running / seen:.4f} "
                      f"({seen / (time.monotonic() - epoch_start):.2f} steps/s)", end="", file=sys.stderr, flush=True)
            over_budget = budget is not None and time.monotonic() - started > budget
            stop = step >= total or over_budget
            if stop:
                break
            if step % config.save_every == 0:
                save_state(epoch, index + 1)
        if config.progress:
            print(file=sys.stderr)
        next_batch = 0
        epoch += 1
        record = {"epoch": epoch, "step": step, "loss": running / max(seen, 1),
                  **_validate(lm, model, val_set, val_questions, config, autocast)}
        record["seconds"] = time.monotonic() - epoch_start
        history.append(record)
        score = record["val_accuracy"] if record["val_accuracy"] is not None else -record["val_loss"]
        improved = score > best
        best = max(best, score)
        log(f"epoch {epoch}: loss {record['loss']:.4f}, {_describe(record)}{' (best)' if improved else ''}")
        _save_model(config, lm, model, config.out / "last", record)
        if improved:
            _save_model(config, lm, model, config.out / "best", record)
        save_state(epoch, 0)
        _write_metrics(config, history, time.monotonic() - started, sum(p.numel() for p in params))
    seconds = time.monotonic() - started
    return TrainResult(config.out / "best", config.out / "last", history, sum(p.numel() for p in params), seconds)


def _describe(record: dict) -> str:
    accuracy = record["val_accuracy"]
    by_dataset = ", ".join(f"{name} {value:.3f}" for name, value in record["val_accuracy_by_dataset"].items())
    return (f"validation loss {record['val_loss']:.4f}, accuracy "
            f"{'-' if accuracy is None else f'{accuracy:.3f}'}{f' ({by_dataset})' if by_dataset else ''}")


def instruct_prompt(lm: LanguageModel, item: QAItem) -> tuple[str, str]:
    """(prompt, answer) of an instruction example: the question as the harness asks it zero-shot, and
    the correct option's text (what the harness scores) closed by the end-of-sequence token."""
    prompt = lm.chat_prompt([{"role": "user", "content": question_text(item)}])
    separator = "" if prompt[-1:].isspace() else " "
    return prompt, separator + item.options[item.answer]


def _tokenise(lm: LanguageModel, sources: Sequence[LMSource], config: LMTrainConfig, validation: bool
              ) -> tuple[list[Sequence_], int]:
    """The training (or validation, at most ``val_items`` per dataset) sequences, and how many were
    skipped as longer than ``max_length`` (instruct; continue cuts texts there)."""
    tokenizer, sequences, skipped = lm.tokenizer, [], 0
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for source in sources:
        if config.recipe == "instruct":
            items = source.val_items[: config.val_items] if validation else source.train_items
            for item in items:
                prompt, reply = instruct_prompt(lm, item)
                prompt_ids = lm.encode(prompt)
                ids = prompt_ids + tokenizer(reply, add_special_tokens=False)["input_ids"] + end
                if len(ids) > config.max_length:
                    skipped += 1
                    continue
                sequences.append(Sequence_(ids, len(prompt_ids), source.name))
        else:
            documents = source.val_docs[: config.val_items] if validation else source.train_docs
            for document in documents:
                ids = (lm.encode(document.text) + end)[: config.max_length]
                if len(ids) > 1:
                    sequences.append(Sequence_(ids, 1, source.name))
    return sequences, skipped


def _trainable(lm: LanguageModel, config: LMTrainConfig) -> torch.nn.Module:
    """The model to train: wrapped with peft LoRA adapters (rank, alpha, the layout's targets), or
    the whole model."""
    if not config.lora:
        for parameter in lm.model.parameters():
            parameter.requires_grad_(True)
        return lm.model
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS.get(lm.model.config.model_type)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=list(targets) if targets else None, bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(lm.model, lora)
    except ValueError as error:
        raise MedfmError(f"LoRA does not fit {config.base} ({error}); try --no-lora") from error


def _batches(sequences: Sequence[Sequence_], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """An epoch's batches, fixed by (seed, epoch): a shuffled order cut into chunks of 16 batches,
    each chunk sorted by length (little padding) and its batches shuffled again."""
    rng = random.Random(f"medfm-train-lm:{seed}:{epoch}")
    order = list(range(len(sequences)))
    rng.shuffle(order)
    batches = []
    chunk = 16 * batch_size
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(sequences[i].ids))
        group = [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        rng.shuffle(group)
        batches += group
    return batches


def _loss(model: torch.nn.Module, batch: Sequence[Sequence_], pad: int, device: torch.device) -> Tensor:
    """Mean next-token cross-entropy over the tokens from each sequence's ``start`` on. The batch is
    left-padded, so the counted tokens sit at the end and only the last ``keep`` positions need logits."""
    longest = max(len(s.ids) for s in batch)
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE, dtype=torch.long)
    for row, sequence in enumerate(batch):
        offset = longest - len(sequence.ids)
        ids[row, offset:] = torch.tensor(sequence.ids)
        mask[row, offset:] = 1
        labels[row, offset + sequence.start :] = torch.tensor(sequence.ids[sequence.start :])
    keep = max(len(s.ids) - s.start for s in batch) + 1  # logits at position t predict token t + 1
    keep = min(keep, longest)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   logits_to_keep=keep)
    logits = output.logits[:, -keep:][:, :-1].float()
    targets = labels[:, longest - keep + 1 :].to(device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def _validate(lm: LanguageModel, model: torch.nn.Module, val_set: Sequence[Sequence_], questions: Sequence[QAItem],
              config: LMTrainConfig, autocast: Callable[[], torch.autocast]) -> dict:
    """Validation loss (mean over texts) and zero-shot accuracy per dataset on ``questions``, scored
    as `medfm.qa` scores them (option log-likelihood per character, float32)."""
    model.eval()
    losses = []
    for start in range(0, len(val_set), config.batch_size):
        with autocast():
            losses.append(float(_loss(model, val_set[start : start + config.batch_size], lm.tokenizer.pad_token_id, lm.device)))
    view = LanguageModel(model, lm.tokenizer, lm.name, lm.prompt_format, lm.card)
    right: dict[str, list[int]] = {}
    for item in questions:
        try:
            prediction = answer(view, item, Strategy("zero-shot")).prediction
        except PromptError:  # over the context length: not scored, as the harness skips it
            continue
        right.setdefault(item.dataset, []).append(int(prediction == item.answer))
    by_dataset = {name: sum(values) / len(values) for name, values in right.items()}
    model.train()
    return {"val_loss": sum(losses) / len(losses) if losses else float("nan"),
            "val_accuracy": sum(map(sum, right.values())) / sum(map(len, right.values())) if right else None,
            "val_accuracy_by_dataset": by_dataset, "val_n_by_dataset": {name: len(v) for name, v in right.items()}}


def lora_delta(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The LoRA factors of a peft model by the adapted layer's name in the base model
    (``<layer>.lora_A``, ``<layer>.lora_B``), and each layer's scale (alpha / rank)."""
    from peft.tuners.lora import LoraLayer

    tensors, scales = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layer = name.removeprefix("base_model.model.")
            tensors[f"{layer}.lora_A"] = module.lora_A["default"].weight.detach().float().cpu()
            tensors[f"{layer}.lora_B"] = module.lora_B["default"].weight.detach().float().cpu()
            scales[layer] = float(module.scaling["default"])
    return tensors, scales


def _save_model(config: LMTrainConfig, lm: LanguageModel, model: torch.nn.Module, folder: Path, record: dict) -> None:
    """``folder`` as a LoRA delta over the base (LoRA) or a full transformers folder, replaced whole."""
    training = {"recipe": config.recipe, "data": [str(path) for path in config.data], "val_fraction": config.val_fraction,
                "seed": config.seed, "epoch": record["epoch"], "step": record["step"], "val_loss": record["val_loss"],
                "val_accuracy": record["val_accuracy"], "val_accuracy_by_dataset": record["val_accuracy_by_dataset"]}
    if config.lora:
        tensors, scales = lora_delta(model)
        path = Path(config.base).expanduser()
        # a registry name or hub id as given; a folder or file made absolute, so the delta loads from anywhere
        base = str(path.resolve()) if registry.lookup(config.base, "lm") is None and path.exists() else config.base
        delta = {"kind": "lora", "base": base, "prompt_format": lm.prompt_format.name, "rank": config.lora_rank,
                 "scales": scales}
        write_model_folder(folder, {DELTA_KEY: delta, "training": training}, tensors)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        lm.tokenizer.save_pretrained(staging)
        (staging / "medfm_training.json").write_text(json.dumps(training, indent=2) + "\n")
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: what `_save_state` writes in ``state.pt``, by type
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "scheduler": dict, "torch_rng": Tensor, "epoch": int, "batch": int, "step": int,
    "best": (int, float), "history": str, "seconds": (int, float), "run": dict,
}


def _run_identity(config: LMTrainConfig) -> dict:
    """The settings a resumed run must share with the one that wrote ``state.pt``."""
    return {"recipe": config.recipe, "base": config.base, "lora": config.lora, "lora_rank": config.lora_rank,
            "data": [str(Path(path).resolve()) for path in config.data], "val_fraction": config.val_fraction,
            "batch_size": config.batch_size, "max_length": config.max_length, "seed": config.seed}


def _save_state(config: LMTrainConfig, model: torch.nn.Module, trained: list[str], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, batch: int, step: int, best: float,
                history: list[dict], seconds: float) -> None:
    state = model.state_dict()
    payload = {"model": {key: state[key].detach().cpu() for key in trained}, "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch, "batch": batch,
               "step": step, "best": best, "history": json.dumps(history), "seconds": seconds, "run": _run_identity(config)}
    with atomic_path(config.out / STATE_NAME) as temporary:
        torch.save(payload, temporary)


def _read_state(config: LMTrainConfig) -> dict:
    """``state.pt`` read without running pickled code, checked field by field and against this run."""
    path = config.out / STATE_NAME
    state, _ = read_torch_file(path)
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in _STATE_FIELDS.items()):
        raise CheckpointError(path, "is not the state of a medfm train-lm run")
    differing = [key for key, value in _run_identity(config).items() if state["run"].get(key) != value]
    if differing:
        raise OptionError(f"{path}: was written by a run with other settings ({', '.join(differing)}); resume with the same ones")
    return state


def _write_metrics(config: LMTrainConfig, history: list[dict], seconds: float, trainable: int) -> None:
    metrics = {"recipe": config.recipe, "base": config.base, "lora": config.lora, "trainable_parameters": trainable,
               "training_seconds": seconds, "history": history}
    with atomic_path(config.out / "metrics.json") as temporary:
        temporary.write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
