"""The HTTP API (``/v1``) and the browser app (``/``): parse, call the library, format.

Every error is an RFC 9457 problem-details JSON whose ``detail`` is the library's own message (the
CLI prints the same line), with the client's file name in place of the server's temporary path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import logging
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import medfm
from medfm.errors import InputFileError, MedfmError, MissingDependencyError, OutputFileError
from medfm.intensity import IntensityPreset, preset
from medfm.prompts import Box3D
from medfm.segment.model import SegmentationModel
from medfm.segment.options import check_volume_options
from medfm.segment.run import untrained_prompts
from medfm.serve import LOOPBACK, ServeSettings
from medfm.serve.state import ANNOTATION, Asker, EmbeddingCache, ImageStore, QuestionsFull, Segmenter, Upload
from medfm.serve.uploads import SUFFIXES, UnsupportedUpload, UploadTooLarge, check_size, sniff

log = logging.getLogger("medfm.serve")
STATIC = resources.files("medfm.serve") / "static"
#: The window names of the slice and segment endpoints; ``auto`` is the modality's default.
Window = Literal["auto", "soft", "lung", "bone", "brain", "abdomen", "liver", "mediastinum", "mr", "minmax"]
MaskFormat = Literal["nifti", "png", "dicom-seg"]
EXPORT_SUFFIX = {"nifti": ".nii.gz", "png": ".png", "dicom-seg": ".dcm"}
EXPORT_MEDIA = {"nifti": "application/gzip", "png": "image/png", "dicom-seg": "application/dicom"}


# ----------------------------------------------------------------------------- schemas
class ImageInfo(BaseModel):
    id: str
    name: str = Field(description="The uploaded file's name, as the client sent it.")
    kind: Literal["image", "volume"]
    shape: list[int] = Field(description="Array shape: (H, W) or (H, W, C) for images, (Z, Y, X) for volumes.")
    spacing: list[float] = Field(description="mm per step along each spatial axis, in array-axis order.")
    modality: str | None
    format: str | None = Field(description="The file format read (png, jpeg, nifti, dicom, ...).")
    slices: int = Field(description="Number of slices (1 for a 2D image).")


class SegmentRequest(BaseModel):
    boxes: list[list[float]] | None = Field(None, description="2D boxes [x0, y0, x1, y1] in pixels; one label each.", max_length=64)
    points: list[list[float]] | None = Field(None, description="Clicks [x, y]; they refine a single box, or are a prompt alone.", max_length=256)
    point_labels: list[int] | None = Field(None, description="1 positive, 0 negative, one per point (default all 1).", max_length=256)
    slice: int | None = Field(None, description="The slice (along Z) of a volume; omit for 2D images.")
    box3d: list[int] | None = Field(None, description="A 3D box [x0, y0, z0, x1, y1, z1] (voxels, inclusive): segments the volume.")
    slice_step: int = Field(1, description="3D box: segment every K-th slice with the model, interpolate between (about K times faster).")
    refine_below: float | None = Field(None, description="3D box with slice_step > 1: also segment the slice between two key slices whose masks' Dice is below this.")
    model: str | None = Field(None, description="One of GET /v1/models' segmentation names (default: the server's first).")
    window: Window = Field("auto", description="Intensity window of the model input (auto: the modality's default).")


class SegmentResponse(BaseModel):
    scores: list[float] = Field(description="Predicted IoU of each prompt's mask (empty for a 3D box).")
    mask_png: str | None = Field(None, description="Base64 PNG label map (uint8, 1..N) on the slice's grid.")
    mask_id: str | None = Field(None, description="For a 3D box: the id of its volume mask (GET .../mask?mask_id=).")
    slices: list[int] | None = Field(None, description="For a 3D box: the slices its mask covers.")
    warning: str | None = Field(None, description="Set when the model was never trained with a prompt type given "
                                "(e.g. clicks to a box-only model): the mask is unreliable; it names models that were.")


class ClassifyRequest(BaseModel):
    labels: list[str] = Field(description="Class names, e.g. ['pneumonia', 'normal'].", min_length=1, max_length=64)
    slice: int | None = Field(None, description="The slice of a volume to classify (default: the middle one).")
    method: Literal["softmax", "pos-neg"] = "softmax"


class ClassifyResponse(BaseModel):
    model: str
    probabilities: dict[str, float]


class AskRequest(BaseModel):
    question: str = Field(description="The question about the image, e.g. 'Is there a pleural effusion?'", max_length=2000)
    choices: list[Annotated[str, Field(max_length=200)]] | None = Field(
        None, description="A closed question: the answer is the most likely of these (two or more), exactly as given.", max_length=32)
    slice: int | None = Field(None, description="The slice (along Z) of a volume; omit for 2D images.")
    max_new_tokens: int = Field(128, description="Longest free-text answer, in tokens.", ge=1, le=256)
    model: str | None = Field(None, description="GET /v1/models' ask model (the only one this server runs).")


class AskResponse(BaseModel):
    answer: str = Field(description="The model's answer: research use, not diagnosis.")
    model: str


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


PROBLEMS = {code: {"model": Problem, "content": {"application/problem+json": {}}} for code in (401, 403, 404, 413, 415, 422, 429)}


# ----------------------------------------------------------------------------- errors
def problem(status: int, detail: str) -> JSONResponse:
    """An RFC 9457 problem-details response."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def status_of(error: MedfmError) -> int:
    """The HTTP status of a library error: a missing optional package is the server's (501), the
    rest are the client's input or prompt (422)."""
    return 501 if isinstance(error, MissingDependencyError) else 422


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the app
def window_preset(window: str) -> IntensityPreset | None:
    """The library's intensity preset of a window name (``auto``: None, the modality's default)."""
    return None if window == "auto" else preset({"soft": "soft_tissue"}.get(window, window))


