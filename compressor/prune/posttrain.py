"""Post-training structured pruning (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers").

Three steps, no retraining:

1. **Fisher information of masks.** A mask of ones multiplies every attention head's context (before the
   attention output projection) and every FFN neuron's activation (before the FFN output projection). The
   squared gradient of the loss with respect to each mask entry, summed over single examples, is the diagonal
   of the empirical Fisher information: the loss a unit's removal costs, to second order. Each task's Fisher is
   normalised to sum to 1 and the tasks are averaged, so every task has the same say.
2. **Masks under a budget.** Heads and FFN neurons are ranked by Fisher across all layers; the search keeps the
   set with the most Fisher whose FLOPs (per token at ``seq_len``) and/or parameters fit the budget: for every
   number of heads kept, the best heads and then as many of the best neurons as the rest of the budget pays for.
   Every layer keeps at least its best head and its best neuron (a layer is removed by ``drop_layers``).
3. **Layer-wise reconstruction.** Layer by layer, in order, on calibration data: the pruned layer's attention
   output projection, then its FFN output projection, are re-solved by ridge least squares (toward the current
   weights) so that the sum that enters each LayerNorm (projection + residual) matches the unpruned model's at
   the same layer. The pruned model's own inputs are used, so each layer also absorbs the error of the ones
   before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compressor.errors import RecipeError
from compressor.model.architecture import LayerArch, encoder_layers, read_architecture
from compressor.model.multitask import MultiTaskModel
from compressor.prune.groups import remove_ffn_neurons, remove_heads
from compressor.prune.importance import Batches, batch_loss

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Fisher:
    """Per layer: the Fisher information of each head's and each FFN neuron's mask (higher: more important)."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]


@dataclass
class Budget:
    """What the kept heads and FFN neurons of the encoder layers may cost, as shares of the unpruned model's."""

    flops_ratio: float | None = None
    params_ratio: float | None = None
    seq_len: int = 128
    field: str = "posttrain"  # the recipe field the budget came from, for error messages


@dataclass
class PostTrainReport:
    heads_kept: list[list[int]]  # per layer: kept head indices
    ffn_kept: list[list[int]]  # per layer: kept neuron indices
    flops: dict[str, float]  # before / after / budget (per token, encoder layers)
    params: dict[str, float]  # before / after / budget (encoder layers' head and FFN weights)
    fisher_kept: float  # share of the total (normalised) Fisher information the masks keep
    reconstruction: list[dict[str, float]] = field(default_factory=list)  # per layer: relative errors

    def to_dict(self) -> dict[str, Any]:
        return {"heads_kept": self.heads_kept, "ffn_kept": self.ffn_kept, "flops": self.flops,
                "params": self.params, "fisher_kept": self.fisher_kept, "reconstruction": self.reconstruction}


