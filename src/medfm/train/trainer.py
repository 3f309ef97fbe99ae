"""The training loop: any recipe, any base medfm loads, on CPU or CUDA, one process or several.

- AdamW over the recipe's trainable parameters; the learning rate warms up linearly over the first
  ``warmup`` share of the optimizer steps, then decays to 0 along a cosine; gradient accumulation;
  optional bf16 autocast (default: on for CUDA devices that support it, off on the CPU).
- loss: Dice + BCE on the low-res logits (4E x 4E, the model-input frame) + ``iou_weight`` x the MSE
  of the IoU head against the IoU the mask actually reached. Prompts: a jittered box, iterative
  clicks (a first click on the target, then ``click_iterations`` corrections, each on the centre of
  the largest error region as ``medfm evaluate --prompt iterative:K`` places them, each pass fed
  the previous logits as mask prompt, losses averaged), none (autoprompt), or mixed
  (SAM-Med2D style, one kind per batch, drawn from (seed, epoch, batch)): a box; 1-5 clicks, positive
  and negative; a box plus 1-5 clicks; or iterative correction: a box or one click, then 1 to
  ``click_iterations`` clicks each on the largest error region (`medfm.prompts.correction_click`)
  with the previous logits as mask prompt. ``robust_input`` adds the resize kernel, blur and gamma
  to the augmentation (`medfm.train.data`), for recipes whose image encoder trains.
- every epoch: validation Dice (tight boxes, centre clicks; mixed: the mean of box, one click and
  a box with ``click_iterations`` corrections), ``RUN_DIR/last`` and, when the Dice
  improved, ``RUN_DIR/best`` (medfm model folders), then ``RUN_DIR/state.pt``: trained tensors,
  optimizer, scheduler, torch RNG, epoch and history, written atomically. ``resume=True``
  continues after the last finished epoch; data order and augmentation depend only on (seed,
  epoch, sample), so a resumed run sees what an uninterrupted one would.
- several processes (``torchrun --nproc_per_node N -m medfm train ...``; ``WORLD_SIZE`` set):
  ``torch.distributed`` (gloo on the CPU, NCCL on CUDA), a `DistributedSampler`, gradients averaged
  across processes before each step (an explicit all-reduce: the loop calls ``encode``/``decode``,
  not ``forward``, which DDP's wrapper would need), checkpoints written by rank 0.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from medfm.catalog import registry
from medfm.data.datasets import discover_cases, split_cases
from medfm.device import resolve_device
from medfm.errors import CheckpointError, InputFileError, MedfmError
from medfm.evaluate.metrics import dice
from medfm.hub import resolve
from medfm.io.writers import jsonable
from medfm.progress import progress_bar
from medfm.safe_load import read_torch_file
from medfm.segment.model import SegmentationModel, load
from medfm.segment.sam import SamCore
from medfm.prompts import correction_click as next_correction
from medfm.train.data import (
    MAX_CLICKS,
    EmbeddingCache,
    SampleOptions,
    SegmentationSamples,
    sample_refs,
)
from medfm.segment.variants import Recipe, apply_recipe, delta_keys
from medfm.train.recipes import freeze_frozen_norms, trainable_parameters

PROMPTS = ("box", "clicks", "none", "mixed")
#: mixed prompting: the kinds of batch and how often each is drawn
MIXED_KINDS = {"box": 0.3, "clicks": 0.25, "box+clicks": 0.15, "iterative": 0.3}
STATE_NAME = "state.pt"


@dataclass
class TrainConfig:
    """Everything a run needs; `train` records it in ``RUN_DIR/run.json``."""

    base: str
    data: Path
    out: Path
    recipe: Recipe
    val: Path | None = None
    validation_fraction: float = 0.1  #: of ``data``, split by patient, when ``val`` is not given
    min_validation_cases: int = 0  #: per dataset, at most half of it (see `split_cases`)
    datasets: tuple[str, ...] | None = None
    limit_per_dataset: int | None = None
    split_limit: int | None = None  #: after the split, at most this many cases per dataset on each side (quick runs)
    slices_per_volume: int | None = 8
    epochs: int = 10
    max_steps: int | None = None  #: optimizer steps over the whole run
    budget_minutes: float | None = None  #: training time over the whole run (resumes included)
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    encoder_lr: float | None = None  #: the image encoder's peak learning rate (default: ``lr``)
    weight_decay: float = 0.01
    warmup: float = 0.05
    iou_weight: float = 1.0
    prompt: str | None = None  #: box, clicks, mixed or none; default: none for autoprompt, else box
    click_iterations: int = 3  #: corrections after the first prompt (clicks: always; mixed: at most)
    #: mixed prompting: how often each kind of `MIXED_KINDS` is drawn (kinds left out: never); None: `MIXED_KINDS`
    mixed_weights: dict[str, float] | None = None
    box_jitter: int = 5
    augment: bool = True
    robust_input: bool = False  #: random resize kernel, blur and gamma (needs a trainable image encoder)
    cache_embeddings: Path | None = None  #: default RUN_DIR/embedding-cache (frozen-encoder recipes)
    backend: str = "torch"  #: what fills the embedding cache on the CPU: torch or openvino (frozen-encoder recipes)
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None
    workers: int = 0
    resume: bool = False
    progress: bool = False

    def prompt_mode(self) -> str:
        mode = self.prompt or ("none" if self.recipe.name == "autoprompt" else "box")
        if mode not in PROMPTS:
            raise MedfmError(f"unknown prompt mode '{mode}'; choose one of {', '.join(PROMPTS)}")
        if (mode == "none") != (self.recipe.name == "autoprompt"):
            raise MedfmError("the autoprompt recipe trains without prompts, every other recipe with box, clicks or mixed")
        if self.backend != "torch" and not self.recipe.frozen_encoder:
            raise MedfmError(f"--backend {self.backend} only fills the embedding cache of a frozen image encoder, but the "
                             f"{self.recipe.name} recipe trains it: use decoder or autoprompt, or --backend torch")
        if self.mixed_weights is not None:
            check_mixed_weights(self.mixed_weights)
            if mode != "mixed":
                raise MedfmError("mixed weights only apply to --prompt mixed")
        if self.robust_input and self.recipe.frozen_encoder:
            raise MedfmError(f"robust input augmentation changes the image encoder's input, but the {self.recipe.name} "
                             "recipe freezes it (and caches its embeddings): use full, lora or adapter")
        return mode


def check_mixed_weights(weights: dict[str, float]) -> None:
    """Raise `MedfmError` unless ``weights`` names kinds of `MIXED_KINDS` with weights >= 0, not all 0."""
    unknown = set(weights) - set(MIXED_KINDS)
    if unknown:
        raise MedfmError(f"unknown mixed prompt kind(s) {sorted(unknown)}; choose from {', '.join(MIXED_KINDS)}")
    if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise MedfmError(f"mixed weights must be numbers >= 0, not all 0; got {weights}")


@dataclass
class TrainResult:
    """Where the run's models are, and what each epoch gave."""

    best: Path
    last: Path
    history: list[dict] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0


