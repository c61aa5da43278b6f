"""Reliability and safe loading: clear errors for bad input, nothing lost, nothing executed.

Each family of bad inputs or faults is a module-level list the tests are parametrised over;
`reliability_table` turns those lists (and the fuzz budgets of ``test_fuzz.py``) into the
table of ``docs/reliability.md``, and a test keeps the two equal.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pathlib
import pickle
import re
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from helpers_training import KILL_POINTS, RESUME_STEP, assert_same_final_run, tiny_run_config
from PIL import Image
from test_fuzz import FUZZ_EXAMPLES

import fusionkit
import fusionkit.io
from fusionkit.cli import main as cli_main
from fusionkit.data import ManifestDataset, generate_catalogue, infer_tasks
from fusionkit.encoders import load_state_dict_file, load_vision_checkpoint
from fusionkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FusionkitError,
    ShapeError,
    StorageError,
)
from fusionkit.io import load_weights, read_yaml
from fusionkit.models import CMACLIP, ModelConfig, build_model
from fusionkit.runs import (
    find_checkpoint,
    load_model_weights,
    read_trainer_state,
    save_checkpoint,
)
from fusionkit.tasks import TaskSpec
from fusionkit.training import Trainer, build_run_config

REPO = Path(__file__).resolve().parents[1]
TASKS = {"color": {"classes": ["blue", "red"]}}
VISION = {"name": "timm", "model_name": "test_efficientnet", "pretrained": False}

# --------------------------------------------------------------------------------------------
# The bad inputs and faults tried (the doc's table counts these lists)
# --------------------------------------------------------------------------------------------

#: (config overrides, regex the one-line error must match: key path first, then the fix).
BAD_CONFIGS: list[tuple[dict, str]] = [
    ({"visoin": VISION}, r"^visoin: unknown top-level key; did you mean 'vision'"),
    ({"fusion": {"dims": 32}}, r"^fusion\.dims: unknown key; did you mean 'dim'"),
    ({"fusion": {"dim": 0}}, r"^fusion\.dim: expected a positive integer, got 0"),
    ({"fusion": {"sequence": {"heads": "four"}}}, r"^fusion\.sequence\.heads: expected int"),
    ({"fusion": {"sequence": {"layer": 2}}},
     r"^fusion\.sequence\.layer: unknown option .*did you mean 'layers'"),
    ({"fusion": {"dim": 32, "sequence": {"dim": 64}}}, r"^fusion\.dim \(32\) and .* disagree"),
    ({"vision": {**VISION, "pretraind": False}},
     r"^vision\.pretraind: unknown option .*did you mean 'pretrained'"),
    ({"vision": {"name": "tim"}}, r"^vision\.name: unknown vision_encoder 'tim'.*did you mean"),
    ({"head": {"name": "mlpp"}}, r"^head\.name: unknown head 'mlpp'; did you mean 'mlp'"),
    ({"head": {"dim": 8}}, r"^head\.dim: set by the model"),
    ({"model": "cma"}, r"^model: unknown model 'cma'; did you mean 'cma_clip'"),
    ({"tasks": None}, r"^tasks: expected a non-empty mapping"),
    ({"tasks": {"color": {"classes": "red"}}}, r"^tasks\.color\.classes: expected a list"),
    ({"tasks": {"color": {"clases": ["a", "b"]}}}, r"^tasks\.color: unknown key.*accepted"),
    ({"tasks": {"color": {"num_classes": 1}}}, r"^tasks\.color: .*num_classes >= 2"),
    ({"tasks": {"color": {"classes": ["a", "b"], "multi_label": "yes"}}},
     r"^tasks\.color\.multi_label: expected true or false"),
    ({"tasks": {"two words": {"num_classes": 2}}}, r"^tasks\.two words: task names must be"),
    ({"data": ["train.csv"]}, r"^data: expected a mapping"),
    ({"text": None, "vision": None}, r"vision and text are both null"),
]

#: (name, keyword arguments of ``CMACLIP.forward``, regex of the ShapeError).
BAD_TENSORS: list[tuple[str, dict, str]] = [
    ("nan-pixel", {"images": "nan"}, r"^images: 1 of 192 values are NaN or infinite"),
    ("inf-pixel", {"images": "inf"}, r"^images: 1 of 192 values are NaN or infinite"),
    ("rank-3", {"images": torch.zeros(3, 8, 8)}, r"^images: .*\(B, C, H, W\), got \(3, 8, 8\)"),
    ("uint8", {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, r"^images: .*uint8"),
    ("one-channel", {"images": torch.zeros(2, 1, 8, 8)}, r"^images: .*\(B, 3, H, W\)"),
    ("empty-batch", {"images": torch.zeros(0, 3, 8, 8)}, r"^images: expected a non-empty"),
    ("float16", {"images": torch.zeros(2, 3, 8, 8, dtype=torch.float16)},
     r"^images: dtype torch.float16 does not match"),
    ("list-images", {"images": [[0.0]]}, r"^images: expected a float tensor"),
    ("texts-str", {"texts": "a red shirt"}, r"^texts: expected a sequence"),
    ("texts-int", {"texts": ["red", 3]}, r"^texts\[1\]: expected str or None, got int"),
    ("texts-empty", {"texts": []}, r"^texts: expected at least one text"),
    ("texts-surrogate", {"texts": ["red \ud800"]}, r"^texts\[0\]: not valid Unicode"),
    ("batch-mismatch", {"images": torch.zeros(2, 3, 8, 8), "texts": ["a", "b", "c"]},
     r"disagree on the batch size"),
    ("present-dtype", {"texts": ["a", "b"], "present": {"text": torch.ones(2)}},
     r"present\['text'\] must be a \(B,\) = \(2,\) bool tensor"),
    ("nothing", {}, r"give images, texts or text_inputs"),
]

_HEADER = "id,image,text,color\n"
#: (name, manifest file name, content, on_error, DataError regex).
BAD_MANIFESTS: list[tuple[str, str, str | bytes, str, str]] = [
    ("no-input-column", "m.csv", "id,color\na,red\n", "skip", r"no column 'image' or 'text'"),
    ("no-task-column", "m.csv", "id,image,text\na,,red tee\n", "skip", r"no task column 'color'"),
    ("unknown-label", "m.csv", _HEADER + "a,,red tee,mauve\n", "raise",
     r"label 'mauve' is not a known class; known classes: \['blue', 'red'\]"),
    ("pipe-in-single-label", "m.csv", _HEADER + "a,,red tee,red|blue\n", "raise",
     r"is single-label: '\|' does not separate labels"),
    ("missing-image", "m.csv", _HEADER + "a,nope.png,red tee,red\n", "raise",
     r"image file .*nope\.png' does not exist"),
    ("duplicated-id", "m.csv", _HEADER + "a,,red tee,red\na,,blue tee,blue\n", "skip",
     r"id 'a' is already used on line 2"),
    ("field-count", "m.csv", _HEADER + "a,,red tee\n", "skip", r"line 2: 3 field\(s\)"),
    ("duplicated-column", "m.csv", "id,image,text,text,color\n", "skip",
     r"duplicated column name\(s\) \['text'\]"),
    ("empty-csv", "m.csv", "", "skip", r"the manifest is empty"),
    ("image-is-a-folder", "m.csv", _HEADER + "a,.,red tee,red\n", "raise",
     r"image file .* does not exist"),
    ("not-utf8", "m.csv", b"id,image,text,color\na,,\xff\xfe,red\n", "skip", r"not UTF-8"),
    ("bad-json", "m.jsonl", '{"text": "red tee", "color": "red"\n', "skip", r"malformed JSON"),
    ("json-array", "m.jsonl", '["red tee", "red"]\n', "skip", r"expected a JSON object"),
    ("json-nested", "m.jsonl", '{"image": "", "text": {"a": 1}, "color": "red"}\n', "skip",
     r"column 'text': expected a string"),
    ("deep-json", "m.jsonl", "[" * 100_000 + "\n", "skip", r"malformed JSON"),
    ("unknown-suffix", "m.txt", "id,image,text,color\n", "skip", r"unknown manifest format"),
]

#: (CLI arguments, text the single ``error:`` line must hold); ``{dir}`` is a scratch folder.
BAD_CLI: list[tuple[list[str], str]] = [
    (["train"], "give --config, or --train (and --val)"),
    (["train", "--config", "{dir}/typo.yaml"], "did you mean 'vision'"),
    (["train", "--config", "{dir}/absent.yaml"], "cannot read config"),
    (["train", "--config", "{dir}/payload.yaml"], "is not valid YAML"),
    (["train", "--config", "{dir}/list.yaml"], "must hold a mapping"),
    (["train", "--config", "{dir}/typo_train.yaml"], "did you mean 'epochs'"),
    (["evaluate", "--checkpoint", "{dir}"], "config.yaml"),
    (["predict", "--checkpoint", "{dir}"], "give --image and/or --text"),
    (["predict", "--checkpoint", "{dir}", "--manifest", "m.csv"], "--manifest needs --out"),
]
#: Arguments argparse itself refuses (usage + exit 2).
BAD_CLI_ARGS: list[list[str]] = [
    ["train", "--epochs", "two"],
    ["train", "--device", "tpu"],
    ["evaluate"],
    ["frobnicate"],
]


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def _data_middle(data: bytes) -> int:
    """A byte in the middle of a safetensors file's tensor data (past its JSON header)."""
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return start + (len(data) - start) // 2