# ---- masks and Fisher information -------------------------------------------------------------------------------
class UnitMasks:
    """Mask tensors (ones, requiring grad) on every head and FFN neuron of ``encoder``, applied by hooks while the
    context is open: the attention context is scaled head by head before ``attention.output.dense``, the FFN
    activation neuron by neuron before ``output.dense``."""

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder
        arch = read_architecture(encoder)
        device = next(encoder.parameters()).device
        self.heads = [torch.ones(a.heads, device=device, requires_grad=True) for a in arch]
        self.ffn = [torch.ones(a.ffn, device=device, requires_grad=True) for a in arch]
        self._sizes = [a.head_size for a in arch]
        self._handles: list[Any] = []

    def __enter__(self) -> UnitMasks:
        for i, layer in enumerate(encoder_layers(self.encoder)):
            self._handles.append(layer.attention.output.register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(layer.output.register_forward_pre_hook(self._ffn_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _head_hook(self, i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * self.heads[i].repeat_interleave(self._sizes[i]), *args[1:])
        return hook

    def _ffn_hook(self, i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * self.ffn[i], *args[1:])
        return hook


def fisher_scores(model: MultiTaskModel, batches: Batches) -> Fisher:
    """Mask Fisher information: per task, the squared mask gradient of each batch (give single-example batches
    for the per-example Fisher) summed, normalised to sum 1 over the model; then averaged over the tasks."""
    was_training = model.training
    model.eval()
    per_task: list[Fisher] = []
    try:
        with UnitMasks(model.encoder) as masks:
            for task, task_batches in batches.items():
                heads = [torch.zeros_like(m) for m in masks.heads]
                ffn = [torch.zeros_like(m) for m in masks.ffn]
                for batch in task_batches:
                    loss = batch_loss(model, task, batch)
                    grads = torch.autograd.grad(loss, [*masks.heads, *masks.ffn])
                    for acc, g in zip([*heads, *ffn], grads):
                        acc += g.detach() ** 2
                total = float(sum(h.sum() for h in heads) + sum(f.sum() for f in ffn))
                scale = 1.0 / total if total > 0 else 1.0
                per_task.append(Fisher([h.cpu() * scale for h in heads], [f.cpu() * scale for f in ffn]))
    finally:
        model.train(was_training)
    if not per_task:
        raise ValueError("Fisher information needs batches of at least one task")
    n = len(per_task)
    return Fisher([sum(f.heads[i] for f in per_task) / n for i in range(len(per_task[0].heads))],
                  [sum(f.ffn[i] for f in per_task) / n for i in range(len(per_task[0].ffn))])


# ---- costs and the mask search ------------------------------------------------------------------------------------
def unit_costs(arch: Sequence[LayerArch], hidden: int, seq_len: int) -> dict[str, list[tuple[float, float]]]:
    """Per layer, (FLOPs per token, parameters) of one head and of one FFN neuron.

    A head: its rows of Q, K and V and its columns of the output projection (``4 * hidden * head_size``
    multiply-adds), plus its attention scores and weighted sum (``2 * seq_len * head_size``); a neuron: one row
    in and one column out (``2 * hidden``). FLOPs count a multiply-add as 2.
    """
    heads = [(2.0 * (4 * hidden * a.head_size + 2 * seq_len * a.head_size), float(4 * hidden * a.head_size
                                                                                  + 3 * a.head_size))
             for a in arch]
    ffn = [(2.0 * 2 * hidden, float(2 * hidden + 1)) for _ in arch]
    return {"heads": heads, "ffn": ffn}


def encoder_cost(arch: Sequence[LayerArch], hidden: int, seq_len: int) -> tuple[float, float]:
    """(FLOPs per token, parameters) of the heads and FFN neurons of the encoder layers ``arch`` describes."""
    costs = unit_costs(arch, hidden, seq_len)
    flops = sum(a.heads * h[0] + a.ffn * f[0] for a, h, f in zip(arch, costs["heads"], costs["ffn"]))
    params = sum(a.heads * h[1] + a.ffn * f[1] for a, h, f in zip(arch, costs["heads"], costs["ffn"]))
    return flops, params


def check_budget(arch: Sequence[LayerArch], hidden: int, budget: Budget) -> list[float]:
    """The (FLOPs, parameters) of the smallest pruned model (one head and one FFN neuron a layer); ``RecipeError``
    naming the budget's field when the budget is below it."""
    costs = unit_costs(arch, hidden, budget.seq_len)
    full = encoder_cost(arch, hidden, budget.seq_len)
    floor = [sum(costs["heads"][i][k] + costs["ffn"][i][k] for i in range(len(arch))) for k in (0, 1)]
    for k, (name, ratio) in enumerate((("flops_ratio", budget.flops_ratio), ("params_ratio", budget.params_ratio))):
        if ratio is not None and floor[k] > ratio * full[k] + 1e-9:
            raise RecipeError(
                f"{budget.field}.{name}: {ratio} of the encoder layers' {'FLOPs' if k == 0 else 'parameters'} "
                f"({ratio * full[k]:,.0f}) is below what any pruned model keeps (one head and one FFN neuron a "
                f"layer: {floor[k]:,.0f}, a ratio of {floor[k] / (full[k] or 1):.4f})")
    return floor


def search_masks(fisher: Fisher, arch: Sequence[LayerArch], hidden: int,
                 budget: Budget) -> tuple[list[list[int]], list[list[int]]]:
    """The kept heads and FFN neurons (per layer, ascending indices) with the most Fisher information within
    ``budget``; ``RecipeError`` naming the budget's field when not even one head and one neuron a layer fits."""
    costs = unit_costs(arch, hidden, budget.seq_len)
    full = encoder_cost(arch, hidden, budget.seq_len)
    limits = [(k, ratio, ratio * total) for k, (ratio, total) in enumerate(
        [(budget.flops_ratio, full[0]), (budget.params_ratio, full[1])]) if ratio is not None]
    if not limits:
        raise RecipeError(f"{budget.field}: give flops_ratio and/or params_ratio")
    must_h = [int(torch.argmax(h)) for h in fisher.heads]
    must_f = [int(torch.argmax(f)) for f in fisher.ffn]
    floor = check_budget(arch, hidden, budget)

    def ranked(scores: list[torch.Tensor], must: list[int], unit_cost: list[tuple[float, float]]) -> tuple[
            list[tuple[int, int]], torch.Tensor, torch.Tensor]:
        items = [(float(s[j]), i, j) for i, s in enumerate(scores) for j in range(len(s)) if j != must[i]]
        items.sort(key=lambda x: (-x[0], x[1], x[2]))
        value = torch.tensor([0.0] + [x[0] for x in items], dtype=torch.float64).cumsum(0)
        cost = torch.tensor([[0.0, 0.0]] + [list(unit_cost[x[1]]) for x in items], dtype=torch.float64).cumsum(0)
        return [(x[1], x[2]) for x in items], value, cost

    heads, h_value, h_cost = ranked(fisher.heads, must_h, costs["heads"])
    neurons, f_value, f_cost = ranked(fisher.ffn, must_f, costs["ffn"])
    best = (-1.0, 0, 0)
    for nh in range(len(heads) + 1):
        n_max = len(neurons)
        fits = True
        for k, _, limit in limits:
            left = limit - floor[k] - float(h_cost[nh, k])
            if left < -1e-9:
                fits = False
                break
            n_max = min(n_max, int(torch.searchsorted(f_cost[:, k].contiguous(), torch.tensor(left + 1e-9,
                                                      dtype=torch.float64), right=True)) - 1)
        if not fits:
            break  # more heads only cost more
        value = float(h_value[nh] + f_value[n_max])
        if value > best[0]:
            best = (value, nh, n_max)
    _, nh, nf = best
    keep_h = [{m} for m in must_h]
    keep_f = [{m} for m in must_f]
    for i, j in heads[:nh]:
        keep_h[i].add(j)
    for i, j in neurons[:nf]:
        keep_f[i].add(j)
    return [sorted(s) for s in keep_h], [sorted(s) for s in keep_f]


def ratio_masks(fisher: Fisher, head_ratios: Sequence[float], ffn_ratios: Sequence[float]) -> tuple[
        list[list[int]], list[list[int]]]:
    """Per layer, the heads and FFN neurons kept when each layer loses its share (rounded as the iterative pruner
    rounds, :func:`compressor.prune.select.scheduled`) of its lowest-Fisher units."""
    from compressor.prune.select import scheduled

    def keep(scores: list[torch.Tensor], ratios: Sequence[float]) -> list[list[int]]:
        out = []
        for s, r in zip(scores, ratios):
            n = len(s) - (scheduled(len(s), r, 1, 1) if r else 0)
            order = sorted(range(len(s)), key=lambda j: (-float(s[j]), j))
            out.append(sorted(order[: max(n, 1)]))
        return out

    return keep(fisher.heads, head_ratios), keep(fisher.ffn, ffn_ratios)


# ---- reconstruction -----------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Ends a forward pass once the layer being reconstructed has been seen."""


def _capture(module: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]:
    """A pre-hook on a ``BertSelfOutput`` / ``BertOutput`` that records (projection input, residual) and stops."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append((args[0].detach(), args[1].detach()))
        raise _Stop

    return seen, module.register_forward_pre_hook(hook)


def _run_until(encoder: nn.Module, module: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    seen, handle = _capture(module)
    device = next(encoder.parameters()).device
    try:
        encoder(**{k: batch[k].to(device) for k in ENCODER_INPUTS if k in batch}, return_dict=True)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


def _part(layer: nn.Module, which: str) -> nn.Module:
    return layer.attention.output if which == "attention" else layer.output


@torch.no_grad()
def reconstruct(pruned: nn.Module, reference: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                damp: float = 0.01, layer_map: Sequence[int] | None = None) -> list[dict[str, float]]:
    """Re-solve every layer's attention and FFN output projections of ``pruned`` (an encoder) so that the sum
    entering each of its LayerNorms matches ``reference`` (the unpruned encoder) on ``batches`` (non-padding
    tokens), layer by layer in order. Ridge least squares toward the current weights, ``damp`` times the mean
    diagonal of the inputs' Gram matrix. ``layer_map``: the reference layer each pruned layer stands for (after
    layers were dropped; default: the same position). Returns per layer the relative error of each sum before
    and after."""
    was = (pruned.training, reference.training)
    pruned.eval()
    reference.eval()
    out: list[dict[str, float]] = []
    p_layers, r_layers = encoder_layers(pruned), encoder_layers(reference)
    pairs = [(p, r_layers[i]) for p, i in zip(p_layers, layer_map)] if layer_map is not None \
        else list(zip(p_layers, r_layers))
    try:
        for p_layer, r_layer in pairs:
            errors: dict[str, float] = {}
            for which in ("attention", "ffn"):
                p_mod, r_mod = _part(p_layer, which), _part(r_layer, which)
                dense = p_mod.dense
                n_in = dense.in_features
                gram = torch.zeros(n_in + 1, n_in + 1, dtype=torch.float64)
                cross = torch.zeros(n_in + 1, dense.out_features, dtype=torch.float64)
                w_old = torch.cat([dense.weight.T, dense.bias[None]], 0).double().cpu()
                t_sq = ref_sq = 0.0
                for batch in batches:
                    keep = batch["attention_mask"].bool().reshape(-1)
                    x_r, res_r = _run_until(reference, r_mod, batch)
                    x_p, res_p = _run_until(pruned, p_mod, batch)
                    target = (r_mod.dense(x_r) + res_r - res_p).reshape(-1, dense.out_features)[keep.to(x_r.device)]
                    x = x_p.reshape(-1, n_in)[keep.to(x_p.device)]
                    x1 = torch.cat([x, torch.ones(len(x), 1, device=x.device, dtype=x.dtype)], 1).double().cpu()
                    t = target.double().cpu()
                    gram += x1.T @ x1
                    cross += x1.T @ t
                    t_sq += float((t**2).sum())
                    ref_sq += float(((r_mod.dense(x_r) + res_r).reshape(-1, dense.out_features)[
                        keep.to(x_r.device)].double() ** 2).sum())

                def sse(w: torch.Tensor) -> float:  # sum over tokens of |x1 w - t|^2, from the sums kept
                    return max(float((w * (gram @ w)).sum() - 2 * (w * cross).sum()) + t_sq, 0.0)

                lam = damp * float(gram.diagonal().mean()) if damp > 0 else 0.0
                eye = torch.eye(n_in + 1, dtype=torch.float64)
                solved = torch.linalg.solve(gram + lam * eye, cross + lam * w_old)
                sse_before, sse_after = sse(w_old), sse(solved)
                if sse_after < sse_before:  # ridge never makes the fit worse in theory; guard rounding anyway
                    dense.weight.copy_(solved[:-1].T.to(dense.weight.dtype))
                    dense.bias.copy_(solved[-1].to(dense.bias.dtype))
                else:
                    sse_after = sse_before
                scale = max(ref_sq, 1e-30)
                errors[f"{which}_before"] = (sse_before / scale) ** 0.5
                errors[f"{which}_after"] = (sse_after / scale) ** 0.5
            out.append(errors)
    finally:
        pruned.train(was[0])
        reference.train(was[1])
    return out


# ---- the whole method -----------------------------------------------------------------------------------------------
def posttrain_prune(model: MultiTaskModel, fisher_batches: Batches, budget: Budget | None = None,
                    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None, damp: float = 0.01,
                    ratios: tuple[Sequence[float], Sequence[float]] | None = None) -> PostTrainReport:
    """Prune ``model``'s heads and FFN neurons in place by mask Fisher information, within ``budget`` (or, given
    ``ratios`` = (per-layer head ratios, per-layer FFN ratios), each layer by its ratios), then (with
    ``calibration`` batches) reconstruct every layer's output projections against the unpruned encoder."""
    import copy

    encoder = model.encoder
    arch = read_architecture(encoder)
    hidden = encoder.config.hidden_size
    fisher = fisher_scores(model, fisher_batches)
    if ratios is not None:
        keep_h, keep_f = ratio_masks(fisher, *ratios)
        budget = budget or Budget()
    elif budget is not None:
        keep_h, keep_f = search_masks(fisher, arch, hidden, budget)
    else:
        raise ValueError("posttrain_prune needs a budget or ratios")
    reference = copy.deepcopy(encoder).eval() if calibration else None
    flops_before, params_before = encoder_cost(arch, hidden, budget.seq_len)
    remove_heads(encoder, {i: [h for h in range(a.heads) if h not in set(k)]
                           for i, (a, k) in enumerate(zip(arch, keep_h))})
    remove_ffn_neurons(encoder, {i: [n for n in range(a.ffn) if n not in set(k)]
                                 for i, (a, k) in enumerate(zip(arch, keep_f))})
    recon = reconstruct(encoder, reference, calibration, damp) if reference is not None and calibration else []
    flops_after, params_after = encoder_cost(read_architecture(encoder), hidden, budget.seq_len)
    total = float(sum(h.sum() for h in fisher.heads) + sum(f.sum() for f in fisher.ffn))
    kept = float(sum(h[k].sum() for h, k in zip(fisher.heads, keep_h))
                 + sum(f[k].sum() for f, k in zip(fisher.ffn, keep_f)))
    return PostTrainReport(
        keep_h, keep_f,
        {"before": flops_before, "after": flops_after,
         **({"budget": budget.flops_ratio * flops_before} if budget.flops_ratio else {})},
        {"before": params_before, "after": params_after,
         **({"budget": budget.params_ratio * params_before} if budget.params_ratio else {})},
        kept / total if total > 0 else 1.0, recon)