class _Run:
    """Process-group facts: rank, world size, device."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device)
        self.device = torch.device("cuda", local) if resolved == torch.device("cuda") else resolved
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()


def _first_per_dataset(cases: list, count: int) -> list:
    """The first ``count`` cases of each dataset, in order: a quick run on part of a split that does
    not move which cases are held out (``limit_per_dataset`` before the split would)."""
    seen: dict[str, int] = {}
    kept = []
    for case in cases:
        if seen.get(case.dataset, 0) < count:
            seen[case.dataset] = seen.get(case.dataset, 0) + 1
            kept.append(case)
    return kept


def _base_id(base: str) -> tuple[str, str]:
    """The base as config.json records it (registry name, or absolute folder/file) and a cache identity."""
    entry = registry.lookup(base, "segment")
    if entry is not None and entry.weights_kind != "bundled":
        return base, f"{base}:{entry.sha256 or entry.weights}"
    # a folder, a file, or a model shipped in the package (whose folder changes when medfm ships new weights)
    path = resolve(base, entry.weights, None, None) if entry is not None else Path(base).resolve()
    name = base if entry is not None else str(path)
    saved = path / "config.json"
    if saved.is_file():
        config = json.loads(saved.read_text())
        if config.get("delta") and Recipe.from_dict(config["recipe"]).frozen_encoder:
            # its images embed exactly as its base's do: a second stage reuses the first stage's cache
            return name, _base_id(config["base"])[1]
    weights = path / "model.safetensors" if path.is_dir() else path
    stamp = weights.stat().st_mtime_ns if weights.exists() else 0
    return name, f"{path}:{stamp}"


#: what `Trainer` saves in ``state.pt``, by type
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "scheduler": dict, "torch_rng": Tensor, "epoch": int, "step": int,
    "best": (int, float), "history": str, "seconds": (int, float), "recipe": dict, "base": str,
}


def read_run_state(path: Path) -> dict:
    """A run's ``state.pt`` (`medfm.safe_load.read_torch_file`: no pickled code runs), with every
    field `Trainer` saves, of the right type; `CheckpointError` naming the file otherwise."""
    state, _ = read_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, not the state of a medfm training run")
    missing = [name for name in _STATE_FIELDS if name not in state]
    wrong = [name for name, kind in _STATE_FIELDS.items() if name in state and not isinstance(state[name], kind)]
    if missing or wrong or not all(isinstance(v, Tensor) for v in state["model"].values()):
        details = [f"missing {', '.join(missing)}"] if missing else []
        details += [f"wrong type of {', '.join(wrong)}"] if wrong else []
        raise CheckpointError(path, f"is not the state of a medfm training run ({'; '.join(details) or 'model holds non-tensors'})")
    try:
        json.loads(state["history"])
    except ValueError as error:
        raise CheckpointError(path, f"its history is not JSON ({error})") from error
    return state


def lr_schedule(total: int, warmup: float, budget_share: Callable[[], float] = lambda: 0.0) -> Callable[[int], float]:
    """The learning-rate factor at an optimizer step: linear warm-up, then a cosine to 0 at ``total``.
    ``budget_share`` (the share of a time budget spent) moves the run on when it is further along than
    its steps, so a run its budget stops still warms up and decays over that budget."""
    warm = max(1, round(warmup * total))

    def factor(step: int) -> float:
        step = max(step, math.floor(budget_share() * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return factor


def dice_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Soft Dice loss + binary cross-entropy, per mask, averaged; logits and target (B, 1, L, L)."""
    probabilities = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = 1 - (2 * (probabilities * flat).sum(1) + 1) / (probabilities.sum(1) + flat.sum(1) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def _hard_iou(logits: Tensor, target: Tensor) -> Tensor:
    predicted, truth = (logits > 0).flatten(1), (target > 0.5).flatten(1)
    union = (predicted | truth).sum(1)
    return torch.where(union > 0, (predicted & truth).sum(1) / union.clamp(min=1), torch.ones_like(union, dtype=torch.float32))


def _dice_sum(logits: Tensor, target: Tensor) -> float:
    """The sum over a batch of each mask's Dice (`medfm.evaluate.metrics.dice`: both empty 1.0) of
    the thresholded logits against the target; both (B, 1, L, L)."""
    predicted, truth = (logits[:, 0] > 0).cpu().numpy(), (target[:, 0] > 0.5).cpu().numpy()
    return sum(dice(mask, reference) for mask, reference in zip(predicted, truth))


def largest_error_clicks(logits: Tensor, target: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """A click per row on the centre of its largest error region (`medfm.prompts.correction_click`),
    in model-input pixels; a row already exact gets a padding point (label -1, ignored).
    -> points (B, 1, 2), labels (B, 1)."""
    predicted, truth = (logits[:, 0] > 0).cpu().numpy(), (target[:, 0] > 0.5).cpu().numpy()
    scale = image_size / logits.shape[-1]
    points, labels = [], []
    for mask, reference in zip(predicted, truth):
        found = next_correction(mask, reference)
        row, col, label = found if found is not None else (0, 0, -1)
        points.append([(col + 0.5) * scale, (row + 0.5) * scale])
        labels.append(label)
    return (torch.tensor(points, dtype=torch.float32, device=logits.device)[:, None],
            torch.tensor(labels, dtype=torch.long, device=logits.device)[:, None])


def mixed_passes(network: SamCore, embeddings: Tensor, batch: dict[str, Tensor], kind: str, clicks: int,
                 corrections: int, start_with_box: bool = True) -> list[tuple[Tensor, Tensor]]:
    """(logits, iou) of each decoder pass of one mixed-prompt ``kind`` (see `MIXED_KINDS`): ``clicks``
    of the batch's simulated clicks (clicks, box+clicks), or for iterative a box (or the first click)
    then ``corrections`` passes, each with one more click on the largest error and the previous
    logits as mask prompt."""
    device = embeddings.device
    box = batch["box"].to(device)
    coords, labels = batch["clicks"].to(device)[:, :clicks], batch["click_labels"].to(device)[:, :clicks]
    if kind == "box":
        return [network.decode(embeddings, boxes=box)]
    if kind == "clicks":
        return [network.decode(embeddings, points=coords, point_labels=labels)]
    if kind == "box+clicks":
        return [network.decode(embeddings, boxes=box, points=coords, point_labels=labels)]
    target = batch["target"].to(device)
    boxes = box if start_with_box else None
    points, point_labels = (None, None) if start_with_box else (coords[:, :1], labels[:, :1])
    outputs, mask_input = [], None
    for round_ in range(corrections + 1):
        outputs.append(network.decode(embeddings, boxes=boxes, points=points, point_labels=point_labels, mask_input=mask_input))
        if round_ < corrections:
            logits = outputs[-1][0].detach().float()
            new_points, new_labels = largest_error_clicks(logits, target, network.config.image_size)
            points = new_points if points is None else torch.cat([points, new_points], 1)
            point_labels = new_labels if point_labels is None else torch.cat([point_labels, new_labels], 1)
            mask_input = logits
    return outputs


def draw_mixed(generator: torch.Generator, max_corrections: int, mix: Mapping[str, float] = MIXED_KINDS
               ) -> tuple[str, int, int, bool]:
    """One batch's mixed prompt: (kind, drawn by the ``mix`` weights; clicks 1..`MAX_CLICKS`,
    corrections 1..``max_corrections``, whether iterative starts with a box)."""
    weights = torch.tensor([float(mix.get(kind, 0.0)) for kind in MIXED_KINDS])
    kind = list(MIXED_KINDS)[int(torch.multinomial(weights, 1, generator=generator))]
    clicks = 1 + int(torch.randint(MAX_CLICKS, (1,), generator=generator))
    corrections = 1 + int(torch.randint(max(1, max_corrections), (1,), generator=generator))
    return kind, clicks, corrections, bool(torch.randint(2, (1,), generator=generator))


def predict(network: SamCore, embeddings: Tensor, batch: dict[str, Tensor], mode: str, iterations: int,
            generator: torch.Generator | None = None, mix: Mapping[str, float] = MIXED_KINDS) -> list[tuple[Tensor, Tensor]]:
    """(logits, iou) of each decoder pass for a batch (one prompt per image)."""
    device = embeddings.device
    if mode == "none":
        return [network.decode(embeddings)]
    if mode == "mixed":
        kind, clicks, corrections, start_with_box = draw_mixed(generator or torch.Generator(), iterations, mix)
        return mixed_passes(network, embeddings, batch, kind, clicks, corrections, start_with_box)
    if mode == "box":
        return [network.decode(embeddings, boxes=batch["box"].to(device))]
    target = batch["target"].to(device)
    points = batch["point"].to(device)[:, None]
    labels = torch.ones(points.shape[:2], dtype=torch.long, device=device)
    outputs, mask_input = [], None
    for round_ in range(iterations + 1):
        outputs.append(network.decode(embeddings, points=points, point_labels=labels, mask_input=mask_input))
        if round_ < iterations:
            logits = outputs[-1][0].detach().float()
            new_points, new_labels = largest_error_clicks(logits, target, network.config.image_size)
            points, labels = torch.cat([points, new_points], 1), torch.cat([labels, new_labels], 1)
            mask_input = logits
    return outputs


class Trainer:
    """One run of `TrainConfig` (use `train`)."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None]) -> None:
        self.config = config
        self.run = _Run(config.device)
        self.log = log if self.run.main else (lambda text: None)
        self.mode = config.prompt_mode()
        device = self.run.device
        self.bf16 = config.bf16 if config.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
        self.out = Path(config.out)
        self.base_id, cache_id = _base_id(config.base)
        torch.manual_seed(config.seed)  # the recipe's new modules start alike on every rank
        self.base = load(config.base)
        self.network = apply_recipe(self.base.network, config.recipe).to(device)
        self.trained = sorted(delta_keys(self.network, config.recipe))
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.resume_state = self._resume_state()  # a foreign or corrupt state.pt fails here, before data or training
        self.train_set, self.val_set = self._datasets(cache_id)

    def _resume_state(self) -> dict | None:
        """``RUN_DIR/state.pt`` when resuming, checked to be this run's (recipe, base, trained tensors)."""
        path = self.out / STATE_NAME
        if path.exists() and not self.config.resume:
            raise MedfmError(f"{self.out} already holds a run: pass --resume to continue it, or another output folder")
        if not (self.config.resume and path.exists()):
            return None
        state = read_run_state(path)
        if state["recipe"] != self.config.recipe.to_dict() or state["base"] != self.base_id:
            raise MedfmError(f"{path}: was trained with recipe {state['recipe']} on {state['base']}; "
                             "resume it with the same --recipe and --base")
        shapes = self.network.state_dict()
        if sorted(state["model"]) != self.trained or any(v.shape != shapes[k].shape for k, v in state["model"].items()):
            raise CheckpointError(path, f"holds tensors that are not the ones the {self.config.recipe.name} recipe trains "
                                  "on this base (a state.pt of another run?)")
        return state

    def _datasets(self, cache_id: str) -> tuple[SegmentationSamples, SegmentationSamples | None]:
        config, preprocess = self.config, self.base.preprocess
        cases = discover_cases(config.data, config.datasets, config.limit_per_dataset)
        if config.val is not None:
            train_cases, val_cases = cases, discover_cases(config.val, config.datasets, config.limit_per_dataset)
        else:
            train_cases, val_cases = split_cases(cases, config.validation_fraction, config.seed, config.min_validation_cases)
        if config.split_limit is not None:  # the held-out cases stay the ones the full split holds out
            train_cases, val_cases = _first_per_dataset(train_cases, config.split_limit), _first_per_dataset(val_cases, config.split_limit)
        train_refs = sample_refs(train_cases, config.slices_per_volume)
        val_refs = sample_refs(val_cases, config.slices_per_volume)
        if not train_refs:
            raise InputFileError(config.data, "holds no training image (or slice) with foreground in its mask")
        cache = None
        if config.recipe.frozen_encoder:
            cache = EmbeddingCache(Path(config.cache_embeddings or self.out / "embedding-cache"), cache_id, preprocess)
            self._fill_cache(cache, train_refs + val_refs)
        low = 4 * self.network.config.embedding_size
        foreground = self.mode == "none"
        train = SegmentationSamples(train_refs, preprocess, low, SampleOptions(True, config.augment, config.box_jitter,
                                    foreground, config.robust_input), config.seed, cache)
        val = SegmentationSamples(val_refs, preprocess, low, SampleOptions(False, False, 0, foreground), config.seed,
                                  cache) if val_refs else None
        return train, val

    def _fill_cache(self, cache: EmbeddingCache, refs: list) -> None:
        """Encode the samples the cache lacks with the frozen encoder's inference path (`InferenceEngine`:
        the same embeddings to float32 rounding; 656 vs 928 ms an image in benchmarks/litemedsam_speed.py),
        one image at a time on the CPU, where batching makes the encoder slower per image (see
        `segment_volume`'s ``batch_size``)."""
        from medfm.segment.fast import InferenceEngine

        mine = refs[self.run.rank :: self.run.world]
        if self.config.backend == "openvino" and self.run.device.type == "cpu":
            from medfm.segment.openvino_backend import EncoderBackend

            encode: Callable[[Tensor], Tensor] = EncoderBackend(self.network.eval())
        else:
            engine = InferenceEngine(self.network.eval())
            encode = lambda pixels: engine.encode(pixels.to(self.run.device))  # noqa: E731
        batch_size = 1 if self.run.device.type == "cpu" else self.config.batch_size
        with progress_bar(self.config.progress and self.run.main, len(mine), "caching embeddings") as advance:
            cache.fill(mine, encode, batch_size, advance)
        self.run.barrier()

    def _loader(self, dataset: SegmentationSamples, shuffle: bool) -> tuple[DataLoader, DistributedSampler]:
        sampler = DistributedSampler(dataset, self.run.world, self.run.rank, shuffle=shuffle, seed=self.config.seed)
        loader = DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, num_workers=self.config.workers)
        return loader, sampler

    def _embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        if "embedding" in batch:
            return batch["embedding"].to(self.run.device, torch.float32)
        return self.network.encode(batch["pixels"].to(self.run.device))

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.run.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _loss(self, batch: dict[str, Tensor], epoch: int, index: int) -> Tensor:
        target = batch["target"].to(self.run.device)
        # the batch's random prompt choices depend only on (seed, epoch, batch, rank): resumable
        generator = torch.Generator().manual_seed(hash((self.config.seed, epoch, index, self.run.rank)) % 2**63)
        with self._autocast():
            outputs = predict(self.network, self._embeddings(batch), batch, self.mode, self.config.click_iterations,
                              generator, self.config.mixed_weights or MIXED_KINDS)
        losses = []
        for logits, iou in outputs:
            logits = logits.float()
            loss = dice_bce(logits, target)
            if self.config.iou_weight:
                loss = loss + self.config.iou_weight * F.mse_loss(iou.float()[:, 0], _hard_iou(logits.detach(), target))
            losses.append(loss)
        return torch.stack(losses).mean()

    def _parameter_groups(self) -> list[dict]:
        """The trainable parameters, the image encoder's at ``encoder_lr`` when one is given."""
        if self.config.encoder_lr is None:
            return [{"params": self.params}]
        encoder = {id(p) for p in self.network.image_encoder.parameters()}
        groups = [{"params": [p for p in self.params if id(p) not in encoder]},
                  {"params": [p for p in self.params if id(p) in encoder], "lr": self.config.encoder_lr}]
        return [group for group in groups if group["params"]]

    def _average_gradients(self) -> None:
        if self.run.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.run.world
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean Dice over the validation samples (all processes together), None without any."""
        if self.val_set is None:
            return None
        self.network.eval()
        indices = list(range(self.run.rank, len(self.val_set), self.run.world))
        generator = torch.Generator().manual_seed(self.config.seed)
        total = 0.0
        for start in range(0, len(indices), self.config.batch_size):
            items = [self.val_set[i] for i in indices[start : start + self.config.batch_size]]
            batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
            with self._autocast():
                embeddings = self._embeddings(batch)
                if self.mode == "mixed":  # box, one centre click, a box and its corrections
                    passes = [mixed_passes(self.network, embeddings, batch, "box", 1, 0),
                              mixed_passes(self.network, embeddings, batch, "clicks", 1, 0),
                              mixed_passes(self.network, embeddings, batch, "iterative", 1, self.config.click_iterations)]
                else:
                    passes = [predict(self.network, embeddings, batch, self.mode, self.config.click_iterations, generator)]
            total += sum(_dice_sum(outputs[-1][0], batch["target"]) for outputs in passes) / len(passes)
        dice_sum, count = self.run.sum([total, float(len(indices))])
        return dice_sum / count

    def save_model(self, directory: Path, epoch: int, val_dice: float | None) -> None:
        """A medfm model folder: the full model (full recipe) or the trained tensors over the base."""
        recipe = self.config.recipe
        this_run = {"box": ("box",), "clicks": ("point",), "mixed": ("box", "point"), "none": ()}[self.mode]
        trained = tuple(dict.fromkeys([*(self.base.trained_prompts or ()), *this_run]))  # the base's and this run's
        model = SegmentationModel(self.network, self.base.preprocess, self.out.name, self.base.arch, self.base.semantic, trained)
        training = {"base": self.base_id, "recipe": recipe.to_dict(), "epochs_trained": epoch, "val_dice": val_dice}
        model.save_pretrained(directory, training=training, only=self.trained if recipe.saves_delta else None)

    def fit(self) -> TrainResult:
        config, run = self.config, self.run
        state_path = self.out / STATE_NAME
        loader, sampler = self._loader(self.train_set, shuffle=True)
        per_epoch = math.ceil(len(loader) / config.grad_accum)
        total = per_epoch * config.epochs if config.max_steps is None else min(per_epoch * config.epochs, config.max_steps)
        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=config.lr, weight_decay=config.weight_decay)
        started = time.monotonic()  # set again below, once a resumed run's seconds are known
        budget = 60 * config.budget_minutes if config.budget_minutes else None
        spent = (lambda: (time.monotonic() - started) / budget) if budget else (lambda: 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, config.warmup, spent))
        start_epoch, step, best, history, seconds = 0, 0, -1.0, [], 0.0
        if self.resume_state is not None:
            state = self.resume_state
            self.network.load_state_dict(state["model"], strict=False)
            try:
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["torch_rng"])
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise CheckpointError(state_path, f"its optimizer, scheduler or RNG state does not fit this run ({error})") from error
            start_epoch, step, best, history, seconds = (state["epoch"], state["step"], state["best"],
                                                         json.loads(state["history"]), state["seconds"])
            self.log(f"resuming {self.out} after epoch {start_epoch} (step {step})")
        if run.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "run.json").write_text(json.dumps(jsonable(asdict(config)), indent=2) + "\n")
        self.log(f"{config.recipe.name} on {self.base_id}: {trainable_parameters(self.network):,} trainable parameters, "
                 f"{len(self.train_set)} training / {len(self.val_set or [])} validation samples, {total} steps, "
                 f"{run.world} process(es) on {run.device}{', bf16' if self.bf16 else ''}")
        started = time.monotonic() - seconds
        stop = step >= total
        for epoch in range(start_epoch, config.epochs):
            if stop:
                break
            self.train_set.set_epoch(epoch)
            sampler.set_epoch(epoch)
            self.network.train()
            freeze_frozen_norms(self.network)
            if config.recipe.frozen_encoder:
                self.network.image_encoder.eval()
            epoch_start, running, seen = time.monotonic(), 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            with progress_bar(config.progress and run.main, len(loader), f"epoch {epoch + 1}/{config.epochs}") as advance:
                for index, batch in enumerate(loader):
                    loss = self._loss(batch, epoch, index)
                    (loss / config.grad_accum).backward()
                    running, seen = running + loss.item(), seen + 1
                    if (index + 1) % config.grad_accum == 0 or index + 1 == len(loader):
                        self._average_gradients()
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        over_budget = config.budget_minutes is not None and time.monotonic() - started > 60 * config.budget_minutes
                        stop = run.sum([float(step >= total or over_budget)])[0] > 0
                    speed = seen * config.batch_size * run.world / (time.monotonic() - epoch_start)
                    advance(f"loss {running / seen:.4f}  {speed:.2f} img/s")
                    if stop:
                        break
            dice = self.validate()
            record = {"epoch": epoch + 1, "step": step, "loss": running / max(seen, 1), "val_dice": dice,
                      "seconds": time.monotonic() - epoch_start}
            history.append(record)
            improved = dice is None or dice > best
            best = max(best, dice) if dice is not None else best
            self.log(f"epoch {epoch + 1}: loss {record['loss']:.4f}, validation Dice "
                     f"{'-' if dice is None else f'{dice:.4f}'}, {record['seconds']:.1f} s{' (best)' if improved else ''}")
            if run.main:
                self.save_model(self.out / "last", epoch + 1, dice)
                if improved:
                    self.save_model(self.out / "best", epoch + 1, dice)
                seconds = time.monotonic() - started
                self._save_state(state_path, epoch + 1, step, best, history, seconds, optimizer, scheduler)
                self._write_metrics(history, seconds)
            run.barrier()
        seconds = time.monotonic() - started
        return TrainResult(self.out / "best", self.out / "last", history, trainable_parameters(self.network), seconds)

    def _save_state(self, path: Path, epoch: int, step: int, best: float, history: list[dict], seconds: float,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        from medfm.io.writers import atomic_path

        state = self.network.state_dict()
        payload = {
            "model": {key: state[key].detach().cpu() for key in self.trained}, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step,
            "best": best, "history": json.dumps(history), "seconds": seconds,
            "recipe": self.config.recipe.to_dict(), "base": self.base_id,
        }
        with atomic_path(path) as temporary:
            torch.save(payload, temporary)

    def _write_metrics(self, history: list[dict], seconds: float) -> None:
        from medfm.io.writers import atomic_path

        device = self.run.device
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        metrics = {"recipe": self.config.recipe.to_dict(), "base": self.base_id,
                   "trainable_parameters": trainable_parameters(self.network), "training_seconds": seconds,
                   "peak_memory_mb": peak / 2**20, "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "process RSS",
                   "best_val_dice": max((h["val_dice"] for h in history if h["val_dice"] is not None), default=None),
                   "history": history}
        with atomic_path(self.out / "metrics.json") as temporary:
            temporary.write_text(json.dumps(metrics, indent=2) + "\n")


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``config.recipe`` on ``config.base``; see the module docstring."""
    return Trainer(config, log).fit()
