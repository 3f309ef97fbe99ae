"""`medfm serve`'s HTTP API: answers equal the library's, errors are problem details with the
library's wording, the security rules hold, and a schemathesis fuzz of the OpenAPI spec finds no 5xx.

Most tests run a tiny random LiteMedSAM-shaped model (and, for /ask, a tiny random transformers
llava folder) through FastAPI's TestClient; two run the real default models on a real uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import io
import threading
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'medfm[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="the test extra is not installed: pip install 'medfm[test]'")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

import medfm  # noqa: E402
from medfm.errors import OptionError  # noqa: E402
from medfm.segment.model import SegmentationModel  # noqa: E402
from medfm.serve import ServeSettings, check_settings  # noqa: E402
from medfm.serve.app import create_app  # noqa: E402
from medfm.serve.state import EmbeddingCache, QuestionsFull  # noqa: E402
from tests.conftest import EXAMPLES, write_dicom_series  # noqa: E402
from tests.test_predictor import tiny_model  # noqa: E402, F401 - the tiny random LiteMedSAM fixture
from tests.serve_support import running, tiny_llava  # noqa: E402, F401 - tiny_llava: the tiny /ask model fixture

PNG = EXAMPLES / "busi_benign_001.png"
CT = EXAMPLES / "totalseg_example_ct.nii.gz"
def make_client(model: SegmentationModel, tmp_path: Path, **settings) -> TestClient:  # noqa: ANN003
    app = create_app(ServeSettings(upload_root=tmp_path / "uploads", **settings), models={"tiny": model})
    return TestClient(app, base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(tiny_model, tiny_llava, tmp_path_factory):  # noqa: ANN001, ANN201
    with make_client(tiny_model, tmp_path_factory.mktemp("serve"), ask_model=str(tiny_llava)) as client:
        yield client


def upload(client: TestClient, path: Path, name: str | None = None, **form: str) -> dict:
    response = client.post("/v1/images", files={"file": (name or path.name, path.read_bytes())}, data=form)
    assert response.status_code == 201, response.text
    return response.json()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def assert_problem(response, status: int, *words: str) -> None:  # noqa: ANN001
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    for word in words:
        assert word in body["detail"], body["detail"]


def test_health_models_and_openapi(client) -> None:
    assert client.get("/v1/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["segmentation"] == [{"name": "tiny", "arch": "litemedsam", "default": True, "prompts": None}]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images", "/v1/images/{image_id}/segment", "/v1/images/{image_id}/mask", "/v1/images/{image_id}/classify",
            "/v1/images/{image_id}/ask"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200


def test_segment_equals_the_library_and_encodes_once(client, tiny_model) -> None:
    image_id = upload(client, PNG)["id"]
    before = client.get("/v1/health").json()["cache"]
    box = [215, 107, 265, 132]
    answer = client.post(f"/v1/images/{image_id}/segment", json={"boxes": [box]}).json()
    clicks = client.post(f"/v1/images/{image_id}/segment", json={"boxes": [box], "points": [[240, 120], [220, 110]], "point_labels": [1, 0]}).json()
    predictor = tiny_model.predictor()
    predictor.set_image(medfm.read_image(PNG))
    expected = predictor.predict(boxes=[box])
    np.testing.assert_array_equal(decode_png(base64.b64decode(answer["mask_png"])), expected.label_map())
    assert answer["scores"] == pytest.approx(expected.scores.tolist(), abs=1e-6)
    with_clicks = predictor.predict(boxes=[box], points=[[[240, 120], [220, 110]]], point_labels=[[1, 0]])
    np.testing.assert_array_equal(decode_png(base64.b64decode(clicks["mask_png"])), with_clicks.label_map())
    after = client.get("/v1/health").json()["cache"]
    assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 1  # encoded once, prompted twice
    encoded = client.get("/v1/health").json()["encoded"]
    other = upload(client, PNG)["id"]
    assert client.post(f"/v1/images/{other}/slices/0/embedding").status_code == 204  # the app warms the slice it shows
    client.post(f"/v1/images/{other}/segment", json={"boxes": [box]})
    assert client.get("/v1/health").json()["encoded"] == encoded + 1


def test_clicks_to_a_box_only_model_come_back_with_a_warning(tiny_model, tmp_path) -> None:
    """The app's user clicks far more than they draw boxes: a box-trained model answers clicks with a
    near-empty mask, so the answer says so and names the models trained with clicks."""
    box_only = dataclasses.replace(tiny_model, name="box-only", trained_prompts=("box",))
    app = create_app(ServeSettings(upload_root=tmp_path / "uploads"), models={"box-only": box_only})
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/v1/models").json()["segmentation"][0]["prompts"] == ["box"]
        image_id = upload(client, PNG)["id"]
        boxed = client.post(f"/v1/images/{image_id}/segment", json={"boxes": [[215, 107, 265, 132]]}).json()
        clicked = client.post(f"/v1/images/{image_id}/segment", json={"points": [[240, 120]]}).json()
    assert boxed["warning"] is None and boxed["mask_png"]
    assert "not point prompts" in clicked["warning"] and "medfm-litemedsam-clicks" in clicked["warning"]


def test_colour_jpeg_named_as_nifti_is_read_as_a_jpeg(client) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buffer := io.BytesIO(), format="JPEG")
    info = client.post("/v1/images", files={"file": ("photo.nii.gz", buffer.getvalue())}).json()
    assert info["shape"] == [60, 80, 3] and info["format"] == "jpg"
    rendered = decode_png(client.get(f"/v1/images/{info['id']}/slices/0.png").content)
    assert rendered.shape == (60, 80, 3)
    answer = client.post(f"/v1/images/{info['id']}/segment", json={"points": [[40, 30]]}).json()
    assert decode_png(base64.b64decode(answer["mask_png"])).shape == (60, 80)


def test_volume_slices_windows_and_prompts(client) -> None:
    info = upload(client, CT, modality="CT")
    assert info["kind"] == "volume" and info["shape"] == [30, 101, 122] and info["slices"] == 30 and info["modality"] == "CT"
    lung = client.get(f"/v1/images/{info['id']}/slices/15.png?window=lung")
    soft = client.get(f"/v1/images/{info['id']}/slices/15.png?window=soft")
    assert lung.headers["content-type"] == "image/png" and decode_png(lung.content).shape == (101, 122)
    assert not np.array_equal(decode_png(lung.content), decode_png(soft.content))
    answer = client.post(f"/v1/images/{info['id']}/segment", json={"boxes": [[30, 30, 70, 70], [60, 20, 100, 60]], "slice": 15}).json()
    assert len(answer["scores"]) == 2 and set(np.unique(decode_png(base64.b64decode(answer["mask_png"])))) <= {0, 1, 2}
    assert_problem(client.post(f"/v1/images/{info['id']}/segment", json={"boxes": [[1, 1, 5, 5]]}), 422, "is a volume", "0..29")
    assert_problem(client.get(f"/v1/images/{info['id']}/slices/30.png"), 422, "slice 30 is outside")


def test_box3d_mask_exports_on_the_input_grid(client, tmp_path) -> None:
    info = upload(client, CT)
    answer = client.post(f"/v1/images/{info['id']}/segment", json={"box3d": [30, 30, 14, 90, 80, 16]}).json()
    assert answer["mask_id"] and answer["scores"] == []
    exported = client.get(f"/v1/images/{info['id']}/mask", params={"format": "nifti", "mask_id": answer["mask_id"]})
    assert exported.status_code == 200 and 'filename="totalseg_example_ct_mask.nii.gz"' in exported.headers["content-disposition"]
    (tmp_path / "mask.nii.gz").write_bytes(exported.content)
    mask, image = medfm.read_image(tmp_path / "mask.nii.gz"), medfm.read_image(CT)
    assert mask.array.shape == image.array.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert sorted(np.flatnonzero(mask.array.any(axis=(1, 2))).tolist()) == answer["slices"]
    assert set(answer["slices"]) <= {14, 15, 16}
    stepped = client.post(f"/v1/images/{info['id']}/segment",
                          json={"box3d": [30, 30, 10, 90, 80, 20], "slice_step": 4, "refine_below": 0.9}).json()
    assert stepped["mask_id"] and set(stepped["slices"]) <= set(range(10, 21))
    for body, words in [({"box3d": [30, 30, 10, 90, 80, 20], "slice_step": 0}, ["slice step must be"]),
                        ({"box3d": [30, 30, 10, 90, 80, 20], "refine_below": 0.9}, ["slice step above 1"]),
                        ({"boxes": [[30, 30, 70, 70]], "slice": 15, "slice_step": 4}, ["apply to 3D boxes only"])]:
        assert_problem(client.post(f"/v1/images/{info['id']}/segment", json=body), 422, *words)
    assert_problem(client.post(f"/v1/images/{info['id']}/segment", json={"box3d": [1, 2, 3]}), 422, "6 numbers")
    assert_problem(client.post(f"/v1/images/{info['id']}/segment", json={"box3d": [0, 0, 0, 500, 5, 5]}), 422, "reaches outside the volume")


def test_edited_label_map_round_trips_and_exports(client, tmp_path) -> None:
    image_id = upload(client, PNG)["id"]
    labels = np.zeros((416, 416), dtype=np.uint8)
    labels[100:150, 200:280], labels[300:320, 10:40] = 1, 2
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG")
    put = client.put(f"/v1/images/{image_id}/mask/slices/0.png", content=buffer.getvalue(), headers={"content-type": "image/png"})
    assert put.status_code == 204
    np.testing.assert_array_equal(decode_png(client.get(f"/v1/images/{image_id}/mask/slices/0.png").content), labels)
    for file_format, suffix in (("png", ".png"), ("nifti", ".nii.gz")):
        exported = client.get(f"/v1/images/{image_id}/mask?format={file_format}")
        (tmp_path / f"m{suffix}").write_bytes(exported.content)
        np.testing.assert_array_equal(medfm.read_image(tmp_path / f"m{suffix}").array.reshape(416, 416), labels)
    assert_problem(client.get(f"/v1/images/{image_id}/mask?format=dicom-seg"), 422, "busi_benign_001_mask.dcm", "DICOM-SEG needs")
    Image.fromarray(labels[:10]).save(buffer := io.BytesIO(), format="PNG")
    assert_problem(client.put(f"/v1/images/{image_id}/mask/slices/0.png", content=buffer.getvalue()), 422, "416x10", "416x416")


def test_dicom_zip_and_file_uploads_export_dicom_seg(client, tmp_path) -> None:
    volume = np.random.default_rng(0).normal(40, 30, (4, 32, 40))
    files = write_dicom_series(volume, (2.5, 0.8, 0.8), (-20.0, -16.0, 10.0), np.eye(3), tmp_path / "series")
    archive = tmp_path / "series.bin"  # the name says nothing: the kind comes from the content
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in files:
            zipped.write(path, path.name)
    info = upload(client, archive)
    assert info["kind"] == "volume" and info["shape"] == [4, 32, 40] and info["modality"] == "CT" and info["format"] == "dicom"
    labels = np.zeros((32, 40), dtype=np.uint8)
    labels[5:20, 5:25] = 1
    Image.fromarray(labels).save(buffer := io.BytesIO(), format="PNG")
    assert client.put(f"/v1/images/{info['id']}/mask/slices/2.png", content=buffer.getvalue()).status_code == 204
    assert client.put(f"/v1/images/{info['id']}/mask/names", json={"1": "lesion"}).status_code == 204
    exported = client.get(f"/v1/images/{info['id']}/mask?format=dicom-seg")
    assert exported.status_code == 200, exported.text
    import pydicom

    seg = pydicom.dcmread(io.BytesIO(exported.content))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "lesion"
    single = upload(client, files[0], name="slice")
    assert single["kind"] == "image" and single["format"] == "dicom"


def test_bad_uploads_are_problem_details_and_leave_no_file(tiny_model, tmp_path) -> None:
    with make_client(tiny_model, tmp_path, max_upload_mb=0.5, max_voxels=100_000) as client:
        uploads = tmp_path / "uploads"
        post = lambda name, data: client.post("/v1/images", files={"file": (name, data)})  # noqa: E731
        assert_problem(post("scan.png", b"just some text" * 40), 415, "scan.png", "judged by its content")
        assert_problem(post("scan.nii.gz", gzip.compress(b"not a nifti header" * 40)), 415, "scan.nii.gz", "gzip file that is not NIfTI")
        assert_problem(post("busi.png", PNG.read_bytes()), 413, "busi.png", "173,056 pixels", "100,000")
        assert_problem(post("big.png", b"\x89PNG\r\n\x1a\n" + bytes(600_000)), 413, "0.5 MiB")
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8))
        noise.save(buffer := io.BytesIO(), format="PNG")
        assert_problem(post("cut.png", buffer.getvalue()[:3000]), 422, "cut.png: corrupt or truncated image file")
        assert not any(uploads.iterdir()), "a refused upload left files behind"
        small = Image.fromarray(np.zeros((20, 30), dtype=np.uint8))
        small.save(buffer := io.BytesIO(), format="PNG")
        image_id = post("small.png", buffer.getvalue()).json()["id"]
        segment = lambda body: client.post(f"/v1/images/{image_id}/segment", json=body)  # noqa: E731
        assert_problem(segment({"boxes": [[0, 0, 40, 10]]}), 422, "reaches outside the 30x20 image")
        assert_problem(segment({"boxes": [[5, 5, 1, 1]]}), 422, "inverted")
        assert_problem(segment({"points": [[1, 1]], "point_labels": [2]}), 422, "labels must be 1 (positive) or 0")
        assert_problem(segment({}), 422, "give at least one box or point")
        assert_problem(segment({"boxes": [[1, 1, 5, 5]], "model": "sam-vit-h"}), 422, "not served here", "tiny")
        assert_problem(segment({"boxes": "nonsense"}), 422, "boxes")
        assert_problem(client.get("/v1/images/nope/slices/0.png"), 404, "no image 'nope'")
        assert_problem(client.post(f"/v1/images/{image_id}/classify", json={"labels": ["a", "a"]}), 422, "labels repeat")


def test_images_held_at_once_are_bounded(tiny_model, tmp_path) -> None:
    with make_client(tiny_model, tmp_path, max_images=2) as client:
        first, _ = upload(client, PNG)["id"], upload(client, PNG)
        assert_problem(client.post("/v1/images", files={"file": ("third.png", PNG.read_bytes())}), 429, "holds 2 images")
        assert client.delete(f"/v1/images/{first}").status_code == 204
        upload(client, PNG)


def test_token_is_required_on_every_v1_call(tiny_model, tmp_path) -> None:
    token = "a-long-enough-test-token"
    with make_client(tiny_model, tmp_path, token=token) as client:
        assert_problem(client.get("/v1/health"), 401, "Authorization: Bearer")
        assert client.get("/v1/health").headers["www-authenticate"] == "Bearer"
        assert_problem(client.get("/v1/health", headers={"Authorization": "Bearer wrong"}), 401)
        assert_problem(client.post("/v1/images", headers={"Authorization": f"Basic {token}"}), 401)
        assert client.get("/v1/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/").status_code == 200  # the app page itself holds no data; it asks for the token


def test_other_hosts_need_a_token_and_cross_origin_calls_are_refused(client) -> None:
    with pytest.raises(OptionError, match="refusing to listen on 0.0.0.0 without a token"):
        check_settings("0.0.0.0", None)
    with pytest.raises(OptionError, match="at least 16 characters"):
        check_settings("0.0.0.0", "short")
    check_settings("0.0.0.0", "x" * 16)
    check_settings("127.0.0.1", None)
    check_settings("::1", None)
    from typer.testing import CliRunner

    from medfm.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "192.168.1.5"], env={"MEDFM_TOKEN": ""})
    assert isinstance(result.exception, OptionError)
    assert_problem(client.get("/v1/health", headers={"Origin": "http://evil.example"}), 403, "cross-origin")
    assert_problem(client.get("/v1/health", headers={"Host": "evil.example"}), 403, "DNS rebinding")
    response = client.get("/v1/health", headers={"Origin": "http://127.0.0.1"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_an_unknown_ask_model_stops_the_server_before_it_listens(monkeypatch, tiny_llava) -> None:
    import uvicorn

    from medfm.errors import MedfmError
    from medfm.serve import serve

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(True))
    for name, problem in (("no-such-model", "unknown vision-language model 'no-such-model'"),
                          ("xraygpt", "needs a folder of its published downloads")):
        with pytest.raises(MedfmError, match=problem):
            serve(ServeSettings(ask_model=name))
    with pytest.raises(MedfmError, match="--ask-weights /no/such/folder: no such folder"):
        serve(ServeSettings(ask_model="radfm", ask_weights=Path("/no/such/folder")))
    with pytest.raises(MedfmError, match="medblip reads whole volumes only; /ask answers about one slice"):
        serve(ServeSettings(ask_model="medblip", ask_weights=Path(tiny_llava)))
    assert not started
    serve(ServeSettings(ask_model=str(tiny_llava)))  # a LLaVA folder is accepted (and the model not loaded yet)
    assert started == [True]


def test_ask_serves_a_published_layout_from_ask_weights(tiny_model, tmp_path) -> None:
    """--ask-model radfm --ask-weights FOLDER: /ask answers about a slice as medfm.ask does with weights=."""
    from tests.test_vlm_radfm import write_radfm

    from medfm.vlm.api import ask, load

    folder = tmp_path / "RadFM"
    write_radfm(folder)
    question = "is there a pleural effusion ?"
    with make_client(tiny_model, tmp_path, ask_model="radfm", ask_weights=folder) as client:
        volume_id = upload(client, CT)["id"]
        chosen = client.post(f"/v1/images/{volume_id}/ask", json={"question": question, "choices": ["yes", "no"], "slice": 15}).json()
    model = load("radfm", weights=folder)
    assert chosen == {"answer": ask(medfm.read_image(CT).slice(15), question, model, ["yes", "no"]), "model": "radfm"}


def test_idle_uploads_are_deleted(client) -> None:
    image_id = upload(client, PNG)["id"]
    store = client.app.state.store
    folder = store.uploads[image_id].folder
    assert folder.is_dir() and store.expire(now=store.uploads[image_id].last_used + 1) == []
    assert image_id in store.expire(now=store.uploads[image_id].last_used + store.idle_seconds + 1)
    assert not folder.exists()
    assert_problem(client.get(f"/v1/images/{image_id}"), 404, "deleted after 60 idle minutes")


def test_embedding_cache_is_bounded_in_bytes() -> None:
    cache = EmbeddingCache(max_bytes=int(2.5 * 4 * 2**20))
    embedding = lambda: (torch.zeros(1, 256, 64, 64), None)  # noqa: E731 - 4 MiB each
    for key in "abc":
        cache.put((key, None, "m", "auto"), embedding())
    assert len(cache) == 2 and cache.bytes == 8 * 2**20
    assert cache.get(("a", None, "m", "auto")) is None and cache.get(("c", None, "m", "auto")) is not None
    cache.drop_image("c")
    assert len(cache) == 1 and cache.bytes == 4 * 2**20


def test_prompts_on_a_cached_image_do_not_wait_for_another_encoding(client) -> None:
    """While one image is being encoded (held here on purpose), a prompt on an encoded one answers."""
    segmenter, store = client.app.state.segmenter, client.app.state.store
    cached, other = (store.uploads[upload(client, PNG)["id"]] for _ in range(2))
    release = threading.Event()
    encode = segmenter._encode

    def held_encode(image, *args):  # noqa: ANN001, ANN002, ANN202
        if image is other.image:
            assert release.wait(30)
        return encode(image, *args)

    async def scenario() -> None:
        embedding = await segmenter.embedding(cached, None, "tiny", "auto", None)
        segmenter._encode = held_encode
        try:
            slow = asyncio.ensure_future(segmenter.embedding(other, None, "tiny", "auto", None))
            await asyncio.sleep(0.05)
            prediction = await asyncio.wait_for(segmenter.predict(embedding, "tiny", [[10, 10, 100, 100]], None, None), 20)
            assert prediction.masks.shape == (1, 416, 416) and not slow.done()
            release.set()
            await asyncio.wait_for(slow, 30)
        finally:
            segmenter._encode = encode
            release.set()

    asyncio.run(scenario())


def test_ask_answers_as_the_library_and_refuses_bad_input_before_loading(client, tiny_llava) -> None:
    from medfm.vlm.api import ask, load

    image_id, volume_id = upload(client, PNG)["id"], upload(client, CT)["id"]
    post = lambda target, body: client.post(f"/v1/images/{target}/ask", json=body)  # noqa: E731
    assert_problem(post(image_id, {"question": "  "}), 422, "the question is empty")
    assert_problem(post(image_id, {"question": "is it ?", "choices": ["yes"]}), 422, "at least two choices, got 1")
    assert_problem(post(image_id, {"question": "is it ?", "choices": ["yes", " yes"]}), 422, "distinct and non-empty")
    assert_problem(post(volume_id, {"question": "is it ?"}), 422, "totalseg_example_ct.nii.gz is a volume: give the slice (0..29)")
    assert_problem(post(volume_id, {"question": "is it ?", "slice": 30}), 422, "slice 30 is outside")
    assert_problem(post(image_id, {"question": "is it ?", "model": "llava-med"}), 422, "not served here", "tiny-llava")
    assert_problem(post(image_id, {"question": "is it ?", "max_new_tokens": 257}), 422, "max_new_tokens")
    assert_problem(post("nope", {"question": "is it ?"}), 404, "no image 'nope'")
    assert client.get("/v1/models").json()["ask"] == [{"name": "tiny-llava", "default": True, "loaded": False}]

    model = load(tiny_llava)
    question = "is there a pleural effusion ?"
    answer = post(image_id, {"question": question, "max_new_tokens": 6}).json()
    assert answer == {"answer": ask(medfm.read_image(PNG), question, model, max_new_tokens=6), "model": "tiny-llava"}
    chosen = post(volume_id, {"question": question, "choices": ["yes", "no"], "slice": 15}).json()["answer"]
    assert chosen == ask(medfm.read_image(CT).slice(15), question, model, ["yes", "no"])
    assert client.get("/v1/models").json()["ask"][0]["loaded"] is True


def test_prompts_do_not_wait_for_a_question_being_answered(client, tiny_llava) -> None:
    """While a question is being answered (held here on purpose), a prompt on an encoded image answers."""
    segmenter, asker, store = client.app.state.segmenter, client.app.state.asker, client.app.state.store
    upload_ = store.uploads[upload(client, PNG)["id"]]
    release = threading.Event()
    answer = asker._ask

    def held_ask(*args):  # noqa: ANN002, ANN202
        assert release.wait(30)
        return answer(*args)

    async def scenario() -> None:
        embedding = await segmenter.embedding(upload_, None, "tiny", "auto", None)
        asker._ask = held_ask
        try:
            slow = asyncio.ensure_future(asker.ask(upload_.image, "is it ?", ["yes", "no"], 4))
            await asyncio.sleep(0.05)
            prediction = await asyncio.wait_for(segmenter.predict(embedding, "tiny", [[10, 10, 100, 100]], None, None), 20)
            assert prediction.masks.shape == (1, 416, 416) and not slow.done()
            release.set()
            assert await asyncio.wait_for(slow, 30) in {"yes", "no"}
        finally:
            asker._ask = answer
            release.set()

    asyncio.run(scenario())


def test_a_full_question_queue_answers_503_and_frees_as_questions_end(client) -> None:
    """/ask holds at most max_questions (running and waiting); one more is refused at once, with a
    reason and Retry-After, and is taken again once a held question has been answered."""
    asker, store = client.app.state.asker, client.app.state.store
    image_id = upload(client, PNG)["id"]
    image = store.uploads[image_id].image
    release, answer = threading.Event(), asker._ask
    assert asker.max_questions == ServeSettings().max_questions == 8

    async def scenario() -> None:
        asker._ask = lambda *args: "held" if release.wait(30) else "timed out"
        try:
            held = [asyncio.ensure_future(asker.ask(image, "is it ?", None, 4)) for _ in range(asker.max_questions)]
            await asyncio.sleep(0.05)
            assert asker.held == asker.max_questions
            with pytest.raises(QuestionsFull, match="8 questions are being answered or waiting"):
                await asker.ask(image, "is it ?", None, 4)
            release.set()
            assert await asyncio.wait_for(asyncio.gather(*held), 30) == ["held"] * asker.max_questions
            assert asker.held == 0 and await asker.ask(image, "is it ?", None, 4) == "held"
        finally:
            asker._ask = answer
            release.set()

    asyncio.run(scenario())
    asker.held = asker.max_questions  # what a full queue looks like to the next request
    try:
        response = client.post(f"/v1/images/{image_id}/ask", json={"question": "is it ?"})
    finally:
        asker.held = 0
    assert_problem(response, 503, "/ask is busy", "at most 8 held", "ask again in a moment")
    assert response.headers["retry-after"] == "5"


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tiny_llava, tmp_path_factory):  # noqa: ANN001, ANN201
    """A real server for the fuzzer, with uploads for its image ids to point at."""
    app = create_app(ServeSettings(upload_root=tmp_path_factory.mktemp("fuzz"), ask_model=str(tiny_llava)), models={"tiny": tiny_model})
    with running(app) as url:
        images = [httpx.post(f"{url}/v1/images", files={"file": (path.name, path.read_bytes())}).json()["id"] for path in (PNG, CT)]
        yield app, url, images


def test_openapi_fuzz_finds_no_server_error(fuzz_server) -> None:
    """A bounded schemathesis run over every operation of the spec (8 cases each), the image ids
    pointing at real uploads: no input makes the server fail (5xx). (Driven with hypothesis
    directly: schemathesis' pytest plugin does not run under this pytest.)"""
    app, url, images = fuzz_server
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda op: op.method.upper() == "DELETE")
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:  # noqa: ANN001
            if "image_id" in (case.path_parameters or {}):
                case.path_parameters["image_id"] = images[len(str(case.path_parameters)) % 2]
            case.call_and_validate(base_url=url, checks=[not_a_server_error])

        check()


