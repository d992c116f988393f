"""Measurement: the benchmark stages, the profile (`python -m detr_fast profile`) and the model zoo."""
from .cases import (
    BENCH_MODELS,
    DTYPES,
    IMPLS,
    MODEL_STAGE,
    NETWORK_STAGES,
    POS_CHANNELS,
    STAGES,
    TRAIN_STAGE,
    VARIANTS,
    Case,
    cases,
    model_case,
    model_cases,
)
from .errors import prediction_errors
from .implementations import (
    Compiled,
    compile_unavailable_reason,
    detector_implementation,
    detectors,
    implementation,
    make_fast_model,
    onnxruntime_unavailable_reason,
)
from .machine import cpu_info, cpu_label, device_name
from .model_zoo import NotMeasured, Unavailable
from .stages import Runner, build
from .training import autocast_unavailable_reason, train_unavailable_reason

__all__ = [
    "BENCH_MODELS", "DTYPES", "IMPLS", "MODEL_STAGE", "NETWORK_STAGES", "POS_CHANNELS", "STAGES", "TRAIN_STAGE",
    "VARIANTS", "Case", "Compiled", "NotMeasured", "Runner", "Unavailable", "autocast_unavailable_reason", "build",
    "cases", "compile_unavailable_reason", "cpu_info", "cpu_label", "detector_implementation", "detectors",
    "device_name", "implementation", "make_fast_model", "model_case", "model_cases", "onnxruntime_unavailable_reason",
    "prediction_errors", "train_unavailable_reason",
]
