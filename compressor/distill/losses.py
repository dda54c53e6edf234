"""Knowledge-distillation losses: logits KL, hidden-state MSE, attention transfer (MiniLM v1 / v2).

``loss = alpha * task + (1 - alpha) * (w_logits * kd_logits + w_hidden * kd_hidden + w_attention * kd_attention)``

* ``kd_logits``: KL(teacher || student) at temperature T, scaled by T^2, over the last dimension of every
  :class:`~compressor.tasks.DistillTarget` the task plugin returns, averaged over the positions its mask keeps.
* ``kd_hidden``: MSE between the student's and the teacher's hidden states (embeddings, and each student layer vs
  its mapped teacher layer) over real tokens; a learned ``nn.Linear`` projects the student's width when it differs.
* ``kd_attention``, per mapped layer pair: where head counts match, KL between the attention distributions plus
  KL between the value relations (MiniLM v1); where they differ, KL between the query-query, key-key and
  value-value self-attention relations split into shared "relation heads" (MiniLM v2), so any head count works.

Attention distributions are computed from the Q/K/V projections captured with forward hooks rather than taken
from ``output_attentions``: that keeps the fast SDPA kernel and, unlike the returned probabilities, is free of
attention dropout. (Relative position scores, which BERT-family checkpoints rarely use, are not included.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.distill.capture import capture_qkv
from compressor.distill.cache import INDEX_KEY, Needs, TeacherCache, needs_of
from compressor.errors import RecipeError
from compressor.model.architecture import encoder_layers
from compressor.model.multitask import ModelOutput, MultiTaskModel
from compressor.model.student import check_layer_map, default_layer_map
from compressor.tasks import DistillTarget

PARTS = ("loss", "task", "kd_logits", "kd_hidden", "kd_attention", "kd_transfer")


@dataclass(frozen=True)
class KDConfig:
    """Weights of the distillation loss.

    Attributes:
        alpha: weight of the task loss; ``1 - alpha`` weighs the distillation terms.
        temperature: softmax temperature of the logits KL.
        logits: weight of ``kd_logits``.
        hidden: weight of ``kd_hidden``.
        attention: weight of ``kd_attention``.
        relation_heads: relation heads of the MiniLM-v2 transfer (where head counts differ); default: the
            student's head count if it divides the teacher's width, else the teacher's if it divides the
            student's, else gcd of both head counts.
        transfer: head -> the tasks whose batches also teach it (or ``"all"``: every other task), through its
            plugin's ``transfer_targets`` on those inputs (``kd_transfer``).
        transfer_weight: weight of ``kd_transfer``.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    logits: float = 1.0
    hidden: float = 0.0
    attention: float = 0.0
    relation_heads: int | None = None
    transfer: Mapping[str, tuple[str, ...] | str] = field(default_factory=dict)
    transfer_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise RecipeError(f"distillation temperature must be > 0, got {self.temperature}")
        if min(self.logits, self.hidden, self.attention, self.transfer_weight) < 0:
            raise RecipeError("distillation weights must be >= 0")


# ---- the terms ----------------------------------------------------------------------------------------------
def kl_last_dim(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over kept positions of KL(softmax(t/T) || softmax(s/T)) over the last dim, times T^2.

    Args:
        student_logits: ``[..., n]``.
        teacher_logits: same shape.
        temperature: T.
        mask: ``[...]`` (logits without the last dim), true where a position counts; ``None`` = all.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_t = log_t.exp()
    # classes the teacher gives zero mass (masked with -inf) add nothing, instead of 0 * inf = nan
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def logits_kd(student: Mapping[str, DistillTarget], teacher: Mapping[str, DistillTarget],
              temperature: float) -> torch.Tensor:
    """Mean of :func:`kl_last_dim` over the plugin's distillation targets (student's masks)."""
    if set(student) != set(teacher):
        raise ValueError(f"distillation targets differ: student {sorted(student)} vs teacher {sorted(teacher)}")
    if not student:
        raise ValueError("the task plugin returned no distillation targets")
    terms = [kl_last_dim(student[k].logits, teacher[k].logits, temperature, student[k].mask) for k in sorted(student)]
    return torch.stack(terms).mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
               projection: nn.Module | None = None) -> torch.Tensor:
    """MSE per element between (projected) student and teacher hidden states ``[batch, seq, width]`` over real tokens."""
    s = student.float()
    if projection is not None:
        s = projection(s).float()
    err = (s - teacher.float()).pow(2).mean(-1)
    return _masked_mean(err, mask.bool() if mask is not None else None)


