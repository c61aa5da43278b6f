"""``fusionkit serve``: a real server process, answered over HTTP by a real client."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS, save_tiny_image_text_model, stop_process
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")

from fusionkit.cli import main  # noqa: E402
from fusionkit.errors import ConfigError, MissingDependencyError  # noqa: E402
from fusionkit.serving import Predictor  # noqa: E402
from fusionkit.serving.batching import MicroBatcher  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = TINY_TASKS
#: (text, image number or None) per sample; a text-only and an image-only sample among them.
SAMPLES = [("a red shirt", 0), ("the blue bag", 1), ("striped dress on the mat", None),
           (None, 2), ("green plain dress", 3), ("a cat sits", 0), ("blue striped", 2),
           ("dog runs on the mat", 1)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bert_dir):
    """A tiny shorthand image + text model (tiny BERT, timm's test_efficientnet) on disk."""
    return save_tiny_image_text_model(tmp_path_factory.mktemp("serve") / "model", tiny_bert_dir)


@pytest.fixture(scope="module")
def images(checkpoint):
    """Four PNG files of random pixels: paths and bytes."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for number in range(4):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
        path = checkpoint.parent / f"image-{number}.png"
        Image.fromarray(pixels.numpy()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return Predictor.from_pretrained(checkpoint, device="cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(checkpoint, log, *options):
    """``fusionkit serve`` in a child process; yields ``(base url, process)`` once ready."""
    port = _free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fusionkit", "serve", "--checkpoint", str(checkpoint),
             "--port", str(port), "--device", "cpu", *options],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"the server exited:\n{Path(log).read_text()}"
            assert time.monotonic() < deadline, f"not ready:\n{Path(log).read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, process
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(checkpoint, log, "--max-body-mb", "1", "--max-text-chars", "200") as (
        url, _
    ):
        yield url


def _form(sample, images):
    text, image = sample
    data = {} if text is None else {"text": text}
    files = {} if image is None else {"image": ("x.png", images[image].read_bytes(), "image/png")}
    return {"data": data, "files": files}


def _expected(predictor, sample, images):
    """What ``fusionkit predict --json`` prints for the sample."""
    text, image = sample
    return predictor.predict(images=None if image is None else [images[image]],
                             texts=None if text is None else [text])[0]


def _assert_same(actual, expected, tolerance=1e-4):
    """Equal labels and keys; scores and weights equal up to float rounding."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (actual, expected)
        for key in expected:
            _assert_same(actual[key], expected[key], tolerance)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=tolerance)
    else:
        assert actual == expected


def test_predict_answers_as_the_predictor(server, predictor, images):
    for sample in SAMPLES:
        response = httpx.post(f"{server}/predict", **_form(sample, images), timeout=30)
        assert response.status_code == 200, response.text
        _assert_same(response.json(), _expected(predictor, sample, images))
    result = response.json()
    assert set(result["color"]) == {"label", "score", "scores", "modality_weights"}
    assert set(result["pattern"]) == {"labels", "scores", "modality_weights"}


def test_a_json_batch_answers_each_sample_and_an_error_in_its_slot(server, predictor, images):
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in images]
    samples = [{"text": "a red shirt", "image": encoded[0]},
               {"text": "the blue bag", "image": "bm90IGFuIGltYWdl"},  # "not an image"
               {"txt": "typo"},
               {"image": f"data:image/png;base64,{encoded[2]}"},
               {"text": "striped dress on the mat"}]
    response = httpx.post(f"{server}/predict", json={"samples": samples}, timeout=30)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == 5
    _assert_same(answers[0], _expected(predictor, ("a red shirt", 0), images))
    assert "cannot read image" in answers[1]["error"]
    assert "unknown field 'txt'" in answers[2]["error"] and "text" in answers[2]["error"]
    _assert_same(answers[3], _expected(predictor, (None, 2), images))
    _assert_same(answers[4], _expected(predictor, ("striped dress on the mat", None), images))
    bad = httpx.post(f"{server}/predict", json={"sample": []}, timeout=30)
    assert bad.status_code == 400 and "samples" in bad.json()["error"]