#: (name, file, damage) applied to a saved training checkpoint.
CORRUPTIONS: list[tuple[str, str, Callable[[bytes], bytes]]] = [
    ("weights-bit-flip-in-data", "model.safetensors", lambda d: _flip(d, _data_middle(d))),
    ("weights-bit-flip-in-header", "model.safetensors", lambda d: _flip(d, 20)),
    ("weights-truncated-half", "model.safetensors", lambda d: d[: len(d) // 2]),
    ("weights-truncated-to-header", "model.safetensors", lambda d: d[:8]),
    ("weights-empty", "model.safetensors", lambda d: b""),
    ("weights-zeroed-tail", "model.safetensors", lambda d: d[:-64] + bytes(64)),
    ("config-bit-flip", "config.yaml", lambda d: _flip(d, len(d) // 2)),
    ("config-truncated", "config.yaml", lambda d: d[: len(d) // 3]),
    ("checksums-garbage", "checksums.json", lambda d: b"{not json"),
    ("trainer-state-pt-bit-flip", "trainer_state.pt", lambda d: _flip(d, len(d) // 2)),
    ("trainer-state-pt-truncated", "trainer_state.pt", lambda d: d[: len(d) // 2]),
    ("trainer-state-json-truncated", "trainer_state.json", lambda d: d[: len(d) // 2]),
]
#: The loaders that read each file of a checkpoint (every one must refuse the damage).
LOADERS: dict[str, list[str]] = {
    "model.safetensors": ["from_pretrained", "load_model_weights"],
    "config.yaml": ["from_pretrained"],
    "checksums.json": ["from_pretrained", "load_model_weights", "read_trainer_state"],
    "trainer_state.pt": ["read_trainer_state"],
    "trainer_state.json": ["read_trainer_state"],
}
CORRUPT_CASES = [
    (name, file, damage, loader)
    for name, file, damage in CORRUPTIONS
    for loader in LOADERS[file]
]

#: The file of a checkpoint save on which the disk fills up.
DISK_FULL_AT = [
    "model.safetensors", "config.yaml", "checksums.json", "trainer_state.pt",
    "trainer_state.json",
]

#: How a hostile pickle runs its code, and how it is stored.
PAYLOAD_KINDS = ["os.system", "pathlib.Path.touch", "builtins.exec"]
PAYLOAD_FORMATS = ["torch-zip.pt", "torch-legacy.bin", "raw-pickle.pt"]
PAYLOAD_LOADERS = ["load_state_dict_file", "load_vision_checkpoint", "read_trainer_state"]
PICKLE_CASES = [
    (kind, fmt, loader)
    for kind in PAYLOAD_KINDS
    for fmt in PAYLOAD_FORMATS
    for loader in PAYLOAD_LOADERS
]
#: YAML documents that would run code under ``yaml.load`` / ``unsafe_load``.
YAML_PAYLOADS = [
    "!!python/object/apply:os.system ['touch {marker}']",
    "model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
    "['{marker}']]",
    "!!python/object/new:os.system ['touch {marker}']",
    "tasks: !!python/name:os.system",
]

#: Image files that must become a counted load failure, never a crash.
HOSTILE_IMAGES = ["truncated-png", "random-bytes", "empty-file", "decompression-bomb-header"]


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability-data")
    return generate_catalogue(folder, train=24, val=8, test=8, image_size=32, progress=False)


@pytest.fixture(scope="module")
def model(tiny_bert_dir):
    text = {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir), "max_length": 16}
    built = build_model({"vision": VISION, "text": text, "fusion": {"dim": 16,
                         "sequence": {"heads": 2}}, "tasks": TASKS})
    return built.eval()


@pytest.fixture
def checkpoint(tmp_path, model):
    """A complete training checkpoint (model, trainer state, optimizer state) at run/last."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        # A made-up gradient fills the optimizer state as well as a real step (a backward pass
        # through the encoders costs seconds here).
        parameter.grad = torch.full_like(parameter, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return save_checkpoint(
        tmp_path / "run" / "last", model, include_frozen=True,
        state={"epoch": 1, "step": 3, "batch_in_epoch": 0, "history": []},
        tensor_state={"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()},
    )


# --------------------------------------------------------------------------------------------
# 1. Validation with clear errors
# --------------------------------------------------------------------------------------------


def test_error_hierarchy_keeps_builtin_types():
    assert fusionkit.FusionkitError is FusionkitError
    for error, builtin in ((ConfigError, ValueError), (DataError, ValueError),
                           (ShapeError, ValueError), (CheckpointError, ValueError),
                           (StorageError, OSError)):
        assert issubclass(error, FusionkitError) and issubclass(error, builtin)
    full = StorageError(errno.ENOSPC, "cannot write x: No space left on device")
    assert full.errno == errno.ENOSPC and str(full) == "cannot write x: No space left on device"


@pytest.mark.parametrize(("overrides", "pattern"), BAD_CONFIGS,
                         ids=[pattern[1:25] for _, pattern in BAD_CONFIGS])
def test_bad_config_names_key_path_and_fix(overrides, pattern):
    config = {"vision": VISION, "text": None, "tasks": TASKS, **overrides}
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict(config)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(("name", "kwargs", "pattern"), BAD_TENSORS,
                         ids=[case[0] for case in BAD_TENSORS])
def test_bad_tensor_is_a_shape_error_naming_the_argument(model, name, kwargs, pattern):
    if kwargs.get("images") in ("nan", "inf"):
        images = torch.zeros(1, 3, 8, 8)
        images[0, 1, 2, 3] = float(kwargs["images"])
        kwargs = {"images": images}
    with pytest.raises(ShapeError, match=pattern), torch.no_grad():
        model(**kwargs)


def test_nan_image_is_refused_by_the_timm_adapter_alone(model):
    images = torch.rand(2, 3, 32, 32)
    images[1, 0, 0, 0] = float("inf")
    with pytest.raises(ShapeError, match=r"^images: 1 of 6144 values are NaN or infinite"):
        model.vision(images)


@pytest.mark.parametrize(("name", "file_name", "content", "on_error", "pattern"), BAD_MANIFESTS,
                         ids=[case[0] for case in BAD_MANIFESTS])
def test_bad_manifest_is_a_data_error(tmp_path, name, file_name, content, on_error, pattern):
    path = tmp_path / file_name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    tasks = {"color": TaskSpec.from_classes(["blue", "red"])}
    with pytest.raises(DataError, match=pattern):
        ManifestDataset(path, tasks, on_error=on_error)


def test_manifest_skip_mode_counts_every_bad_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png(4, 4))
    path = tmp_path / "m.csv"
    path.write_text(_HEADER + "a,ok.png,red tee,red\nb,gone.png,blue tee,blue\n"
                    "c,,green tee,green\nd,,,red\ne,,plain tee,\n", encoding="utf-8")
    data = ManifestDataset(path, {"color": TaskSpec.from_classes(["blue", "red"])})
    assert data.skipped == {"missing_image_file": 1, "unknown_label": 1, "no_input": 1}
    assert [record.id for record in data.records] == ["a", "e"]
    assert data[1]["targets"] == {"color": None}
    with pytest.raises(ConfigError, match="task_names must be a sequence"):
        infer_tasks(path, task_names="color")


def _assert_one_line_error(captured, needle):
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], captured.err
    assert any(line.startswith("hint: ") for line in captured.err.splitlines())


@pytest.fixture
def cli_files(tmp_path):
    base = {"vision": VISION, "text": None, "tasks": TASKS}
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**base, "visoin": {}}))
    (tmp_path / "typo_train.yaml").write_text(yaml.safe_dump({**base, "train": {"epoch": 2},
                                                              "data": {"train": "t.csv",
                                                                       "val": "v.csv"}}))
    (tmp_path / "list.yaml").write_text("- vision\n- text\n")
    marker = tmp_path / "pwned"
    (tmp_path / "payload.yaml").write_text(YAML_PAYLOADS[0].format(marker=marker))
    yield tmp_path
    assert not marker.exists()


@pytest.mark.parametrize(("argv", "needle"), BAD_CLI, ids=[" ".join(a[:2]) for a, _ in BAD_CLI])
def test_cli_prints_one_line_and_exits_2(cli_files, capsys, argv, needle):
    args = [arg.format(dir=cli_files) for arg in argv]
    assert cli_main(["-q", *args]) == 2
    _assert_one_line_error(capsys.readouterr(), needle)


@pytest.mark.parametrize("argv", BAD_CLI_ARGS, ids=[" ".join(a) for a in BAD_CLI_ARGS])
def test_cli_refuses_bad_arguments_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fusionkit") and "Traceback" not in err


def test_cli_debug_shows_the_traceback(cli_files):
    with pytest.raises(ConfigError, match="did you mean 'vision'"):
        cli_main(["-q", "--debug", "train", "--config", str(cli_files / "typo.yaml")])
    with pytest.raises(CheckpointError, match=r"config\.yaml"):
        cli_main(["-q", "--debug", "predict", "--checkpoint", str(cli_files), "--text", "a"])


# --------------------------------------------------------------------------------------------
# 2. Nothing lost: corrupt checkpoints, full disks, SIGKILL at chosen points
# --------------------------------------------------------------------------------------------


def _load(loader: str, folder: Path, model) -> None:
    if loader == "from_pretrained":
        CMACLIP.from_pretrained(folder)
    elif loader == "load_model_weights":
        load_model_weights(model, folder)
    else:
        read_trainer_state(folder)


def test_clean_checkpoint_loads_with_every_loader(checkpoint, model):
    for loader in ("from_pretrained", "load_model_weights", "read_trainer_state"):
        _load(loader, checkpoint, model)
    listed = json.loads((checkpoint / "checksums.json").read_text())["files"]
    assert set(listed) == {"model.safetensors", "config.yaml", "trainer_state.json",
                           "trainer_state.pt"}


@pytest.mark.parametrize(("name", "file", "damage", "loader"), CORRUPT_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in CORRUPT_CASES])
def test_corrupt_checkpoint_is_detected(checkpoint, model, name, file, damage, loader):
    path = checkpoint / file
    path.write_bytes(damage(path.read_bytes()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((CheckpointError, ConfigError)):
        _load(loader, checkpoint, model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"


def test_bit_flip_in_tensor_data_passes_safetensors_but_not_the_checksum(checkpoint):
    path = checkpoint / "model.safetensors"
    # load_weights maps the file; copy before the file is rewritten in place.
    clean = {key: value.clone() for key, value in load_weights(path).items()}
    path.write_bytes(CORRUPTIONS[0][2](path.read_bytes()))
    flipped = load_weights(path)  # the header check alone accepts the damaged file
    assert any(not torch.equal(clean[k], flipped[k]) for k in clean)
    with pytest.raises(CheckpointError, match=r"SHA-256 does not match checksums\.json"):
        CMACLIP.from_pretrained(checkpoint)


def _disk_full_at(monkeypatch, file_name: str) -> None:
    """Make the atomic write of ``file_name`` fail with ENOSPC halfway through its data."""
    real = fusionkit.io.atomic_write

    def full(path, write):
        if Path(path).name != file_name:
            return real(path, write)

        def partial(tmp: Path) -> None:
            write(tmp)
            size = tmp.stat().st_size
            with open(tmp, "r+b") as handle:
                handle.truncate(size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, partial)

    monkeypatch.setattr(fusionkit.io, "atomic_write", full)
    monkeypatch.setattr("fusionkit.runs.atomic_write", full)


@pytest.mark.parametrize("file_name", DISK_FULL_AT)
def test_disk_full_keeps_the_previous_checkpoint(checkpoint, model, monkeypatch, file_name):
    saved = load_weights(checkpoint / "model.safetensors")
    changed = build_model(CMACLIP.from_pretrained(checkpoint).config)
    _disk_full_at(monkeypatch, file_name)
    with pytest.raises(StorageError, match="No space left on device") as info:
        save_checkpoint(checkpoint, changed, include_frozen=True, state={"epoch": 2},
                        tensor_state={"rng": torch.get_rng_state()})
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    monkeypatch.undo()
    assert find_checkpoint(checkpoint) == checkpoint
    assert not [p for p in checkpoint.iterdir() if p.name.endswith(".tmp")]
    reloaded = CMACLIP.from_pretrained(checkpoint).state_dict()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    assert read_trainer_state(checkpoint)[0]["epoch"] == 1
    # The next save, with space again, replaces it whole.
    save_checkpoint(checkpoint, changed, include_frozen=True, state={"epoch": 2})
    assert json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] == 2


def _runner(config: Path, output: Path, kill_point: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tests" / "helpers_training.py"), str(config),
               str(output), kill_point]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_at_each_kill_point_then_resume_matches_uninterrupted_run(
    small_catalogue, tmp_path
):
    # Image-only, trainable (no feature cache): dropout and the data order draw from the RNGs.
    config = tiny_run_config(small_catalogue["train"], small_catalogue["val"], None,
                             tmp_path / "cache", save_every_steps=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    killed = tmp_path / "killed"
    kill_points = list(KILL_POINTS)
    run = _runner(path, killed, kill_points[0])
    # The uninterrupted reference trains here meanwhile, single-threaded like the children so
    # that float reductions happen in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(build_run_config(config), tmp_path / "reference", progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    for index, kill_point in enumerate(kill_points):
        if index:
            run = _runner(path, killed, kill_point)
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == -signal.SIGKILL, f"{kill_point} not reached: {stderr[-2000:]}"
        found = find_checkpoint(killed / "last")
        assert found is not None, kill_point
        assert read_trainer_state(found)[0]["step"] == RESUME_STEP[kill_point], kill_point
        CMACLIP.from_pretrained(found)  # the surviving checkpoint is whole
    final = _runner(path, killed, "none")
    _, stderr = final.communicate(timeout=300)
    assert final.returncode == 0, stderr[-2000:]
    assert_same_final_run(killed, tmp_path / "reference")


# --------------------------------------------------------------------------------------------
# 3. Safe loading: pickles, YAML, images
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object runs code that creates ``marker``."""

    def __init__(self, kind: str, marker: Path) -> None:
        self.kind, self.marker = kind, marker

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch {self.marker}",)
        if self.kind == "pathlib.Path.touch":
            return pathlib.Path.touch, (pathlib.Path(self.marker),)
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _write_payload(path: Path, kind: str, fmt: str, marker: Path) -> None:
    # A payload hides among real tensors, as it would in a tampered checkpoint.
    obj = {"conv.weight": torch.zeros(2), "extra": _Payload(kind, marker)}
    if fmt == "torch-zip.pt":
        torch.save(obj, path)
    elif fmt == "torch-legacy.bin":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj))


@pytest.mark.parametrize(("kind", "fmt", "loader"), PICKLE_CASES,
                         ids=["-".join(case) for case in PICKLE_CASES])
def test_pickle_payload_is_refused_without_running(tmp_path, model, kind, fmt, loader):
    marker = tmp_path / "pwned"
    if loader == "read_trainer_state":
        folder = tmp_path / "last"
        save_checkpoint(folder, model, include_frozen=True, state={"epoch": 1},
                        tensor_state={"rng": torch.get_rng_state()})
        _write_payload(folder / "trainer_state.pt", kind, fmt, marker)
        # An attacker rewrites the checksums too: weights-only unpickling must still refuse.
        fusionkit.io.write_checksums(folder, ["trainer_state.pt", "trainer_state.json"])
        with pytest.raises(CheckpointError, match=r"never unpickles|cannot resume"):
            read_trainer_state(folder)
    else:
        path = tmp_path / fmt
        _write_payload(path, kind, fmt, marker)
        with pytest.raises(CheckpointError, match="weights-only"):
            if loader == "load_state_dict_file":
                load_state_dict_file(path)
            else:
                load_vision_checkpoint(torch.nn.Linear(2, 2), path)
    assert not marker.exists(), "the payload ran"


def test_payload_writer_really_runs_code_when_unpickled_unsafely(tmp_path):
    # Guards the test above: the payloads are live, so their absence of effect means something.
    for kind in PAYLOAD_KINDS:
        marker = tmp_path / f"live-{kind}"
        pickle.loads(pickle.dumps(_Payload(kind, marker)))
        assert marker.exists(), kind


@pytest.mark.parametrize("payload", YAML_PAYLOADS)
def test_yaml_payload_is_refused_by_read_yaml(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "config.yaml"
    path.write_text(payload.format(marker=marker))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml(path)
    with pytest.raises(ConfigError):
        ModelConfig.from_yaml(path)
    assert not marker.exists()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png(width: int, height: int) -> bytes:
    """A valid grey PNG; its header alone claims the size (Pillow checks it before decoding)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\0" + bytes(width) for _ in range(min(height, 64))))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _hostile_image(kind: str) -> bytes:
    if kind == "truncated-png":
        return _png(32, 32)[:40]
    if kind == "random-bytes":
        return bytes(range(256)) * 4
    if kind == "empty-file":
        return b""
    # 100,000 x 100,000 pixels claimed by a 100-byte file: decoding would need 10 GB.
    return _png(100_000, 100_000)


@pytest.mark.parametrize("kind", HOSTILE_IMAGES)
def test_hostile_image_is_a_counted_load_failure(tmp_path, caplog, kind):
    assert Image.MAX_IMAGE_PIXELS is not None  # fusionkit keeps Pillow's bomb limit
    (tmp_path / "bad.png").write_bytes(_hostile_image(kind))
    (tmp_path / "ok.png").write_bytes(_png(8, 8))
    path = tmp_path / "m.csv"
    path.write_text(_HEADER + "a,bad.png,red tee,red\nb,ok.png,blue tee,blue\n")
    data = ManifestDataset(path, {"color": TaskSpec.from_classes(["blue", "red"])})
    sample = data[0]
    assert sample["image"] is None and sample["text"] == "red tee"
    assert data[1]["image"].shape == (3, 8, 8)
    assert data[0]["image"] is None and data.load_failures == 1
    assert "cannot read image" in caplog.text


def test_truncated_png_in_a_batch_training_continues(small_catalogue, tiny_bert_dir, tmp_path,
                                                     caplog):
    train = small_catalogue["train"]
    with train.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    image = train.parent / rows[0]["image"]
    (tmp_path / "broken.png").write_bytes(image.read_bytes()[:60])
    rows[0]["image"] = str(tmp_path / "broken.png")
    for row in rows[1:]:
        row["image"] = str(train.parent / row["image"])
    manifest = tmp_path / "train.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = tiny_run_config(manifest, small_catalogue["val"], tiny_bert_dir, tmp_path / "c",
                             frozen=True, epochs=1, cache_features=False)
    trainer = Trainer(build_run_config(config), tmp_path / "run", progress=False)
    result = trainer.fit()
    assert len(result.history) == 1
    failures = [r for r in caplog.records if "cannot read image" in r.getMessage()]
    assert len(failures) == 1 and "broken.png" in failures[0].getMessage()
    assert "1 load failure(s)" in failures[0].getMessage()


def test_plugins_come_only_from_installed_entry_points():
    from fusionkit import registry

    source = Path(registry.__file__).read_text()
    assert "entry_points(" in source
    for loader in ("import_module(os", "exec(", "eval(", "spec_from_file_location", "sys.path"):
        assert loader not in source


# --------------------------------------------------------------------------------------------
# 5. The reliability table of docs/reliability.md
# --------------------------------------------------------------------------------------------


def reliability_table() -> str:
    """The Markdown table of ``docs/reliability.md``, counted from the lists above."""
    bad_inputs = len(BAD_CONFIGS) + len(BAD_TENSORS) + len(BAD_MANIFESTS) + len(BAD_CLI) + len(
        BAD_CLI_ARGS) + len(HOSTILE_IMAGES)
    fuzzed = sum(FUZZ_EXAMPLES.values())
    rows = [
        ("Bad configs (key path + accepted values checked)", len(BAD_CONFIGS)),
        ("Bad tensors at `CMACLIP.forward` (rank, dtype, batch, NaN/inf, texts)",
         len(BAD_TENSORS)),
        ("Bad manifests (columns, paths, labels, ids, encoding, syntax)", len(BAD_MANIFESTS)),
        ("Bad CLI invocations (one `error:` line, exit 2)", len(BAD_CLI) + len(BAD_CLI_ARGS)),
        ("Hostile image files (truncated, random, empty, decompression bomb)",
         len(HOSTILE_IMAGES)),
        ("**Bad inputs, hand-written, total**", bad_inputs),
        *((f"Fuzzed {name}, hypothesis `max_examples`", count)
          for name, count in FUZZ_EXAMPLES.items()),
        ("**Bad inputs, generated, total (at most)**", fuzzed),
        ("SIGKILL fault points (each followed by `resume`)", len(KILL_POINTS)),
        ("Disk-full fault points in a checkpoint save", len(DISK_FULL_AT)),
        ("**Fault points tried**", len(KILL_POINTS) + len(DISK_FULL_AT)),
        ("Runs resumed after SIGKILL, final weights bit-identical", len(KILL_POINTS)),
        ("Checkpoints corrupted (damage × loader)", len(CORRUPT_CASES)),
        ("Checkpoints corrupted and detected", len(CORRUPT_CASES)),
        ("**Checkpoints corrupted and accepted**", 0),
        ("Pickle payloads tried (kind × format × loader)", len(PICKLE_CASES)),
        ("YAML payloads tried", len(YAML_PAYLOADS)),
        ("**Payloads executed**", 0),
    ]
    lines = ["| What the test suite does | Count |", "|---|---:|"]
    lines += [f"| {label} | {count} |" for label, count in rows]
    return "\n".join(lines)


def test_reliability_doc_states_the_counts_the_tests_use():
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    table = reliability_table()
    assert table in doc, f"update the table in docs/reliability.md to:\n\n{table}\n"
