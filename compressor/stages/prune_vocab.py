"""The ``prune_vocab`` stage: keep the vocabulary the tasks need, sized by measurement on dev.

Word embeddings are about half the parameters of a small encoder (30,522 x 384 of MiniLM-L6's 22.7M). The
stage ranks candidate tokens from text the model is allowed to learn from, never from dev or test text:

* every task's **whole** training file (``full_train``; the recipe's ``limit.train`` subsample would leave the
  words of the other training examples to split into fragments),
* the ``english_words`` most frequent English words (``wordfreq``), tokenised with the model's tokenizer,
* any corpus files the recipe names (``extra_files``),

and always keeps the special tokens, single characters (``keep_chars``) and ``extra_tokens``. Each candidate
size (``sizes``) keeps the top-ranked tokens; for each the stage measures the share of dev sub-tokens that
tokenise differently and every task's dev metric, and keeps the smallest size whose every task is within
``tolerance`` (relative drop) of the unpruned model. It then shrinks the embedding matrix, writes a matching
fast tokenizer and reports how much of the test text tokenises differently. The step never costs more than its
tolerance: when even every candidate together fails it, the stage keeps the whole vocabulary
(``if_none_within: keep_full``) or stops with one line (``if_none_within: fail``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from compressor.data.readers import split_lines
from compressor.errors import DataError, RecipeError
from compressor.model.io import load_model, save_model
from compressor.model.student import teacher_layers_entry
from compressor.prune.vocab import (
    VocabCandidates, changed_tokens, english_words, prune_embeddings, prune_tokenizer, rank_vocab,
)
from compressor.recipe import PruneVocabStage
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult

DEFAULT_SIZES = (8000, 12000, 16000, 20000)


def run(ctx: StageContext) -> StageResult:
    """Rank candidate tokens, size the vocabulary on dev, shrink the embeddings and tokenizer, save and report."""
    cfg: PruneVocabStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError("prune_vocab stage needs a model: put a train or distill stage before it")
    recipe = ctx.recipe
    field = f"stage '{cfg.name}'"
    max_length = recipe.model.max_length
    corpus = _corpus_texts(ctx, cfg)  # bad files fail before anything heavy runs
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, manifest = load_model(ctx.model_dir, device)
    tasks = list(model.tasks)
    too_big = [s for s in cfg.sizes or () if s > len(tokenizer)]
    if too_big:
        raise RecipeError(f"{field}: sizes: {too_big[0]:,} is larger than the tokenizer's vocabulary "
                          f"({len(tokenizer):,} tokens)")

    splits = ("train", "dev", "test") if cfg.keep_eval_splits else ("train",)
    candidates = _candidates(ctx, cfg, tokenizer, tasks, splits, corpus)
    sweep, chosen, sweep_notes = _size_sweep(ctx, cfg, model, tokenizer, candidates)
    layers = teacher_layers_entry(manifest.get("teacher_layers"))  # the vocabulary cut keeps every layer
    if chosen is None:
        return _keep_full(ctx, cfg, model, tokenizer, candidates, sweep, sweep_notes, layers)
    kept = candidates.kept(chosen)

    # measured with the original tokenizer before anything changes
    changed, overall = _changed_share(ctx, tasks, "test", tokenizer, max_length, kept)

    before_vocab, before_params = len(tokenizer), model.num_parameters()
    new_tokenizer = prune_tokenizer(tokenizer, kept)
    prune_embeddings(model.encoder, kept)
    model.eval()
    after_params = model.num_parameters()

    saved = ctx.out_dir / "model"
    save_model(model, new_tokenizer, saved, max_length,
               extra={"vocab_pruned_by": {"stage": cfg.name, "vocab_before": before_vocab,
                                          "kept_sources": candidates.sources},
                      **layers})
    ctx.reporter.extend(evaluate_rows(model, new_tokenizer, ctx.data, label=cfg.name, stage=cfg.name,
                                      model_dir=saved, report=recipe.report, batch_size=cfg.eval_batch_size))

    notes = [
        f"{cfg.name}: vocabulary {before_vocab:,} -> {len(kept):,} tokens; parameters {before_params:,} -> "
        f"{after_params:,} ({100 * (before_params - after_params) / before_params:.1f}% fewer)",
        *_source_notes(cfg, candidates, sweep_notes, changed, overall),
    ]
    outputs: dict[str, Any] = {
        "vocab_size_before": before_vocab, "vocab_size_after": len(kept),
        "parameters_before": before_params, "parameters_after": after_params,
        "kept_sources": candidates.sources, "candidates": candidates.max_size,
        "test_tokens_changed": overall, "test_tokens_changed_per_task": changed,
        "splits_used": list(splits), "full_train": cfg.full_train, "english_words": cfg.english_words,
        "tolerance": cfg.tolerance, "sweep": sweep, "chosen_size": len(kept), "pruned": True,
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _candidates(ctx: StageContext, cfg: PruneVocabStage, tokenizer: Any, tasks: list[str], splits: tuple[str, ...],
                corpus: list[str]) -> VocabCandidates:
    """Rank the candidate tokens from the tasks' ``splits``, the corpus and English words (checked against sizes)."""
    max_length = ctx.recipe.model.max_length
    sources: dict[str, list[list[int]]] = {}
    for t in tasks:
        for s in splits:
            if ctx.data.has(t, s):
                sources[f"{s}:{t}"] = [f["input_ids"] for f in _features(ctx, cfg, t, s, tokenizer, max_length)]
    if corpus:
        sources["corpus"] = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    weighted = {"english": english_words(tokenizer, cfg.english_words)} if cfg.english_words else {}
    candidates = rank_vocab(tokenizer, sources, weighted=weighted, extra_tokens=cfg.extra_tokens,
                            keep_chars=cfg.keep_chars, min_count=cfg.min_count)
    if cfg.sizes:
        try:
            candidates.kept(min(cfg.sizes))
        except RecipeError as exc:
            raise RecipeError(f"stage '{cfg.name}': {exc}") from exc
    return candidates


