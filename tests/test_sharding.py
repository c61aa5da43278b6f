"""Sharded training (``train.strategy: fsdp``, FSDP2 on gloo) and activation checkpointing.

FSDP2's ``fully_shard`` runs on CPU processes over gloo in this torch, so the sharded path is
tested here, not only on a GPU: two processes under ``torchrun`` train to the weights DDP
reaches (float summation order apart), resume from a sharded checkpoint, and write a
``best/`` that a one-process :class:`~fusionkit.serving.Predictor` loads. The checkpoint
helpers are tested in one process on a one-rank gloo group, where ``fully_shard`` works too.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
import yaml
from test_distributed import (
    ATOL,
    REPO,
    _free_port,
    assert_same_run,
    bert_without_dropout,
    catalogue,
    fit,
    frozen_run,
    metrics,
    tiny_config,
    torchrun_train,
)

from fusionkit.config import TrainConfig, parse_section
from fusionkit.encoders import TimmVisionEncoder
from fusionkit.encoders.base import backbone_blocks
from fusionkit.errors import CheckpointError, ConfigError
from fusionkit.io import load_weights
from fusionkit.models import CMACLIP, build_model
from fusionkit.serving import Predictor
from fusionkit.training.accelerator import apply_channels_last
from fusionkit.training.averaging import weight_average
from fusionkit.training.distributed import DistContext
from fusionkit.training.optim import build_optimizer
from fusionkit.training.sharding import (
    checkpoint_blocks,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    savable,
    shard_model,
    shard_units,
)
from fusionkit.training.sharding import (
    load_weights as load_sharded_weights,
)

#: The fixtures of test_distributed this module uses too (its catalogue, BERT and eager run).
SHARED_FIXTURES = (bert_without_dropout, catalogue, frozen_run)
TEXTS = ["red striped shirt", "a blue dress", None]


def tiny_model(bert, *, freeze_vision=True, dropout=0.0):
    """The test_distributed model: frozen resnet18 at 32 px, the tiny BERT, one fusion layer."""
    torch.manual_seed(0)
    return build_model({
        "vision": {"name": "timm", "model_name": "resnet18", "freeze": freeze_vision},
        "text": {"name": "huggingface", "model_name_or_path": str(bert), "max_length": 16},
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2,
                                           "dropout": dropout}},
        "head": {"name": "mlp", "hidden_dim": 32, "dropout": dropout},
        "tasks": {"color": {"num_classes": 3}, "tags": {"num_classes": 4, "multi_label": True}},
        "image_size": 32,
    })


def inputs():
    generator = torch.Generator().manual_seed(1)
    return {"images": torch.randn(3, 3, 32, 32, generator=generator), "texts": TEXTS}


@pytest.fixture
def one_rank_group():
    """A one-process gloo group: enough for ``fully_shard`` and the state-dict collectives."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1)
    yield DistContext(0, 1, 0, torch.device("cpu"))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# What is sharded and checkpointed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "kind"),
    [("vit_tiny_patch16_224", 12, "Block"), ("resnet18", 8, "BasicBlock"),
     ("convnext_atto", 4, "ConvNeXtStage"), ("tf_efficientnet_lite0", 7, "Sequential")],
)
def test_backbone_blocks_of_timm_backbones(name, count, kind):
    blocks = backbone_blocks(TimmVisionEncoder(name))
    assert len(blocks) == count
    assert {type(b).__name__ for b in blocks} == {kind}


def test_shard_units_are_encoder_blocks_in_input_order_then_fusion_layers(tiny_bert_dir):
    model = tiny_model(tiny_bert_dir)
    names = [type(unit).__name__ for unit in shard_units(model)]
    assert names == ["BertLayer"] * 2 + ["BasicBlock"] * 8 + ["TransformerLayer"]


