"""The epoch checkpoint of the training loop: weights, best weights, optimizer, schedule, sampler and RNGs, so
``resume`` continues exactly where the last finished epoch left off."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from compressor.data.sampling import BatchStream
from compressor.fsutil import atomic_dir, atomic_write_text
from compressor.model.multitask import MultiTaskModel
from compressor.train.weighting import LossWeighter

CHECKPOINT = "last"
BEST_HEADS = "best-heads.safetensors"  # each task's head from its own best dev epoch
OBJECTIVE = "objective.safetensors"  # the training objective's own parameters, when it has some


def clear_checkpoint(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is not None:
        shutil.rmtree(Path(checkpoint_dir) / CHECKPOINT, ignore_errors=True)


def save_checkpoint(path: Path, model: MultiTaskModel, weighter: LossWeighter, optimizer, scheduler,
                    sampler, streams: Mapping[str, BatchStream], state: dict, improved: bool,
                    best_heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    extra: torch.nn.Module | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    best = path / "best.safetensors"
    with atomic_dir(path) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if improved:
            save_file(weights, str(tmp / "best.safetensors"))
        elif best.is_file():
            shutil.copy2(best, tmp / "best.safetensors")
        heads = {k: v.contiguous() for weights in (best_heads or {}).values() for k, v in weights.items()}
        if heads:
            save_file(heads, str(tmp / BEST_HEADS))
        save_file({k: v.detach().cpu() for k, v in weighter.state_dict().items()} or {"_": torch.zeros(0)},
                  str(tmp / "weighter.safetensors"))
        if extra is not None:  # the objective's own parameters (e.g. distillation's projections)
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.state_dict().items()} or {"_": torch.zeros(0)},
                      str(tmp / OBJECTIVE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        trainer = {**state, "sampler": sampler.state_dict(),
                   "streams": {t: {"order": s._order, "pos": s._pos, "rng": s._rng.getstate()} for t, s in streams.items()},
                   "python_rng": random.getstate()}
        atomic_write_text(tmp / "trainer.json", json.dumps(trainer, allow_nan=False))


def load_checkpoint(path: Path, model: MultiTaskModel, weighter: LossWeighter, optimizer, scheduler,
                    sampler, streams: Mapping[str, BatchStream], extra: torch.nn.Module | None = None) -> dict:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    if extra is not None:
        extra.load_state_dict({k: v for k, v in load_file(str(path / OBJECTIVE)).items() if k != "_"}, strict=True)
    wstate = {k: v for k, v in load_file(str(path / "weighter.safetensors")).items() if k != "_"}
    weighter.load_state_dict(wstate, strict=True)
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(opt["optimizer"])
    for group, kernel in zip(optimizer.param_groups, kernels):  # this run's kernel choice, not the checkpoint's
        group.update(kernel)
    scheduler.load_state_dict(opt["scheduler"])
    torch.set_rng_state(opt["torch_rng"])
    trainer = json.loads((path / "trainer.json").read_text())
    sampler.load_state_dict(trainer.pop("sampler"))
    for t, s in trainer.pop("streams").items():
        streams[t]._order, streams[t]._pos = s["order"], s["pos"]
        streams[t]._rng.setstate(_as_rng_state(s["rng"]))
    random.setstate(_as_rng_state(trainer.pop("python_rng")))
    return trainer


def load_best_heads(path: Path, tasks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's best-epoch head weights saved by :func:`save_checkpoint` (empty where none was saved)."""
    from safetensors.torch import load_file

    file = path / BEST_HEADS
    weights = load_file(str(file)) if file.is_file() else {}
    return {t: {k: v for k, v in weights.items() if k.startswith(f"heads.{t}.")} for t in tasks}


def _as_rng_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
