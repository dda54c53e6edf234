import pytest
import torch

from compressor.errors import RecipeError
from compressor.train.weighting import LossWeighter


def test_uncertainty_weights_are_learned_and_downweight_the_noisier_task():
    w = LossWeighter(["easy", "hard"], "uncertainty")
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(200):
        for task, loss in (("easy", torch.tensor(0.1)), ("hard", torch.tensor(3.0))):
            opt.zero_grad()
            w.weighted(task, loss).backward()
            opt.step()
    weights = w.current()
    # the optimum of exp(-s) L + s/2 is s = log(2L): weight exp(-s) = 1 / (2L)
    assert weights["easy"] == pytest.approx(1 / 0.2, rel=0.05)
    assert weights["hard"] == pytest.approx(1 / 6.0, rel=0.05)


def test_fixed_and_uniform():
    assert float(LossWeighter(["a"], "uniform").weighted("a", torch.tensor(2.0))) == 2.0
    fixed = LossWeighter(["a", "b"], "fixed", {"a": 0.5})
    assert float(fixed.weighted("a", torch.tensor(2.0))) == 1.0
    assert float(fixed.weighted("b", torch.tensor(2.0))) == 2.0
    with pytest.raises(RecipeError, match="unknown task"):
        LossWeighter(["a"], "fixed", {"zz": 1.0})