def _source_notes(cfg: PruneVocabStage, candidates: VocabCandidates, sweep_notes: list[str],
                  changed: dict[str, float], overall: float | None) -> list[str]:
    """The notes after the headline: the candidates' sources, the size sweep, the share of changed test tokens."""
    notes = [
        f"{cfg.name}: {candidates.max_size:,} candidate tokens ({len(candidates.required):,} always kept), from "
        f"{', '.join(f'{k} {v:,}' for k, v in candidates.sources.items())} (sources overlap); "
        f"training text: {'whole training files' if cfg.full_train else 'the recipe subsample'}",
        *sweep_notes,
    ]
    if overall is not None:
        per_task = ", ".join(f"{t} {100 * v:.2f}%" for t, v in changed.items())
        notes.append(f"{cfg.name}: {100 * overall:.2f}% of test-set sub-tokens tokenise differently after pruning "
                     f"(split differently or [UNK]): {per_task}")
    else:
        notes.append(f"{cfg.name}: no test split, so the share of changed test tokens is not measured")
    return notes


def _keep_full(ctx: StageContext, cfg: PruneVocabStage, model: Any, tokenizer: Any, candidates: VocabCandidates,
               sweep: list[dict[str, Any]], sweep_notes: list[str], extra: dict[str, Any]) -> StageResult:
    """No size (not even every candidate) is within tolerance: save the model unpruned, or fail as configured."""
    worst = sweep[-1] if sweep else {"size": candidates.max_size, "drops": {}}
    drops = ", ".join(f"{t} -{100 * d:.2f}%" for t, d in worst["drops"].items())
    what = (f"stage '{cfg.name}': no vocabulary size is within the tolerance of {100 * cfg.tolerance:.2f}%, not even "
            f"every candidate ({worst['size']:,} tokens: {drops})")
    if cfg.if_none_within == "fail":
        raise RecipeError(f"{what}; if_none_within is 'fail' (set it to 'keep_full' to keep the whole vocabulary, "
                          "or raise tolerance)")
    saved = ctx.out_dir / "model"
    save_model(model, tokenizer, saved, ctx.recipe.model.max_length, extra=extra)
    ctx.reporter.extend(evaluate_rows(model, tokenizer, ctx.data, label=cfg.name, stage=cfg.name, model_dir=saved,
                                      report=ctx.recipe.report, batch_size=cfg.eval_batch_size))
    msg = f"{what}; kept the whole vocabulary ({len(tokenizer):,} tokens, if_none_within: keep_full)"
    ctx.reporter.notes.append(msg)
    params = model.num_parameters()
    outputs: dict[str, Any] = {
        "vocab_size_before": len(tokenizer), "vocab_size_after": len(tokenizer),
        "parameters_before": params, "parameters_after": params, "kept_sources": candidates.sources,
        "candidates": candidates.max_size, "test_tokens_changed": 0.0, "test_tokens_changed_per_task": {},
        "full_train": cfg.full_train, "english_words": cfg.english_words, "tolerance": cfg.tolerance,
        "sweep": sweep, "chosen_size": len(tokenizer), "pruned": False,
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs,
                       notes=[*sweep_notes, f"WARNING: {msg}"])


