"""The training loader: seeded epochs, exact resume, workers that persist across epochs."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from fusionkit.training.distributed import DistContext
from fusionkit.training.sources import EpochLoader, epoch_batches

CTX = DistContext(0, 1, 0, torch.device("cpu"))


class Augmented(Dataset):
    """Each sample is its index, a random draw (as an augmentation makes) and the loading pid."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, index: int) -> tuple[int, float, int]:
        worker = get_worker_info()
        return index, float(torch.rand(())), os.getpid() if worker else -1


def collate(samples):
    return samples


def run(loader: EpochLoader, epochs, start_batch: int = 0):
    out = []
    for n, epoch in enumerate(epochs):
        out.append(list(loader.epoch(seed=100 + epoch, start_batch=start_batch if n == 0 else 0)))
    return out


def values(batches):
    return [[(i, x) for i, x, _ in batch] for batch in batches]


def test_persistent_workers_serve_every_epoch_and_a_resume_draws_the_same():
    loader = EpochLoader(Augmented(), collate, CTX, batch_size=4, num_workers=2,
                         persistent=True)
    assert loader.persistent
    epochs = run(loader, [0, 1, 2])
    pids = [{pid for batch in e for _, _, pid in batch} for e in epochs]
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]
    # Every epoch is a permutation of the samples, each epoch another.
    orders = [[i for batch in e for i, _, _ in batch] for e in epochs]
    assert all(sorted(o) == list(range(20)) for o in orders) and orders[0] != orders[1]
    # A resume mid-epoch 2 with new workers replays its batches, augmentations included.
    resumed = run(EpochLoader(Augmented(), collate, CTX, batch_size=4, num_workers=2,
                              persistent=True), [2], start_batch=2)
    assert values(resumed[0]) == values(epochs[2][2:])
    # The draws do not depend on the number of workers.
    one = run(EpochLoader(Augmented(), collate, CTX, batch_size=4, num_workers=1,
                          persistent=True), [0, 1, 2])
    assert [values(e) for e in one] == [values(e) for e in epochs]


def test_the_order_is_the_same_with_or_without_persistent_workers():
    persistent = run(EpochLoader(Augmented(), collate, CTX, batch_size=4, num_workers=2,
                                 persistent=True), [0, 1])
    fresh = [list(epoch_batches(Augmented(), collate, CTX, seed=100 + e, batch_size=4,
                                num_workers=2)) for e in (0, 1)]
    assert [[[i for i, _, _ in b] for b in e] for e in persistent] == \
        [[[i for i, _, _ in b] for b in e] for e in fresh]


@pytest.mark.parametrize(("workers", "pin", "persistent", "expected"), [
    (0, True, None, False), (0, False, True, False), (2, True, None, True),
    (2, False, None, False), (2, True, False, False),
])
def test_workers_persist_by_default_only_with_workers_on_cuda(workers, pin, persistent, expected):
    loader = EpochLoader(Augmented(), collate, CTX, batch_size=4, num_workers=workers,
                         pin_memory=pin, persistent=persistent)
    assert loader.persistent is expected