def test_activation_checkpointing_gives_the_same_gradients(tiny_bert_dir):
    # Dropout on: the recomputation must draw the same masks as the first forward.
    reference = tiny_model(tiny_bert_dir, freeze_vision=False, dropout=0.1).train()
    checkpointed = tiny_model(tiny_bert_dir, freeze_vision=False, dropout=0.1).train()
    assert checkpoint_blocks(checkpointed) == 8 + 2
    assert checkpointed.state_dict().keys() == reference.state_dict().keys()
    targets = {"color": torch.tensor([0, 2, 1]), "tags": torch.tensor([[1.0, 0, 0, 1]] * 3)}
    for model in (reference, checkpointed):
        torch.manual_seed(5)
        model.loss(model(**inputs()), targets).backward()
    named = dict(checkpointed.named_parameters())
    for name, parameter in reference.named_parameters():
        if parameter.grad is None:
            assert named[name].grad is None, name
            continue
        torch.testing.assert_close(named[name].grad, parameter.grad, rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_activation_checkpointing_leaves_frozen_encoders_alone(tiny_bert_dir):
    assert checkpoint_blocks(tiny_model(tiny_bert_dir, freeze_vision=True)) == 2


def test_sharded_model_runs_saves_and_loads_full_weights(one_rank_group, tiny_bert_dir, tmp_path):
    reference = tiny_model(tiny_bert_dir).eval()
    model = tiny_model(tiny_bert_dir).eval()
    assert shard_model(model, one_rank_group) == 11 and is_sharded(model)
    with torch.no_grad():
        expected, actual = reference(**inputs()), model(**inputs())
    torch.testing.assert_close(actual.logits["color"], expected.logits["color"])

    savable(model).save_pretrained(tmp_path / "saved")
    loaded = CMACLIP.from_pretrained(tmp_path / "saved")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    # A checkpoint loads into the sharded model: every rank keeps its shard of it.
    other = tiny_model(tiny_bert_dir)
    torch.nn.init.zeros_(other.head.heads["color"][-1].weight)
    other.save_pretrained(tmp_path / "other")
    load_sharded_weights(model, tmp_path / "other")
    gathered = savable(model).state
    assert all(torch.equal(gathered[k], v) for k, v in other.state_dict().items())


def test_a_weight_average_of_a_sharded_model_is_refused(one_rank_group, tiny_bert_dir):
    model = tiny_model(tiny_bert_dir)
    assert weight_average(model, 0.99) is not None
    shard_model(model, one_rank_group)
    assert weight_average(model, 0.0) is None
    with pytest.raises(ConfigError, match=r"ema_decay is not supported with train\.strategy: fsdp"):
        weight_average(model, 0.99)


def test_channels_last_cnn_shards_with_contiguous_weights(one_rank_group):
    # FSDP2 refuses non-contiguous parameters: the weights go back, the images stay NHWC.
    config = {"vision": {"name": "timm", "model_name": "resnet18"}, "text": None,
              "tasks": {"c": {"num_classes": 3}}, "image_size": 32}
    torch.manual_seed(0)
    reference = build_model(config).eval()
    torch.manual_seed(0)
    model = build_model(config).eval()
    apply_channels_last(model, True, torch.device("cpu"))
    shard_model(model, one_rank_group)
    images = inputs()["images"]
    torch.testing.assert_close(model(images=images).logits["c"],
                               reference(images=images).logits["c"])
    assert model.vision.channels_last


def test_sharded_optimizer_state_is_keyed_by_name(one_rank_group, tiny_bert_dir):
    model = tiny_model(tiny_bert_dir)
    shard_model(model, one_rank_group)
    optimizer = build_optimizer(model, TrainConfig())
    model.loss(model(**inputs()), {"color": torch.tensor([0, 1, 2])}).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():  # validation: a forward without backward leaves the root gathered
        model.forward_head(*model.forward_features(**inputs()))
    state = optimizer_state(model, optimizer)
    assert "head.heads.color.0.weight" in state["state"]
    load_optimizer_state(model, optimizer, state)  # what a resume does
    plain = build_optimizer(tiny_model(tiny_bert_dir), TrainConfig())
    with pytest.raises(CheckpointError, match=r"resume it with train\.strategy: ddp"):
        load_optimizer_state(model, optimizer, plain.state_dict())


def test_sharded_bf16_matches_autocast(one_rank_group, tiny_bert_dir):
    reference = tiny_model(tiny_bert_dir).eval()
    model = tiny_model(tiny_bert_dir).eval()
    shard_model(model, one_rank_group, torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = reference(**inputs()), model(**inputs())
    assert actual.logits["color"].dtype == torch.bfloat16
    torch.testing.assert_close(actual.logits["color"].float(), expected.logits["color"].float(),
                               rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------------------------
# The strategy in training
# --------------------------------------------------------------------------------------------


def test_unknown_strategy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.strategy"):
        parse_section(TrainConfig, {"strategy": "zero3"}, "train")


def test_fsdp_in_one_process_trains_unsharded(frozen_run, tmp_path, caplog):
    config, eager = frozen_run
    with caplog.at_level(logging.INFO, logger="fusionkit.training"):
        fit({**config, "train": {**config["train"], "strategy": "fsdp"}}, tmp_path / "run")
    assert "nothing to shard; training unsharded" in caplog.text
    weights = load_weights(tmp_path / "run" / "last" / "model.safetensors")
    assert all(torch.equal(eager[k], weights[k]) for k in eager)


@pytest.mark.slow
def test_fsdp_trains_like_ddp_resumes_and_saves_for_one_process(
    catalogue, bert_without_dropout, tmp_path
):
    # Trainable BERT (its pooler gets no gradient) beside a frozen resnet18, unimodal heads
    # refit after the epochs:
    # the same run as test_distributed's DDP test; the sharded one also recomputes the BERT
    # layers (activation checkpointing), which must not change the weights either.
    config = tiny_config(catalogue, bert_without_dropout, tmp_path, train_text=True)
    config["unimodal_heads"] = {"loss_weight": 0.5}
    # The heads refit after the epochs too: pooled over the ranks, the same on each.
    config["train"]["refit_heads"] = True
    paths = {}
    for strategy, extra in (("ddp", {}), ("fsdp", {"activation_checkpointing": True})):
        paths[strategy] = tmp_path / f"{strategy}.yaml"
        section = {**config["train"], "strategy": strategy, **extra}
        paths[strategy].write_text(yaml.safe_dump({**config, "train": section}))
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    torchrun_train(paths["ddp"], ddp)
    done = torchrun_train(paths["fsdp"], fsdp)
    assert "FSDP: 11 blocks and the model sharded over 2 processes" in done.stderr
    assert "activation checkpointing: 2 backbone blocks" in done.stderr
    assert not (fsdp / "replicas.json").exists()
    assert_same_run(fsdp, ddp)

    # Every rank resumes from the gathered checkpoint: two epochs in all, as one process.
    torchrun_train(paths["fsdp"], fsdp, "--resume", "--epochs", "2")
    one = tmp_path / "one"
    fit({**config, "train": {**config["train"], "epochs": 2}}, one)
    assert_same_run(fsdp, one)
    assert len(metrics(fsdp)) == 2

    # best/ of the sharded run is a plain checkpoint: a one-process Predictor loads it.
    images = sorted((catalogue["train"].parent / "images").glob("val-*.png"))[:2]
    sharded = Predictor.from_pretrained(fsdp / "best", device="cpu")
    single = Predictor.from_pretrained(one / "best", device="cpu")
    got = sharded.predict(images=images, texts=TEXTS[:2])
    want = single.predict(images=images, texts=TEXTS[:2])
    for row, reference in zip(got, want, strict=True):
        for task, entry in reference.items():
            assert row[task].get("label") == entry.get("label")
            assert row[task].get("labels") == entry.get("labels")
            assert row[task]["scores"] == pytest.approx(entry["scores"], abs=10 * ATOL)


# --------------------------------------------------------------------------------------------
# The computed memory table
# --------------------------------------------------------------------------------------------


def test_memory_per_gpu_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.fsdp_memory import Counts, per_gpu

    # 100 parameters, 80 of them in units of at most 10, 20 in the root group.
    counts = Counts(total=100, units=80, largest_unit=10, vision=50, text=40)
    assert per_gpu(counts, "single", "fp32", 1)["total"] == 16 * 100
    assert per_gpu(counts, "ddp", "fp32", 8)["total"] == 20 * 100  # + the flat buckets
    assert per_gpu(counts, "ddp", "bf16", 8)["total"] == 22 * 100  # + autocast's bf16 copies
    # Sharded 16 bytes a parameter, plus the root and two units gathered (param + fp32 grad).
    assert per_gpu(counts, "fsdp", "fp32", 4)["total"] == 16 * 100 / 4 + (20 + 20) * (4 + 4)
    assert per_gpu(counts, "fsdp", "bf16", 4)["total"] == 16 * 100 / 4 + (20 + 20) * (2 + 4)


def test_memory_table_in_the_docs_is_the_scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.fsdp_memory import build_model, count, report

    model = build_model(dim=512, layers=1, tasks=3)
    counts = count(model)
    assert counts.largest_unit == 7_087_872  # a ViT-B block = a BERT-base layer
    page = REPO / "docs" / "results" / "fsdp_memory.md"
    assert page.read_text() == report(counts, 512, 1, 3)
