"""What every recipe model shares: ``extra="forbid"``, the name pattern, the text-encoding check, and the
tolerance test of the stages that keep a change only within a tolerance."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from compressor.inputs import NAME, NAME_MAX, NAME_RULE, InputModel  # noqa: F401  (recipe models use them)


#: a random seed: what numpy, torch and ``random`` all accept
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="random seed, 0..2**32-1")]


class Strict(InputModel):
    """A recipe model: unknown keys and booleans where numbers are expected are refused."""


class ToleranceTest(Strict):
    """How a stage decides that a task's dev drop is over its tolerance (``compressor.significance``)."""

    tolerance_test: Literal["point", "bootstrap"] = Field(
        "point", description="when a task's drop is over its tolerance: its drop on the whole eval split (point), "
        "or only when the drop's paired-bootstrap interval over the split's examples lies wholly above the "
        "tolerance (bootstrap: a drop the data cannot tell from noise passes; the stage reports every interval; "
        "on a small dev set the interval is wide and a real loss can pass too)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="tolerance_test bootstrap: two-sided coverage of "
                              "the drop's interval")
    bootstrap_samples: int = Field(1000, ge=100, description="tolerance_test bootstrap: resamples per task and "
                                   "check (each rescores both models' predictions; no model runs)")


def known_codec(v: str | None) -> str | None:
    if v is not None:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding '{v}' (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return v
