"""ONNX export: a checkpoint as one ``model.onnx`` from tokenised text and preprocessed images to
per-task logits and modality weights, plus ``export.json`` saying how to feed it.

The graph is the model's padded path (no token packing) with the plain ``math`` attention, a
dynamic batch size and a dynamic length per text input. Its inputs, per model input ``name``:

- an image input: ``name.pixels`` ``(B, 3, H, W)`` float, preprocessed as its data config says,
  and ``name.present`` ``(B,)`` bool (False: no image; the pixels are then ignored);
- a text input: ``name.input_ids``, ``name.attention_mask`` (and ``name.token_type_ids`` when
  its tokenizer returns them), ``(B, T)`` int64, as its tokenizer pads them; a missing text is a
  row of zeros in ``name.attention_mask``.

Its outputs, per task: ``task.logits`` ``(B, C)`` and ``task.modality_weights`` ``(B, M)`` (the
columns in the order of ``export.json``'s ``modalities``).

Which exporter, and why: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer with
``dynamic_axes``, still in torch 2.14) fails on every model with two inputs and sequence-wise
attention: under the tracer tensor sizes are 0-d tensors, and the fusion's running span offset
(``start += mask.shape[1]``) then updates in place the tensor already stored as the previous
span's start (an ``IndexError`` at export). ``dynamo=True`` with ``dynamic_shapes`` (through
``torch.export``) fails on the model's data-dependent Python branches (the finite-pixels check,
the attention's CPU mask shortcuts, the "no input present" check); ``draft_export`` gets
through them but fixes the text length to the example's (a storage-offset guard where the
fusion reads each input's summary token). What is kept: ``dynamo=True`` on a non-strict
``torch.export`` program whose data-dependent branches are recorded on an eager run of an
example and replayed as constants, as a trace would take them. The example takes the branches
that hold for any batch: padded texts, a sample lacking an input, no sample lacking all.

Examples:
    >>> export_onnx("runs/quickstart", "exports/quickstart")  # doctest: +SKIP
    PosixPath('exports/quickstart')
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fusionkit.data import input_image_configs
from fusionkit.errors import CheckpointError, ConfigError, FusionkitError, MissingDependencyError
from fusionkit.io import write_json
from fusionkit.models import CMACLIP
from fusionkit.models.members import MEMBERS_FILE, members_run
from fusionkit.runs import BEST, CONFIG_FILE, resolve_run_dir

__all__ = ["EXPORT_FILE", "FORMATS", "ONNX_FILE", "export_onnx", "is_export_dir"]

#: The description of an export folder; its presence makes a folder an export.
EXPORT_FILE = "export.json"
#: The ONNX graph inside an export folder.
ONNX_FILE = "model.onnx"
#: The formats ``fusionkit export --format`` writes.
FORMATS = ("onnx",)
#: Version of the ``export.json`` layout.
EXPORT_FORMAT_VERSION = 1
#: Largest exported |eager - onnxruntime| on the export's own check before it is refused.
CHECK_TOLERANCE = 1e-3

_TEXTS = (
    "a red striped cotton shirt with long sleeves, a round collar and two pockets",
    "blue bag",
    "the dog sits on the mat",
    "plain",
)
_TORCH_DIR = os.path.dirname(torch.__file__)


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an export folder (it holds ``export.json``).

    Examples:
        >>> is_export_dir("runs/quickstart")  # doctest: +SKIP
        False
    """
    return (Path(path) / EXPORT_FILE).is_file()


def require_export_dependencies(*modules: str) -> None:
    """Fail clearly when an optional ONNX package is missing.

    Args:
        modules: Module names to look for (default: ``onnx``, ``onnxscript``, ``onnxruntime``).

    Raises:
        MissingDependencyError: One is not installed; the message says what to install.
    """
    missing = [m for m in modules or ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"ONNX export and prediction need {', '.join(missing)}: pip install 'fusionkit[export]'"
        )


@dataclass(frozen=True)
class _Port:
    """One model input as graph inputs: its name, kind and tensor keys."""

    name: str
    kind: str
    keys: tuple[str, ...]

    @property
    def onnx_names(self) -> list[str]:
        return [f"{self.name}.{key}" for key in self.keys]


