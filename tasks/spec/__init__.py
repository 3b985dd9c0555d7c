"""Pipeline spec: the one declarative file a user writes to add a pipeline for a tabular dataset.

A spec is YAML, validated on load into frozen pydantic models. Every error names the file, the field, what was
found and what is allowed, so that a typo never surfaces later as a confusing failure inside a step.
"""

from kiln.tasks.spec.base import (
    CLASSIFICATION_METRICS,
    HIGHER_IS_BETTER,
    REGRESSION_METRICS,
    ColumnType,
    SpecError,
    TaskType,
)
from kiln.tasks.spec.data import (
    CacheSpec,
    CleaningSpec,
    ColumnCleaning,
    ExpectationSpec,
    ExpectationsSpec,
    FeaturesSpec,
    ProfileBoundsSpec,
    SourceSpec,
    SqlSourceSpec,
    WatchSpec,
)
from kiln.tasks.spec.loading import discover_specs, load_spec, load_specs, spec_named
from kiln.tasks.spec.monitoring import DriftSpec, MonitoringSpec, QualitySpec, RetrainSpec
from kiln.tasks.spec.pipeline import PARAM_FIELDS, PipelineSpec, parse_spec
from kiln.tasks.spec.release import (
    CanarySpec,
    DeploymentSpec,
    EvaluationSpec,
    GateSpec,
    InfraValidationSpec,
    SliceSpec,
)
from kiln.tasks.spec.scoring import ScoringSpec
from kiln.tasks.spec.training import CodeSpec, DockerSpec, ModelSpec, ResourcesSpec, TrainingSpec
from kiln.tasks.spec.tuning import DistributionSpec, ObjectiveSpec, TuningSpec
from kiln.tasks.spec.yaml_reader import SPEC_LIMITS, SpecLimits

__all__ = [
    "CLASSIFICATION_METRICS", "HIGHER_IS_BETTER", "PARAM_FIELDS", "REGRESSION_METRICS", "SPEC_LIMITS", "CacheSpec",
    "CanarySpec", "CleaningSpec", "CodeSpec", "ColumnCleaning", "ColumnType", "DeploymentSpec", "DockerSpec",
    "DistributionSpec", "DriftSpec", "EvaluationSpec", "ExpectationSpec", "ExpectationsSpec", "FeaturesSpec",
    "GateSpec", "InfraValidationSpec", "ModelSpec", "MonitoringSpec", "ObjectiveSpec", "PipelineSpec",
    "ProfileBoundsSpec", "QualitySpec", "ResourcesSpec", "RetrainSpec", "ScoringSpec", "SliceSpec", "SourceSpec",
    "SpecError", "SpecLimits", "SqlSourceSpec", "TaskType", "TrainingSpec", "TuningSpec", "WatchSpec", "discover_specs",
    "load_spec", "load_specs", "parse_spec", "spec_named",
]
