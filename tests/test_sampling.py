import collections

import pytest

from compressor.data.sampling import BatchStream, TaskSampler, task_probabilities


def test_proportional_and_temperature_probabilities_by_hand():
    sizes = {"a": 900, "b": 100}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"a": 0.9, "b": 0.1})
    # tau = 2: sqrt(900) = 30, sqrt(100) = 10 -> 0.75 / 0.25
    assert task_probabilities(sizes, "temperature", tau=2.0) == pytest.approx({"a": 0.75, "b": 0.25})
    # tau -> large approaches uniform
    assert task_probabilities(sizes, "temperature", tau=1000.0)["a"] == pytest.approx(0.5, abs=0.01)
    assert task_probabilities(sizes, "round_robin") == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("strategy,tau,expected", [("proportional", 1.0, 0.9), ("temperature", 2.0, 0.75)])
def test_sampler_draws_tasks_in_proportion(strategy, tau, expected):
    sampler = TaskSampler({"a": 900, "b": 100}, strategy, tau, seed=1)
    counts = collections.Counter(next(sampler) for _ in range(20000))
    assert counts["a"] / 20000 == pytest.approx(expected, abs=0.015)


def test_round_robin_cycles_and_state_restores():
    sampler = TaskSampler({"a": 5, "b": 1, "c": 1}, "round_robin")
    assert [next(sampler) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    s = TaskSampler({"a": 3, "b": 1}, "proportional", seed=3)
    [next(s) for _ in range(10)]
    state = s.state_dict()
    after = [next(s) for _ in range(20)]
    s2 = TaskSampler({"a": 3, "b": 1}, "proportional", seed=99)
    s2.load_state_dict(state)
    assert [next(s2) for _ in range(20)] == after


def test_batch_stream_covers_every_index_once_per_pass():
    stream = BatchStream(10, 4, seed=0)
    assert stream.batches_per_pass() == 3
    seen = [i for _ in range(3) for i in stream.next()]
    assert sorted(seen) == list(range(10))


def test_quota_sampler_gives_each_task_exactly_its_steps_interleaved_and_stops_tasks():
    from compressor.data.sampling import QuotaSampler

    s = QuotaSampler({"big": 6, "small": 3}, seed=4)
    epoch = [next(s) for _ in range(s.epoch_steps())]
    assert sorted(epoch) == ["big"] * 6 + ["small"] * 3
    assert epoch != sorted(epoch) and epoch != sorted(epoch, reverse=True)  # interleaved, not bunched
    state = s.state_dict()
    s.stop("big")
    assert s.epoch_steps() == 3 and [next(s) for _ in range(3)] == ["small"] * 3
    again = QuotaSampler({"big": 6, "small": 3}, seed=0)
    again.load_state_dict(state)
    assert again.epoch_steps() == 9


def test_length_grouped_batches_cover_every_index_once_and_pad_less():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    plain, grouped = BatchStream(1000, 16, seed=1), BatchStream(1000, 16, seed=1, lengths=lengths)

    def padded(stream):
        batches = [stream.next() for _ in range(stream.batches_per_pass())]
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert all(len(b) == 16 for b in batches[:-1])
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)


def test_passes_budget_must_name_a_task_of_the_recipe():
    from compressor.recipe import Recipe

    base = {"name": "r", "tasks": [{"name": "ner", "plugin": "ner", "data": {"train": "x"}}]}
    stage = {"kind": "train", "sampling": {"strategy": "passes", "passes": {"nre": 2}}}
    with pytest.raises(Exception, match="sampling.passes names task 'nre'"):
        Recipe.model_validate({**base, "stages": [stage]})
    with pytest.raises(Exception, match="greater than 0"):
        Recipe.model_validate({**base, "stages": [{"kind": "train", "head_lr": 0}]})


def test_passes_quotas_follow_the_budget_and_steps_per_epoch_keeps_the_shares():
    from compressor.recipe import TrainStage
    from compressor.train.loop import epoch_steps, task_quotas

    sizes = {"small": 100, "big": 800}  # 7 and 50 batches of 16
    cfg = TrainStage.model_validate({"kind": "train", "sampling": {"passes": {"small": 3}}})
    assert task_quotas(cfg, sizes) == {"small": 21, "big": 50} and epoch_steps(cfg, sizes) == 71
    capped = cfg.model_copy(update={"steps_per_epoch": 142})
    assert task_quotas(capped, sizes) == {"small": 42, "big": 100} and epoch_steps(capped, sizes) == 142
