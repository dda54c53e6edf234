"""The model card (``README.md``) of a transformers export: tasks and labels, how to load each, the run's
results when the model came from a run with a report, how the model was compressed, and its limits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compressor.report.rows import fmt_value
from compressor.rundir import RunDir

_PIPELINE_EXAMPLE = {
    "token-classification": 'pipeline("token-classification", model="{path}", aggregation_strategy="simple")'
                            '("Anna Schmidt works for Acme Corp in Oslo .")',
    "sequence-classification": 'pipeline("text-classification", model="{path}")("a gorgeous , witty movie .")',
    "question-answering": 'pipeline("question-answering", model="{path}")(question="Where does Anna work ?", '
                          'context="Anna Schmidt works for Acme Corp in Oslo .")',
}


def model_card(model_dir: Path, manifest: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """The card's Markdown (with Hub metadata in its front matter)."""
    tasks = info["tasks"]
    kinds = sorted({t["pipeline"] for t in tasks.values() if t["pipeline"]})
    front = ["---", "library_name: transformers", "pipeline_tag: " + (kinds[0] if len(tasks) == 1 and kinds
                                                                       else "feature-extraction"),
             "tags:", "- compressor", *(f"- {k}" for k in kinds), "---", ""]
    names = ", ".join(f"`{n}`" for n in tasks)
    lines = [*front, f"# {info['source']} (exported by compressor)", "",
             f"A {info['model_type']} encoder with {len(tasks)} task head(s) ({names}), exported from the compressor "
             f"model directory `{info['source']}`. The encoder's outputs equal compressor's (largest difference "
             f"measured at export: {info['parity_max_abs_diff']['encoder']:.2g}).", "",
             "## Tasks", "", "| task | plugin | folder | transformers class | labels |", "|---|---|---|---|---|"]
    for name, t in tasks.items():
        labels = t.get("id2label") or t["labels"]
        shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)" if len(labels) > 12 else "")
        lines.append(f"| {name} | {t['plugin']} | `{t['folder']}/` | {t['class'] or 'none (compressor head)'} | "
                     f"{shown or '-'} |")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModel, AutoTokenizer, pipeline", "",
              'encoder = AutoModel.from_pretrained("PATH")           # last_hidden_state as compressor computes it',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    for name, t in tasks.items():
        if t["pipeline"]:
            lines.append(_PIPELINE_EXAMPLE[t["pipeline"]].format(path=f"PATH/{t['folder']}"))
    lines += ["```", ""]
    custom = [n for n, t in tasks.items() if not t["class"]]
    if custom:
        lines += [f"Heads without a transformers class ({', '.join(custom)}) are in `<task>/head.safetensors` with "
                  "`<task>/head.json` (plugin, labels, options, inputs, outputs); with compressor installed:", "",
                  "```python", "import json, safetensors.torch", "from compressor.tasks import build_task", "",
                  'spec = json.load(open("PATH/<task>/head.json"))',
                  'head = build_task(spec["plugin"], spec["name"], spec["labels"], spec["options"])'
                  '.build_head(spec["hidden_size"])',
                  'head.load_state_dict(safetensors.torch.load_file("PATH/<task>/head.safetensors"))',
                  "out = head(encoder(**inputs).last_hidden_state, inputs[\"attention_mask\"], **extra_inputs)",
                  "```", ""]
    lines += _results(model_dir)
    lines += _compression(model_dir, manifest, info)
    lines += _limits(info, manifest)
    return "\n".join(lines)


def _run_of(model_dir: Path) -> tuple[RunDir | None, str | None]:
    run = RunDir.enclosing(model_dir)
    if run is None:
        return None, None
    try:
        records = run.records()
    except Exception:  # noqa: BLE001 - a card is written without the run's context rather than not at all
        return run, None
    here = Path(model_dir).resolve()
    stage = next((r.name for r in records if r.model_dir is not None and Path(r.model_dir).resolve() == here), None)
    return run, stage


