"""Train a run config and record the sample ids each rank trained on, per epoch.

Run under ``torchrun`` by ``tests/test_shards.py``::

    torchrun --nproc-per-node 2 tests/shard_ranks.py CONFIG.yaml OUTPUT

Each rank writes ``OUTPUT/ids-rank<r>.json``: one list of sample ids per epoch. The hook wraps
the trainer's batch source in this process only; the library is unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(config: str, output: str) -> None:
    from fusionkit.training import Trainer, build_run_config, loop

    seen: list[list[str]] = []
    original = loop.epoch_batches

    def recording(*args, **kwargs):
        ids: list[str] = []
        seen.append(ids)
        for batch in original(*args, **kwargs):
            ids.extend(batch.ids)
            yield batch

    loop.epoch_batches = recording
    Trainer(build_run_config(config), output, progress=False).fit()
    rank = int(os.environ.get("RANK", "0"))
    (Path(output) / f"ids-rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:3])
