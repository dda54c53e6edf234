"""How many steps an epoch takes and which task each step draws: samplers, per-task quotas, per-task early
stopping, and each process's share of a global batch."""

from __future__ import annotations

from collections.abc import Mapping

from compressor.data.sampling import QuotaSampler, TaskSampler
from compressor.model.multitask import MultiTaskModel
from compressor.train.options import TrainOptions


def make_sampler(cfg: TrainOptions, sizes: Mapping[str, int], seed: int) -> TaskSampler | QuotaSampler:
    """The task sampler of ``cfg.sampling`` over tasks with ``sizes`` training features."""
    if cfg.sampling.strategy == "passes":
        return QuotaSampler(task_quotas(cfg, sizes), seed=seed)
    return TaskSampler(sizes, cfg.sampling.strategy, cfg.sampling.tau, seed=seed)


def task_quotas(cfg: TrainOptions, sizes: Mapping[str, int]) -> dict[str, int]:
    """Steps per epoch of each task under strategy ``passes``: passes x batches of its training data, scaled to
    ``cfg.steps_per_epoch`` in all when that is set (the tasks keep their shares)."""
    passes = cfg.sampling.passes
    quotas = {t: passes.get(t, 1.0) * -(-n // cfg.batch_size) for t, n in sizes.items()}
    scale = cfg.steps_per_epoch / sum(quotas.values()) if cfg.steps_per_epoch else 1.0
    return {t: max(1, round(q * scale)) for t, q in quotas.items()}


def epoch_steps(cfg: TrainOptions, sizes: Mapping[str, int]) -> int:
    """Optimizer steps of one epoch (before any task stops early)."""
    if cfg.sampling.strategy == "passes":
        return sum(task_quotas(cfg, sizes).values())
    if cfg.steps_per_epoch:
        return cfg.steps_per_epoch
    return sum(-(-n // cfg.batch_size) for n in sizes.values())


def rank_slice(idx: list[int], rank: int, world: int) -> list[int]:
    """This process's share of a global batch; a short last batch is topped up so no process gets none."""
    if world == 1:
        return idx
    if len(idx) < world:
        idx = (idx * world)[:world]
    return idx[rank::world]


def stop_tasks(sampler, state: dict, per_task: Mapping[str, float], model: MultiTaskModel,
               patience: float) -> list[str]:
    """Per-task early stopping: a task whose dev metric has not improved for ``patience`` epochs takes no more
    steps (strategy ``passes``). Returns the tasks stopped now."""
    stopped = []
    for task, value in per_task.items():
        signed = value if model.tasks[task].metric.higher_is_better else -value
        best = state["task_best"].get(task)
        if best is None or signed > best:
            state["task_best"][task], state["task_bad"][task] = signed, 0
        else:
            state["task_bad"][task] = state["task_bad"].get(task, 0) + 1
            if state["task_bad"][task] >= patience and isinstance(sampler, QuotaSampler) \
                    and task not in sampler.stopped and len(sampler.stopped) < len(sampler.tasks) - 1:
                sampler.stop(task)
                stopped.append(task)
    return stopped