# ---- sizing by measurement ---------------------------------------------------------------------------------
def _size_sweep(ctx: StageContext, cfg: PruneVocabStage, model: Any, tokenizer: Any,
                candidates: VocabCandidates) -> tuple[list[dict[str, Any]], int | None, list[str]]:
    """Measure every candidate size on dev; returns (the sweep rows, the chosen size, notes).

    Sizes above the number of candidates collapse into "every candidate". The smallest size whose every task's
    dev metric is within ``tolerance`` (relative drop) of the unpruned model is chosen (``tolerance_test:
    bootstrap``: whose every task's drop interval does not lie wholly above it); if none is, every candidate is
    kept (measured too) and a warning says so.
    """
    from compressor.significance import relative_drop, task_intervals

    max_length = ctx.recipe.model.max_length
    tasks = [t for t in model.tasks if ctx.data.has(t, "dev")]
    sizes = sorted({min(s, candidates.max_size) for s in (cfg.sizes or DEFAULT_SIZES)})
    if not tasks:
        if cfg.sizes and sizes != [candidates.max_size]:
            raise RecipeError(f"stage '{cfg.name}': sizes: choosing a vocabulary size needs a dev split, and no "
                              "task has one")
        return [], candidates.max_size, [f"{cfg.name}: no task has a dev split: every one of the "
                                         f"{candidates.max_size:,} candidate tokens kept, size not measured"]
    bootstrap = cfg.tolerance_test == "bootstrap"
    ref_preds: dict[str, list[Any]] = {}
    reference = _dev_metrics(ctx, cfg, model, tokenizer, tasks, ref_preds if bootstrap else None)
    examples = {t: ctx.data.examples(t, "dev") for t in tasks}
    higher = {t: model.tasks[t].metric.higher_is_better for t in tasks}
    sweep: list[dict[str, Any]] = []
    chosen: int | None = None
    for size in [*sizes, *([candidates.max_size] if candidates.max_size not in sizes else [])]:
        if size == candidates.max_size and sizes[-1] != size and chosen is not None:
            break  # the "every candidate" fallback is only measured when no listed size passed
        kept = candidates.kept(size)
        per_task, overall = _changed_share(ctx, tasks, "dev", tokenizer, max_length, kept)
        pruned = copy.deepcopy(model)
        new_tok = prune_tokenizer(tokenizer, kept)
        prune_embeddings(pruned.encoder, kept)
        preds: dict[str, list[Any]] = {}
        metrics = _dev_metrics(ctx, cfg, pruned, new_tok, tasks, preds if bootstrap else None)
        del pruned
        drops = {t: relative_drop(reference[t], metrics[t], higher[t]) for t in tasks}
        intervals = (task_intervals(model.tasks, examples, ref_preds, preds, cfg.bootstrap_samples, cfg.confidence,
                                    ctx.recipe.seed) if bootstrap else {})
        ok = (all(not iv.exceeds(cfg.tolerance) for iv in intervals.values()) if bootstrap
              else all(d <= cfg.tolerance + 1e-12 for d in drops.values()))
        sweep.append({"size": len(kept), "requested": size, "dev_tokens_changed": overall,
                      "dev_tokens_changed_per_task": per_task, "metrics": metrics, "drops": drops,
                      **({"drop_intervals": {t: iv.to_json() for t, iv in intervals.items()}} if bootstrap else {}),
                      "within_tolerance": ok})
        if ok and chosen is None:
            chosen = len(kept)
    def change(r: dict[str, Any], t: str) -> str:  # relative change of the metric (negative: worse)
        iv = r.get("drop_intervals", {}).get(t)
        return f"{-100 * r['drops'][t]:+.2f}%" + (f", interval {-100 * iv['high']:+.2f}%..{-100 * iv['low']:+.2f}%"
                                                  if iv else "")

    rows = "; ".join(
        f"{r['size']:,}: {100 * r['dev_tokens_changed']:.2f}% dev sub-tokens changed, "
        + ", ".join(f"{t} {r['metrics'][t]:.4f} ({change(r, t)})" for t in tasks)
        + ("" if r["within_tolerance"] else " [over tolerance]") for r in sweep)
    ref = ", ".join(f"{t} {reference[t]:.4f}" for t in tasks)
    test = (f"; tolerance_test bootstrap: {cfg.confidence:.0%} paired-bootstrap intervals of each drop over "
            f"{cfg.bootstrap_samples} resamples, a size fails only where an interval lies above the tolerance"
            if bootstrap else "")
    notes = [f"{cfg.name}: size sweep on dev (unpruned: {ref}; tolerance {100 * cfg.tolerance:.2f}% relative"
             f"{test}): {rows}"]
    if chosen is not None:
        notes.append(f"{cfg.name}: kept the smallest size within tolerance: {chosen:,} tokens")
    return sweep, chosen, notes


