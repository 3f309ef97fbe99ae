"""``medfm train --engine ray``: the training loop of `medfm.train.trainer` run by Ray Train.

Ray Train's `TorchTrainer` starts ``workers`` processes (on the cluster at ``address``, or a local
Ray), sets up ``torch.distributed`` among them (gloo on the CPU, NCCL with GPUs) and sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, so each process runs the same `train` as a ``torchrun`` rank
does: a `DistributedSampler` shard each, gradients averaged before every step, and rank 0 writing
``RUN_DIR/last``, ``RUN_DIR/best``, ``metrics.json`` and ``RUN_DIR/state.pt`` after every epoch.
``RUN_DIR`` (and the data) must therefore be on storage every worker reaches at the same path.

A worker that dies (a killed process, a lost node) makes Ray restart the whole group, at most
``max_failures`` times (and after node preemptions), and the new group continues from the last
finished epoch's ``state.pt``, as ``--resume`` does: so the restart is only safe when the run is
ours, which is checked before anything starts (a folder holding another run needs ``resume``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from medfm.batch.engines import import_ray, ray_session
from medfm.data.datasets import discover_cases
from medfm.errors import MedfmError, MissingDependencyError, OptionError
from medfm.train.trainer import STATE_NAME, TrainConfig, TrainResult, train

FEATURE = "medfm train --engine ray"
#: the folder under RUN_DIR where Ray Train keeps its own records of the run
RAY_RECORDS = "ray-train"


def import_ray_train(feature: str = FEATURE) -> Any:
    """``ray.train.torch``, or `MissingDependencyError` saying how to install it."""
    import_ray(feature)
    try:
        import ray.train.torch
    except ImportError as error:
        raise MissingDependencyError("ray[train]", "ray", feature) from error
    return ray.train.torch


def train_on_ray(
    config: TrainConfig,
    *,
    workers: int = 2,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``config`` with ``workers`` Ray Train processes (``gpus_per_worker`` GPUs and
    ``cpus_per_worker`` CPUs each) and return rank 0's result. ``log`` gets rank 0's lines in its
    worker process (a module-level function, so it pickles; default: print them, which Ray shows
    on the driver's terminal). A run that fails in a worker is restarted from its last epoch up to
    ``max_failures`` times; a `MedfmError` a worker raised (bad data) is raised here as it was."""
    if workers < 1 or max_failures < 0:
        raise OptionError(f"workers must be >= 1 and max failures >= 0, not {workers} and {max_failures}")
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise OptionError("gpus per worker must be >= 0 and cpus per worker > 0")
    wanted = config.device.strip().lower()
    if (gpus_per_worker > 0 and wanted not in ("auto", "cuda")) or (gpus_per_worker == 0 and wanted not in ("auto", "cpu")):
        raise OptionError(f"on Ray the device follows --gpus-per-worker ({gpus_per_worker:g}): "
                          f"drop --device {config.device} or give the workers GPUs")
    ray_torch = import_ray_train()
    config = _absolute(config)
    if not config.resume and (config.out / STATE_NAME).exists():
        raise MedfmError(f"{config.out} already holds a run: pass --resume to continue it, or another output folder")
    for folder in (config.data, config.val):  # a wrong data folder is said here, not after Ray has started
        if folder is not None:
            discover_cases(folder, config.datasets, config.limit_per_dataset)
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    # Ray Train's own processes log at INFO/WARNING (and, without Ray's dashboard, warn every few
    # seconds that its state API is unavailable): errors only, so the run's lines (printed) stand out
    with ray_session(address, FEATURE, logging_config=ray.LoggingConfig(log_level="ERROR")):
        trainer = ray_torch.TorchTrainer(
            _train_worker,
            train_loop_config={"config": config, "log": log or _print_line},
            torch_config=ray_torch.TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
            run_config=RunConfig(name=RAY_RECORDS, storage_path=str(config.out),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        )
        try:
            trainer.fit()
        except Exception as error:  # noqa: BLE001 - Ray wraps the workers' errors: surface medfm's own
            raise _medfm_error(error) or error
    return _result_of(config.out)


def _train_worker(loop_config: dict) -> None:
    """One Ray Train worker: the trainer with this worker's device; continues from ``state.pt``
    when an earlier attempt of the same run (a group Ray restarted) left one."""
    import ray.train.torch

    config: TrainConfig = loop_config["config"]
    device = str(ray.train.torch.get_device())
    config = replace(config, device=device, resume=config.resume or (config.out / STATE_NAME).exists())
    try:
        train(config, loop_config["log"])
    except MedfmError as error:  # its subclasses take other arguments than their message: they do not unpickle
        raise MedfmError(str(error)) from None


def _print_line(text: str) -> None:
    print(text, flush=True)


def _result_of(out: Path) -> TrainResult:
    """What rank 0's `train` returned, from the run folder it wrote."""
    metrics = json.loads((out / "metrics.json").read_text())
    return TrainResult(out / "best", out / "last", metrics["history"], metrics["trainable_parameters"],
                       metrics["training_seconds"])


def _absolute(config: TrainConfig) -> TrainConfig:
    """The config with every path absolute (workers do not share the driver's working folder)."""
    def absolute(path: Path | None) -> Path | None:
        return None if path is None else Path(path).resolve()

    base = str(Path(config.base).resolve()) if Path(config.base).exists() else config.base
    return replace(config, base=base, data=absolute(config.data), out=absolute(config.out), val=absolute(config.val),
                   cache_embeddings=absolute(config.cache_embeddings))


def _medfm_error(error: BaseException) -> MedfmError | None:
    """The `MedfmError` a worker raised, out of Ray's wrappers (`WorkerGroupError`, `RayTaskError`)."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(cause, MedfmError):
            return cause
        if isinstance(current, MedfmError) and type(current).__module__.startswith("medfm"):
            return current
        pending += [e for e in (cause, current.__cause__, current.__context__) if isinstance(e, BaseException)]
        pending += [e for e in getattr(current, "worker_failures", {}).values() if isinstance(e, BaseException)]
    return None
