"""The streaming feature cache: shards written as encoded, read mapped, resumed, by content."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_training import tiny_run_config

from fusionkit.config import DataConfig
from fusionkit.config.run import auto_num_workers, parse_section
from fusionkit.data import (
    ManifestDataset,
    build_image_transform,
    generate_catalogue,
    input_image_configs,
    make_collate,
)
from fusionkit.data.loading import loader_options
from fusionkit.errors import ConfigError
from fusionkit.models import build_model
from fusionkit.training import build_run_config
from fusionkit.training.cache import (
    CacheStats,
    FeatureCollator,
    encode_dataset,
    feature_inputs,
)
from fusionkit.training.cache_store import FeatureStore, shard_path

REPO = Path(__file__).resolve().parents[1]
SHARD = 8  # 40 samples: 5 shards


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=40, val=8, test=8, image_size=32, progress=False)


@pytest.fixture(scope="module")
def run_config(catalogue, tiny_bert_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("unused-cache")
    return tiny_run_config(catalogue["train"], catalogue["val"], tiny_bert_dir, cache,
                           frozen=True)


@pytest.fixture(scope="module")
def model(run_config):
    torch.manual_seed(0)
    return build_model(build_run_config(run_config)).eval()


def dataset_of(model, manifest):
    transforms = {n: build_image_transform(c, train=False)
                  for n, c in input_image_configs(model).items()}
    return ManifestDataset(manifest, model.tasks, transforms, inputs=model.config.inputs)


def encode(model, manifest, cache, stats=None, **kwargs):
    kwargs = {"batch_size": 4, "image_shape": (3, 32, 32), "dtype": torch.float32,
              "shard_size": SHARD, **kwargs}
    return encode_dataset(model, dataset_of(model, manifest), cache, "eval", stats=stats,
                          **kwargs)


def test_cached_samples_equal_the_encoders_outputs(model, catalogue, tmp_path):
    stats = CacheStats()
    features = encode(model, catalogue["train"], tmp_path, stats)
    assert (stats.misses, stats.encoded_shards, stats.encoded_batches) == (1, 5, 10)
    dataset = dataset_of(model, catalogue["train"])
    collate = FeatureCollator(model.tasks, image_shape=(3, 32, 32))
    assert len(features) == len(dataset) == 40
    raw = make_collate(model.tasks, (3, 32, 32), inputs=model.config.inputs)
    for indices in ([0, 1, 2], [37, 5, 22, 9]):
        batch = raw([dataset[i] for i in indices])
        with torch.no_grad():
            tokens, masks = model.forward_features(**feature_inputs(model, batch))
        cached = collate([features[i] for i in indices])
        assert cached.ids == batch.ids
        for name in model.modalities:
            length = cached.masks[name].shape[1]
            # Trimmed to the batch's longest real sequence: nothing real is lost.
            assert not masks[name][:, length:].any()
            torch.testing.assert_close(cached.masks[name], masks[name][:, :length])
            real = cached.masks[name]
            torch.testing.assert_close(cached.tokens[name][real], tokens[name][:, :length][real],
                                       rtol=1e-5, atol=1e-5)
            assert not cached.tokens[name][~real].any(), "padding is zeros"
        for task in model.tasks:
            torch.testing.assert_close(cached.targets[task], batch.targets[task],
                                       equal_nan=True)


def test_texts_are_stored_ragged_without_padding(model, catalogue, tmp_path):
    features = encode(model, catalogue["train"], tmp_path)
    store = features.store
    lengths = [len(store.sample(i)[1]["text"]) for i in range(40)]
    assert min(lengths) < max(lengths), "texts of different lengths keep their own length"
    for index in range(40):
        _, masks = store.sample(index)
        assert masks["text"].all(), "every stored text token is real"
    from safetensors import safe_open

    with safe_open(str(shard_path(store.folder, 0)), "pt") as shard:
        stored = shard.get_slice("text.tokens").get_shape()[0]
    assert stored == sum(lengths[:SHARD]) < SHARD * max(lengths[:SHARD])


def test_a_byte_identical_rewrite_of_the_manifest_reuses_the_cache(model, catalogue, tmp_path):
    encode(model, catalogue["train"], tmp_path / "cache")
    text = catalogue["train"].read_text()
    copy = catalogue["train"].parent / "rewritten.csv"
    copy.write_text(text)
    os.utime(copy, ns=(10**18, 10**18))  # a much later modification time
    stats = CacheStats()
    encode(model, copy, tmp_path / "cache", stats)
    assert (stats.hits, stats.misses, stats.encoded_batches) == (1, 0, 0)
    # A changed text is another entry.
    lines = text.splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    first[header.index("text")] = "a different title"
    copy.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    stats = CacheStats()
    encode(model, copy, tmp_path / "cache", stats)
    assert stats.misses == 1 and stats.encoded_shards == 5


def test_a_corrupt_shard_is_encoded_again_alone(model, catalogue, tmp_path):
    features = encode(model, catalogue["train"], tmp_path)
    damaged = shard_path(features.store.folder, 2)
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated
    stats = CacheStats()
    again = encode(model, catalogue["train"], tmp_path, stats)
    assert (stats.misses, stats.reused_shards, stats.encoded_shards, stats.encoded_batches) == (
        1, 4, 1, 2)
    torch.testing.assert_close(again.store.sample(20), features.store.sample(20))


def test_workers_read_only_their_own_samples_and_agree_with_the_main_process(
    model, catalogue, tmp_path
):
    features = encode(model, catalogue["train"], tmp_path)
    collate = FeatureCollator(model.tasks, image_shape=(3, 32, 32))
    batches = [list(range(i, i + 8)) for i in range(0, 40, 8)]

    def load(workers):
        loader = torch.utils.data.DataLoader(features, batch_sampler=batches,
                                             collate_fn=collate, num_workers=workers)
        return list(loader)

    for one, two in zip(load(0), load(2), strict=True):
        assert one.ids == two.ids
        torch.testing.assert_close(one.tokens, two.tokens)
    # A pickled store (what a spawned worker receives) holds no open shard.
    import pickle

    features.store.sample(0)
    assert not pickle.loads(pickle.dumps(features.store))._open


def test_encoding_workers_give_the_same_shards(model, catalogue, tmp_path):
    one = encode(model, catalogue["train"], tmp_path / "a")
    two = encode(model, catalogue["train"], tmp_path / "b", num_workers=2)
    for index in (0, 17, 39):
        torch.testing.assert_close(one.store.sample(index), two.store.sample(index))


_KILLED_ENCODING = """
import os, signal, sys, torch
from fusionkit.training import build_run_config
from fusionkit.models import build_model
from fusionkit.training import cache_store
sys.path.insert(0, {tests!r})
from test_cache_streaming import encode
written = {{"n": 0}}
original = cache_store.ShardBuffer.write
def write_then_die(self, path, key):
    original(self, path, key)
    written["n"] += 1
    if written["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
cache_store.ShardBuffer.write = write_then_die
torch.manual_seed(0)
model = build_model(build_run_config({config!r})).eval()
encode(model, {manifest!r}, {cache!r})
"""


def test_a_killed_encoding_resumes_after_its_last_complete_shard(
    run_config, model, catalogue, tmp_path
):
    script = _KILLED_ENCODING.format(tests=str(REPO / "tests"), config=run_config,
                                     manifest=str(catalogue["train"]), cache=str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == -9, done.stderr[-2000:]
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in folder.glob("shard-*")) == [
        "shard-000000.safetensors", "shard-000001.safetensors"]
    assert not (folder / "index.json").exists()
    stats = CacheStats()
    resumed = encode(model, catalogue["train"], tmp_path, stats)
    # 5 shards of 8 samples in batches of 4: the 3 unfinished shards take 6 batches (of 10).
    assert (stats.misses, stats.reused_shards, stats.encoded_shards, stats.encoded_batches) == (
        1, 2, 3, 6)
    assert (folder / "index.json").is_file()
    fresh = encode(model, catalogue["train"], tmp_path / "fresh")
    for index in range(0, 40, 3):
        torch.testing.assert_close(resumed.store.sample(index), fresh.store.sample(index))
    stats = CacheStats()
    encode(model, catalogue["train"], tmp_path, stats)
    assert (stats.hits, stats.encoded_batches, stats.reused_shards) == (1, 0, 5)


def test_the_store_refuses_an_index_out_of_range(model, catalogue, tmp_path):
    features = encode(model, catalogue["train"], tmp_path)
    store = FeatureStore(features.store.folder, 40, model.modalities, SHARD)
    with pytest.raises(IndexError, match="out of range"):
        store.sample(40)


@pytest.mark.parametrize(("cpus", "cuda", "expected"),
                         [(16, True, 8), (4, True, 3), (1, True, 0), (2, False, 0),
                          (8, False, 2), (64, False, 4)])
def test_auto_num_workers_follows_cpus_and_cuda(cpus, cuda, expected):
    assert auto_num_workers(cpus=cpus, cuda=cuda) == expected


def test_num_workers_auto_is_resolved_on_reading_and_written_back_as_auto():
    data = parse_section(DataConfig, {}, "data")
    assert data.num_workers == auto_num_workers() and isinstance(data.num_workers, int)
    assert data.to_dict()["num_workers"] == "auto"
    assert parse_section(DataConfig, {"num_workers": 3}, "data").to_dict()["num_workers"] == 3
    with pytest.raises(ConfigError, match="num_workers"):
        parse_section(DataConfig, {"num_workers": "many"}, "data")


def test_loader_options_pin_and_prefetch_on_cuda_only():
    assert loader_options(4, True) == {"num_workers": 4, "pin_memory": True,
                                       "prefetch_factor": 4}
    assert loader_options(0, True) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(2, False) == {"num_workers": 2, "pin_memory": False}
