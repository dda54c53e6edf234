"""YAML recipes, validated by pydantic. Torch-free, so ``compressor validate`` is fast.

Errors name the YAML path, the line and what was expected::

    recipes/x.yaml:14: stages[0].epochs: Input should be greater than 0 (got -1)

Each stage kind has a config model with ``kind: Literal[...]`` (``train_stages``, ``prune_stages``,
``export_stages``); ``Stage`` (``schema``) is the union of the config models registered in
``compressor.stage_kinds.STAGE_KINDS``, discriminated on ``kind``. The field descriptions are the stage
reference (``docs/stages.md``, written by ``python -m compressor.docs``).
"""

from compressor.recipe._base import NAME, Strict
from compressor.recipe.export_stages import (BundleStage, ExportStage, QuantCalibration, QuantizeStage,
                                             ReferenceStage)
from compressor.recipe.loader import DATA_ROOT_ENV, line_of, load_recipe, resolve_data_root
from compressor.recipe.prune_stages import (PruneLayerRatios, PruneRecovery, PruneStage, PruneVocabStage,
                                            RecoveryStop, SearchBudget, SearchRatio, SearchSpace, SearchStage)
from compressor.recipe.schema import Recipe, ReportSpec, Stage, Targets
from compressor.recipe.tasks import Limits, ModelSpec, SplitFile, Splits, TaskSpec
from compressor.recipe.train_stages import (AddTaskStage, DistillOptions, DistillStage, DistillWeights, FinetuneStage,
                                            LoadStage, StudentFromConfig, StudentFromTeacher, StudentSpec,
                                            TeacherCacheOptions, TrainStage)
from compressor.train.options import LossWeighting, Sampling, TrainOptions

__all__ = [
    "NAME", "DATA_ROOT_ENV", "Strict", "ModelSpec", "SplitFile", "Splits", "Limits", "TaskSpec",
    "TrainStage", "FinetuneStage", "StudentFromTeacher", "StudentFromConfig", "StudentSpec", "DistillWeights",
    "LoadStage", "DistillStage", "DistillOptions", "TeacherCacheOptions", "AddTaskStage", "PruneLayerRatios",
    "PruneRecovery", "RecoveryStop", "PruneStage",
    "PruneVocabStage", "SearchRatio", "SearchBudget", "SearchSpace", "SearchStage", "ExportStage",
    "QuantCalibration", "QuantizeStage", "BundleStage", "ReferenceStage", "Stage", "Targets", "ReportSpec", "Recipe",
    "load_recipe", "resolve_data_root", "line_of", "LossWeighting", "Sampling", "TrainOptions",
]