def relation_log_probs(x: torch.Tensor, y: torch.Tensor, heads: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(x_h y_h^T / sqrt(d)) per head over the keys: ``[batch, seq, heads*d]`` -> ``[batch, heads, seq, seq]``.

    With x = Q, y = K this is the attention distribution; with x = y = V the value relation. Masked keys get
    -inf (probability 0).
    """
    b, s, width = x.shape
    if width % heads:
        raise ValueError(f"width {width} does not split into {heads} heads")
    d = width // heads
    xh = x.float().view(b, s, heads, d).transpose(1, 2)
    yh = y.float().view(b, y.shape[1], heads, d).transpose(1, 2)
    scores = xh @ yh.transpose(-1, -2) / math.sqrt(d)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return F.log_softmax(scores, dim=-1)


def relation_kl(student_log: torch.Tensor, teacher_log: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher || student) per query row of ``[batch, heads, seq, seq]`` log-probabilities, mean over real rows."""
    p_t = teacher_log.exp()
    kl = torch.where(p_t > 0, p_t * (teacher_log - student_log), torch.zeros_like(p_t)).sum(-1)  # [b, h, s]
    mask = None if query_mask is None else query_mask.bool()[:, None, :].expand_as(kl)
    return _masked_mean(kl, mask)


def pick_relation_heads(student_heads: int, student_width: int, teacher_heads: int, teacher_width: int,
                        requested: int | None = None) -> int:
    """Relation heads that split both the student's and the teacher's Q/K/V width."""
    if requested is not None:
        if student_width % requested or teacher_width % requested:
            raise RecipeError(
                f"relation_heads {requested} does not divide the attention widths (student {student_width}, "
                f"teacher {teacher_width})"
            )
        return requested
    if teacher_width % student_heads == 0:
        return student_heads
    if student_width % teacher_heads == 0:
        return teacher_heads
    return math.gcd(student_heads, teacher_heads)


def attention_transfer(s_qkv: tuple[torch.Tensor, ...], s_heads: int, t_qkv: tuple[torch.Tensor, ...], t_heads: int,
                       mask: torch.Tensor | None, relation_heads: int | None = None) -> torch.Tensor:
    """Attention loss of one layer pair from its captured (Q, K, V) projections ``[batch, seq, heads*d]``.

    Same head count: KL of attention distributions + KL of value relations (MiniLM v1), averaged.
    Different head counts: KL of Q-Q, K-K and V-V relations over shared relation heads (MiniLM v2), averaged.
    """
    sq, sk, sv = s_qkv
    tq, tk, tv = t_qkv
    if s_heads == t_heads:
        terms = [
            relation_kl(relation_log_probs(sq, sk, s_heads, mask), relation_log_probs(tq, tk, t_heads, mask), mask),
            relation_kl(relation_log_probs(sv, sv, s_heads, mask), relation_log_probs(tv, tv, t_heads, mask), mask),
        ]
    else:
        r = pick_relation_heads(s_heads, sq.shape[-1], t_heads, tq.shape[-1], relation_heads)
        terms = [
            relation_kl(relation_log_probs(s, s, r, mask), relation_log_probs(t, t, r, mask), mask)
            for s, t in ((sq, tq), (sk, tk), (sv, tv))
        ]
    return torch.stack(terms).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.bool()
    if mask.shape != values.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match values {tuple(values.shape)}")
    kept = mask.sum()
    # an all-masked batch (e.g. no entity pairs) contributes 0, keeping the graph connected
    return torch.where(mask, values, torch.zeros_like(values)).sum() / kept.clamp(min=1)


# ---- the combined loss --------------------------------------------------------------------------------------
class DistillLoss(nn.Module):
    """The distillation objective for one student/teacher pair; its parameters are the hidden-state projections.

    The projections are trained together with the student (give ``loss.parameters()`` to the optimizer) and are
    not part of the student model, so they are never saved with it.

    Args:
        student: the model being trained.
        teacher: the frozen teacher (the same tasks, the same vocabulary).
        teacher_cache: where the teacher's outputs are read from for batches that carry ``feature_index``
            (see :mod:`compressor.distill.cache`); None: the teacher runs on every batch.
        teachers: task -> its own teacher (per-task teachers, :mod:`compressor.distill.teachers`); tasks not in
            it learn from ``teacher``. ``forward`` is given each batch's teacher.
        teacher_caches: task -> the cache of that task's teacher (one per teacher); tasks not in it use
            ``teacher_cache``.
        config: weights and temperature.
        layer_map: student layer -> teacher layer, 0-based; default: uniform (student top = teacher top).
            Embeddings are always compared with the teacher's embeddings in ``kd_hidden``.

    Raises:
        RecipeError: a layer map naming a layer that does not exist, or models whose tasks differ.
    """

    def __init__(self, student: MultiTaskModel, teacher: MultiTaskModel, config: KDConfig,
                 layer_map: Mapping[int, int] | None = None, teacher_cache: TeacherCache | None = None,
                 teachers: Mapping[str, MultiTaskModel] | None = None,
                 teacher_caches: Mapping[str, TeacherCache] | None = None, unlabeled: Sequence[str] = ()):
        super().__init__()
        self.config = config
        self.teacher_cache = teacher_cache
        self.teacher_caches = dict(teacher_caches or {})
        n_s, n_t = len(encoder_layers(student.encoder)), len(encoder_layers(teacher.encoder))
        self.layer_map = check_layer_map(layer_map if layer_map is not None else default_layer_map(n_s, n_t), n_s, n_t)
        teachers = dict(teachers or {})
        missing = sorted(t for t in student.tasks if t not in teachers.get(t, teacher).tasks)
        if missing:
            raise RecipeError(f"distillation: the teacher has no task '{missing[0]}' (teacher tasks: {sorted(teacher.tasks)})")
        # input task (or unlabeled text set) -> the heads taught on its batches
        self.transfer_heads = _transfer_heads(student, config.transfer, unlabeled)
        # each taught head's teacher (a plain dict: the teachers are no part of this module's parameters)
        self.transfer_teachers = {h: teachers.get(h, teacher) for hs in self.transfer_heads.values() for h in hs}
        s_w, t_w = student.config.hidden_size, teacher.config.hidden_size
        self.projections = nn.ModuleDict()
        if s_w != t_w and config.hidden > 0:
            # one projection per compared hidden state: "0" = embeddings, "i+1" = output of student layer i
            for idx in (0, *(s + 1 for s in self.layer_map)):
                self.projections[str(idx)] = nn.Linear(s_w, t_w)

    def forward(self, student: MultiTaskModel, teacher: MultiTaskModel, task: str,
                batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named parts of the loss on one batch of ``task``: ``loss`` (to backpropagate), ``task``,
        ``kd_logits``, ``kd_hidden``, ``kd_attention`` (detached; 0 when a term's weight is 0)."""
        cfg = self.config
        kd_weight = 1.0 - cfg.alpha
        want_logits = kd_weight > 0 and cfg.logits > 0
        want_hidden = kd_weight > 0 and cfg.hidden > 0
        want_attention = kd_weight > 0 and cfg.attention > 0
        need_teacher = want_logits or want_hidden or want_attention
        s_layers = sorted(self.layer_map) if want_attention else []
        t_layers = sorted(set(self.layer_map.values())) if want_attention else []
        taught = self.transfer_heads.get(task, []) if kd_weight > 0 and cfg.transfer_weight > 0 else []

        with capture_qkv(student, s_layers) as s_qkv:
            s_out = student.forward_batch(task, batch, output_hidden_states=want_hidden or bool(taught))
        plugin = student.tasks[task]
        task_loss = plugin.loss(s_out.outputs, batch).float() if cfg.alpha > 0 else None
        zero = torch.zeros((), device=batch["input_ids"].device)
        parts = {"task": task_loss if task_loss is not None else zero, "kd_logits": zero, "kd_hidden": zero,
                 "kd_attention": zero, "kd_transfer": zero}
        if taught:
            parts["kd_transfer"] = self._transfer(student, batch, s_out.hidden_states[-1], taught)

        if need_teacher:
            if teacher.training:
                teacher.eval()
            cache = self.cache_for(task)
            if cache is not None and INDEX_KEY in batch:
                t_out, t_qkv = cache.teacher_outputs(
                    teacher, task, batch, self.needs(want_hidden, want_attention), s_out.outputs)
            else:
                with torch.no_grad(), capture_qkv(teacher, t_layers) as t_qkv:
                    t_out = teacher.forward_batch(task, batch, output_hidden_states=want_hidden)
            mask = batch["attention_mask"].bool()
            # the comparisons run in fp32 even under bf16 autocast: relation matmuls and KLs between nearly equal
            # distributions lose too much in bf16
            with torch.autocast(mask.device.type, enabled=False):
                parts.update(self._kd_terms(student, teacher, task, batch, s_out, t_out, s_qkv, t_qkv, mask,
                                            want_logits, want_hidden, want_attention))

        kd = (cfg.logits * parts["kd_logits"] + cfg.hidden * parts["kd_hidden"] + cfg.attention * parts["kd_attention"]
              + cfg.transfer_weight * parts["kd_transfer"])
        total = kd_weight * kd
        if task_loss is not None:
            total = total + cfg.alpha * task_loss
        out = {k: v.detach() for k, v in parts.items()}
        out["loss"] = total
        return out

    def transfer_on(self, student: MultiTaskModel, batch: Mapping[str, torch.Tensor], heads: list[str]) -> torch.Tensor:
        """``kd_transfer`` of ``heads`` on a batch of inputs alone (e.g. unlabeled text), the student's encoder
        run here."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self._transfer(student, batch, student.encoder(**inputs, return_dict=True).last_hidden_state, heads)

    def _transfer(self, student: MultiTaskModel, batch: Mapping[str, torch.Tensor], s_last: torch.Tensor,
                  heads: list[str]) -> torch.Tensor:
        """``kd_transfer``: the mean logits KL of ``heads`` on this batch of another task, each head against its
        own teacher's head on the same inputs (the teacher's encoder runs on the fly: its cache holds each
        task's own outputs only)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        mask = batch["attention_mask"]
        encoded: dict[int, torch.Tensor] = {}
        terms = []
        for head in heads:
            teacher = self.transfer_teachers[head]
            with torch.no_grad():
                if id(teacher) not in encoded:
                    encoded[id(teacher)] = teacher.encoder(**inputs, return_dict=True).last_hidden_state
                t_out = teacher.heads[head](encoded[id(teacher)], mask)
            s_out = student.heads[head](s_last, mask)
            with torch.autocast(mask.device.type, enabled=False):
                terms.append(logits_kd(student.tasks[head].transfer_targets(s_out, batch),
                                       teacher.tasks[head].transfer_targets(t_out, batch), self.config.temperature))
        return torch.stack(terms).mean()

    def cache_for(self, task: str) -> TeacherCache | None:
        """The teacher cache of ``task``'s teacher (None: its teacher runs on every batch)."""
        return self.teacher_caches.get(task, self.teacher_cache)

    def needs(self, hidden: bool | None = None, attention: bool | None = None) -> Needs:
        """The teacher parts this loss reads (by default: those its weights switch on)."""
        cfg = self.config
        on = cfg.alpha < 1
        hidden = on and cfg.hidden > 0 if hidden is None else hidden
        attention = on and cfg.attention > 0 if attention is None else attention
        return needs_of(hidden, attention, self.layer_map)

    def _kd_terms(self, student: MultiTaskModel, teacher: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor],
                  s_out: ModelOutput, t_out: ModelOutput, s_qkv: dict[int, dict[str, torch.Tensor]],
                  t_qkv: dict[int, dict[str, torch.Tensor]], mask: torch.Tensor, want_logits: bool,
                  want_hidden: bool, want_attention: bool) -> dict[str, torch.Tensor]:
        cfg = self.config
        parts: dict[str, torch.Tensor] = {}
        if want_logits:
            parts["kd_logits"] = logits_kd(student.tasks[task].distill_targets(s_out.outputs, batch),
                                           teacher.tasks[task].distill_targets(t_out.outputs, batch),
                                           cfg.temperature)
        if want_hidden:
            pairs = [(0, 0), *((s + 1, t + 1) for s, t in sorted(self.layer_map.items()))]
            parts["kd_hidden"] = torch.stack([
                hidden_mse(s_out.hidden_states[si], t_out.hidden_states[ti], mask,
                           self.projections[str(si)] if str(si) in self.projections else None)
                for si, ti in pairs
            ]).mean()
        if want_attention:
            s_blocks, t_blocks = encoder_layers(student.encoder), encoder_layers(teacher.encoder)
            terms = []
            for s, t in sorted(self.layer_map.items()):
                s_heads = s_blocks[s].attention.self.num_attention_heads
                t_heads = t_blocks[t].attention.self.num_attention_heads
                if not s_heads or not t_heads:
                    continue  # pruning removed every head of the layer: no attention to transfer
                sq = tuple(s_qkv[s][k] for k in ("query", "key", "value"))
                tq = tuple(t_qkv[t][k] for k in ("query", "key", "value"))
                terms.append(attention_transfer(sq, s_heads, tq, t_heads, mask, cfg.relation_heads))
            if terms:
                parts["kd_attention"] = torch.stack(terms).mean()
        return parts


def _transfer_heads(student: MultiTaskModel, transfer: Mapping[str, Any],
                    unlabeled: Sequence[str] = ()) -> dict[str, list[str]]:
    """``transfer`` (head -> the tasks or ``unlabeled`` text sets whose inputs teach it, or ``"all"``: every other
    task) turned around: input task or text set -> the heads taught on its batches. Raises RecipeError for a
    source that is neither, or a head whose plugin cannot be taught on other inputs."""
    from compressor.tasks import TaskPlugin

    out: dict[str, list[str]] = {}
    for head, sources in transfer.items():
        if head not in student.tasks:
            raise RecipeError(f"transfer.{head}: the student has no task '{head}' (tasks: {', '.join(student.tasks)})")
        plugin = student.tasks[head]
        if type(plugin).transfer_targets is TaskPlugin.transfer_targets:
            raise RecipeError(f"transfer.{head}: task '{head}' (plugin {type(plugin).__name__}) cannot be taught on "
                              "other tasks' inputs: its plugin defines no transfer_targets (it needs inputs of its "
                              "own, e.g. a question with a context, or candidate pairs)")
        for source in ([t for t in student.tasks if t != head] if sources == "all" else sources):
            if source not in student.tasks and source not in unlabeled:
                raise RecipeError(f"transfer.{head}: the student has no task '{source}' "
                                  f"(tasks: {', '.join(student.tasks)}; unlabeled sets: "
                                  f"{', '.join(unlabeled) or 'none'})")
            if source != head:
                out.setdefault(source, []).append(head)
    return out
