"""Vocabulary pruning that generalises: candidates from the whole training files, an English word list and corpus
files (never dev or test text), ranked; the size chosen by measuring dev on every candidate size; bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from _prune_helpers import PLUGIN
from compressor.errors import DataError, RecipeError
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.prune.vocab import english_words, rank_vocab
from compressor.tasks import build_task
from conftest import tiny_bert

pytestmark = pytest.mark.usefixtures("tiny_cls_plugin")  # conftest

COMMON = ["the", "film", "was", "good", "bad", "plot", "actors", "great", "dull", "story", "service", "fast",
          "slow", "staff", "and", "very"]
RARE = ["aardvark", "quixotic", "zeppelin", "marmalade", "hullabaloo", "kerfuffle"]  # once each, train only
DEV_ONLY = ["zebra", "okapi", "pangolin"]  # words only dev or test text uses
TOL = 0.05


def _sentences(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(COMMON) for _ in range(rng.randint(4, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """Data (train: common words many times + a rare tail; dev: common words only, labelled with the tiny model's
    own predictions so any changed prediction is a drop; test: with words no training text has) and the model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vocab")
    train = [f"{i % 2} {s}" for i, s in enumerate(_sentences(40, 1))]
    train += [f"{i % 2} the {w} was good" for i, w in enumerate(RARE)]
    (root / "c.train.txt").write_text("\n".join(train) + "\n")
    dev = _sentences(40, 2) + [f"the {w} was good" for w in DEV_ONLY[:1]]
    (root / "c.test.txt").write_text("".join(f"{i % 2} the {w} and the {DEV_ONLY[2]}\n" for i, w in enumerate(COMMON[:4])))
    (root / "corpus.txt").write_text("penguins\n\nwalrus colony\n")

    model = MultiTaskModel(tiny_bert(vocab_size=len(tokenizer), layers=1, heads=2, hidden=32, ffn=64, seed=3),
                           {"c": build_task(PLUGIN, "c", ["0", "1"])}).eval()
    # put the decision boundary at the median dev logit margin, so predictions are balanced and sensitive
    with torch.no_grad():
        batch = tokenizer(dev, padding=True, return_tensors="pt")
        logits = model("c", **batch).outputs["logits"]
        margin = (logits[:, 1] - logits[:, 0]) * 50
        head = model.heads["c"].out
        head.weight.mul_(50)
        head.bias.mul_(50)
        head.bias[1] -= float(statistics.median(margin.tolist()))
        predicted = model("c", **batch).outputs["logits"].argmax(-1).tolist()
    (root / "c.dev.txt").write_text("".join(f"{p} {t}\n" for p, t in zip(predicted, dev)))
    save_model(model, tokenizer, root / "model", max_length=32)
    return root


def _context(root, stage: dict, limit: int | None = None, dev: str = "c.dev.txt"):
    from compressor.data.store import DataStore
    from compressor.recipe import Recipe
    from compressor.report.rows import Reporter
    from compressor.stages import StageContext

    task = {"name": "c", "plugin": PLUGIN, "data": {"train": "c.train.txt", "dev": dev, "test": "c.test.txt"}}
    if limit:
        task["limit"] = {"train": limit}
    recipe = Recipe.model_validate({"name": "vocab", "seed": 0, "data_root": str(root), "model": {"max_length": 32},
                                    "tasks": [task], "stages": [{"kind": "prune_vocab", **stage}],
                                    "report": {"latency": False}})
    out = root / "run" / "stage.tmp"
    if out.parent.exists():
        import shutil

        shutil.rmtree(out.parent)
    out.mkdir(parents=True)
    return StageContext(recipe=recipe, stage=recipe.stages[0], index=0, run_dir=out.parent, out_dir=out,
                        final_dir=out.parent / "stage", data=DataStore(recipe.data_options(), root), reporter=Reporter("vocab"),
                        model_dir=root / "model")


def _ids(tokenizer, lines):
    return {i for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in ids}


def _texts(path):
    return [line.split(" ", 1)[1] for line in path.read_text().splitlines()]


def test_kept_vocabulary_never_takes_tokens_only_dev_or_test_needs(setup, tokenizer):
    from compressor.stages.prune_vocab import run

    ctx = _context(setup, {"keep_chars": "none", "english_words": 0, "extra_files": ["corpus.txt"], "tolerance": TOL},
                   limit=8)
    result = run(ctx)
    kept = {tokenizer.convert_tokens_to_ids(t) for t in
            json.loads((ctx.out_dir / "model" / "tokenizer.json").read_text())["model"]["vocab"]}
    train = _ids(tokenizer, _texts(setup / "c.train.txt"))
    corpus = _ids(tokenizer, ["penguins", "walrus colony"])
    held_out = _ids(tokenizer, _texts(setup / "c.dev.txt") + _texts(setup / "c.test.txt"))
    only_held_out = held_out - train - corpus
    assert only_held_out and not (kept & only_held_out)  # zebra, okapi, pangolin's pieces were never candidates
    assert kept - set(tokenizer.all_special_ids) <= train | corpus
    # limit.train subsamples 8 of 46 training lines, yet the whole training file's tokens are candidates
    assert kept >= train | corpus and result.outputs["full_train"]
    assert result.outputs["kept_sources"]["train:c"] == len(train | {tokenizer.cls_token_id, tokenizer.sep_token_id})
    # the pruned tokenizer turns the held-out-only words into [UNK] (no character fallback here)
    _, new_tok, _ = load_model(ctx.out_dir / "model")
    assert new_tok.tokenize("the zebra") == ["the", "[UNK]"]
    # measured on test: "pangolin" and the "zebra"-type words change
    assert result.outputs["test_tokens_changed"] > 0

    subsample = run(_context(setup, {"keep_chars": "none", "english_words": 0, "full_train": False, "tolerance": TOL},
                             limit=8))
    # candidates from the subsample only (the size then kept depends on the tolerance; it may be the whole vocabulary)
    assert subsample.outputs["candidates"] < len(train | set(tokenizer.all_special_ids))