def test_64_concurrent_requests_are_batched_and_answered_as_one_by_one(server, images):
    sequential = [httpx.post(f"{server}/predict", **_form(s, images), timeout=30).json()
                  for s in SAMPLES]
    before = httpx.get(f"{server}/metadata").json()["batching"]

    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(
                client.post(f"{server}/predict", **_form(SAMPLES[i % len(SAMPLES)], images))
                for i in range(64)
            ))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 64
    for i, response in enumerate(responses):
        _assert_same(response.json(), sequential[i % len(SAMPLES)])
    after = httpx.get(f"{server}/metadata").json()["batching"]
    assert after["samples"] - before["samples"] == 64
    assert after["batches"] - before["batches"] < 64  # some requests shared a forward pass
    assert 1 < after["largest"] <= 32


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels and holds none (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_bad_inputs_get_4xx_json_and_the_server_stays_up(server, images):
    png = images[0].read_bytes()
    cases = [
        ({"files": {"image": ("a.png", b"no image here", "image/png")}}, 400,
         "cannot read image"),
        ({"files": {"image": ("a.png", png[: len(png) // 2], "image/png")}}, 400, "truncated"),
        ({"files": {"image": ("bomb.png", _png_header(30_000, 30_000), "image/png")}}, 400,
         "decompression bomb"),
        ({"files": {"image": ("big.png", b"\0" * (1024 * 1024 + 1), "image/png")}}, 413,
         "over the limit"),
        ({"data": {"title": "red tee"}}, 400, "unknown field 'title'; the model's inputs: text"),
        ({"data": {"text": "red " * 60}}, 400, "over the limit of 200"),
        ({"data": {"text": ""}}, 400, "no input"),
        ({}, 400, "no input"),
        ({"files": {"image": ("", b"", "application/octet-stream")}}, 400, "no input"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
    ]
    for request, status, needle in cases:
        response = httpx.post(f"{server}/predict", timeout=30, **request)
        assert response.status_code == status, (needle, response.text)
        assert needle in response.json()["error"], response.json()
        assert httpx.get(f"{server}/health").json() == {"status": "ready"}
    good = httpx.post(f"{server}/predict", **_form(SAMPLES[0], images), timeout=30)
    assert good.status_code == 200


def test_metadata_describes_the_model(server, tiny_bert_dir):
    import fusionkit

    metadata = httpx.get(f"{server}/metadata").json()
    assert metadata["tasks"] == {"color": {"classes": ["blue", "red"], "multi_label": False},
                                 "pattern": {"classes": ["plain", "striped", "floral"],
                                             "multi_label": True}}
    assert {n: i["kind"] for n, i in metadata["inputs"].items()} == {"text": "text",
                                                                     "image": "image"}
    assert metadata["backbones"]["image"]["model_name"] == "test_efficientnet"
    assert metadata["backbones"]["text"]["model_name_or_path"] == str(tiny_bert_dir)
    assert metadata["fusionkit_version"] == fusionkit.__version__
    assert metadata["batching"]["max_batch"] == 32
    assert metadata["limits"] == {"max_body_mb": 1.0, "max_text_chars": 200}


def test_sigterm_lets_a_request_in_flight_finish(checkpoint, images, tmp_path):
    with running_server(checkpoint, tmp_path / "server.log") as (url, process):
        request = httpx.Request("POST", f"{url}/predict", data={"text": "a red shirt"},
                                files={"image": ("a.png", images[0].read_bytes(), "image/png")})
        body = request.read()
        sent_half, go_on = threading.Event(), threading.Event()

        def slow_upload():
            yield body[: len(body) // 2]
            sent_half.set()
            go_on.wait(30)
            yield body[len(body) // 2:]

        answers = {}

        def client():
            answers["response"] = httpx.post(
                f"{url}/predict", content=slow_upload(), timeout=60,
                headers={"content-type": request.headers["content-type"]},
            )

        log = tmp_path / "server.log"
        thread = threading.Thread(target=client)
        thread.start()
        assert sent_half.wait(30)
        time.sleep(1.0)  # the server has read the request's headers
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Waiting for connections to close" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        go_on.set()  # the rest of the body, while the server shuts down
        thread.join(60)
        response = answers["response"]
        assert response.status_code == 200, response.text
        assert response.json()["color"]["label"] in ("blue", "red")
        assert process.wait(30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert text.index("Shutting down") < text.index('"POST /predict HTTP/1.1" 200')


def test_health_is_503_until_the_warm_up_is_done(predictor, monkeypatch):
    from fastapi.testclient import TestClient

    from fusionkit.serving import samples, server

    release = threading.Event()
    monkeypatch.setattr(samples, "warm_up", lambda *args: release.wait(30))
    with TestClient(server.create_app(predictor)) as client:
        assert client.get("/health").status_code == 503
        response = client.post("/predict", data={"text": "a red shirt"})
        assert response.status_code == 503 and "warming up" in response.json()["error"]
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/predict", data={"text": "a red shirt"}).status_code == 200


def test_micro_batcher_gathers_up_to_max_batch_and_1_turns_it_off():
    def run(samples):
        time.sleep(0.02)
        return [(x, len(samples)) if x != 3 else ValueError("three") for x in samples]

    async def burst(max_batch):
        batcher = MicroBatcher(run, max_batch=max_batch, max_wait_ms=20)
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(x) for x in range(10)),
                                           return_exceptions=True)
        finally:
            await batcher.close()
        return results, batcher

    results, batcher = asyncio.run(burst(4))
    assert [r[0] for r in results if not isinstance(r, Exception)] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert isinstance(results[3], ValueError)  # its error alone; the others are answered
    assert batcher.batches == 3 and batcher.largest == 4
    results, batcher = asyncio.run(burst(1))
    assert batcher.batches == 10 and {r[1] for r in results if isinstance(r, tuple)} == {1}


def test_forward_batch_tuning_keeps_the_size_of_least_time_per_sample(predictor, monkeypatch):
    from fusionkit.serving import samples

    assert samples.forward_batch_sizes(1) == [1]
    assert samples.forward_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert samples.forward_batch_sizes(24) == [1, 2, 4, 8, 16, 24]
    # A clock that charges each forward 10 ms plus 1 ms per sample, and 3 ms per sample past 4
    # samples (a batch that no longer fits the caches): 4 is the cheapest per sample.
    clock = [0.0]
    real_predict = predictor.predict

    def charged(*args, inputs, **kwargs):
        count = len(next(iter(inputs.values())))
        for start in range(0, count, predictor.batch_size):
            size = min(predictor.batch_size, count - start)
            clock[0] += (10 + size + 3 * max(0, size - 4)) / 1000
        return real_predict(*args, inputs=inputs, **kwargs)

    monkeypatch.setattr(predictor, "predict", charged)
    monkeypatch.setattr(samples.time, "perf_counter", lambda: clock[0])
    batch_size = predictor.batch_size
    try:
        timings = samples.tune_forward_batch(predictor, 16)
        assert list(timings) == [1, 2, 4, 8, 16] and predictor.batch_size == 4
        assert timings[1] == pytest.approx(11.0) and timings[4] == pytest.approx(3.5)
    finally:
        predictor.batch_size = batch_size


def test_a_server_reports_its_forward_batch(predictor):
    from fastapi.testclient import TestClient

    from fusionkit.serving import server

    batch_size = predictor.batch_size
    try:
        options = server.ServeOptions(max_batch=8, forward_batch=2)
        with TestClient(server.create_app(predictor, options)) as client:
            while client.get("/health").status_code != 200:
                time.sleep(0.05)
            batching = client.get("/metadata").json()["batching"]
            assert batching["forward_batch"] == 2 and batching["forward_batch_ms"] is None
        with TestClient(server.create_app(predictor, server.ServeOptions(max_batch=4))) as client:
            while client.get("/health").status_code != 200:
                time.sleep(0.05)
            batching = client.get("/metadata").json()["batching"]
            assert set(batching["forward_batch_ms"]) == {"1", "2", "4"}
            assert batching["forward_batch"] in (1, 2, 4)
    finally:
        predictor.batch_size = batch_size
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="--forward-batch"):
            server.ServeOptions(max_batch=8, forward_batch=bad)


def test_serve_errors_are_one_line(tmp_path, monkeypatch, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["serve", "--checkpoint", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    from fusionkit.serving.server import require_serving_dependencies

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'fusionkit\[serve\]'"):
        require_serving_dependencies()
    assert main(["serve", "--checkpoint", str(tmp_path)]) == 2
    assert "needs uvicorn: pip install 'fusionkit[serve]'" in capsys.readouterr().err


def test_fusionkit_imports_without_fastapi():
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None; "
            "import fusionkit, fusionkit.serving, fusionkit.cli; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    assert result.stdout.strip() == "ok", result.stderr



def test_an_onnx_export_is_served_like_its_checkpoint(checkpoint, predictor, images, tmp_path):
    from fusionkit.serving.export import export_onnx

    exported = export_onnx(checkpoint, tmp_path / "export")
    with running_server(exported, tmp_path / "server.log") as (url, _):
        assert httpx.get(f"{url}/metadata", timeout=10).status_code == 200
        for sample in SAMPLES[:3]:
            response = httpx.post(f"{url}/predict", **_form(sample, images), timeout=30)
            assert response.status_code == 200, response.text
            _assert_same(response.json(), _expected(predictor, sample, images), tolerance=1e-3)