def test_real_model_on_a_real_server_matches_the_expert_mask() -> None:
    """The default model behind uvicorn on 127.0.0.1: the demo's box gives the demo's Dice."""
    app = create_app(ServeSettings())
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        image_id = http.post("/v1/images", files={"file": ("busi.png", PNG.read_bytes())}).json()["id"]
        answer = http.post(f"/v1/images/{image_id}/segment", json={"boxes": [[215, 107, 265, 132]]}).json()
        mask = decode_png(base64.b64decode(answer["mask_png"])) == 1
        reference = medfm.read_image(EXAMPLES / "busi_benign_001_mask.png").array > 0
        dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
        assert dice > 0.85 and answer["scores"][0] > 0.5


def test_real_ask_model_on_a_real_server_answers() -> None:
    """The default /ask model (medfm-vlm-small: medfm-clip-small's tower, SmolLM2-135M's words) behind uvicorn:
    it loads on the first question, answers in words, and picks one of the given choices."""
    app = create_app(ServeSettings())
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        image_id = http.post("/v1/images", files={"file": ("busi.png", PNG.read_bytes())}).json()["id"]
        answer = http.post(f"/v1/images/{image_id}/ask", json={"question": "Describe the image briefly.", "max_new_tokens": 24}).json()
        assert answer["model"] == "medfm-vlm-small" and len(answer["answer"].split()) >= 2, answer
        chosen = http.post(f"/v1/images/{image_id}/ask", json={"question": "Is there a tumour?", "choices": ["yes", "no"]}).json()
        assert chosen["answer"] in {"yes", "no"}
        assert http.get("/v1/models").json()["ask"] == [{"name": "medfm-vlm-small", "default": True, "loaded": True}]


def test_paths_given_as_strings_work_like_paths(tiny_model, tmp_path) -> None:
    settings = ServeSettings(upload_root=str(tmp_path / "uploads"), ask_weights=str(tmp_path))
    assert settings.upload_root == tmp_path / "uploads" and settings.ask_weights == tmp_path
    with TestClient(create_app(settings, models={"tiny": tiny_model}), base_url="http://127.0.0.1") as client:
        assert upload(client, PNG)["slices"] == 1
