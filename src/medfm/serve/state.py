"""What the server holds between requests: the uploaded images (deleted when idle), the image
embeddings (an LRU cache bounded in bytes), the two worker pools that fill and use it, and the
vision-language model that answers questions, in a pool of its own.

Encoding (the costly image-encoder pass, once per slice) runs in one pool and prompting (the mask
decoder, milliseconds) in another, so a prompt on a cached image never queues behind another
client's encoding. Every worker thread has its own `Predictor` per model (a predictor holds the
image it answers for); the networks themselves are shared, read-only.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medfm.intensity import IntensityPreset
from medfm.io import MedicalImage
from medfm.preprocess import Geometry, uint8_rgb_converter
from medfm.prompts import Box3D
from medfm.segment.model import SegmentationModel
from medfm.segment.predictor import Prediction, Predictor

T = TypeVar("T")
#: The editable label map of an image (what the browser app draws into); 3D results get their own ids.
ANNOTATION = "annotation"


@dataclass
class Upload:
    """One uploaded image. ``name`` is the client's file name, shown in messages, never used as a path."""

    id: str
    name: str
    folder: Path
    image: MedicalImage
    last_used: float = field(default_factory=time.monotonic)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    _display: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict, repr=False)

    def annotation(self) -> np.ndarray:
        """The editable label map on the image's grid (created empty on first use)."""
        if ANNOTATION not in self.masks:
            self.masks[ANNOTATION] = np.zeros(self.image.spatial_shape, dtype=np.uint16)
        return self.masks[ANNOTATION]

    def display_converter(self, window: str, intensity: IntensityPreset | None) -> Callable[[np.ndarray], np.ndarray]:
        """The uint8 RGB conversion of any slice under a window, fitted once to the whole image."""
        if window not in self._display:
            self._display[window] = uint8_rgb_converter(self.image.array, intensity, self.image.modality)
        return self._display[window]


class ImageStore:
    """Uploads by id, each in its own server-made folder under ``root``; idle ones are deleted."""

    def __init__(self, root: Path, idle_seconds: float) -> None:
        self.root, self.idle_seconds = root, idle_seconds
        self.uploads: dict[str, Upload] = {}

    def new_folder(self) -> tuple[str, Path]:
        """A fresh id and an empty folder for its files."""
        upload_id = secrets.token_urlsafe(12)
        folder = self.root / upload_id
        folder.mkdir(parents=True)
        return upload_id, folder

    def add(self, upload: Upload) -> None:
        self.uploads[upload.id] = upload

    def get(self, upload_id: str) -> Upload | None:
        """The upload, marked as used now; None when unknown or already deleted."""
        upload = self.uploads.get(upload_id)
        if upload is not None:
            upload.last_used = time.monotonic()
        return upload

    def remove(self, upload_id: str) -> bool:
        upload = self.uploads.pop(upload_id, None)
        if upload is not None:
            shutil.rmtree(upload.folder, ignore_errors=True)
        return upload is not None

    def expire(self, now: float | None = None) -> list[str]:
        """Delete uploads unused for ``idle_seconds``; returns their ids."""
        now = time.monotonic() if now is None else now
        idle = [key for key, upload in self.uploads.items() if now - upload.last_used > self.idle_seconds]
        for key in idle:
            self.remove(key)
        return idle


Embedding = tuple[Any, Geometry]  # (torch.Tensor (1, C, E, E), Geometry)