def test_sweep_keeps_the_smallest_size_within_tolerance(setup, tokenizer):
    from compressor.stages.prune_vocab import run

    specials = len(set(tokenizer.all_special_ids))
    common = _ids(tokenizer, COMMON)
    # 1: too small, most dev words become [UNK]; 2: every common (dev) token; 3: every candidate (+ the rare tail)
    sizes = [specials + 3, specials + len(common), 30000]
    ctx = _context(setup, {"keep_chars": "none", "english_words": 0, "sizes": sizes, "tolerance": TOL})
    result = run(ctx)
    sweep = result.outputs["sweep"]
    assert [r["requested"] for r in sweep] == sorted({min(s, result.outputs["candidates"]) for s in sizes})
    small, fit, every = sweep
    assert small["size"] == sizes[0] and small["dev_tokens_changed"] > 0.5 and not small["within_tolerance"]
    assert small["drops"]["c"] > TOL
    # every dev token but the one dev-only word ("zebra", 1 sub-token) kept: within tolerance
    assert fit["size"] == sizes[1] and 0 < fit["dev_tokens_changed"] < 0.01 and fit["drops"]["c"] <= TOL
    assert every["size"] == result.outputs["candidates"] > fit["size"] and every["within_tolerance"]
    assert result.outputs["chosen_size"] == fit["size"] == result.outputs["vocab_size_after"]
    assert any("kept the smallest size within tolerance: " in n for n in result.notes)
    assert any("size sweep on dev" in n and "[over tolerance]" in n for n in result.notes)
    # what the stage reports on dev for the chosen size is what the saved model scores
    dev_row = next(r for r in ctx.reporter.rows if r["split"] == "dev")
    assert dev_row["value"] == pytest.approx(fit["metrics"]["c"])


def test_sweep_with_the_bootstrap_tolerance_test_decides_by_the_interval(setup, tokenizer):
    from compressor.stages.prune_vocab import run

    specials = len(set(tokenizer.all_special_ids))
    sizes = [specials + 3, 30000]
    ctx = _context(setup, {"keep_chars": "none", "english_words": 0, "sizes": sizes, "tolerance": TOL,
                           "tolerance_test": "bootstrap", "bootstrap_samples": 200})
    result = run(ctx)
    sweep = result.outputs["sweep"]
    for r in sweep:
        iv = r["drop_intervals"]["c"]
        assert iv["low"] <= iv["high"] and iv["samples"] == 200 and iv["drop"] == pytest.approx(r["drops"]["c"])
        assert r["within_tolerance"] == (iv["low"] <= TOL + 1e-12)  # fails only when the interval lies above
    chosen = next((r["size"] for r in sweep if r["within_tolerance"]), result.outputs["candidates"])
    assert result.outputs["chosen_size"] == chosen
    assert any("paired-bootstrap intervals" in n and ", interval " in n for n in result.notes)


def test_sweep_measures_every_candidate_when_no_listed_size_is_within_tolerance(setup, tokenizer):
    from compressor.stages.prune_vocab import run

    specials = len(set(tokenizer.all_special_ids))
    ctx = _context(setup, {"keep_chars": "none", "english_words": 0, "sizes": [specials + 2], "tolerance": TOL})
    result = run(ctx)
    sweep = result.outputs["sweep"]
    assert [r["within_tolerance"] for r in sweep] == [False, True]  # the fallback "every candidate" was measured
    assert result.outputs["chosen_size"] == result.outputs["candidates"]
    assert any(f"within tolerance: {result.outputs['candidates']:,} tokens" in n for n in result.notes)


@pytest.fixture(scope="module")
def unseen_dev(setup, tokenizer):
    """A dev file whose every sentence has a word no candidate source has, labelled with the model's own
    predictions: every vocabulary that drops those words changes some predictions (a drop over any tolerance)."""
    import random

    rng = random.Random(5)
    dev = [" ".join([*rng.sample(COMMON, 3), rng.choice(DEV_ONLY), rng.choice(DEV_ONLY)]) for _ in range(40)]
    model, _, _ = load_model(setup / "model")
    with torch.no_grad():
        predicted = model("c", **tokenizer(dev, padding=True, return_tensors="pt")).outputs["logits"].argmax(-1)
    (setup / "c.dev_unseen.txt").write_text("".join(f"{p} {t}\n" for p, t in zip(predicted.tolist(), dev)))
    return "c.dev_unseen.txt"


