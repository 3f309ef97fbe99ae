"""The browser app in a real headless chromium (Playwright), against a real server running the
default segmentation model: upload, draw a box with the mouse, see the overlay, check the mask
against the API's answer for the same box, undo/redo, export, and read the export back with medfm;
classify, and ask a question (a tiny random /ask model: the real one's answers are tested in
test_serve.py).

Needs Debian's chromium (``apt-get install chromium``; Playwright's own browser download is not
used) or ``MEDFM_CHROMIUM=/path/to/chrome``; skips with the reason otherwise."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'medfm[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install 'medfm[test]'")
CHROMIUM = os.environ.get("MEDFM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on this machine (apt-get install chromium, or set MEDFM_CHROMIUM)", allow_module_level=True)

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import medfm  # noqa: E402
from medfm.serve import ServeSettings  # noqa: E402
from medfm.serve.app import create_app  # noqa: E402
from tests.conftest import EXAMPLES  # noqa: E402
from tests.serve_support import running, tiny_llava  # noqa: E402, F401 - tiny_llava: the tiny /ask model fixture
from tests.test_predictor import tiny_model  # noqa: E402, F401 - the tiny random LiteMedSAM fixture

PNG = EXAMPLES / "busi_benign_001.png"


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):  # noqa: ANN001, ANN201
    with running(create_app(ServeSettings(upload_root=tmp_path_factory.mktemp("uploads"), ask_model=str(tiny_llava)))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):  # noqa: ANN001, ANN201
    # bypass_csp: Playwright's waits evaluate strings, which the app's Content-Security-Policy forbids
    context = browser.new_context(viewport={"width": 1200, "height": 800}, accept_downloads=True, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(server + "/")
    yield page
    context.close()
    assert not errors, errors


def drag_box(page, x0: int, y0: int, x1: int, y1: int, width: int, height: int) -> None:  # noqa: ANN001
    """Press at one corner's pixel centre, move, release at the other's."""
    stage = page.locator("#overlay").bounding_box()
    to_screen = lambda x, y: (stage["x"] + (x + 0.5) * stage["width"] / width, stage["y"] + (y + 0.5) * stage["height"] / height)  # noqa: E731
    page.mouse.move(*to_screen(x0, y0))
    page.mouse.down()
    page.mouse.move(*to_screen((x0 + x1) / 2, (y0 + y1) / 2), steps=4)
    page.mouse.move(*to_screen(x1, y1), steps=4)
    page.mouse.up()


def wait_idle(page) -> None:  # noqa: ANN001
    page.wait_for_function("document.body.dataset.busy === '0'", timeout=60_000)


def overlay_pixels(page) -> int:  # noqa: ANN001
    """Pixels of label 1's colour (#e6194b; alpha-blended, so within a few levels) on the overlay."""
    return page.evaluate("""() => {
        const c = document.getElementById('overlay'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && Math.abs(d[i] - 230) < 4 && Math.abs(d[i + 1] - 25) < 4 && Math.abs(d[i + 2] - 75) < 4) n++;
        return n; }""")


def server_labels(server: str, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(f"{server}/v1/images/{image_id}/mask/slices/0.png").content)))


def test_box_drawn_in_the_browser_gives_the_api_mask_and_exports(page, server, tmp_path) -> None:
    page.set_input_files("#file", str(PNG))
    page.wait_for_selector("#stage:not([hidden])")
    wait_idle(page)
    drag_box(page, 215, 107, 265, 132, 416, 416)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('score')", timeout=60_000)
    assert overlay_pixels(page) > 500  # the mask is on screen

    sent = json.loads(page.inner_text("#prompt"))
    assert np.abs(np.subtract(sent["boxes"], [[215, 107, 265, 132]])).max() <= 1  # the mouse lands on whole screen pixels
    image_id = page.evaluate("() => state.image.id")
    answer = httpx.post(f"{server}/v1/images/{image_id}/segment", json={"boxes": sent["boxes"]}, timeout=60).json()
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))) == 1
    page.wait_for_function("() => state.dirty.size === 0")
    page.evaluate("() => state.sync")
    labels = server_labels(server, image_id)
    np.testing.assert_array_equal(labels == 1, expected)  # what the app drew is the API's mask for that box

    page.click("#undo")
    page.evaluate("() => state.sync")
    assert overlay_pixels(page) == 0 and not server_labels(server, image_id).any()
    page.click("#redo")
    page.evaluate("() => state.sync")
    np.testing.assert_array_equal(server_labels(server, image_id) == 1, expected)

    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename == "busi_benign_001_mask.nii.gz"
    download.value.save_as(tmp_path / "exported.nii.gz")
    exported = medfm.read_image(tmp_path / "exported.nii.gz")
    np.testing.assert_array_equal(exported.array.reshape(416, 416) == 1, expected)


