"""How a batch becomes a task's logits (plain heads, Hugging Face classifiers, CLIP zero-shot,
causal LMs) and how a model splits into blocks."""

from adamerge.tasks.base import HeadTask, Task, TaskOutput

__all__ = ["HeadTask", "Task", "TaskOutput"]
