"""The ``prune_vocab`` stage: keep only the vocabulary the tasks' training data uses.

Word embeddings are about half the parameters of a small encoder (30,522 x 384 of MiniLM-L6's 22.7M), and a
task's data uses a fraction of the vocabulary. The stage keeps every token of every task's training features
(tokenised by the task plugins), the special tokens, optional extras and single-character fallbacks; shrinks
the embedding matrix; and writes a matching fast tokenizer. It reports how much of the test text tokenises
differently afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compressor.errors import DataError, RecipeError
from compressor.model.io import load_model, save_model
from compressor.prune.vocab import changed_tokens, prune_embeddings, prune_tokenizer, select_vocab
from compressor.recipe import PruneVocabStage
from compressor.report.evaluate import evaluate_rows
from compressor.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cfg: PruneVocabStage = ctx.stage
    if ctx.model_dir is None:
        raise RecipeError("prune_vocab stage needs a model: put a train or distill stage before it")
    recipe = ctx.recipe
    max_length = recipe.model.max_length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_model(ctx.model_dir, device)
    tasks = list(model.tasks)

    splits = ("train", "dev", "test") if cfg.keep_eval_splits else ("train",)
    id_lists = [f["input_ids"] for t in tasks for s in splits if ctx.data.has(t, s)
                for f in ctx.data.encoded(t, s, tokenizer, max_length, train=s == "train").features]
    kept, sources = select_vocab(tokenizer, id_lists, extra_tokens=cfg.extra_tokens,
                                 extra_texts=_extra_texts(ctx, cfg), keep_chars=cfg.keep_chars, min_count=cfg.min_count)

    # measured with the original tokenizer before anything changes
    changed: dict[str, float] = {}
    totals = [0, 0]
    for t in tasks:
        if not ctx.data.has(t, "test"):
            continue
        test_ids = [f["input_ids"] for f in ctx.data.encoded(t, "test", tokenizer, max_length).features]
        c, n = changed_tokens(test_ids, kept, tokenizer)
        changed[t] = c / n if n else 0.0
        totals[0] += c
        totals[1] += n

    before_vocab, before_params = len(tokenizer), model.num_parameters()
    new_tokenizer = prune_tokenizer(tokenizer, kept)
    prune_embeddings(model.encoder, kept)
    model.eval()
    after_params = model.num_parameters()

    saved = ctx.out_dir / "model"
    save_model(model, new_tokenizer, saved, max_length,
               extra={"vocab_pruned_by": {"stage": cfg.name, "vocab_before": before_vocab, "kept_sources": sources}})
    ctx.reporter.extend(evaluate_rows(model, new_tokenizer, ctx.data, label=cfg.name, stage=cfg.name,
                                      model_dir=saved, report=recipe.report, batch_size=cfg.eval_batch_size))

    overall = totals[0] / totals[1] if totals[1] else None
    notes = [
        f"{cfg.name}: vocabulary {before_vocab:,} -> {len(kept):,} tokens; parameters {before_params:,} -> "
        f"{after_params:,} ({100 * (before_params - after_params) / before_params:.1f}% fewer)",
        f"{cfg.name}: kept from {', '.join(f'{k} {v:,}' for k, v in sources.items())} (sources overlap)",
    ]
    if overall is not None:
        per_task = ", ".join(f"{t} {100 * v:.2f}%" for t, v in changed.items())
        notes.append(f"{cfg.name}: {100 * overall:.2f}% of test-set sub-tokens tokenise differently after pruning "
                     f"(split differently or [UNK]): {per_task}")
    else:
        notes.append(f"{cfg.name}: no test split, so the share of changed test tokens is not measured")
    outputs: dict[str, Any] = {
        "vocab_size_before": before_vocab, "vocab_size_after": len(kept),
        "parameters_before": before_params, "parameters_after": after_params,
        "kept_sources": sources, "test_tokens_changed": overall, "test_tokens_changed_per_task": changed,
        "splits_used": list(splits),
    }
    return StageResult(model_dir=ctx.final_dir / "model", outputs=outputs, notes=notes)


def _extra_texts(ctx: StageContext, cfg: PruneVocabStage) -> list[str]:
    texts = []
    for name in cfg.extra_files:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else ctx.data.root / path
        if not path.is_file():
            raise DataError(path, f"prune_vocab stage '{cfg.name}': extra_files entry not found")
        try:
            texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise DataError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return texts
