"""The task-plugin contract as a test kit: run it from a plugin's own test suite, or ``compressor tasks check``.

::

    # tests/test_my_plugin.py of a plugin package
    from pathlib import Path
    from compressor.testing import check_plugin, contract_test
    from my_plugin import MyTask

    test_contract = contract_test(MyTask, Path(__file__).parent / "fixture.tsv")   # a pytest test

    def test_contract_with_options():
        check_plugin(MyTask, Path(__file__).parent / "fixture.tsv", options={"dropout": 0.2})

:func:`check_plugin` takes a plugin through every part of the contract on its own small data file with a tiny
random BERT (2 layers, hidden 32; no download) and the project's offline fast tokenizer:
read -> fit_labels -> encode -> collate -> head forward -> loss -> backward -> distill_targets -> decode ->
aggregate -> score -> evaluate -> export_spec and its runtime decoder (on the PyTorch outputs) -> save/load.
The first broken part raises :class:`ContractError`, one line naming the plugin, the method, what was expected
and what came back. Among others it catches: ``collate`` returning something other than a dict of tensors, a
non-bool distillation mask, ``decode`` returning the wrong number of results, an output whose size changes
along an axis its ``onnx_outputs`` does not declare dynamic, labels on sub-tokens other than a word's first in a
token task, and an ``export_spec`` decoder no installed package registers.
"""

from compressor.testing.base import (IGNORE, SAMPLE_PAIR, SAMPLE_QUESTION, CheckReport, ContractError,
                                     default_tokenizer, tiny_encoder)
from compressor.testing.kit import check_plugin, contract_test

__all__ = ["IGNORE", "SAMPLE_PAIR", "SAMPLE_QUESTION", "CheckReport", "ContractError", "check_plugin",
           "contract_test", "default_tokenizer", "tiny_encoder"]