def _ports(model: CMACLIP) -> list[_Port]:
    ports = []
    for name in model.modalities:
        if model.config.inputs[name].kind == "image":
            ports.append(_Port(name, "image", ("pixels", "present")))
            continue
        encoder = model.encoder_of(name)
        if not hasattr(getattr(encoder, "tokenizer", None), "save_pretrained") or not hasattr(
            encoder, "tokenize"
        ):
            raise ConfigError(
                f"input {name!r}: ONNX export needs a text encoder with a Hugging Face tokenizer "
                f"(huggingface, sentence_transformers), not {type(encoder).__name__}"
            )
        keys = [k for k in encoder.tokenize(["a"]) if k != "present"]
        ports.append(_Port(name, "text", tuple(keys)))
    return ports


class _Branches(TorchFunctionMode):
    """Records the value of every ``bool(tensor)`` by call site, or replays recorded values.

    Replaying turns the model's data-dependent branches into the constants of the recorded
    run, so that ``torch.export`` can trace through them, as a trace would.
    """

    def __init__(self, recorded: Mapping[tuple[str, int], list[bool]] | None = None) -> None:
        super().__init__()
        self.recording = recorded is None
        self.values: dict[tuple[str, int], deque[bool]] = defaultdict(deque)
        for site, values in (recorded or {}).items():
            self.values[site].extend(values)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func is not Tensor.__bool__:
            return func(*args, **(kwargs or {}))
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
            frame = frame.f_back
        site = (frame.f_code.co_filename, frame.f_lineno)
        if self.recording:
            value = bool(func(*args, **(kwargs or {})))
            self.values[site].append(value)
            return value
        if not self.values[site]:
            raise ConfigError(
                f"ONNX export: a data-dependent branch at {site[0]}:{site[1]} was not taken on "
                "the example; this model cannot be exported"
            )
        return self.values[site].popleft()


class _ExportModule(nn.Module):
    """The model from flat graph inputs (see `_ports`) to ``(logits, weights)`` per task.

    ``branches`` makes the context its forward runs in: a `_Branches` that records the
    data-dependent branches (on the eager example) or replays them (under ``torch.export``).
    """

    def __init__(self, model: CMACLIP, ports: list[_Port]) -> None:
        super().__init__()
        self.model = model
        self.ports = ports
        self.branches: Callable[[], Any] = _Branches

    def forward(self, *flat: Tensor) -> tuple[Tensor, ...]:
        with self.branches():
            tokens, masks = {}, {}
            values = iter(flat)
            for port in self.ports:
                given = {key: next(values) for key in port.keys}
                encoder = self.model.encoder_of(port.name)
                if port.kind == "image":
                    out = encoder(given["pixels"])
                    mask = out.mask & given["present"][:, None]
                else:
                    # A row of zeros is a missing text: the transformer reads its first token
                    # (a valid mask, no NaN), and the present flag masks the whole row out.
                    attention = given["attention_mask"]
                    present = attention.sum(dim=1) > 0
                    first = (torch.ones_like(attention).cumsum(dim=1) == 1).to(attention.dtype)
                    safe = torch.where(present[:, None], attention, first)
                    out = encoder(text_inputs={**given, "attention_mask": safe, "present": present})
                    mask = out.mask
                tokens[port.name], masks[port.name] = out.tokens, mask
            output = self.model.forward_head(tokens, masks)
            return tuple(
                tensor
                for task in self.model.tasks
                for tensor in (output.logits[task], output.modality_weights[task])
            )


def _output_names(model: CMACLIP) -> list[str]:
    return [f"{task}.{part}" for task in model.tasks for part in ("logits", "modality_weights")]


@contextmanager
def _padded_math(model: CMACLIP) -> Iterator[None]:
    """Run every fusion on the padded batch with the plain ``math`` attention."""
    saved = []
    for module in model.modules():
        for attribute, value in (("packing", False), ("attention_backend", "math")):
            if hasattr(module, attribute):
                saved.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, value)
    try:
        yield
    finally:
        for module, attribute, value in reversed(saved):
            setattr(module, attribute, value)


