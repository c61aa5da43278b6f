"""WebDataset tar shards: written from a manifest, read as one, trained on by two ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers_training import tiny_run_config

from fusionkit.cli import main
from fusionkit.data import ManifestDataset, generate_catalogue, infer_tasks
from fusionkit.data.shard_writer import write_shards
from fusionkit.data.shards import expand_shards, read_member
from fusionkit.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PATTERN = "shard-{000000..000002}.tar"


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalogue")
    return generate_catalogue(folder, train=40, val=8, test=8, image_size=32, progress=False)


@pytest.fixture(scope="module")
def shards(catalogue, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    index = write_shards(catalogue["train"], folder, shard_size=16)
    assert index["counts"] == [16, 16, 8] and index["image_columns"] == ["image"]
    assert index["pattern"] == str(folder / PATTERN)
    return folder


def test_the_cli_writes_byte_identical_shards_that_webdataset_reads(catalogue, shards, tmp_path,
                                                                   capsys):
    assert main(["data", "shard", "--manifest", str(catalogue["train"]), "--out",
                 str(tmp_path), "--shard-size", "16"]) == 0
    assert "40 samples in 3 shards" in capsys.readouterr().out
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes()
    import webdataset as wds

    samples = list(wds.WebDataset(str(shards / PATTERN), shardshuffle=False))
    assert len(samples) == 40
    first = json.loads(samples[3]["json"])
    assert first["id"] == "train-00003"
    image = catalogue["train"].parent / "images" / "train-00003.png"
    assert samples[3]["image.png"] == image.read_bytes()


def test_shards_read_as_the_manifest(catalogue, shards):
    tasks = infer_tasks(shards / PATTERN)
    assert tasks == infer_tasks(catalogue["train"])
    from_shards = ManifestDataset(shards / PATTERN, tasks)
    from_manifest = ManifestDataset(catalogue["train"], tasks)
    assert len(from_shards) == len(from_manifest) == 40
    for index in (0, 15, 16, 39):
        a, b = from_shards[index], from_manifest[index]
        assert a["id"] == b["id"] and a["text"] == b["text"] and a["targets"] == b["targets"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_a_pattern_that_matches_nothing_is_a_data_error(shards):
    with pytest.raises(DataError, match="3 of 3 shard file"):
        expand_shards(shards / "missing-{000000..000002}.tar")
    with pytest.raises(DataError, match="1 of 4 shard file"):
        ManifestDataset(shards / "shard-{000000..000003}.tar", {})


def test_a_truncated_shard_is_a_data_error(shards, tmp_path):
    broken = tmp_path / "shard-000000.tar"
    broken.write_bytes((shards / "shard-000000.tar").read_bytes()[:5000])
    with pytest.raises(DataError, match="unreadable tar shard"):
        infer_tasks(broken)
    with pytest.raises(DataError, match="no member"):
        read_member(shards / "shard-000000.tar" / "999.image.png")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_train_on_shards_each_sample_once_per_epoch(catalogue, shards, tiny_bert_dir,
                                                              tmp_path):
    val = write_shards(catalogue["val"], tmp_path / "val", shard_size=4)["pattern"]
    config = tiny_run_config(shards / PATTERN, Path(val), tiny_bert_dir, tmp_path / "cache",
                             frozen=True, epochs=2)
    config["data"]["num_workers"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), str(REPO / "tests" / "shard_ranks.py"),
               str(path), str(tmp_path / "run")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"ids-rank{r}.json").read_text()) for r in (0, 1)]
    everything = {f"train-{n:05d}" for n in range(40)}
    assert len(ranks[0]) == len(ranks[1]) == 2
    for epoch in range(2):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 20
        assert not set(first) & set(second), "the ranks saw a sample twice"
        assert set(first) | set(second) == everything
    assert ranks[0][0] != ranks[0][1], "each epoch has its own order"
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "val_loss", "val_accuracy"} <= set(records[-1])
