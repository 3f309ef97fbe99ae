"""``segment_batch``: every case of a prompts file through read -> encode -> decode -> write, on one
process (``engine="local"``) or on a Ray cluster (``engine="ray"``, Ray Data), with the same stage
functions (`medfm.batch.stages`), so both engines give the same masks.

On Ray, reading and writing are CPU tasks (0.25 CPU each, at most ``2 * workers`` at a time: they
mostly wait on storage); encoding
runs in a pool of ``workers`` actors that load the model once each (``gpus_per_worker`` GPUs and
``cpus_per_worker`` CPUs each); decoding runs in a second pool of ``workers`` actors (0.25 CPU each)
that answer every prompt of an image from its one embedding. A killed actor is restarted and its
image retried (Ray Data's ``max_restarts``/``max_task_retries``), and ``results.jsonl`` is written
only by this driver process, one row per finished case, so each case gets exactly one row.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from medfm.batch.cases import RESULTS_NAME, read_cases
from medfm.batch.results import ResultsLog
from medfm.batch.stages import (
    CaseWork,
    ImageWork,
    decode_stage,
    digest_of,
    encode_stage,
    group_by_image,
    is_done,
    read_stage,
    run_stages,
    write_stage,
)
from medfm.errors import MissingDependencyError, OptionError
from medfm.io.outputs import check_outputs
from medfm.progress import progress_bar

#: A registry name or model folder, or a function that returns a loaded `SegmentationModel`
#: (called once per process or actor; it must be picklable for Ray).
ModelSource = str | PathLike[str] | Callable[[], Any] | None
ENGINES = ("local", "ray")


@dataclass
class BatchSummary:
    """What a batch run did: cases done now, failed now, skipped as already done; wall time."""

    ok: int
    errors: int
    skipped: int
    seconds: float
    results: Path


def segment_batch(
    prompts: str | PathLike[str],
    out: str | PathLike[str],
    *,
    model: ModelSource = None,
    engine: str = "local",
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    retry_errors: bool = False,
    progress: bool = False,
    backend: str = "torch",
) -> BatchSummary:
    """Segment every case of a prompts file (one JSON object a line, see `medfm.batch.cases`) into
    ``out``, with one row a case in ``out/results.jsonl``; resumable (a rerun skips the cases whose
    input, prompt and model are unchanged and whose mask is there; ``retry_errors`` redoes failed
    ones). ``address``: ``auto`` or ``ray://HOST:PORT`` to join a cluster (default: a local Ray)."""
    check_engine(engine, workers, "medfm segment-batch --engine ray")
    from medfm.segment.openvino_backend import check_backend

    check_backend(backend)  # an unknown backend or a missing openvino: before anything loads
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise OptionError("gpus per worker must be >= 0 and cpus per worker > 0")
    check_outputs({"--out": (out, "folder")}, {"--prompts": prompts})  # before any work, nothing created
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = read_cases(Path(prompts), out)
    log = ResultsLog(out / RESULTS_NAME)
    previous = {key: {k: row.get(k) for k in ("hash", "status", "output")} for key, row in log.rows.items()}
    counts = {"ok": 0, "error": 0, "skipped": 0}

    def report(item: CaseWork) -> None:
        counts[item.status] += 1
        if item.status != "skipped":
            log.append(item.row())

    for case in (case for case in cases if case.error is not None):  # lines that never reach a stage
        item = CaseWork(case, digest=digest_of(case.prompt, case.error), error=case.error)
        item.status = "skipped" if is_done(previous, case.id, item.digest, retry_errors) else "error"
        report(item)
    groups = group_by_image([case for case in cases if case.error is None])
    loaded = load_model(model, backend=backend)
    fingerprint = model_fingerprint(loaded)
    if engine == "local":
        finished = _run_local(groups, loaded, previous, fingerprint, retry_errors, progress)
    else:
        finished = _run_ray(groups, model, previous, fingerprint, retry_errors, address, workers, gpus_per_worker, cpus_per_worker,
                            backend)
    for work in finished:
        for item in work.cases:
            report(item)
    if log.superseded:
        log.compact()
    return BatchSummary(counts["ok"], counts["error"], counts["skipped"], time.perf_counter() - started, log.path)


def load_model(model: ModelSource, device: str = "cpu", backend: str = "torch") -> Any:
    """The `SegmentationModel` a source names, on ``device``, its encoder run by ``backend``."""
    from medfm.segment.model import load

    if callable(model):
        loaded = model().to(device)
        loaded.backend = backend
        return loaded
    return load(model, device=device, backend=backend)