def _example(
    model: CMACLIP, ports: list[_Port], configs: Mapping[str, Mapping[str, Any]], batch: int,
    *, shift: int = 0, seed: int = 0,
) -> tuple[Tensor, ...]:
    """Graph inputs of ``batch`` samples: texts of different lengths, and (with two inputs or
    more) sample ``batch - 1`` lacking the last input."""
    generator = torch.Generator().manual_seed(seed)
    values: list[Tensor] = []
    for index, port in enumerate(ports):
        missing = torch.zeros(batch, dtype=torch.bool)
        if len(ports) > 1 and index == len(ports) - 1:
            missing[batch - 1] = True
        if port.kind == "image":
            _, height, width = configs[port.name]["input_size"]
            pixels = torch.randn(batch, 3, height, width, generator=generator)
            values += [pixels, ~missing]
            continue
        texts = [_TEXTS[(row + shift) % len(_TEXTS)] for row in range(batch)]
        tokens = model.encoder_of(port.name).tokenize(texts)
        tokens["attention_mask"] = tokens["attention_mask"].masked_fill(missing[:, None], 0)
        values += [tokens[key].long() for key in port.keys]
    return tuple(values)


def _dynamic_shapes(model: CMACLIP, ports: list[_Port]) -> tuple[tuple[dict[int, Any], ...]]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=65536)
    shapes: list[dict[int, Any]] = []
    for port in ports:
        if port.kind == "image":
            shapes += [{0: batch}, {0: batch}]
            continue
        length = Dim(f"{port.name}_length", min=1, max=model.encoder_of(port.name).max_length)
        shapes += [{0: batch, 1: length} for _ in port.keys]
    return (tuple(shapes),)


