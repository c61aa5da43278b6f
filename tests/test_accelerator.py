"""The accelerator paths: the run's precision in evaluation and prediction, non-blocking copies
from pinned memory, ``channels_last`` CNN backbones, and ``torch.compile`` of the fusion stack.

On this CPU each path is checked against its plain counterpart: channels_last tokens against
contiguous ones, compiled fusion against eager, autocast seen from inside the model. The
``cuda`` case runs in ``make gpu-check``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from conftest import TINY_TASKS, save_tiny_image_text_model
from PIL import Image

from fusionkit.data import Batch
from fusionkit.device import inference_dtype
from fusionkit.encoders import TimmVisionEncoder
from fusionkit.models import CMACLIP, build_model
from fusionkit.runs import run_precision
from fusionkit.serving import Predictor
from fusionkit.training import evaluate_checkpoint
from fusionkit.training.accelerator import apply_channels_last, to_device
from fusionkit.training.cache import FeatureBatch
from fusionkit.training.step import CompileFallback


def image_model(name):
    torch.manual_seed(0)
    return build_model({"vision": {"name": "timm", "model_name": name}, "text": None,
                        "tasks": {"c": {"num_classes": 3}}, "image_size": 32})


# --------------------------------------------------------------------------------------------
# channels_last
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "test_efficientnet"])
def test_channels_last_tokens_equal_contiguous_ones(name):
    encoder = TimmVisionEncoder(name).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = encoder(images).tokens
        encoder.use_channels_last()
        actual = encoder(images).tokens
    first_conv = next(p for p in encoder.parameters() if p.ndim == 4)
    assert first_conv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    encoder.use_channels_last(False)
    assert first_conv.is_contiguous() and not encoder.channels_last


def test_apply_channels_last_switches_cnns_only():
    cnn = image_model("resnet18")
    assert apply_channels_last(cnn, "auto", torch.device("cpu")) == []  # auto: CUDA only
    assert not cnn.vision.channels_last
    assert apply_channels_last(cnn, True, torch.device("cpu")) == ["image"]
    assert cnn.vision.channels_last
    assert apply_channels_last(image_model("resnet18"), False, torch.device("cuda")) == []
    vit = TimmVisionEncoder("vit_tiny_patch16_224", img_size=32)
    assert not vit.convolutional and TimmVisionEncoder("resnet18").convolutional


# --------------------------------------------------------------------------------------------
# Copies and precision
# --------------------------------------------------------------------------------------------


def test_to_device_copies_every_tensor_without_blocking(monkeypatch):
    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking", False))
        return original(self, *args, **kwargs)

    images = torch.randn(2, 3, 4, 4)
    batch = Batch(["a", "b"], {"image": images, "text": ["x", None]},
                  {"image": torch.tensor([True, False])}, {"c": torch.tensor([0, 1])})
    features = FeatureBatch(["a", "b"], {"text": torch.ones(2, 3, 4)},
                            {"text": torch.ones(2, 3, dtype=torch.bool)},
                            {"c": torch.tensor([0, 1])}, live=("image",), inputs=batch)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    moved = to_device(batch, "cpu")
    assert calls == [True] * 3
    assert torch.equal(moved.inputs["image"], images) and moved.inputs["text"] == ["x", None]
    calls.clear()
    moved = to_device(features, "cpu")
    assert calls == [True] * 6 and moved.live == ("image",)
    assert torch.equal(moved.inputs.inputs["image"], images)


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("fp32", "cuda", None),
     ("bf16", "cpu", torch.bfloat16), ("fp16", "cuda", torch.float16), ("fp16", "cpu", None)],
)
def test_inference_dtype_follows_the_training_precision(precision, device, expected):
    assert inference_dtype(precision, device) == expected


@pytest.fixture
def bf16_run(tmp_path, tiny_bert_dir):
    """A run folder whose config asked ``precision: bf16``, its ``best/`` a tiny model, and a
    two-row manifest."""
    run = tmp_path / "run"
    save_tiny_image_text_model(run / "best", tiny_bert_dir)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"precision": "bf16"}}))
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    manifest = tmp_path / "test.csv"
    manifest.write_text("id,image,text,color,pattern\n"
                        f"a,{tmp_path / 'red.png'},a red shirt,red,striped\n"
                        "b,,a blue dress,blue,plain\n")
    return run, manifest


@pytest.fixture
def autocast_seen(monkeypatch):
    """The CPU autocast state inside every ``forward_head`` call: ``(enabled, dtype)``."""
    seen = []
    original = CMACLIP.forward_head

    def spy(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CMACLIP, "forward_head", spy)
    return seen


def test_run_precision_reads_the_run_config(bf16_run, tmp_path, tiny_bert_dir):
    run, _ = bf16_run
    assert run_precision(run / "best") == run_precision(run) == "bf16"
    assert run_precision(save_tiny_image_text_model(tmp_path / "loose", tiny_bert_dir)) == "auto"


def test_evaluation_runs_in_the_runs_precision(bf16_run, autocast_seen):
    run, manifest = bf16_run
    report = evaluate_checkpoint(run, manifest, device="cpu")
    assert report["precision"] == "bf16" and report["num_samples"] == 2
    assert autocast_seen == [(True, torch.bfloat16)]
    autocast_seen.clear()
    report = evaluate_checkpoint(run, manifest, device="cpu", precision="fp32")
    assert report["precision"] == "fp32" and not autocast_seen[0][0]


def test_prediction_runs_in_the_runs_precision(bf16_run, autocast_seen, tmp_path, tiny_bert_dir):
    run, _ = bf16_run
    predictor = Predictor.from_pretrained(run, device="cpu")
    assert predictor.precision == torch.bfloat16
    rows = predictor.predict(texts=["a red shirt"])
    assert autocast_seen == [(True, torch.bfloat16)]
    assert set(rows[0]) == set(TINY_TASKS)
    loose = save_tiny_image_text_model(tmp_path / "loose", tiny_bert_dir)
    assert Predictor.from_pretrained(loose, device="cpu").precision is None  # auto on CPU
    assert Predictor.from_pretrained(run, device="cpu", precision="fp32").precision is None


# Defined only where CUDA is present (marked ``cuda``: ``make gpu-check`` runs it), so a CPU
# run has nothing to skip.
if torch.cuda.is_available():

    @pytest.mark.parametrize("device", ["cuda"])
    def test_pinned_batches_evaluate_in_bf16_on_cuda(device, bf16_run):
        run, manifest = bf16_run
        pinned = Batch(["a"], {"image": torch.randn(1, 3, 4, 4)}, {"image": torch.tensor([True])},
                       {}).pin_memory()
        assert pinned.inputs["image"].is_pinned()
        moved = to_device(pinned, device)
        torch.cuda.synchronize()
        assert moved.inputs["image"].is_cuda
        assert torch.equal(moved.inputs["image"].cpu(), pinned.inputs["image"])
        report = evaluate_checkpoint(run, manifest, device=device)
        assert report["precision"] == "bf16" and report["num_samples"] == 2


# --------------------------------------------------------------------------------------------
# torch.compile of the fusion stack
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_fusion_stack_equals_eager(tiny_bert_dir, tmp_path, caplog):
    # Inductor builds C++ kernels with the system compiler (gcc here); a failure would fall
    # back to eager with a warning, which this test would catch.
    # Eval mode: inductor draws dropout masks from its own generator, not eager's.
    model = CMACLIP.from_pretrained(save_tiny_image_text_model(tmp_path / "m", tiny_bert_dir))
    with torch.no_grad():
        tokens, masks = model.forward_features(images=torch.randn(3, 3, 32, 32),
                                               texts=["red shirt", "a blue dress", None])
    with caplog.at_level(logging.WARNING, logger="fusionkit.training"):
        compiled = CompileFallback(model.forward_head)
        got = compiled(tokens, masks)
    assert compiled.compiled is not None, caplog.text
    want = model.forward_head(tokens, masks)
    for task in TINY_TASKS:
        torch.testing.assert_close(got.logits[task], want.logits[task], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.modality_weights[task], want.modality_weights[task],
                                   rtol=1e-5, atol=1e-6)
    grads = []
    for output in (got, want):
        model.zero_grad()
        sum(logits.square().sum() for logits in output.logits.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6,
                                   msg=name)
