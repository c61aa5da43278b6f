"""Multi-task heads and their losses."""

from fusionkit.heads.multitask import MultiTaskHead, task_loss

__all__ = ["MultiTaskHead", "task_loss"]