def test_vocabulary_step_never_costs_more_than_its_tolerance(setup, tokenizer, unseen_dev):
    from compressor.stages.prune_vocab import run

    stage = {"keep_chars": "none", "english_words": 0, "sizes": [len(set(tokenizer.all_special_ids)) + 2],
             "tolerance": 0.01}
    ctx = _context(setup, stage, dev=unseen_dev)
    result = run(ctx)
    sweep = result.outputs["sweep"]
    # the listed size and every candidate were measured, and both fail the tolerance
    assert [r["within_tolerance"] for r in sweep] == [False, False]
    assert sweep[-1]["size"] == result.outputs["candidates"] < len(tokenizer)
    assert max(sweep[-1]["drops"].values()) > 0.01
    # so the whole vocabulary is kept: the saved model and tokenizer are the unpruned ones
    assert not result.outputs["pruned"] and result.outputs["vocab_size_after"] == len(tokenizer)
    model, new_tok, _ = load_model(ctx.out_dir / "model")
    assert len(new_tok) == len(tokenizer) and new_tok.tokenize("the zebra") == tokenizer.tokenize("the zebra")
    assert model.encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert any("not even every candidate" in n and "kept the whole vocabulary" in n for n in result.notes)

    ctx = _context(setup, {**stage, "if_none_within": "fail"}, dev=unseen_dev)
    with pytest.raises(RecipeError, match=r"stage 'prune_vocab': no vocabulary size is within the tolerance of "
                       r"1\.00%, not even every candidate .*if_none_within is 'fail'"):
        run(ctx)
    assert not (ctx.out_dir / "model").exists()  # nothing written


def test_english_words_rank_beside_the_training_text(tokenizer):
    pairs = english_words(tokenizer, 2000)
    assert len(pairs) >= 1990 and pairs[0][0] == tokenizer("the", add_special_tokens=False)["input_ids"]
    assert pairs[0][1] > pairs[-1][1] > 0
    big = [tokenizer("film film film plot")["input_ids"]] * 50
    small = [tokenizer("okapi")["input_ids"]]
    cands = rank_vocab(tokenizer, {"train:big": big, "train:small": small}, weighted={"english": pairs},
                       keep_chars="ascii")
    rank = {i: n for n, i in enumerate(cands.ranked)}
    okapi = tokenizer("okapi", add_special_tokens=False)["input_ids"]
    # a small task's only word ranks with the large task's words (mean share per source), above rare English
    assert max(rank[i] for i in okapi if i in rank) < rank[tokenizer.convert_tokens_to_ids("film")] + 10
    assert set(tokenizer.all_special_ids) <= set(cands.required) and cands.sources["chars"] > 0
    assert cands.kept(len(cands.required) + 3) == sorted(set(cands.required) | set(cands.ranked[:3]))
    with pytest.raises(RecipeError, match="sizes: 5 is smaller than the .* tokens every pruned vocabulary keeps"):
        cands.kept(5)


def test_bad_input_names_the_field(setup, tokenizer, tmp_path):
    from compressor.recipe import load_recipe
    from compressor.stages.prune_vocab import run

    with pytest.raises(RecipeError, match=r"sizes: 40,000 is larger than the tokenizer's vocabulary \(30,522"):
        run(_context(setup, {"sizes": [8000, 40000]}))
    with pytest.raises(RecipeError, match="sizes: 3 is smaller than"):
        run(_context(setup, {"sizes": [3], "english_words": 0}))
    with pytest.raises(DataError, match="nope.txt: .*extra_files entry not found"):
        run(_context(setup, {"extra_files": ["nope.txt"]}))
    (setup / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(DataError, match="blob.bin: .*extra_files entry is not text"):
        run(_context(setup, {"extra_files": ["blob.bin"]}))
    (setup / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: .*extra_files entry is not UTF-8 text"):
        run(_context(setup, {"extra_files": ["latin1.txt"]}))
    assert not (setup / "run" / "stage.tmp" / "model").exists()  # nothing written

    path = tmp_path / "r.yaml"
    base = ("name: v\ntasks:\n  - {name: c, plugin: classification, data: {train: a.txt}}\nstages:\n"
            "  - kind: prune_vocab\n    {field}\n")
    for field, pattern in (("tolerance: 1.5", r"r\.yaml:6: stages\[0\]\.tolerance: Input should be less than 1"),
                           ("tolerance: 0", r"r\.yaml:6: stages\[0\]\.tolerance: Input should be greater than 0"),
                           ("sizes: [0, 100]", r"r\.yaml:6: stages\[0\]\.sizes\[0\]: Input should be greater than 0"),
                           ("sizes: []", r"r\.yaml:6: stages\[0\]\.sizes: List should have at least 1 item")):
        path.write_text(base.replace("{field}", field))
        with pytest.raises(RecipeError, match=pattern):
            load_recipe(path)
