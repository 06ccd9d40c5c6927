"""`luoshu.ctr`: NVIDIA HugeCTR's Python training API on luoshu — `from luoshu import ctr as hugectr`.

A HugeCTR script (CreateSolver, DataReaderParams, CreateOptimizer, Model, Input,
SparseEmbedding, DenseLayer, compile, fit, ...) runs unchanged after that import; the model
compiles onto one luoshu define-and-run graph. `luoshu.ctr.tools` holds the data generator.
"""

from luoshu.ctr import tools
from luoshu.ctr.config import (
    SUPPORTED_LAYERS,
    Activation_t,
    Check_t,
    CreateOptimizer,
    CreateSolver,
    CTRError,
    DataReaderParams,
    DataReaderSparseParam,
    DataReaderType_t,
    DenseLayer,
    Distribution_t,
    Embedding_t,
    Initializer_t,
    Input,
    Layer_t,
    LrPolicy_t,
    MetricsType,
    Optimizer_t,
    OptParamsPy,
    PowerLaw_t,
    Regularizer_t,
    Solver,
    SparseEmbedding,
    Update_t,
)
from luoshu.ctr.model import Model
from luoshu.ctr.reader import read_file_list, write_file_list

__all__ = [
    "SUPPORTED_LAYERS", "Activation_t", "CTRError", "Check_t", "CreateOptimizer", "CreateSolver", "DataReaderParams",
    "DataReaderSparseParam", "DataReaderType_t", "DenseLayer", "Distribution_t", "Embedding_t", "Initializer_t",
    "Input", "Layer_t", "LrPolicy_t", "MetricsType", "Model", "OptParamsPy", "Optimizer_t", "PowerLaw_t",
    "Regularizer_t", "Solver", "SparseEmbedding", "Update_t", "read_file_list", "tools", "write_file_list",
]