def _results(model_dir: Path) -> list[str]:
    run, stage = _run_of(model_dir)
    if run is None or not run.report_json.is_file():
        return ["## Results", "", "No run report: this model directory is not inside a run directory with a "
                "`report.json`.", ""]
    try:
        rows = json.loads(run.report_json.read_text(encoding="utf-8")).get("rows", [])
    except (OSError, ValueError):
        return []
    lines = ["## Results", "",
             f"From the report of the run this model came from" + (f" (this model: stage `{stage}`)" if stage else "")
             + ". Latency: batch 1, median, in the runtime and format of its row.", "",
             "| model | task | split | metric | value | retention | size (MB) | latency p50 (ms) | format |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.1f}" if r.get("size_bytes") else "-"
        mark = "**" if stage and r.get("stage") == stage else ""
        lines.append(f"| {mark}{r.get('model')}{mark} | {r.get('task')} | {r.get('split')} | {r.get('metric')} | "
                     f"{fmt_value(r.get('value'))} | {fmt_value(r.get('retention'), 3)} | {size} | "
                     f"{fmt_value(r.get('latency_ms_p50'), 2)} | {r.get('format', '-')} |")
    return [*lines, ""]


def _compression(model_dir: Path, manifest: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    layers = manifest["architecture"]["layers"]
    config = manifest["encoder"]["config"]
    source = manifest["encoder"].get("source") or "-"
    lines = ["## How it was compressed", "",
             f"- encoder: `{Path(str(source)).name if source != '-' else '-'}` ({config.get('model_type')}), hidden "
             f"size {manifest['architecture']['hidden_size']}, vocabulary {manifest['architecture']['vocab_size']}",
             f"- {len(layers)} layer(s); attention heads per layer {[la['heads'] for la in layers]}; FFN width per "
             f"layer {[la['ffn'] for la in layers]}",
             f"- parameters: {info['parameters']['compressor']:,} in compressor's model (encoder "
             f"{info['parameters']['compressor_encoder']:,} + task heads); the transformers encoder holds "
             f"{info['parameters']['transformers_encoder']:,} (its pooler and any zero padding included)"]
    for key, what in (("pruned_by", "pruned"), ("searched_by", "found by search"), ("distilled_from", "distilled"),
                      ("train_result", "trained")):
        if key in manifest:
            lines.append(f"- {what}: see `{key}` in the model directory's manifest.json")
    run, stage = _run_of(model_dir)
    if run is not None:
        try:
            records = run.records()
        except Exception:  # noqa: BLE001 - see _run_of
            records = []
        chain = []
        for r in records:
            chain.append(f"{r.name} ({r.kind})")
            if r.name == stage:
                break
        if chain:
            lines.append(f"- stages of the run{' up to this model' if stage else ''}: {' -> '.join(chain)}")
    return [*lines, ""]


def _limits(info: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[str]:
    tasks = info["tasks"]
    lines = ["## Limits", "",
             f"- Trained with inputs of at most {info['max_length']} tokens; the tokenizer's `model_max_length` is "
             "set to that, so pipelines truncate longer texts.",
             "- `pooler_output` of the encoder is zeros: compressor's heads read the hidden states, not a pooler."]
    if info["pruned_heads"]:
        lines.append("- Pruned attention heads are declared in `config.json` (`pruned_heads`); transformers removes "
                     "them when it loads the model.")
    if len({la["ffn"] for la in manifest["architecture"]["layers"]}) > 1:
        lines.append("- FFN layers narrower than the widest are zero-padded to it: exact, but the files are larger "
                     "than compressor's model directory.")
    kinds = {t["pipeline"] for t in tasks.values()}
    if "sequence-classification" in kinds:
        lines.append("- Sequence classification: the pooler is a scaled identity (tanh's linear range) and the "
                     "classifier is scaled to match; fine-tuning further starts from that unusual scale.")
    if "question-answering" in kinds:
        lines.append("- Question answering: compressor masks the logits of padding positions (-1e4); transformers "
                     "does not, so compare logits at real tokens only.")
    custom = [n for n, t in tasks.items() if not t["class"]]
    if custom:
        lines.append(f"- {', '.join(custom)}: no transformers class fits this head; it needs compressor's plugin to "
                     "run (see Use).")
    lines.append("- Predictions decoded by compressor (entity spans over words, QA windows, relation pairs) may "
                 "differ in detail from transformers' pipelines, which decode the same logits their own way.")
    return [*lines, ""]