class EmbeddingCache:
    """Image embeddings by (image id, slice, model, window), least recently used evicted first,
    bounded by the bytes of the tensors it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, tuple[Embedding, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Embedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: tuple, value: Embedding) -> None:
        size = value[0].element_size() * value[0].nelement()
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            self._entries[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._entries) > 1:
                self.bytes -= self._entries.popitem(last=False)[1][1]

    def drop_image(self, upload_id: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[0] == upload_id]:
                self.bytes -= self._entries.pop(key)[1]

    def __len__(self) -> int:
        return len(self._entries)


class Segmenter:
    """The library's predictors behind two thread pools and the embedding cache."""

    def __init__(self, models: dict[str, SegmentationModel], cache: EmbeddingCache, encode_workers: int, decode_workers: int) -> None:
        self.models, self.cache = models, cache
        self.encode_pool = ThreadPoolExecutor(encode_workers, thread_name_prefix="medfm-encode")
        self.decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="medfm-decode")
        self._local = threading.local()
        self._pending: dict[tuple, asyncio.Future] = {}
        self.encoded = 0  # slices encoded so far (concurrent asks for one slice share one encoding)

    def _predictor(self, model: str) -> Predictor:
        predictors = self._local.__dict__.setdefault("predictors", {})
        if model not in predictors:
            predictors[model] = self.models[model].predictor()
        return predictors[model]

    async def _run(self, pool: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    async def embedding(self, upload: Upload, slice_index: int | None, model: str, window: str, intensity: IntensityPreset | None) -> Embedding:
        """The slice's embedding: from the cache, from an encoding already under way, or encoded now."""
        key = (upload.id, slice_index, model, window)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        if key not in self._pending:  # one encoding per slice, however many clients ask at once
            future = asyncio.ensure_future(self._run(self.encode_pool, self._encode, upload.image, slice_index, model, intensity))
            future.add_done_callback(lambda done: self._finished(key, done))
            self._pending[key] = future
        return await asyncio.shield(self._pending[key])  # a client that disconnects does not cancel it

    def _finished(self, key: tuple, future: asyncio.Future) -> None:
        self._pending.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self.cache.put(key, future.result())

    def _encode(self, image: MedicalImage, slice_index: int | None, model: str, intensity: IntensityPreset | None) -> Embedding:
        predictor = self._predictor(model)
        predictor.set_image(image, slice_index=slice_index, intensity=intensity)
        self.encoded += 1
        return predictor.embedding, predictor.geometry

    async def predict(self, embedding: Embedding, model: str, boxes: Sequence | None, points: np.ndarray | None, point_labels: np.ndarray | None) -> Prediction:
        """Masks for the prompts on an encoded slice (the decoder only)."""
        return await self._run(self.decode_pool, self._decode, embedding, model, boxes, points, point_labels)

    def _decode(self, embedding: Embedding, model: str, boxes, points, point_labels) -> Prediction:  # noqa: ANN001
        predictor = self._predictor(model)
        predictor.use_embedding(*embedding)
        return predictor.predict(boxes=boxes, points=points, point_labels=point_labels)

    async def volume(self, image: MedicalImage, box: Box3D, model: str, intensity: IntensityPreset | None,
                     slice_step: int = 1, refine_below: float | None = None) -> np.ndarray:
        """The label map (label 1) of a 3D box, propagated slice by slice (an encoder-heavy job);
        ``slice_step`` and ``refine_below`` as in `segment_volume`."""
        from medfm.segment.volume import segment_volume

        def run() -> np.ndarray:
            return segment_volume(self._predictor(model), image, [box], intensity=intensity, slice_step=slice_step,
                                  refine_below=refine_below).label_map

        return await self._run(self.encode_pool, run)

    def close(self) -> None:
        self.encode_pool.shutdown(wait=False, cancel_futures=True)
        self.decode_pool.shutdown(wait=False, cancel_futures=True)


class QuestionsFull(Exception):
    """/ask already holds its most questions (running and waiting): the client should retry later."""


class Asker:
    """The server's vision-language model (`medfm.vlm.api`), loaded on the first question (seconds)
    and kept. Questions run one at a time in their own thread, so a generation of seconds never holds
    up the segmentation pools, and a model that keeps per-image state is never used by two threads.
    At most ``max_questions`` are held at once (the one running included): a longer queue would only
    grow the server's memory and every client's wait, so more are refused with `QuestionsFull`."""

    def __init__(self, source: str, device: str, max_questions: int = 8, weights: Path | None = None) -> None:
        self.source, self.device, self.max_questions, self.weights = source, device, max_questions, weights
        #: The name clients see and send: a folder is named by its last part, not its path on the server.
        self.name = Path(source).name if Path(source).is_dir() else source
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medfm-ask")
        self.model: Any = None
        #: questions running or waiting; changed only on the event loop's thread, so no lock
        self.held = 0

    async def ask(self, image: MedicalImage, question: str, choices: Sequence[str] | None, max_new_tokens: int) -> str:
        """The model's answer about a 2D image (a choice exactly as given, when choices are given)."""
        if self.held >= self.max_questions:
            raise QuestionsFull(f"{self.held} questions are being answered or waiting (one at a time, at most "
                                f"{self.max_questions} held); ask again in a moment")
        self.held += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._ask, image, question, choices, max_new_tokens)
        finally:
            self.held -= 1

    def _ask(self, image: MedicalImage, question: str, choices: Sequence[str] | None, max_new_tokens: int) -> str:
        from medfm.vlm.api import ask, load

        if self.model is None:
            self.model = load(self.source, weights=self.weights, device=self.device)
        return ask(image, question, self.model, choices, max_new_tokens=max_new_tokens)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