def _check(
    path: Path, module: _ExportModule, example: tuple[Tensor, ...], names: list[str]
) -> float:
    """Largest |eager - onnxruntime| over the outputs of ``example``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(names, example, strict=True)})
    with torch.no_grad():
        expected = module(*example)
    return max(
        float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True)
    )


def _short(site: tuple[str, int]) -> str:
    path = Path(site[0])
    return f"{path.parent.name}/{path.name}:{site[1]}"


def export_onnx(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], *, opset: int | None = None
) -> Path:
    """Export a checkpoint to ONNX, with what it takes to use it.

    Writes into ``out``: ``model.onnx`` (see the module docstring for its inputs and outputs),
    ``export.json`` (fusionkit version, opset, inputs with their kind, column and graph inputs,
    tasks with class names and ``multi_label``, each image input's data config for
    `fusionkit.data.build_image_transform`, each text input's tokenizer folder, ``max_length``
    and padding), ``tokenizer-<input>/`` per text encoder, and the checkpoint's
    ``config.yaml``. Before writing ``export.json`` the graph is run with onnxruntime on a
    second example and compared with the model.

    Args:
        checkpoint: A run folder (its ``best/``) or a checkpoint folder.
        out: The export folder (created).
        opset: ONNX opset; default the exporter's.

    Returns:
        The export folder.

    Raises:
        CheckpointError: ``checkpoint`` is not a loadable checkpoint (or is an export, or a
            run folder with a member blend: export its ``best/``).
        ConfigError: ``out`` is the checkpoint folder, a text encoder has no Hugging Face
            tokenizer, or the graph disagrees with the model.
        MissingDependencyError: onnx, onnxscript or onnxruntime is not installed.

    Examples:
        >>> export_onnx("runs/shop/best", "exports/shop", opset=18)  # doctest: +SKIP
        PosixPath('exports/shop')
    """
    require_export_dependencies()
    if is_export_dir(checkpoint):
        raise CheckpointError(f"{checkpoint} is an ONNX export; export a run or checkpoint folder")
    if members_run(checkpoint) is not None:
        raise CheckpointError(
            f"{checkpoint} is the blend of a fused model and its unimodal models "
            f"({MEMBERS_FILE}, train.unimodal_models), which one ONNX graph does not hold; "
            f"export {Path(checkpoint) / BEST} for the fused model alone"
        )
    folder = resolve_run_dir(checkpoint)
    model = CMACLIP.from_pretrained(folder, map_location="cpu")
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ConfigError(f"--out {out} is the checkpoint folder; choose another folder")
    ports = _ports(model)
    configs = input_image_configs(model)
    module = _ExportModule(model, ports).eval()
    names = [n for port in ports for n in port.onnx_names]
    outputs = _output_names(model)
    with _padded_math(model), torch.no_grad():
        example = _example(model, ports, configs, 2)
        recorder = _Branches()
        module.branches = lambda: recorder
        module(*example)
        recorded = {site: list(values) for site, values in recorder.values.items()}
        module.branches = lambda: _Branches(recorded)
        try:
            program = torch.export.export(
                module, example, dynamic_shapes=_dynamic_shapes(model, ports), strict=False
            )
            onnx_program = torch.onnx.export(
                program, example, input_names=names, output_names=outputs, opset_version=opset,
                dynamo=True, verbose=False,
            )
        except FusionkitError:
            raise
        except Exception as error:  # torch.export and the ONNX translation raise many kinds
            summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"ONNX export failed ({type(error).__name__}: {summary}); run with --debug for "
                "the exporter's report"
            ) from error
        out.mkdir(parents=True, exist_ok=True)
        # A folder with the new graph but an old export.json must never look like an export.
        (out / EXPORT_FILE).unlink(missing_ok=True)
        onnx_program.save(str(out / ONNX_FILE))
        module.branches = _Branches
        second = _example(model, ports, configs, 3, shift=1, seed=1)
        difference = _check(out / ONNX_FILE, module, second, names)
    if not difference <= CHECK_TOLERANCE:
        raise ConfigError(
            f"the exported graph disagrees with the model (max |difference| {difference:.2e} > "
            f"{CHECK_TOLERANCE}); this model cannot be exported as it is"
        )
    opsets = {entry.domain: entry.version for entry in onnx_program.model_proto.opset_import}
    description = _description(model, ports, configs, out, opsets.get("", opset))
    description["check"] = {"batch": 3, "max_abs_difference": difference}
    description["traced_branches"] = [
        f"{_short(site)} -> {values}" for site, values in recorded.items()
    ]
    shutil.copyfile(folder / CONFIG_FILE, out / CONFIG_FILE)
    write_json(out / EXPORT_FILE, description)
    return out


def _description(
    model: CMACLIP, ports: list[_Port], configs: Mapping[str, Mapping[str, Any]], out: Path,
    opset: int | None,
) -> dict[str, Any]:
    """The content of ``export.json``; saves each text encoder's tokenizer into ``out``."""
    from fusionkit import __version__
    from fusionkit.models.inputs import owner_of

    inputs = []
    for port in ports:
        spec = model.config.inputs[port.name]
        entry: dict[str, Any] = {
            "name": port.name,
            "kind": port.kind,
            "column": spec.column,
            "encoder": owner_of(model.config, port.name),
            "onnx_inputs": port.onnx_names,
        }
        if port.kind == "image":
            entry["data_config"] = _plain(configs[port.name])
        else:
            encoder = model.encoder_of(port.name)
            folder = f"tokenizer-{entry['encoder']}"
            encoder.tokenizer.save_pretrained(str(out / folder))
            entry.update(tokenizer=folder, max_length=encoder.max_length,
                         padding=getattr(encoder, "padding", "longest"))
        inputs.append(entry)
    return {
        "format": "fusionkit-onnx",
        "format_version": EXPORT_FORMAT_VERSION,
        "fusionkit_version": __version__,
        "torch_version": torch.__version__,
        "exporter": "torch.onnx.export(dynamo=True) of torch.export.export(strict=False)",
        "opset": opset,
        "model": ONNX_FILE,
        "shorthand": model.config.shorthand,
        "modalities": list(model.modalities),
        "inputs": inputs,
        "tasks": {
            task: {"classes": list(spec.class_names()), "multi_label": spec.multi_label}
            for task, spec in model.tasks.items()
        },
        "outputs": _output_names(model),
        "dynamic_axes": {"batch": "axis 0 of every input and output",
                         "<text input>_length": "axis 1 of that text input's tensors"},
    }


def _plain(value: Any) -> Any:
    """A data config as JSON: tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