def _dev_metrics(ctx: StageContext, cfg: PruneVocabStage, model: Any, tokenizer: Any, tasks: list[str],
                 predictions: dict[str, list[Any]] | None = None) -> dict[str, float]:
    """Every task's dev metric of ``model`` with ``tokenizer`` (its predictions into ``predictions``, given)."""
    from compressor.model.forward import dev_metrics

    return dev_metrics(model, tokenizer, ctx.data, tasks, ctx.recipe.model.max_length, cfg.eval_batch_size,
                       predictions)


def _changed_share(ctx: StageContext, tasks: list[str], split: str, tokenizer: Any, max_length: int,
                   kept: list[int]) -> tuple[dict[str, float], float | None]:
    """Per task and overall: share of ``split`` sub-tokens (original tokenizer) that tokenise differently."""
    per_task: dict[str, float] = {}
    totals = [0, 0]
    for t in tasks:
        if not ctx.data.has(t, split):
            continue
        ids = [f["input_ids"] for f in ctx.data.encoded(t, split, tokenizer, max_length).features]
        c, n = changed_tokens(ids, kept, tokenizer)
        per_task[t] = c / n if n else 0.0
        totals[0] += c
        totals[1] += n
    return per_task, (totals[0] / totals[1] if totals[1] else None)


# ---- candidate sources ---------------------------------------------------------------------------------------
def _features(ctx: StageContext, cfg: PruneVocabStage, task: str, split: str, tokenizer: Any,
              max_length: int) -> list[dict[str, Any]]:
    """Encoded features of a split: the whole training file with ``full_train``, else the recipe's subsample."""
    spec = ctx.recipe.task(task)
    limit = getattr(spec.limit, split)
    if split != "train" or not cfg.full_train or limit is None:
        return ctx.data.encoded(task, split, tokenizer, max_length, train=split == "train").features
    plugin = ctx.data.tasks[task]
    examples = ctx.data.full(task, split)  # the whole split in its format and encoding (no dev hold-out)
    return plugin.encode(examples, tokenizer, max_length, True).features


def _corpus_texts(ctx: StageContext, cfg: PruneVocabStage) -> list[str]:
    """Non-empty lines of the ``extra_files``; a file that is missing or not text is an error naming the field."""
    texts = []
    for name in cfg.extra_files:
        path = ctx.data.resolve(name, f"prune_vocab stage '{cfg.name}': extra_files entry")
        if not path.is_file():
            raise DataError(path, f"prune_vocab stage '{cfg.name}': extra_files entry not found")
        raw = path.read_bytes()
        if b"\x00" in raw[:65536]:
            raise DataError(path, f"prune_vocab stage '{cfg.name}': extra_files entry is not text (NUL bytes; "
                            "a binary file?)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(path, f"prune_vocab stage '{cfg.name}': extra_files entry is not UTF-8 text "
                            f"({exc.reason} at byte {exc.start})") from exc
        texts += [line for line in split_lines(text) if line.strip()]
    return texts
