"""Property-based fuzzing of every place user input enters: configs, manifests, texts, images.

The property is the same everywhere: fusionkit either accepts the input or raises a
`fusionkit.FusionkitError` subclass with a message; never another exception type, never a
crash. `FUZZ_EXAMPLES` sets each test's hypothesis budget (also counted in
``docs/reliability.md``).
"""

from __future__ import annotations

import csv
import io
import json
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionkit.data import ManifestDataset, collate_samples, infer_tasks
from fusionkit.errors import FusionkitError
from fusionkit.models import ModelConfig, build_model
from fusionkit.tasks import TaskSpec

#: Hypothesis ``max_examples`` per fuzz test.
FUZZ_EXAMPLES: dict[str, int] = {
    "configs (random nested mappings)": 150,
    "configs (one key of a valid config mutated)": 150,
    "CSV manifests": 60,
    "JSONL manifests": 60,
    "text batches": 60,
    "image tensors": 60,
}
_SETTINGS = {"deadline": None, "derandomize": True,
             "suppress_health_check": [HealthCheck.too_slow]}

VALID_CONFIG: dict[str, Any] = {
    "vision": {"name": "timm", "model_name": "test_efficientnet", "pretrained": False},
    "text": None,
    "fusion": {"dim": 16, "sequence": {"name": "transformer", "heads": 2, "layers": 1},
               "modality": {"name": "keyless"}},
    "head": {"name": "mlp", "hidden_dim": 16},
    "tasks": {"color": {"classes": ["blue", "red"]},
              "pattern": {"num_classes": 3, "multi_label": True, "weight": 0.5}},
    "data": {"batch_size": 8},
    "train": {"epochs": 1},
}
_KEYS = ["model", "vision", "text", "fusion", "head", "tasks", "data", "train", "name", "dim",
         "sequence", "modality", "heads", "layers", "classes", "num_classes", "multi_label",
         "weight", "hidden_dim", "model_name", "pretrained", "freeze", "color", "timm", "mlp"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["timm", "mlp", "transformer", "keyless", "cma_clip", "huggingface"]),
)
keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=8), st.integers(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _fails_cleanly(error: BaseException) -> None:
    assert isinstance(error, FusionkitError), f"{type(error).__name__}: {error}"
    assert str(error).strip(), "an error without a message"


@settings(max_examples=FUZZ_EXAMPLES["configs (random nested mappings)"], **_SETTINGS)
@given(st.one_of(st.dictionaries(keys, values, max_size=6), values))
def test_fuzz_config_from_random_values(config):
    try:
        ModelConfig.from_dict(config)
    except Exception as error:  # the property: only FusionkitError escapes
        _fails_cleanly(error)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _paths(value, (*prefix, key))
    return found


_CONFIG_PATHS = _paths(VALID_CONFIG)


@settings(max_examples=FUZZ_EXAMPLES["configs (one key of a valid config mutated)"],
          **_SETTINGS)
@given(st.sampled_from(_CONFIG_PATHS), values, st.booleans())
def test_fuzz_config_with_one_key_mutated(path, value, delete):
    config = json.loads(json.dumps(VALID_CONFIG))
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        parsed = ModelConfig.from_dict(config)
    except Exception as error:
        _fails_cleanly(error)
        message = str(error)
        # Errors about a key name where it sits (the top-level ones name the key alone).
        assert any(str(part) in message for part in path) or "null" in message, message
        return
    assert ModelConfig.from_dict(parsed.to_dict()).to_dict() == parsed.to_dict()


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------

TASKS = {"color": TaskSpec.from_classes(["blue", "red"]),
         "pattern": TaskSpec.from_classes(["dot", "plain"], multi_label=True)}
_COLUMNS = ["id", "image", "text", "color", "pattern", "", " text ", "extra"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder with a good, a truncated and a non-image file, named by manifests."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("fuzz-images")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "good.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:30])
    (folder / "text.png").write_text("not an image")
    (folder / "dir.png").mkdir()
    return folder


cells = st.one_of(
    st.sampled_from(["", "red", "blue", "dot|plain", "red|blue", "mauve", "good.png",
                     "truncated.png", "text.png", "dir.png", "missing.png", "../good.png",
                     "/", "a,b", '"', "\n", "\r\n", "|", "||", " red "]),
    st.text(max_size=20),
)


