"""The multi-task model: encoder + one head per task, its per-layer architecture, saving and loading."""