def model_fingerprint(network: Any) -> str:
    """A `SegmentationModel`'s part of each case's content hash: its name, preprocessing and
    weights (SHA-256 of every tensor), so a retrained or re-pointed model redoes the batch."""
    digest = hashlib.sha256(f"{network.name}\0{network.arch}\0{network.preprocess.to_dict()}".encode())
    for key, tensor in sorted(network.network.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _run_local(groups: list[ImageWork], model: Any, previous: Mapping, fingerprint: str, retry_errors: bool,
               progress: bool) -> Iterator[ImageWork]:
    predictor = None

    def predictor_of() -> Any:  # made on first need
        nonlocal predictor
        if predictor is None:
            predictor = model.predictor()
        return predictor

    with progress_bar(progress, len(groups), "segmenting images") as advance:
        for work in groups:
            yield run_stages(work, predictor_of, previous, fingerprint, retry_errors)
            advance()


def _pack(work: ImageWork) -> dict[str, bytes]:
    """A Ray Data row holding one image's work, pickled (arrays, tensors and geometry are not Arrow columns)."""
    return {"work": pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)}


def _unpack(row: dict[str, bytes]) -> ImageWork:
    return pickle.loads(row["work"])


class _ModelActor:
    """A Ray actor holding one predictor, loaded when its first image needs it."""

    stage: Callable[[ImageWork, Any], ImageWork]

    def __init__(self, model: ModelSource, backend: str = "torch") -> None:
        self.model, self.backend, self.predictor = model, backend, None

    def __call__(self, row: dict[str, bytes]) -> dict[str, bytes]:
        work = _unpack(row)
        if not work.todo():
            return row
        if self.predictor is None:
            import torch

            self.predictor = load_model(self.model, "cuda" if torch.cuda.is_available() else "cpu", self.backend).predictor()
        return _pack(type(self).stage(work, self.predictor))


class _Encoder(_ModelActor):
    stage = staticmethod(encode_stage)


class _Decoder(_ModelActor):
    stage = staticmethod(decode_stage)


def _read_row(row: dict[str, bytes], previous: Mapping, fingerprint: str, retry_errors: bool) -> dict[str, bytes]:
    return _pack(read_stage(_unpack(row), previous, fingerprint, retry_errors))


def _write_row(row: dict[str, bytes]) -> dict[str, bytes]:
    return _pack(write_stage(_unpack(row)))


def check_engine(engine: str, workers: int, feature: str) -> None:
    """`OptionError` for an unknown engine or fewer than one worker; for ``ray``, how to install it
    when it is missing. Called before any work (the CLI calls it before loading a model)."""
    if engine not in ENGINES:
        raise OptionError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if workers < 1:
        raise OptionError(f"workers must be >= 1, not {workers}")
    if engine == "ray":
        import_ray(feature)


def import_ray(feature: str = "--engine ray") -> Any:
    """``ray`` with Ray Data, or `MissingDependencyError` saying how to install it for ``feature``."""
    try:
        import ray
        import ray.data  # noqa: F401 - the part the engine needs
    except ImportError as error:
        raise MissingDependencyError("ray[data]", "ray", feature) from error
    return ray


@contextmanager
def ray_session(address: str | None = None, feature: str = "--engine ray", **options: Any) -> Iterator[Any]:
    """``ray``, joined to ``address`` (``auto``, ``ray://HOST:PORT``) or to a local Ray started here
    when none is running (``options`` go to ``ray.init``), and shut down on leaving if this call
    started it."""
    ray = import_ray(feature)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, **options) if address is None else ray.init(address=address, **options)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def _run_ray(groups: list[ImageWork], model: ModelSource, previous: Mapping, fingerprint: str, retry_errors: bool,
             address: str | None, workers: int, gpus_per_worker: float, cpus_per_worker: float,
             backend: str = "torch") -> Iterator[ImageWork]:
    if not groups:
        return
    with ray_session(address) as ray:
        light = 0.25  # reading, writing and decoding mostly wait on storage or run the small decoder
        # enough tasks to keep the encoders fed, without a process per image (each imports torch)
        io_pool = ray.data.TaskPoolStrategy(size=2 * workers)
        dataset = ray.data.from_items([_pack(work) for work in groups], override_num_blocks=len(groups))
        dataset = dataset.map(_read_row, fn_kwargs={"previous": dict(previous), "fingerprint": fingerprint,
                                                    "retry_errors": retry_errors}, num_cpus=light, compute=io_pool)
        dataset = dataset.map(_Encoder, fn_constructor_kwargs={"model": model, "backend": backend}, compute=ray.data.ActorPoolStrategy(size=workers),
                              num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None)
        dataset = dataset.map(_Decoder, fn_constructor_kwargs={"model": model}, compute=ray.data.ActorPoolStrategy(size=workers),
                              num_cpus=light)
        dataset = dataset.map(_write_row, num_cpus=light, compute=io_pool)
        for row in dataset.iter_rows():
            yield _unpack(row)