def _check_dataset(path: Path, on_error: str) -> None:
    try:
        data = ManifestDataset(path, TASKS, on_error=on_error)
        samples = [data[i] for i in range(len(data))]
        if samples:
            collate_samples(samples[:4], TASKS, image_shape=(3, 8, 8))
        infer_tasks(path)
    except Exception as error:
        _fails_cleanly(error)


@settings(max_examples=FUZZ_EXAMPLES["CSV manifests"],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None, derandomize=True)
@given(
    header=st.lists(st.sampled_from(_COLUMNS), min_size=0, max_size=6),
    rows=st.lists(st.lists(cells, max_size=7), max_size=6),
    raw=st.one_of(st.none(), st.binary(max_size=60)),
    on_error=st.sampled_from(["skip", "raise"]),
)
def test_fuzz_csv_manifest(image_folder, header, rows, raw, on_error):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    content = buffer.getvalue().encode("utf-8", "surrogatepass") + (raw or b"")
    with tempfile.NamedTemporaryFile(suffix=".csv", dir=image_folder, delete=False) as handle:
        handle.write(content)
    try:
        _check_dataset(Path(handle.name), on_error)
    finally:
        Path(handle.name).unlink()


json_values = st.one_of(
    cells, st.none(), st.booleans(), st.integers(), st.floats(),
    st.lists(st.one_of(cells, st.integers(), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=FUZZ_EXAMPLES["JSONL manifests"],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None, derandomize=True)
@given(
    lines=st.lists(
        st.one_of(
            st.dictionaries(st.sampled_from(_COLUMNS), json_values, max_size=6).map(json.dumps),
            st.text(alphabet=string.printable, max_size=30),
            st.sampled_from(["[]", "null", "1", '"x"', "{", "", "{}", "[" * 50]),
        ),
        max_size=6,
    ),
    on_error=st.sampled_from(["skip", "raise"]),
)
def test_fuzz_jsonl_manifest(image_folder, lines, on_error):
    with tempfile.NamedTemporaryFile(
        "w", suffix=".jsonl", dir=image_folder, delete=False, encoding="utf-8"
    ) as handle:
        handle.write("\n".join(lines))
    try:
        _check_dataset(Path(handle.name), on_error)
    finally:
        Path(handle.name).unlink()


# --------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(tiny_bert_dir):
    text = {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir), "max_length": 16}
    return build_model({**VALID_CONFIG, "vision": None, "text": text}).eval()


@pytest.fixture(scope="module")
def image_model():
    return build_model(VALID_CONFIG)


odd_texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
    st.characters(categories=["Cs"]),  # lone surrogates
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=4), st.integers(1, 3000)),
    st.sampled_from(["", " ", "\0", "\n\t", "[CLS]", "[PAD] [SEP]", "🙂" * 50]),
    st.none(), st.integers(), st.floats(), st.binary(max_size=5), st.lists(st.text(), max_size=2),
)


@settings(max_examples=FUZZ_EXAMPLES["text batches"],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None, derandomize=True)
@given(texts=st.one_of(st.lists(odd_texts, max_size=5), odd_texts,
                       st.tuples(odd_texts, odd_texts)))
def test_fuzz_texts(text_model, texts):
    try:
        with torch.no_grad():
            out = text_model(texts=texts)
    except Exception as error:
        _fails_cleanly(error)
        return
    for logits in out.logits.values():
        assert torch.isfinite(logits).all()


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8,
           torch.int64, torch.bool, torch.complex64]


@settings(max_examples=FUZZ_EXAMPLES["image tensors"],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          deadline=None, derandomize=True)
@given(
    shape=st.lists(st.integers(0, 24), min_size=0, max_size=5),
    dtype=st.sampled_from(_DTYPES),
    fill=st.sampled_from([0.0, 1.0, -1e30, 1e30, float("nan"), float("inf"), None]),
    training=st.booleans(),
)
def test_fuzz_image_tensors(image_model, shape, dtype, fill, training):
    if len(shape) == 4:
        shape[1] = 3 if shape[1] % 2 else shape[1]  # half of the 4-d cases get 3 channels
    images = torch.rand(shape).to(dtype) if fill is None else torch.full(shape, fill).to(dtype)
    image_model.train(training)
    try:
        with torch.no_grad():
            out = image_model(images=images)
    except Exception as error:
        _fails_cleanly(error)
        return
    for logits in out.logits.values():
        assert logits.shape[0] == shape[0]
