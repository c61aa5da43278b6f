"""Shared helpers of the training fault tests: a tiny run config and a run that kills itself.

Run as a script, this module trains a run config with ``resume=True`` and sends itself SIGKILL
at one named point of `KILL_POINTS`, so the kill lands at an exact place (between two renames of
a checkpoint swap, say) rather than wherever a polling parent happens to catch it::

    python tests/helpers_training.py CONFIG.yaml OUTPUT KILL_POINT

The hooks wrap functions of the trainer in this process only; the library is unchanged.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
from pathlib import Path
from typing import Any

from torch.optim.optimizer import register_optimizer_step_pre_hook

#: Where a killed run dies, in the order a chain of resumed runs meets them (3 steps per epoch,
#: a checkpoint after every step). Each resumed run starts from what the previous kill left.
KILL_POINTS: dict[str, str] = {
    "mid_epoch_1": "epoch 1, in the 2nd optimizer step of the run (after its backward pass)",
    "torn_swap_epoch_1_end": (
        "epoch-1-end checkpoint of last/, between renaming last/ away and renaming the new "
        "folder into place"
    ),
    "mid_write_epoch_2": (
        "epoch 2, inside the atomic write of model.safetensors of a mid-epoch checkpoint"
    ),
}

#: The step of the checkpoint a resume finds after each kill point (see `KILL_POINTS`): the
#: torn swap leaves only ``.last.old/``, from step 2, which the next run must resume from and
#: keep until its own epoch-end checkpoint is in place.
RESUME_STEP: dict[str, int] = {
    "mid_epoch_1": 1,
    "torn_swap_epoch_1_end": 2,
    "mid_write_epoch_2": 3,
}


def tiny_run_config(
    train: Path, val: Path, bert: Path | None, cache: Path, *, frozen: bool = False,
    **overrides: Any,
) -> dict:
    """A tiny run config: timm's 0.1M-parameter ``test_efficientnet`` at 32 px, a tiny BERT
    (or no text encoder), a 32-wide fusion.

    Args:
        train: Training manifest.
        val: Validation manifest.
        bert: Folder of a tiny BERT (see ``conftest.write_tiny_bert``), or None for an
            image-only model (a child process then skips importing transformers).
        cache: Feature cache folder.
        frozen: Freeze the encoders.
        **overrides: Keys of the ``train`` section.

    Returns:
        The run config mapping.
    """
    text = None
    if bert is not None:
        text = {"name": "huggingface", "model_name_or_path": str(bert), "freeze": frozen,
                "max_length": 16}
    return {
        "vision": {"name": "timm", "model_name": "test_efficientnet", "pretrained": False,
                   "freeze": frozen},
        "text": text,
        "fusion": {"dim": 32, "sequence": {"name": "transformer", "heads": 2}},
        "head": {"name": "mlp", "hidden_dim": 32},
        "data": {"train": str(train), "val": str(val), "image_size": 32, "batch_size": 8},
        "train": {"epochs": 2, "lr": 3e-3, "lr_backbone": 1e-4, "device": "cpu",
                  "warmup_ratio": 0.0, "cache_dir": str(cache), **overrides},
    }


def assert_same_final_run(run: Path, reference: Path) -> None:
    """Assert two runs ended with bit-identical last weights and the same metrics history
    (epoch timings aside)."""
    import torch

    from fusionkit.io import load_weights

    a = load_weights(run / "last" / "model.safetensors")
    b = load_weights(reference / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def metrics(folder: Path) -> list[dict[str, Any]]:
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in records]

    assert metrics(run) == metrics(reference)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _is_last_save(directory: Any, state: Any, epoch: int, batch: int) -> bool:
    return (
        Path(directory).name == "last"
        and state is not None
        and state["epoch"] == epoch
        and state["batch_in_epoch"] == batch
    )


def install_kill_point(name: str) -> None:
    """Make this process SIGKILL itself at the kill point ``name`` (see `KILL_POINTS`).

    Args:
        name: A key of `KILL_POINTS`, or ``"none"`` to run to the end.

    Raises:
        KeyError: Unknown name.
    """
    from fusionkit.training import checkpoints

    if name == "none":
        return
    if name not in KILL_POINTS:
        raise KeyError(name)
    save = checkpoints.save_checkpoint

    if name == "mid_epoch_1":
        steps = {"n": 0}

        def before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
            steps["n"] += 1
            if steps["n"] == 2:
                _die()

        register_optimizer_step_pre_hook(before_step)
        return

    def hooked_save(directory: Any, model: Any, **kwargs: Any) -> Any:
        state = kwargs.get("state")
        if name == "torn_swap_epoch_1_end" and _is_last_save(directory, state, 1, 0):
            rename = pathlib.Path.rename

            def dying_rename(self: Path, target: Any) -> Any:
                if self.name == ".last.new":
                    _die()
                return rename(self, target)

            pathlib.Path.rename = dying_rename  # type: ignore[method-assign]
        if name == "mid_write_epoch_2" and _is_last_save(directory, state, 1, 1):
            replace = os.replace

            def dying_replace(src: Any, dst: Any) -> None:
                if Path(dst).name == "model.safetensors":
                    _die()
                replace(src, dst)

            os.replace = dying_replace
        return save(directory, model, **kwargs)

    checkpoints.save_checkpoint = hooked_save


def main(argv: list[str]) -> int:
    """Train ``CONFIG`` into ``OUTPUT`` (resuming), dying at ``KILL_POINT``.

    Args:
        argv: ``[CONFIG, OUTPUT, KILL_POINT]``.

    Returns:
        0 when the run finished (``KILL_POINT`` was ``none`` or never reached).
    """
    config, output, kill_point = argv
    from fusionkit.training import Trainer, build_run_config

    install_kill_point(kill_point)
    Trainer(build_run_config(config), output, resume=True, progress=False).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
