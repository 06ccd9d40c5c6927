"""The model zoo: each model is built from a small config object."""

from luoshu.models.recommendation import (
    DCN,
    DLRM,
    NCF,
    CrossNetwork,
    CTRConfig,
    DeepFM,
    LogisticRegression,
    NCFConfig,
    SlotEmbedding,
    WideAndDeep,
)

__all__ = ["CTRConfig", "CrossNetwork", "DCN", "DLRM", "DeepFM", "LogisticRegression", "NCF", "NCFConfig",
           "SlotEmbedding", "WideAndDeep"]
