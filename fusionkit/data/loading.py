"""DataLoader settings shared by every loader of fusionkit: workers, pinning, prefetching."""

from __future__ import annotations

from typing import Any

__all__ = ["loader_options"]


def loader_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader options that keep an accelerator fed.

    Args:
        num_workers: Worker processes.
        pin_memory: Pin batches (CUDA); with workers, each also prefetches 4 batches.

    Returns:
        Keyword arguments of :class:`torch.utils.data.DataLoader`.

    Examples:
        >>> loader_options(4, True)
        {'num_workers': 4, 'pin_memory': True, 'prefetch_factor': 4}
        >>> loader_options(0, False)
        {'num_workers': 0, 'pin_memory': False}
    """
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers and pin_memory:
        options["prefetch_factor"] = 4
    return options
