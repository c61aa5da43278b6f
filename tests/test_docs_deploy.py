"""The curl examples of ``docs/deploy.md`` run against a live ``fusionkit serve``.

Convention: a fenced ```` ```bash ```` block preceded by the line ``<!-- curl -->`` holds one
``curl -s`` call to ``localhost:8000`` (and may prepare its input first). Each is run with bash
in a temporary working directory holding ``photo.png``, against a real server process on a
free port, and must answer 200 with the JSON of its endpoint. A ``# {...}`` comment line in a
block is the exact answer expected. The ```` ```json ```` block preceded by ``<!-- answer -->``
must have the keys of a real ``/predict`` answer. Every ``fusionkit`` command line of the page
must parse.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASKS, save_tiny_image_text_model, stop_process
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")

from fusionkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "deploy.md"
CURL = shutil.which("curl")
HOST = "localhost:8000"
TASKS = TINY_TASKS

BLOCK = re.compile(
    r"^<!-- (?P<kind>curl|answer) -->\n```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def _blocks(kind: str) -> list[tuple[str, str]]:
    text = PAGE.read_text(encoding="utf-8")
    return [
        (f"docs/deploy.md:{text.count(chr(10), 0, m.start()) + 2}", m["body"])
        for m in BLOCK.finditer(text)
        if m["kind"] == kind
    ]


CURL_BLOCKS = _blocks("curl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    """``python -m fusionkit serve`` on a tiny image + text model; yields ``host:port``."""
    if CURL is None:
        pytest.skip("curl is not installed (apt-get install curl); the curl examples are not run")
    folder = tmp_path_factory.mktemp("deploy")
    save_tiny_image_text_model(folder / "model", tiny_bert_dir)
    port = _free_port()
    log = folder / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fusionkit", "serve", "--checkpoint", str(folder / "model"),
             "--port", str(port), "--device", "cpu", "--max-batch", "4"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _health(url) != 200:
            assert process.poll() is None, f"the server exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()}"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(process)


@pytest.fixture
def workdir(tmp_path):
    """A working directory with ``photo.png``, as the page assumes."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "photo.png")
    return tmp_path


def _run(body: str, host: str, cwd: Path) -> tuple[int, object]:
    """Run a curl block against ``host``; its HTTP status and JSON answer."""
    assert body.count("curl -s ") == 1 and HOST in body, body
    # The status goes on a last line of its own.
    script = body.replace(HOST, host).replace("curl -s ", "curl -s -w '\\n%{http_code}' ", 1)
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer, _, status = result.stdout.rpartition("\n")
    return int(status), json.loads(answer)


def _check_prediction(answer: object) -> None:
    assert isinstance(answer, dict) and set(answer) == set(TASKS), answer
    for task, spec in TASKS.items():
        entry = answer[task]
        assert set(entry["scores"]) == set(spec["classes"])
        assert set(entry["modality_weights"]) == {"text", "image"}
        if spec.get("multi_label"):
            assert set(entry["labels"]) <= set(spec["classes"])
        else:
            assert entry["label"] in spec["classes"] and 0 <= entry["score"] <= 1


def test_the_page_has_a_curl_example_per_endpoint():
    bodies = [body for _, body in CURL_BLOCKS]
    assert any("/health" in b for b in bodies) and any("/metadata" in b for b in bodies)
    assert any("/predict" in b and "-F " in b for b in bodies)
    assert any("/predict" in b and "application/json" in b for b in bodies)


@pytest.mark.parametrize(("where", "body"), CURL_BLOCKS, ids=[w for w, _ in CURL_BLOCKS])
def test_curl_example_answers(where, body, server, workdir):
    status, answer = _run(body, server, workdir)
    assert status == 200, answer
    for line in body.splitlines():
        if line.startswith("# {"):
            assert answer == json.loads(line[2:]), where
    if "/health" in body:
        assert answer == {"status": "ready"}
    elif "/metadata" in body:
        assert answer["tasks"] == {
            task: {"classes": spec["classes"], "multi_label": spec.get("multi_label", False)}
            for task, spec in TASKS.items()
        }
        assert {name: i["kind"] for name, i in answer["inputs"].items()} == {
            "text": "text", "image": "image"}
        assert answer["batching"]["max_batch"] == 4
    elif "application/json" in body:
        samples = json.loads((workdir / "batch.json").read_text())["samples"]
        assert isinstance(answer, list) and len(answer) == len(samples) == 2
        for item in answer:
            _check_prediction(item)
    else:
        _check_prediction(answer)


def test_the_example_answer_has_the_keys_of_a_real_one(server, workdir):
    (where, example), = _blocks("answer")
    form = next(body for _, body in CURL_BLOCKS if "-F " in body)
    _, answer = _run(form, server, workdir)

    def keys(value: object) -> object:
        if isinstance(value, dict):
            return {key: keys(item) for key, item in value.items()}
        return type(value).__name__ if not isinstance(value, list) else "list"

    assert keys(json.loads(example)) == keys(answer), where


def _command_lines() -> list[str]:
    """The ``fusionkit ...`` lines of the page's bash blocks, continuations joined."""
    text = PAGE.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("fusionkit "):
                lines.append(line)
    return lines


def test_every_fusionkit_command_of_the_page_parses():
    lines = _command_lines()
    assert {line.split()[1] for line in lines} >= {"export", "predict", "evaluate", "serve"}
    parser = build_parser()
    for line in lines:
        try:
            parser.parse_args(shlex.split(line, comments=True)[1:])
        except SystemExit:
            pytest.fail(f"does not parse: {line}")
