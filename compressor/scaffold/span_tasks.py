"""Templates of the plugin class (``task.py``) of the ``span`` and ``span-pair`` kinds (string.Template: ``$$`` is a literal dollar; ``$name``, ``$module``, ``$Class``, ``$Decoder``, ``$dist``, ``$kind`` are filled in)."""

from __future__ import annotations

from compressor.scaffold.label_tasks import ONE_LABEL_METHODS, TASK_HEADER

SPAN_TASK = TASK_HEADER + '''

@dataclass
class Example:
    text: str
    start: int  # character offsets of the gold span, end exclusive
    end: int
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    text, start, end = str(record["text"]), int(record["start"]), int(record["end"])
    if not 0 <= start < end <= len(text):
        raise ValueError(f"span [{start}, {end}) is outside the text (length {len(text)})")
    return Example(text, start, end, path, line)


class $Class(TaskPlugin):
    """One character span of each text (start and end token logits). Metric: character-overlap F1."""

    metric = MetricSpec("f1")
    Options = Options
    default_labels = ("span",)
    description = "$name: one span of each text (span extraction)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return ["span"]

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = []
        for i, ex in enumerate(examples):
            seq_ids = enc.encodings[i].sequence_ids
            offsets = [list(o) if s == 0 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < ex.end and o[1] > ex.start]
            start, end = (inside[0], inside[-1]) if inside else (IGNORE, IGNORE)  # cut off: not trained on
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(start_positions=start, end_positions=end, offsets=offsets, example_index=i,
                           pad_id=pad_id)
            features.append(feature)
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_inputs(features)
        for key in ("start_positions", "end_positions"):
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch

    def build_head(self, hidden_size: int) -> Any:
        from $module.head import Head

        return Head(hidden_size, self.options.dropout)

    def loss(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> Any:
        import torch.nn.functional as F

        if not bool((batch["start_positions"] != IGNORE).any()):
            return outputs["start_logits"].sum() * 0.0
        return (F.cross_entropy(outputs["start_logits"].float(), batch["start_positions"], ignore_index=IGNORE)
                + F.cross_entropy(outputs["end_logits"].float(), batch["end_positions"], ignore_index=IGNORE)) / 2

    def distill_targets(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, DistillTarget]:
        # softmax over the sequence; the head already pushed padding to -10000
        return {"start": DistillTarget(outputs["start_logits"]), "end": DistillTarget(outputs["end_logits"])}

    def decode(self, outputs: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray],
               features: Sequence[dict[str, Any]]) -> list[tuple[int, int] | None]:
        from compressor.runtime.decoding import qa_span_candidates

        out = []
        for i, f in enumerate(features):
            best = qa_span_candidates(outputs["start_logits"][i], outputs["end_logits"][i],
                                      [tuple(o) if o else None for o in f["offsets"]], 30, 1)
            out.append((best[0][1], best[0][2]) if best else None)
        return out

    def score(self, predictions: Sequence[tuple[int, int] | None], examples: Sequence[Example]) -> dict[str, float]:
        f1s, exact = [], 0
        for pred, ex in zip(predictions, examples):
            if pred is None:
                f1s.append(0.0)
                continue
            overlap = max(0, min(pred[1], ex.end) - max(pred[0], ex.start))
            exact += tuple(pred) == (ex.start, ex.end)
            p, r = overlap / max(1, pred[1] - pred[0]), overlap / (ex.end - ex.start)
            f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        n = len(examples)
        return {"f1": sum(f1s) / n if n else 0.0, "exact": exact / n if n else 0.0}

    def onnx_outputs(self) -> list[OnnxOutput]:
        return [OnnxOutput("start_logits", {0: "batch", 1: "sequence"}),
                OnnxOutput("end_logits", {0: "batch", 1: "sequence"})]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "max_answer_length": 30}
'''

SPAN_PAIR_TASK = TASK_HEADER + '''

@dataclass
class Example:
    text: str
    head: tuple[int, int]  # character offsets, end exclusive
    tail: tuple[int, int]
    label: str
    path: str
    line: int


def _example(record: dict, path: str, line: int) -> Example:
    text = str(record["text"])
    head, tail = tuple(int(x) for x in record["head"]), tuple(int(x) for x in record["tail"])
    for span in (head, tail):
        if len(span) != 2 or not 0 <= span[0] < span[1] <= len(text):
            raise ValueError(f"span {list(span)} is not [start, end) inside the text")
    return Example(text, head, tail, str(record["label"]), path, line)


def token_range(offsets: Sequence, span: Sequence[int]) -> tuple[int, int]:
    """Sub-token range [start, end) covering a character span (``(0, 1)``, the first token, when cut off)."""
    inside = [p for p, o in enumerate(offsets) if o is not None and o[0] < span[1] and o[1] > span[0]]
    return (inside[0], inside[-1] + 1) if inside else (0, 1)


class $Class(TaskPlugin):
    """A label for a pair of spans of a text (e.g. the relation of head to tail). Metric: accuracy."""

    metric = MetricSpec("accuracy")
    Options = Options
    description = "$name: a label per pair of spans (span-pair classification)"

    def read(self, path: Path, format: str | None = None) -> list[Example]:
        return read_jsonl(path, format, _example)

    def fit_labels(self, examples: Sequence[Example]) -> list[str]:
        return sorted({ex.label for ex in examples})

    def encode(self, examples: Sequence[Example], tokenizer: Any, max_length: int, train: bool) -> Encoded:
        index = {label: i for i, label in enumerate(self.labels)}
        for ex in examples:
            if ex.label not in index:
                raise DataError(ex.path, f"label '{ex.label}' is not one of {self.labels}", line=ex.line)
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                        return_offsets_mapping=True)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        features = []
        for i, ex in enumerate(examples):
            seq_ids = enc.encodings[i].sequence_ids
            offsets = [o if s == 0 else None for o, s in zip(enc["offset_mapping"][i], seq_ids)]
            spans = [*token_range(offsets, ex.head), *token_range(offsets, ex.tail)]
            feature = {k: list(enc[k][i]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            feature.update(pair_spans=spans, labels=index[ex.label], example_index=i, pad_id=pad_id)
            features.append(feature)
        truncated = sum(bool(e.overflowing) for e in enc.encodings)
        return Encoded(features, num_examples=len(examples), truncated=truncated)

    def collate(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = pad_inputs(features)
        batch["pair_spans"] = torch.tensor([f["pair_spans"] for f in features], dtype=torch.long)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch

''' + ONE_LABEL_METHODS + '''
    def onnx_inputs(self) -> list[OnnxInput]:
        # [batch, 4]: head start, head end, tail start, tail end (sub-token positions, ends exclusive)
        return [OnnxInput("pair_spans", "int64", {0: "batch"}, example_shape=(4,))]

    def export_spec(self) -> dict[str, Any]:
        return {"decoder": "$name", "labels": list(self.labels)}
'''

