"""Students built from a teacher (kept layers, fewer heads / FFN neurons) or from a fresh config."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from compressor.errors import RecipeError
from compressor.model.architecture import LayerArch, encoder_layers, read_architecture
from compressor.model.io import load_model, save_model
from compressor.model.multitask import MultiTaskModel
from compressor.model.student import (
    check_layer_map, default_layer_map, head_importance, select_layers, student_from_config, student_from_teacher,
)
from compressor.tasks import build_task

HIDDEN, HEADS, HEAD_SIZE, FFN = 32, 4, 8, 64


def make_tasks():
    return {
        "ner": build_task("ner", "ner", ["Loc", "Org", "Peop"]),
        "sst": build_task("classification", "sst", ["0", "1"]),
    }


def make_teacher(layers: int = 4, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(tiny_bert(layers=layers, heads=HEADS, hidden=HIDDEN, ffn=FFN, seed=seed), make_tasks()).eval()


def inputs(tokenizer) -> dict[str, torch.Tensor]:
    enc = tokenizer(["Anna Smith works for Acme in Paris .", "the film was fun"], padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def logits(model: MultiTaskModel, batch) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return {t: model(t, **batch).outputs["logits"] for t in model.tasks}


def layer_params(heads: int, ffn: int) -> int:
    width = heads * HEAD_SIZE
    attention = 3 * (HIDDEN * width + width) + width * HIDDEN + HIDDEN
    feed_forward = HIDDEN * ffn + ffn + ffn * HIDDEN + HIDDEN
    return attention + feed_forward + 2 * 2 * HIDDEN  # + two LayerNorms


# ---- layer choice ---------------------------------------------------------------------------------------------
def test_select_layers_choices():
    assert select_layers("every_other", 6) == [1, 3, 5]
    assert select_layers("every_other", 5) == [1, 3]
    assert select_layers(3, 6) == [1, 3, 5]
    assert select_layers(2, 12) == [5, 11]
    assert select_layers(4, 6) == [1, 2, 4, 5]
    assert select_layers(1, 4) == [3]
    assert select_layers([0, 2], 4) == [0, 2]


@pytest.mark.parametrize("choice, message", [
    ([0, 4], "layer 4 does not exist; the teacher has 4 layers"),
    ([1, 1], "names a layer twice"),
    (5, "cannot keep 5 of the teacher's 4 layers"),
    ("first_half", "unknown choice"),
])
def test_select_layers_rejects_missing_layers(choice, message):
    with pytest.raises(RecipeError, match=message):
        select_layers(choice, 4)


def test_layer_map_naming_a_missing_layer_is_a_recipe_error():
    assert check_layer_map({0: 1, 1: 3}, 2, 4) == {0: 1, 1: 3}
    with pytest.raises(RecipeError, match="teacher layer 4 .* does not exist; the teacher has 4 layers"):
        check_layer_map({0: 1, 1: 4}, 2, 4)
    with pytest.raises(RecipeError, match="student layer 2 does not exist; the student has 2 layers"):
        check_layer_map({2: 3}, 2, 4)


def test_default_layer_map():
    assert default_layer_map(2, 4) == {0: 1, 1: 3}
    assert default_layer_map(3, 12) == {0: 3, 1: 7, 2: 11}
    assert default_layer_map(2, 4, kept=[0, 2]) == {0: 0, 1: 2}


# ---- from the teacher -----------------------------------------------------------------------------------------
def test_student_keeps_chosen_layers_with_teacher_weights(tokenizer):
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, [0, 2])

    assert len(encoder_layers(student.encoder)) == 2 and student.config.num_hidden_layers == 2
    assert len(encoder_layers(teacher.encoder)) == 4 and teacher.config.num_hidden_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_idx, t_idx in ((0, 0), (1, 2)):
        for name, value in encoder_layers(student.encoder)[s_idx].state_dict().items():
            assert torch.equal(value, t_state[f"encoder.encoder.layer.{t_idx}.{name}"])
    for key in ("encoder.embeddings.word_embeddings.weight", "heads.ner.classifier.weight"):
        assert torch.equal(s_state[key], t_state[key])
    assert student.num_parameters() == teacher.num_parameters() - 2 * layer_params(HEADS, FFN)
    # the teacher is untouched, and the student is a copy, not a view
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    # keeping every layer changes nothing
    full = student_from_teacher(teacher)
    batch = inputs(tokenizer)
    for task, value in logits(full, batch).items():
        assert torch.equal(value, logits(teacher, batch)[task])


def test_student_heads_and_ffn_are_the_largest_and_the_slicing_is_exact(tokenizer):
    teacher = make_teacher(layers=2)
    # heads 1 and 3 and FFN neurons 32.. are silenced (zero output weights), so a student keeping the other heads
    # and neurons computes exactly what the teacher computes
    with torch.no_grad():
        for layer in encoder_layers(teacher.encoder):
            out = layer.attention.output.dense.weight.view(HIDDEN, HEADS, HEAD_SIZE)
            out[:, 1].zero_()
            out[:, 3].zero_()
            for name in ("query", "key", "value"):
                w = getattr(layer.attention.self, name).weight.view(HEADS, HEAD_SIZE, HIDDEN)
                w[1].mul_(0.01)
                w[3].mul_(0.01)
            layer.output.dense.weight[:, 32:].zero_()
            layer.intermediate.dense.weight[32:].mul_(0.01)
    assert head_importance(encoder_layers(teacher.encoder)[0]).topk(2).indices.sort().values.tolist() == [0, 2]

    student = student_from_teacher(teacher, heads=2, ffn=32)
    assert read_architecture(student.encoder) == [LayerArch(heads=2, head_size=HEAD_SIZE, ffn=32)] * 2
    for layer, t_layer in zip(encoder_layers(student.encoder), encoder_layers(teacher.encoder)):
        attn = layer.attention.self
        assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, HEAD_SIZE, 16)
        assert attn.query.weight.shape == (16, HIDDEN) and layer.attention.output.dense.weight.shape == (HIDDEN, 16)
        kept_rows = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
        assert torch.equal(attn.key.weight, t_layer.attention.self.key.weight[kept_rows])
        assert torch.equal(attn.value.bias, t_layer.attention.self.value.bias[kept_rows])
        assert layer.intermediate.dense.weight.shape == (32, HIDDEN) and layer.output.dense.weight.shape == (HIDDEN, 32)
    assert student.num_parameters() == teacher.num_parameters() - 2 * (layer_params(HEADS, FFN) - layer_params(2, 32))

    batch = inputs(tokenizer)
    t_logits, s_logits = logits(teacher, batch), logits(student, batch)
    for task in t_logits:
        torch.testing.assert_close(s_logits[task], t_logits[task], atol=1e-5, rtol=1e-5)


def test_student_from_teacher_rejects_impossible_sizes():
    teacher = make_teacher(layers=2)
    with pytest.raises(RecipeError, match="cannot keep 5 heads; teacher layer 0 has 4"):
        student_from_teacher(teacher, heads=5)
    with pytest.raises(RecipeError, match="cannot keep 65 neurons"):
        student_from_teacher(teacher, ffn=65)
    with pytest.raises(RecipeError, match="layer 7 does not exist"):
        student_from_teacher(teacher, [0, 7])


def test_student_round_trips_through_save_and_load(tmp_path, tokenizer):
    teacher = make_teacher()
    student = student_from_teacher(teacher, "every_other", heads=3, ffn=40)
    batch = inputs(tokenizer)
    expected = logits(student, batch)
    save_model(student, tokenizer, tmp_path / "student", max_length=32)
    loaded, _, manifest = load_model(tmp_path / "student")
    assert [layer["heads"] for layer in manifest["architecture"]["layers"]] == [3, 3]
    assert manifest["encoder"]["config"]["num_hidden_layers"] == 2
    assert loaded.num_parameters() == student.num_parameters()
    for task, value in logits(loaded, batch).items():
        assert torch.equal(value, expected[task])


# ---- from a config ------------------------------------------------------------------------------------------
def test_student_from_config_is_a_fresh_smaller_model_with_the_same_tasks(tmp_path, tokenizer):
    teacher = make_teacher()
    student = student_from_config(teacher, hidden_size=16, num_layers=2, heads=2, ffn=24, seed=1)
    assert student.config.hidden_size == 16 and len(encoder_layers(student.encoder)) == 2
    assert read_architecture(student.encoder)[0].heads == 2 and read_architecture(student.encoder)[0].ffn == 24
    assert student.encoder.get_input_embeddings().num_embeddings == teacher.encoder.get_input_embeddings().num_embeddings
    assert {t: p.labels for t, p in student.tasks.items()} == {t: p.labels for t, p in teacher.tasks.items()}
    assert student.heads["sst"] is not teacher.heads["sst"] and student.tasks["ner"] is not teacher.tasks["ner"]
    assert student.heads["ner"].classifier.weight.shape == (7, 16)  # O + B/I for 3 types, from 16 wide states

    batch = inputs(tokenizer)
    expected = logits(student, batch)
    save_model(student, tokenizer, tmp_path / "fresh", max_length=32)
    loaded, _, _ = load_model(tmp_path / "fresh")
    for task, value in logits(loaded, batch).items():
        assert torch.equal(value, expected[task])

    from_tasks = student_from_config(make_tasks(), tokenizer, hidden_size=16, num_layers=1, heads=4)
    assert from_tasks.encoder.get_input_embeddings().num_embeddings == len(tokenizer)
    assert from_tasks.config.intermediate_size == 64
    with pytest.raises(RecipeError, match="not a multiple of heads"):
        student_from_config(teacher, hidden_size=16, num_layers=1, heads=3)