def test_drop_a_file_refine_with_a_click_classify_and_ask(page, server) -> None:
    data = base64.b64encode(PNG.read_bytes()).decode()
    page.evaluate("""(data) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", data)
    page.wait_for_selector("#stage:not([hidden])")
    wait_idle(page)
    assert "dropped.png" in page.inner_text("#name")
    drag_box(page, 215, 107, 265, 132, 416, 416)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('score')", timeout=60_000)
    page.evaluate("() => { document.getElementById('status').textContent = ''; }")
    page.check('input[value="positive"]')
    stage = page.locator("#overlay").bounding_box()
    page.mouse.click(stage["x"] + 240.5 * stage["width"] / 416, stage["y"] + 120.5 * stage["height"] / 416)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('score')", timeout=60_000)
    sent = json.loads(page.inner_text("#prompt"))
    (x, y), = sent["points"]
    assert np.abs(np.subtract(sent["boxes"], [[215, 107, 265, 132]])).max() <= 1  # the mouse lands on whole screen pixels
    assert sent["point_labels"] == [1] and abs(x - 240) <= 1 and abs(y - 120) <= 1  # the click refines the box
    status = page.inner_text("#status")  # the default learnt from boxes only: the click's answer says so
    assert "not point prompts" in status and "medfm-litemedsam-clicks" in status and "error" in page.get_attribute("#status", "class")
    assert overlay_pixels(page) > 500
    page.click("#undo")
    page.click("#undo")
    assert overlay_pixels(page) == 0
    page.fill("#classes", "benign tumour, malignant tumour, normal breast")
    page.click("#classify")
    page.wait_for_selector("#probabilities li", timeout=60_000)
    shown = page.locator("#probabilities li").all_inner_texts()
    assert len(shown) == 3 and sum(float(text.split(": ")[1]) for text in shown) == pytest.approx(1.0, abs=0.01)

    image_id = page.evaluate("() => state.image.id")
    question = "is there a pleural effusion ?"
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_selector("#answer:not([hidden])", timeout=60_000)
    expected = httpx.post(f"{server}/v1/images/{image_id}/ask", json={"question": question}, timeout=60).json()["answer"]
    assert page.inner_text("#answer-text") == (expected or "(the model gave no answer)")
    assert page.inner_text("#answer-note") == "tiny-llava · research use, not diagnosis"
    page.evaluate("() => { document.getElementById('answer').hidden = true; }")
    page.fill("#choices", "yes, no ,")
    page.click("#ask")
    page.wait_for_selector("#answer:not([hidden])", timeout=60_000)
    expected = httpx.post(f"{server}/v1/images/{image_id}/ask", json={"question": question, "choices": ["yes", "no"]}, timeout=60).json()
    assert page.inner_text("#answer-text") == expected["answer"] and expected["answer"] in {"yes", "no"}
    page.fill("#choices", "yes")
    page.click("#ask")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert page.inner_text("#status") == "a closed question needs at least two choices, got 1"


def test_the_app_takes_the_token_from_the_address_and_drops_it(browser, tiny_model, tmp_path) -> None:  # noqa: ANN001
    token = "browser-test-token-0123456789"
    app = create_app(ServeSettings(token=token, upload_root=tmp_path), models={"tiny": tiny_model})
    with running(app) as url:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.goto(f"{url}/#token={token}")
        page.set_input_files("#file", str(PNG))
        page.wait_for_selector("#stage:not([hidden])")
        assert page.evaluate("() => location.hash") == ""  # not left in the address bar or history
        assert httpx.get(f"{url}/v1/health").status_code == 401
        assert httpx.get(f"{url}/v1/health", headers={"Authorization": f"Bearer {token}"}).json()["images"] == 1
        context.close()


def test_a_3d_box_with_a_slice_step_from_the_app(page, server) -> None:
    ct = EXAMPLES / "totalseg_example_ct.nii.gz"
    page.set_input_files("#file", str(ct))
    page.wait_for_selector("#stage:not([hidden])")
    wait_idle(page)
    page.check('input[value="box3d"]')
    page.fill("#z0", "8")
    page.fill("#z1", "20")
    page.fill("#zstep", "4")
    page.check("#adaptive")
    drag_box(page, 45, 26, 104, 84, 122, 101)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('3D box')", timeout=120_000)
    sent = json.loads(page.inner_text("#prompt"))
    assert sent["slice_step"] == 4 and sent["refine_below"] == 0.9 and sent["box3d"][2::3] == [8, 20]
    image_id = page.evaluate("() => state.image.id")
    answer = httpx.post(f"{server}/v1/images/{image_id}/segment",
                        json={k: sent[k] for k in ("box3d", "slice_step", "refine_below")}, timeout=120).json()
    assert page.inner_text("#status") == f"3D box: {len(answer['slices'])} slice(s) segmented" and answer["slices"]
    page.fill("#zstep", "1")
    page.evaluate("() => { document.getElementById('status').textContent = ''; }")
    drag_box(page, 45, 26, 104, 84, 122, 101)
    page.wait_for_function("document.getElementById('status').textContent.startsWith('3D box')", timeout=120_000)
    sent = json.loads(page.inner_text("#prompt"))
    assert sent["slice_step"] == 1 and sent["refine_below"] is None  # adaptive means nothing without a step
