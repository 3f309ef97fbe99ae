"""A real uvicorn server on 127.0.0.1 and a free port, started and stopped inside a test, and the
tiny /ask model the serve tests share."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:  # noqa: ANN001
    """A tiny random transformers llava folder: the /ask model of the tests that need no real answer."""
    from tests.test_vlm_formats import write_transformers_llava

    folder = tmp_path_factory.mktemp("ask") / "tiny-llava"
    write_transformers_llava(folder, 5)
    return folder


@contextlib.contextmanager
def running(app) -> Iterator[str]:  # noqa: ANN001 - a FastAPI app
    """Serve ``app`` in a thread; yields its base URL and stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
