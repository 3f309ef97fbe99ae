"""The README's two screenshots of ``medfm serve``'s browser app (headless chromium via Playwright).

    python docs/serve_screenshots.py     # writes docs/serve_ultrasound.png and docs/serve_ct.png
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.serve_support import running  # noqa: E402

from medfm.serve import ServeSettings  # noqa: E402
from medfm.serve.app import create_app  # noqa: E402


def drag(page, box: tuple[int, int, int, int], width: int, height: int) -> None:  # noqa: ANN001
    stage = page.locator("#overlay").bounding_box()
    at = lambda x, y: (stage["x"] + (x + 0.5) * stage["width"] / width, stage["y"] + (y + 0.5) * stage["height"] / height)  # noqa: E731
    page.mouse.move(*at(*box[:2]))
    page.mouse.down()
    page.mouse.move(*at(*box[2:]), steps=5)
    page.mouse.up()


def wait_for(page, prefix: str) -> None:  # noqa: ANN001
    page.wait_for_function(f"document.getElementById('status').textContent.startsWith('{prefix}')", timeout=300_000)


def save(page, path: Path) -> None:  # noqa: ANN001
    """A small PNG: the screenshot in 128 colours."""
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB").quantize(128)
    shot.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main() -> None:
    with running(create_app(ServeSettings())) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 640}, bypass_csp=True)
        page.goto(url + "/")
        page.set_input_files("#file", str(REPO / "examples" / "busi_benign_001.png"))
        page.wait_for_selector("#stage:not([hidden])")
        drag(page, (215, 107, 265, 132), 416, 416)
        wait_for(page, "score")
        page.fill("#classes", "benign tumour, malignant tumour, normal breast")
        page.click("#classify")
        page.wait_for_selector("#probabilities li", timeout=300_000)
        page.fill("#question", "What kind of image is this?")
        page.click("#ask")
        page.wait_for_selector("#answer:not([hidden])", timeout=300_000)
        save(page, REPO / "docs" / "serve_ultrasound.png")

        page.select_option("#modality", "CT")
        page.set_input_files("#file", str(REPO / "examples" / "totalseg_example_ct.nii.gz"))
        page.wait_for_function("state.image && state.image.name.startsWith('totalseg')")
        page.select_option("#window", "soft")
        page.check('input[value="box3d"]')
        page.fill("#z0", "13")
        page.fill("#z1", "17")
        drag(page, (41, 25, 105, 86), 122, 101)  # the reference liver's box (TotalSegmentator label 5)
        wait_for(page, "3D box")
        page.click("#add-label")
        page.check('input[value="box"]')
        drag(page, (10, 22, 43, 57), 122, 101)  # the reference spleen's box (label 1)
        wait_for(page, "score")
        page.locator("#labels input[type=text]").nth(0).fill("liver")
        page.locator("#labels input[type=text]").nth(1).fill("spleen")
        save(page, REPO / "docs" / "serve_ct.png")
        browser.close()


if __name__ == "__main__":
    main()