def create_app(settings: ServeSettings, models: dict[str, SegmentationModel] | None = None) -> FastAPI:
    """The FastAPI app. ``models`` (name -> loaded model, the first the default) saves loading
    ``settings.models`` again, e.g. in tests."""
    if models is None:
        loaded = [medfm.load(name, device=settings.device) for name in settings.models or (None,)]
        models = {model.name: model for model in loaded}
    default_model = next(iter(models))
    root = settings.upload_root or Path(tempfile.mkdtemp(prefix="medfm-serve-"))
    store = ImageStore(root, settings.idle_minutes * 60)
    cache = EmbeddingCache(int(settings.cache_mb * 2**20))
    segmenter = Segmenter(models, cache, settings.encode_workers, settings.decode_workers)
    asker = Asker(settings.ask_model, settings.device, settings.max_questions, settings.ask_weights)
    max_upload = int(settings.max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(60.0, max(1.0, store.idle_seconds / 4)))
                for upload_id in store.expire():
                    cache.drop_image(upload_id)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            segmenter.close()
            asker.close()
            shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(
        title="medfm", version=medfm.__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
        description="Interactive segmentation, zero-shot classification and questions about medical images with medfm "
        "(research use, not diagnosis). "
        "Every /v1 call needs `Authorization: Bearer <token>` when the server was started with a token.",
    )
    app.state.store, app.state.cache, app.state.segmenter, app.state.asker = store, cache, segmenter, asker

    # -- security: token, same-origin, headers ------------------------------------------------
    allowed_hosts = LOOPBACK | {"[::1]", settings.host}

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202 - starlette's signature
        host = _hostname(request.headers.get("host", ""))
        if settings.host in LOOPBACK and host not in allowed_hosts:
            return problem(403, f"host '{host}' is not this server's (DNS rebinding is refused)")
        if request.url.path.startswith("/v1"):
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
                return problem(403, "cross-origin requests are refused (CORS is off)")
            if settings.token is not None:
                sent = request.headers.get("authorization", "")
                scheme, _, credential = sent.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(credential.encode(), settings.token.encode()):
                    response = problem(401, "missing or wrong token: send 'Authorization: Bearer <token>'")
                    response.headers["WWW-Authenticate"] = "Bearer"
                    return response
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'; base-uri 'none'"
        )
        if request.url.path.startswith("/v1"):
            response.headers["Cache-Control"] = "no-store"
        return response

    app.add_middleware(BodyLimit, max_bytes=max_upload)

    @app.exception_handler(MedfmError)
    async def library_error(_: Request, error: MedfmError) -> JSONResponse:
        return problem(status_of(error), str(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        response = problem(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return problem(422, _validation_detail(error))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, f"internal error ({type(error).__name__}); the server log has the details")

    def upload_of(image_id: str) -> Upload:
        upload = store.get(image_id)
        if upload is None:
            raise HTTPException(404, f"no image '{image_id}' (never uploaded, or deleted after {settings.idle_minutes:g} idle minutes)")
        return upload

    def slice_of(upload: Upload, index: int | None) -> int | None:
        """The slice index checked against the image: an int for a volume, None for a 2D image
        (whose only slice is 0)."""
        slices = upload.image.spatial_shape[0] if upload.image.is_volume else 1
        if index is None:
            if upload.image.is_volume:
                raise HTTPException(422, f"{upload.name} is a volume: give the slice (0..{slices - 1})")
            return None
        if not 0 <= index < slices:
            raise HTTPException(422, f"slice {index} is outside {upload.name}'s {slices} slice(s)")
        return index if upload.image.is_volume else None

    def served(model: str | None) -> str:
        """The model's name if this server runs it (None: the default)."""
        model = model or default_model
        if model not in models:
            raise HTTPException(422, f"model '{model}' is not served here; choose one of {', '.join(models)}")
        return model

    def info(upload: Upload) -> ImageInfo:
        image = upload.image
        return ImageInfo(
            id=upload.id, name=upload.name, kind="volume" if image.is_volume else "image", shape=list(image.array.shape),
            spacing=[float(s) for s in image.spacing], modality=image.modality, format=image.metadata.get("format"),
            slices=image.spatial_shape[0] if image.is_volume else 1,
        )

    # -- routes -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/v1/health", responses=PROBLEMS)
    async def health() -> dict:
        """Liveness, the number of open images and the embedding cache's use."""
        return {"status": "ok", "version": medfm.__version__, "images": len(store.uploads), "encoded": segmenter.encoded,
                "cache": {"entries": len(cache), "bytes": cache.bytes, "max_bytes": cache.max_bytes,
                          "hits": cache.hits, "misses": cache.misses}}

    @app.get("/v1/models", responses=PROBLEMS)
    async def list_served_models() -> dict:
        """The segmentation models this server runs (the first is the default), its classifier and
        the vision-language model of /ask (loaded on the first question)."""
        return {"segmentation": [{"name": name, "arch": model.arch, "default": name == default_model,
                                  "prompts": None if model.trained_prompts is None else list(model.trained_prompts)}
                                 for name, model in models.items()],
                "classification": [{"name": settings.classify_model, "default": True}],
                "ask": [{"name": asker.name, "default": True, "loaded": asker.model is not None}]}

    @app.post("/v1/images", status_code=201, responses=PROBLEMS)
    async def upload_image(
        file: Annotated[UploadFile, File(description="PNG, JPEG, NIfTI, a DICOM file or a zip of a DICOM series.")],
        modality: Annotated[str | None, Form(description="Override the file's modality, e.g. CT.", max_length=16)] = None,
    ) -> ImageInfo:
        """Upload an image; its kind is judged by its content, its size by its header."""
        name = Path(file.filename or "upload").name[:200] or "upload"
        if len(store.uploads) >= settings.max_images:
            raise HTTPException(429, f"this server holds {settings.max_images} images already: delete one "
                                "(DELETE /v1/images/{id}) or wait until an idle one is deleted")
        head = await file.read(352)
        try:
            kind = sniff(head)
        except UnsupportedUpload as error:
            raise HTTPException(415, f"{name}: {error}") from error
        upload_id, folder = store.new_folder()
        path = folder / f"upload{SUFFIXES[kind]}"
        try:
            await file.seek(0)
            with open(path, "wb") as handle:
                await asyncio.to_thread(shutil.copyfileobj, file.file, handle)
            try:
                await asyncio.to_thread(check_size, path, kind, settings.max_voxels)
            except UnsupportedUpload as error:
                raise HTTPException(415, f"{name}: {error}") from error
            except UploadTooLarge as error:
                raise HTTPException(413, f"{name}: {error}") from error
            try:
                image = await asyncio.to_thread(medfm.read_image, path, modality=modality or None)
            except InputFileError as error:
                raise InputFileError(name, error.problem) from error
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        upload = Upload(upload_id, name, folder, image)
        store.add(upload)
        return info(upload)

    @app.get("/v1/images/{image_id}", responses=PROBLEMS)
    async def image_info(image_id: str) -> ImageInfo:
        """What POST /v1/images answered for this image."""
        return info(upload_of(image_id))

    @app.delete("/v1/images/{image_id}", status_code=204, responses=PROBLEMS)
    async def delete_image(image_id: str) -> Response:
        """Delete the image, its masks and its cached embeddings now."""
        upload_of(image_id)
        store.remove(image_id)
        cache.drop_image(image_id)
        return Response(status_code=204)

    @app.get("/v1/images/{image_id}/slices/{index}.png", responses={**PROBLEMS, 200: {"content": {"image/png": {}}}}, response_class=Response)
    async def slice_png(image_id: str, index: int, window: Window = "auto") -> Response:
        """Slice ``index`` (0 for a 2D image) rendered under a window as PNG."""
        upload = upload_of(image_id)
        index = slice_of(upload, index)

        def render() -> bytes:
            from PIL import Image

            array = upload.image.array if index is None else upload.image.array[index]
            rgb = upload.display_converter(window, window_preset(window))(array)
            picture = Image.fromarray(rgb if upload.image.channels == 3 else rgb[..., 0])
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG", compress_level=1)
            return buffer.getvalue()

        return Response(await asyncio.to_thread(render), media_type="image/png")

    @app.post("/v1/images/{image_id}/slices/{index}/embedding", status_code=204, responses=PROBLEMS)
    async def encode_slice(image_id: str, index: int, model: str | None = None, window: Window = "auto") -> Response:
        """Encode slice ``index`` now (if not cached), so that the first prompt on it costs the
        decoder only; the app asks for the slice the user is looking at."""
        upload = upload_of(image_id)
        await segmenter.embedding(upload, slice_of(upload, index), served(model), window, window_preset(window))
        return Response(status_code=204)

    @app.post("/v1/images/{image_id}/segment", responses=PROBLEMS)
    async def segment(image_id: str, request: SegmentRequest) -> SegmentResponse:
        """Masks from boxes and clicks on one slice (the slice is encoded once, then cached), or a
        volume mask from a 3D box."""
        upload = upload_of(image_id)
        model = served(request.model)
        intensity = window_preset(request.window)
        check_volume_options(request.slice_step, request.refine_below, request.box3d is not None)  # before queueing
        if request.box3d is not None:
            if request.boxes or request.points or request.slice is not None:
                raise medfm.PromptError("3D boxes segment the whole volume: do not combine them with boxes, points or a slice")
            if len(request.box3d) != 6:
                raise medfm.PromptError(f"a 3D box needs 6 numbers (x0, y0, z0, x1, y1, z1), got {len(request.box3d)}")
            labels = await segmenter.volume(upload.image, Box3D(*request.box3d), model, intensity, request.slice_step,
                                            request.refine_below)
            mask_id = f"m-{secrets.token_urlsafe(8)}"
            upload.masks[mask_id] = labels
            return SegmentResponse(scores=[], mask_id=mask_id, slices=[int(z) for z in np.flatnonzero(labels.any(axis=(1, 2)))])
        index = slice_of(upload, request.slice)
        if not request.boxes and not request.points:
            raise medfm.PromptError("give at least one box or point")
        points = labels = None
        if request.points:
            if any(len(point) != 2 for point in request.points):
                raise medfm.PromptError(f"points must be [x, y] pairs, got {request.points[:3]}")
            points = np.asarray(request.points, dtype=np.float64)[None]
            if request.point_labels is not None:
                if len(request.point_labels) != len(request.points):
                    raise medfm.PromptError(f"{len(request.points)} points but {len(request.point_labels)} labels")
                labels = np.asarray(request.point_labels)[None]
        elif request.point_labels:
            raise medfm.PromptError("point_labels given without points")
        embedding = await segmenter.embedding(upload, index, model, request.window, intensity)
        prediction = await segmenter.predict(embedding, model, request.boxes or None, points, labels)
        return SegmentResponse(scores=[float(s) for s in prediction.scores],
                               mask_png=base64.b64encode(_png(prediction.label_map())).decode(),
                               warning=untrained_prompts(models[model], bool(request.boxes), points is not None))

    @app.put("/v1/images/{image_id}/mask/slices/{index}.png", status_code=204, responses=PROBLEMS,
             openapi_extra={"requestBody": {"required": True, "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_mask_slice(image_id: str, index: int, request: Request) -> Response:
        """Replace slice ``index`` of the image's editable label map with a grey PNG (0 background)."""
        upload = upload_of(image_id)
        index = slice_of(upload, index)
        grid = upload.image.spatial_shape[-2:]
        plane = await asyncio.to_thread(_label_png, await request.body(), grid)
        annotation = upload.annotation()
        if index is None:
            annotation[...] = plane
        else:
            annotation[index] = plane
        return Response(status_code=204)

    @app.put("/v1/images/{image_id}/mask/names", status_code=204, responses=PROBLEMS)
    async def put_label_names(image_id: str, names: Annotated[dict[int, Annotated[str, Field(max_length=64)]], Body(max_length=255)]) -> Response:
        """Names of the labels (1: 'liver', ...), written into DICOM-SEG exports."""
        upload_of(image_id).label_names = {int(k): v for k, v in names.items() if 0 < int(k) < 2**16}
        return Response(status_code=204)

    @app.get("/v1/images/{image_id}/mask/slices/{index}.png", responses={**PROBLEMS, 200: {"content": {"image/png": {}}}}, response_class=Response)
    async def mask_slice_png(image_id: str, index: int, mask_id: str = ANNOTATION) -> Response:
        """Slice ``index`` of a label map (the editable one, or a 3D result's) as a grey PNG."""
        upload = upload_of(image_id)
        mask = _mask(upload, mask_id)
        index = slice_of(upload, index)
        return Response(_png(mask if index is None else mask[index]), media_type="image/png")

    @app.get("/v1/images/{image_id}/mask", responses={**PROBLEMS, 200: {"content": {m: {} for m in EXPORT_MEDIA.values()}}}, response_class=Response)
    async def export_mask(image_id: str, format: MaskFormat = "nifti", mask_id: str = ANNOTATION) -> Response:  # noqa: A002 - the API's name
        """A label map as a file on the input's grid: NIfTI (the input's geometry), PNG (2D) or
        DICOM-SEG (DICOM inputs), written by `medfm.write_mask`."""
        upload = upload_of(image_id)
        mask = _mask(upload, mask_id)
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", upload.name.split(".")[0])[:80] or "image"
        download = f"{stem}_mask{EXPORT_SUFFIX[format]}"

        def write() -> bytes:
            path = upload.folder / f"export-{secrets.token_hex(8)}{EXPORT_SUFFIX[format]}"
            try:
                medfm.write_mask(mask, path, like=upload.image, label_names=upload.label_names or None)
                return path.read_bytes()
            except OutputFileError as error:
                raise OutputFileError(download, error.problem) from error
            finally:
                path.unlink(missing_ok=True)

        return Response(await asyncio.to_thread(write), media_type=EXPORT_MEDIA[format],
                        headers={"Content-Disposition": f'attachment; filename="{download}"'})

    @app.post("/v1/images/{image_id}/classify", responses=PROBLEMS)
    async def classify(image_id: str, request: ClassifyRequest) -> ClassifyResponse:
        """Zero-shot probabilities of the labels for the image (a volume's slice), with medfm.classify."""
        upload = upload_of(image_id)
        middle = upload.image.spatial_shape[0] // 2 if upload.image.is_volume else None
        index = slice_of(upload, middle if request.slice is None else request.slice)
        image = upload.image if index is None else upload.image.slice(index)
        probabilities = await asyncio.to_thread(medfm.classify, image, request.labels, settings.classify_model, method=request.method)
        return ClassifyResponse(model=settings.classify_model, probabilities=probabilities)

    @app.post("/v1/images/{image_id}/ask", responses={**PROBLEMS, 503: PROBLEMS[429]})
    async def ask(image_id: str, request: AskRequest) -> AskResponse:
        """The vision-language model's answer to a question about the image (a volume's slice),
        with medfm.vlm.api.ask; with choices, the most likely of them. Research use, not diagnosis."""
        from medfm.vlm.api import check_choices, check_question

        upload = upload_of(image_id)
        if request.model not in (None, asker.name):
            raise HTTPException(422, f"model '{request.model}' is not served here; /ask runs {asker.name}")
        check_question(request.question)  # refused here, not after a queue of generations and a model load
        if request.choices is not None:
            check_choices(request.choices)
        index = slice_of(upload, request.slice)
        image = upload.image if index is None else upload.image.slice(index)
        try:
            answer = await asker.ask(image, request.question, request.choices, request.max_new_tokens)
        except QuestionsFull as full:
            raise HTTPException(503, f"/ask is busy: {full}", headers={"Retry-After": "5"}) from full
        return AskResponse(answer=answer, model=asker.name)

    def _mask(upload: Upload, mask_id: str) -> np.ndarray:
        if mask_id == ANNOTATION:
            return upload.annotation()
        if mask_id not in upload.masks:
            raise HTTPException(404, f"no mask '{mask_id}' for {upload.name}")
        return upload.masks[mask_id]

    return app


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, as soon as its length is
    announced or, for a chunked body, as soon as that much has arrived (raised as an HTTPException
    from ``receive``, which FastAPI passes on to the problem-details handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"the upload is larger than this server's limit of {self.max_bytes / 2**20:g} MiB"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await problem(413, detail)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, detail)
            return message

        await self.app(scope, limited_receive, send)


def _hostname(header: str) -> str:
    """The host of a Host header, without its port (``[::1]:8000`` -> ``[::1]``)."""
    return header[: header.index("]") + 1] if header.startswith("[") and "]" in header else header.rsplit(":", 1)[0]


def _png(labels: np.ndarray) -> bytes:
    """A label map as a grey PNG (8-bit when the labels fit)."""
    from PIL import Image

    from medfm.io.writers import smallest_unsigned

    buffer = io.BytesIO()
    Image.fromarray(smallest_unsigned(labels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _label_png(data: bytes, grid: tuple[int, int]) -> np.ndarray:
    """A grey PNG label map of the given (H, W), checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise HTTPException(415, "a label map is sent as a PNG")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if (opened.height, opened.width) != tuple(grid):
                raise HTTPException(422, f"the label map is {opened.width}x{opened.height}, the slice {grid[1]}x{grid[0]}")
            if opened.mode not in ("L", "I;16", "I;16B", "I", "P", "1"):
                raise HTTPException(422, f"a label map is a grey PNG (8 or 16 bit), not mode {opened.mode}")
            array = np.asarray(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise HTTPException(422, f"corrupt PNG label map ({error})") from error
    if array.min(initial=0) < 0 or array.max(initial=0) >= 2**16:
        raise HTTPException(422, "label values must lie in 0..65535")
    return array.astype(np.uint16)
