"""Multi-task heads and their losses."""

from fusionkit.heads.multitask import MultiTaskHead, hide_labels, task_loss

__all__ = ["MultiTaskHead", "hide_labels", "task_loss"]
