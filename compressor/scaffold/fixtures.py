"""The small fixture a scaffolded package ships (``data/train.jsonl``, ``data/dev.jsonl``): 24 + 8 seeded records
of its kind."""

from __future__ import annotations

import random

_NOUNS = ["cat", "dog", "teacher", "river", "city", "student", "bird", "farmer"]
_VERBS = ["sees", "likes", "finds", "follows", "paints", "visits"]
_ADJS = ["old", "small", "quiet", "bright"]
_MONTHS = ["January", "March", "May", "July", "October", "December"]


def fixture_records(kind: str) -> tuple[list[dict], list[dict]]:
    rng = random.Random(7)
    records = []
    for i in range(32):
        subj, obj, verb, adj = rng.choice(_NOUNS), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_ADJS)
        if kind == "token":
            tokens = ["the", adj, subj, verb, "a", obj, "."]
            records.append({"tokens": tokens, "tags": ["DET", "ADJ", "NOUN", "VERB", "DET", "NOUN", "PUNCT"]})
        elif kind == "sequence":
            happy = i % 2 == 0
            text = f"the {adj} {subj} {verb} a {obj} and it is {'wonderful' if happy else 'terrible'} ."
            records.append({"text": text, "label": "positive" if happy else "negative"})
        elif kind == "span":
            date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}"
            prefix = f"the {subj} {verb} a {obj} on "
            text = prefix + date + " ."
            records.append({"text": text, "start": len(prefix), "end": len(prefix) + len(date)})
        else:
            text = f"the {subj} {verb} the {obj} ."
            head = [4, 4 + len(subj)]
            tail_start = text.index(f" {obj} .") + 1
            label = "agent" if i % 2 == 0 else "patient"
            h, t = (head, [tail_start, tail_start + len(obj)]) if label == "agent" else \
                ([tail_start, tail_start + len(obj)], head)
            records.append({"text": text, "head": h, "tail": t, "label": label})
    return records[:24], records[24:]

