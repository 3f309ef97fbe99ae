"""``medfm serve``: an HTTP API and a browser app for interactive segmentation, classification and
questions about an image.

`create_app` builds the FastAPI app (see `medfm.serve.app`); `serve` checks the settings, loads
the models and runs it on uvicorn. FastAPI and uvicorn come with the ``serve`` extra.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import MissingDependencyError, OptionError

__all__ = ["LOOPBACK", "ServeSettings", "check_settings", "serve"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeSettings:
    """What ``medfm serve`` is started with (see its options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_upload_mb: float = 512
    #: Segmentation models served, the first the default; none: the library's default model.
    models: tuple[str, ...] = ()
    classify_model: str = "medfm-clip-small"
    #: The vision-language model of /ask (a `medfm.vlm.api.load` name or folder; its default), loaded on the
    #: first question (a literal here: importing medfm.vlm would load torch before the settings are checked).
    ask_model: str = "medfm-vlm-small"
    #: A local folder of the /ask model's published files (radfm, llava-med, xraygpt, med-flamingo).
    ask_weights: Path | None = None
    #: Questions /ask holds at once, the one being answered included; more are refused with 503.
    max_questions: int = 8
    device: str = "cpu"
    cache_mb: float = 1024
    idle_minutes: float = 60
    #: Images held at once (each is in memory until deleted or idle).
    max_images: int = 32
    max_voxels: int = 2**28
    encode_workers: int = 1
    decode_workers: int = 2
    upload_root: Path | None = None

    def __post_init__(self) -> None:
        # a str from Python callers would otherwise fail deep inside the first upload, as a 500
        self.upload_root = None if self.upload_root is None else Path(self.upload_root)
        self.ask_weights = None if self.ask_weights is None else Path(self.ask_weights)


def check_settings(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (anyone who can reach the port could
    otherwise read every uploaded image)."""
    if token is not None and len(token) < 16:
        raise OptionError("the token must be at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    if host in LOOPBACK:
        return
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback and token is None:
        raise OptionError(f"refusing to listen on {host} without a token: pass --token or set MEDFM_TOKEN "
                          "(only 127.0.0.1 is served without one)")


def serve(settings: ServeSettings) -> None:
    """Load the models and serve the API and the app until interrupted."""
    check_settings(settings.host, settings.token)
    try:
        import uvicorn

        from medfm.serve.app import create_app
    except ImportError as error:
        raise MissingDependencyError(error.name or "fastapi", "serve", "medfm serve") from error
    from medfm.vlm.api import check_name, volumes_only

    # a wrong --ask-model or --ask-weights is the operator's mistake: say so now, not at the first question
    check_name(settings.ask_model, settings.ask_weights is not None)
    if settings.ask_weights is not None and not settings.ask_weights.is_dir():
        raise OptionError(f"--ask-weights {settings.ask_weights}: no such folder")
    if volumes_only(settings.ask_model):
        raise OptionError(f"--ask-model {settings.ask_model} reads whole volumes only; /ask answers about one slice "
                          "(use medfm ask on the volume)")
    app = create_app(settings)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"medfm serve: open http://{address}:{settings.port}/" + ("#token=<your token>" if settings.token else ""), flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", server_header=False)
