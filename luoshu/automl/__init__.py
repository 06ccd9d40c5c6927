"""Automated machine learning: hyper-parameter search (`tune`, on Optuna), model selection over the
`luoshu.ml` families (`select`) and automated feature engineering for tabular/CTR data (`AutoFeatures`)."""

from luoshu.automl.features import AutoFeatures, CTRData, write_ctr_data
from luoshu.automl.mlp import MLPClassifier, MLPRegressor
from luoshu.automl.select import FAMILIES, select
from luoshu.automl.space import TuneError, parse_space
from luoshu.automl.space import apply as apply_values
from luoshu.automl.tune import Reporter, TuneResult, direction_of, tune

__all__ = [
    "FAMILIES",
    "MLPClassifier",
    "MLPRegressor",
    "AutoFeatures",
    "CTRData",
    "Reporter",
    "TuneError",
    "TuneResult",
    "apply_values",
    "direction_of",
    "parse_space",
    "select",
    "tune",
    "write_ctr_data",
]
