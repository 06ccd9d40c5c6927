"""HugeCTR's configuration vocabulary: the `*_t` enums, `CreateSolver`, `DataReaderParams`,
`CreateOptimizer`, `Input`, `DataReaderSparseParam`, `SparseEmbedding` and `DenseLayer`.

Names, arguments and defaults follow HugeCTR's Python API, so a HugeCTR script runs after
`from luoshu import ctr as hugectr`. Every object converts to and from a JSON dict (the
layers of `Model.graph_to_json`). Arguments that only tune GPU kernels in HugeCTR
(`use_cuda_graph`, `use_algorithm_search`, overlap flags, `workspace_size_per_gpu_in_mb` as a
memory budget) are accepted and kept, and have no effect on CPU.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from luoshu.core.errors import Error


class CTRError(Error, ValueError):
    """A HugeCTR-style model, reader or file that cannot be used: names the layer and field at fault."""


class _Enum(enum.Enum):
    def __repr__(self) -> str:
        return f"{type(self).__name__}.{self.name}"

    @classmethod
    def parse(cls, value, what: str):
        """The member named by `value` (a member, or its name as written in a JSON file)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in cls.__members__:
            return cls[value]
        raise CTRError(f"{what}: expected one of {cls.__name__}.{{{', '.join(cls.__members__)}}}, found {value!r}")


class DataReaderType_t(_Enum):  # noqa: N801 - HugeCTR's names
    Norm = "Norm"
    Raw = "Raw"
    Parquet = "Parquet"
    RawAsync = "RawAsync"


class Check_t(_Enum):  # noqa: N801
    Sum = "Sum"
    Non = "Non"


class Optimizer_t(_Enum):  # noqa: N801
    Adam = "Adam"
    AdaGrad = "AdaGrad"
    MomentumSGD = "MomentumSGD"
    Nesterov = "Nesterov"
    SGD = "SGD"


class Update_t(_Enum):  # noqa: N801
    Local = "Local"
    Global = "Global"
    LazyGlobal = "LazyGlobal"


class Embedding_t(_Enum):  # noqa: N801
    DistributedSlotSparseEmbeddingHash = "DistributedSlotSparseEmbeddingHash"
    LocalizedSlotSparseEmbeddingHash = "LocalizedSlotSparseEmbeddingHash"
    LocalizedSlotSparseEmbeddingOneHot = "LocalizedSlotSparseEmbeddingOneHot"


class Initializer_t(_Enum):  # noqa: N801
    Default = "Default"
    Uniform = "Uniform"
    XavierNorm = "XavierNorm"
    XavierUniform = "XavierUniform"
    Zero = "Zero"


class Regularizer_t(_Enum):  # noqa: N801
    L1 = "L1"
    L2 = "L2"


class Activation_t(_Enum):  # noqa: N801
    Relu = "Relu"
    Non = "Non"


class LrPolicy_t(_Enum):  # noqa: N801
    fixed = "fixed"


class MetricsType(_Enum):
    AUC = "AUC"
    AverageLoss = "AverageLoss"


class Distribution_t(_Enum):  # noqa: N801
    Uniform = "Uniform"
    PowerLaw = "PowerLaw"


class PowerLaw_t(_Enum):  # noqa: N801
    Long = "Long"
    Medium = "Medium"
    Short = "Short"
    Specific = "Specific"


class Layer_t(_Enum):  # noqa: N801
    """Every dense layer type HugeCTR names; `luoshu.ctr` builds the ones in `SUPPORTED_LAYERS`."""

    Add = "Add"
    BatchNorm = "BatchNorm"
    BinaryCrossEntropyLoss = "BinaryCrossEntropyLoss"
    Cast = "Cast"
    Concat = "Concat"
    CrossEntropyLoss = "CrossEntropyLoss"
    DotProduct = "DotProduct"
    Dropout = "Dropout"
    ELU = "ELU"
    ElementwiseMultiply = "ElementwiseMultiply"
    FmOrder2 = "FmOrder2"
    FusedInnerProduct = "FusedInnerProduct"
    FusedReshapeConcat = "FusedReshapeConcat"
    Gather = "Gather"
    GRU = "GRU"
    InnerProduct = "InnerProduct"
    Interaction = "Interaction"
    LayerNorm = "LayerNorm"
    MLP = "MLP"
    MultiCross = "MultiCross"
    MultiCrossEntropyLoss = "MultiCrossEntropyLoss"
    MultiHeadAttention = "MultiHeadAttention"
    PReLU_Dice = "PReLU_Dice"
    ReduceMean = "ReduceMean"
    ReduceSum = "ReduceSum"
    ReLU = "ReLU"
    Reshape = "Reshape"
    Scale = "Scale"
    Sigmoid = "Sigmoid"
    Slice = "Slice"
    Softmax = "Softmax"
    Sub = "Sub"
    WeightMultiply = "WeightMultiply"


def _enum_json(value):
    return value.name if isinstance(value, _Enum) else value


def _plain(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = {_enum_json(a): _enum_json(b) for a, b in v.items()}
        elif isinstance(v, (list, tuple)):
            out[k] = [list(x) if isinstance(x, tuple) else _enum_json(x) for x in v]
        else:
            out[k] = _enum_json(v)
    return out


# --- solver -------------------------------------------------------------------------------
@dataclass
class Solver:
    """Training resources and global hyperparameters (HugeCTR's `Solver`); build with `CreateSolver`."""

    model_name: str = ""
    seed: int = 0
    lr_policy: LrPolicy_t = LrPolicy_t.fixed
    lr: float = 0.001
    warmup_steps: int = 1
    decay_start: int = 0
    decay_steps: int = 1
    decay_power: float = 2.0
    end_lr: float = 0.0
    max_eval_batches: int = 100
    batchsize_eval: int = 2048
    batchsize: int = 2048
    vvgpu: list = field(default_factory=lambda: [[0]])
    devices: list | None = None
    repeat_dataset: bool = True
    use_mixed_precision: bool = False
    enable_tf32_compute: bool = False
    scaler: float = 1.0
    metrics_spec: dict = field(default_factory=lambda: {MetricsType.AUC: 1.0})
    i64_input_key: bool = False
    use_algorithm_search: bool = True
    use_cuda_graph: bool = True
    embedding_placement: str = "auto"  # luoshu: "auto", "distributed", "localized" or "parameter_server"
    mixed_precision_dtype: str = "bfloat16"  # luoshu: the autocast dtype of use_mixed_precision (CPU: bfloat16)
    compile_step: bool = False  # luoshu: each training step runs as one compiled graph (Graph.compile, Inductor)

    def __post_init__(self):
        self.lr_policy = LrPolicy_t.parse(self.lr_policy, "CreateSolver lr_policy")
        self.metrics_spec = {MetricsType.parse(k, "CreateSolver metrics_spec"): float(v)
                             for k, v in dict(self.metrics_spec).items()}
        for name in ("batchsize", "batchsize_eval", "max_eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CTRError(f"CreateSolver {name}: expected a positive integer, found {value!r}")
        if not self.lr > 0:
            raise CTRError(f"CreateSolver lr: expected a positive learning rate, found {self.lr!r}")
        if self.use_mixed_precision and not self.scaler > 0:
            raise CTRError(f"CreateSolver scaler: expected a positive loss scale, found {self.scaler!r}")
        if not isinstance(self.compile_step, bool):
            raise CTRError(f"CreateSolver compile_step: expected True or False, found {self.compile_step!r}")
        if self.embedding_placement not in ("auto", "distributed", "localized", "parameter_server"):
            raise CTRError("CreateSolver embedding_placement: expected 'auto', 'distributed', 'localized' or "
                           f"'parameter_server', found {self.embedding_placement!r}")

    def to_json(self) -> dict:
        return _plain(asdict(self))


def CreateSolver(**kwargs: Any) -> Solver:  # noqa: N802 - HugeCTR's name
    """A `Solver` from HugeCTR's keyword arguments (`batchsize`, `lr`, `vvgpu`, `repeat_dataset`, ...)."""
    known = set(Solver.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known - _IGNORED_SOLVER_ARGS)
    if unknown:
        raise CTRError(f"CreateSolver: unknown argument(s) {unknown}; known: {sorted(known)}")
    return Solver(**{k: v for k, v in kwargs.items() if k in known})


# GPU-only knobs HugeCTR accepts; they change nothing on CPU.
_IGNORED_SOLVER_ARGS = {"device_layout", "train_intra_iteration_overlap", "train_inter_iteration_overlap",
                        "eval_intra_iteration_overlap", "eval_inter_iteration_overlap", "all_reduce_algo",
                        "grouped_all_reduce", "num_iterations_statistics", "is_dlrm", "use_holistic_cuda_graph",
                        "use_overlapped_pipeline", "gen_loss_summary", "perf_logging", "drop_epoch_remainder"}


# --- data reader ---------------------------------------------------------------------------
@dataclass
class DataReaderParams:
    """Where the training and evaluation data are and in which format (HugeCTR's `DataReaderParams`).

    `source` / `eval_source` name file lists (Norm, Parquet: first line the number of files,
    then one path per line, relative to the list's folder or absolute) or a single binary file
    (Raw). `slot_size_array` gives each slot's key range; with it, slot k's keys are offset by
    the sizes of the slots before it, as HugeCTR does for Parquet.
    """

    data_reader_type: DataReaderType_t = DataReaderType_t.Parquet
    source: Sequence[str] | str = ()
    eval_source: str = ""
    check_type: Check_t = Check_t.Non
    cache_eval_data: int = 0
    num_samples: int = 0
    eval_num_samples: int = 0
    float_label_dense: bool = False
    num_workers: int = 12
    slot_size_array: Sequence[int] = ()
    shuffle: bool = False  # luoshu: shuffle row groups and rows each pass (Parquet)

    def __post_init__(self):
        self.data_reader_type = DataReaderType_t.parse(self.data_reader_type, "DataReaderParams data_reader_type")
        self.check_type = Check_t.parse(self.check_type, "DataReaderParams check_type")
        self.source = [self.source] if isinstance(self.source, str) else [str(s) for s in self.source]
        if not self.source:
            raise CTRError("DataReaderParams source: expected a file list (or a Raw file), found nothing")
        self.slot_size_array = [int(s) for s in self.slot_size_array]
        if any(s < 1 for s in self.slot_size_array):
            raise CTRError(f"DataReaderParams slot_size_array: every slot size must be positive, "
                           f"found {self.slot_size_array}")

    def to_json(self) -> dict:
        return _plain(asdict(self))


# --- optimizer -----------------------------------------------------------------------------
@dataclass
class OptParamsPy:
    """An optimizer and its hyperparameters (HugeCTR's `OptParamsPy`); build with `CreateOptimizer`."""

    optimizer_type: Optimizer_t = Optimizer_t.Adam
    update_type: Update_t = Update_t.Global
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-7
    initial_accu_value: float = 0.0
    momentum_factor: float = 0.0
    atomic_update: bool = True
    lr: float | None = None  # luoshu: None takes the solver's lr

    def __post_init__(self):
        self.optimizer_type = Optimizer_t.parse(self.optimizer_type, "CreateOptimizer optimizer_type")
        self.update_type = Update_t.parse(self.update_type, "CreateOptimizer update_type")
        if self.update_type is Update_t.LazyGlobal and self.optimizer_type is not Optimizer_t.Adam:
            raise CTRError(f"CreateOptimizer update_type: LazyGlobal needs optimizer_type Adam, found "
                           f"{self.optimizer_type.name}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.epsilon > 0):
            raise CTRError(f"CreateOptimizer: expected 0 <= beta1, beta2 < 1 and epsilon > 0, found "
                           f"beta1={self.beta1}, beta2={self.beta2}, epsilon={self.epsilon}")

    def to_json(self) -> dict:
        return _plain(asdict(self))


def CreateOptimizer(**kwargs: Any) -> OptParamsPy:  # noqa: N802
    """An `OptParamsPy` from HugeCTR's keyword arguments (`optimizer_type`, `update_type`, `beta1`, ...)."""
    known = set(OptParamsPy.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise CTRError(f"CreateOptimizer: unknown argument(s) {unknown}; known: {sorted(known)}")
    return OptParamsPy(**kwargs)


# --- layers --------------------------------------------------------------------------------
@dataclass
class DataReaderSparseParam:
    """One sparse input: its tensor name, hotness (max keys per slot), fixed length and slot count."""

    sparse_name: str
    nnz_per_slot: int | Sequence[int] = 1
    is_fixed_length: bool = True
    slot_num: int = 1

    def __post_init__(self):
        if not isinstance(self.slot_num, int) or self.slot_num < 1:
            raise CTRError(f"DataReaderSparseParam {self.sparse_name!r} slot_num: expected a positive integer, "
                           f"found {self.slot_num!r}")
        nnz = self.nnz_per_slot
        if isinstance(nnz, (list, tuple)):
            if len(nnz) != self.slot_num:
                raise CTRError(f"DataReaderSparseParam {self.sparse_name!r} nnz_per_slot: expected "
                               f"{self.slot_num} entries (one per slot), found {len(nnz)}")
            self.nnz_per_slot = [int(n) for n in nnz]
        if min(self.nnz_list) < 1:
            raise CTRError(f"DataReaderSparseParam {self.sparse_name!r} nnz_per_slot: must be >= 1, found {nnz}")

    @property
    def nnz_list(self) -> list[int]:
        n = self.nnz_per_slot
        return list(n) if isinstance(n, list) else [int(n)] * self.slot_num

    @property
    def max_nnz(self) -> int:
        return max(self.nnz_list)

    def to_json(self) -> dict:
        return _plain(asdict(self))


@dataclass
class Input:
    """The data layer: label, dense features and the sparse inputs, each named for later layers."""

    label_dim: int | Sequence[int] = 1
    label_name: str | Sequence[str] = "label"
    dense_dim: int = 0
    dense_name: str = "dense"
    data_reader_sparse_param_array: Sequence[DataReaderSparseParam] = ()

    def __post_init__(self):
        if isinstance(self.label_dim, (list, tuple)):  # multi-task: several label tensors
            self.label_dim = [int(d) for d in self.label_dim]
            self.label_name = [str(n) for n in self.label_name]
        self.data_reader_sparse_param_array = [
            p if isinstance(p, DataReaderSparseParam) else DataReaderSparseParam(**p)
            for p in self.data_reader_sparse_param_array]
        if not isinstance(self.dense_dim, int) or self.dense_dim < 0:
            raise CTRError(f"Input dense_dim: expected an integer >= 0, found {self.dense_dim!r}")

    @property
    def total_label_dim(self) -> int:
        return sum(self.label_dim) if isinstance(self.label_dim, list) else int(self.label_dim)

    def to_json(self) -> dict:
        d = _plain({k: v for k, v in asdict(self).items() if k != "data_reader_sparse_param_array"})
        d["data_reader_sparse_param_array"] = [p.to_json() for p in self.data_reader_sparse_param_array]
        return {"type": "Input", **d}


@dataclass
class SparseEmbedding:
    """An embedding table over one sparse input: each slot's keys become one vector (sum or mean)."""

    embedding_type: Embedding_t = Embedding_t.DistributedSlotSparseEmbeddingHash
    workspace_size_per_gpu_in_mb: float = 0
    embedding_vec_size: int = 1
    combiner: str = "sum"
    sparse_embedding_name: str = ""
    bottom_name: str = ""
    slot_size_array: Sequence[int] = ()
    optimizer: OptParamsPy | None = None
    max_vocabulary_size_per_gpu: int = 0

    def __post_init__(self):
        self.embedding_type = Embedding_t.parse(self.embedding_type, f"SparseEmbedding {self.sparse_embedding_name!r} "
                                                                     "embedding_type")
        if isinstance(self.optimizer, dict):
            self.optimizer = OptParamsPy(**self.optimizer)
        self.slot_size_array = [int(s) for s in self.slot_size_array]

    def to_json(self) -> dict:
        d = _plain({k: v for k, v in asdict(self).items() if k != "optimizer"})
        d["optimizer"] = None if self.optimizer is None else self.optimizer.to_json()
        return {"type": "SparseEmbedding", **d}


# Each supported dense layer type and its parameters with HugeCTR's defaults.
_DEFAULT_INIT = Initializer_t.Default
_LOSS_PARAMS = {"use_regularizer": False, "regularizer_type": Regularizer_t.L1, "lambda": 0.0}
SUPPORTED_LAYERS: dict[Layer_t, dict[str, Any]] = {
    Layer_t.InnerProduct: {"num_output": 1, "weight_init_type": _DEFAULT_INIT, "bias_init_type": _DEFAULT_INIT},
    Layer_t.FusedInnerProduct: {"num_output": 1, "weight_init_type": _DEFAULT_INIT, "bias_init_type": _DEFAULT_INIT},
    Layer_t.MLP: {"num_outputs": (), "act_type": Activation_t.Relu, "use_bias": True, "activations": (),
                  "biases": (), "weight_init_type": _DEFAULT_INIT, "bias_init_type": _DEFAULT_INIT},
    Layer_t.ReLU: {},
    Layer_t.Sigmoid: {},
    Layer_t.ELU: {"elu_alpha": 1.0},
    Layer_t.Softmax: {},
    Layer_t.Dropout: {"dropout_rate": 0.5},
    Layer_t.Concat: {"axis": 1},
    Layer_t.Reshape: {"leading_dim": 0, "time_step": 0, "selected": False, "selected_slots": ()},
    Layer_t.Slice: {"ranges": ()},
    Layer_t.MultiCross: {"num_layers": 0, "projection_dim": 0, "weight_init_type": _DEFAULT_INIT,
                         "bias_init_type": _DEFAULT_INIT},
    Layer_t.FmOrder2: {"out_dim": 0},
    Layer_t.WeightMultiply: {"weight_dims": (), "weight_init_type": _DEFAULT_INIT},
    Layer_t.DotProduct: {},
    Layer_t.ElementwiseMultiply: {},
    Layer_t.Add: {},
    Layer_t.Sub: {},
    Layer_t.ReduceSum: {"axis": 1},
    Layer_t.ReduceMean: {"axis": 1},
    Layer_t.Interaction: {},
    Layer_t.BatchNorm: {"factor": 1.0, "eps": 1e-5, "gamma_init_type": _DEFAULT_INIT, "beta_init_type": _DEFAULT_INIT},
    Layer_t.LayerNorm: {"eps": 1e-5, "gamma_init_type": _DEFAULT_INIT, "beta_init_type": _DEFAULT_INIT},
    Layer_t.BinaryCrossEntropyLoss: dict(_LOSS_PARAMS),
    Layer_t.CrossEntropyLoss: dict(_LOSS_PARAMS),
    Layer_t.MultiCrossEntropyLoss: {**_LOSS_PARAMS, "target_weight_vec": ()},
}
LOSS_LAYERS = (Layer_t.BinaryCrossEntropyLoss, Layer_t.CrossEntropyLoss, Layer_t.MultiCrossEntropyLoss)
_INIT_PARAMS = ("weight_init_type", "bias_init_type", "gamma_init_type", "beta_init_type")


class DenseLayer:
    """A dense layer or loss: `layer_type`, the tensors it reads (`bottom_names`) and writes
    (`top_names`), and the type's parameters (HugeCTR's names and defaults; `lambda` may be
    passed as `lambda_` or `**{"lambda": x}`). Unknown types and parameters are reported by
    `Model.compile()`, naming the layer."""

    def __init__(self, layer_type=None, bottom_names: Sequence[str] = (), top_names: Sequence[str] = (),
                 **params: Any):
        self.layer_type = layer_type
        self.bottom_names = [bottom_names] if isinstance(bottom_names, str) else list(bottom_names)
        self.top_names = [top_names] if isinstance(top_names, str) else list(top_names)
        if "lambda_" in params:
            params["lambda"] = params.pop("lambda_")
        self.params = params

    def resolved(self, where: str) -> tuple[Layer_t, dict[str, Any]]:
        """The layer type and its full parameter dict (defaults filled in); raises naming `where`."""
        try:
            kind = Layer_t.parse(self.layer_type, f"{where} layer_type")
        except CTRError:
            raise CTRError(f"{where}: unknown layer type {self.layer_type!r}; luoshu.ctr builds "
                           f"{sorted(k.name for k in SUPPORTED_LAYERS)}") from None
        if kind not in SUPPORTED_LAYERS:
            raise CTRError(f"{where}: layer type {kind.name} is not supported by luoshu.ctr; it builds "
                           f"{sorted(k.name for k in SUPPORTED_LAYERS)}")
        defaults = SUPPORTED_LAYERS[kind]
        unknown = sorted(set(self.params) - set(defaults))
        if unknown:
            raise CTRError(f"{where}: unknown parameter(s) {unknown} for a {kind.name} layer; it takes "
                           f"{sorted(defaults) or 'none'}")
        params = {**defaults, **self.params}
        for name in _INIT_PARAMS:
            if name in params:
                params[name] = Initializer_t.parse(params[name], f"{where} {name}")
        if "regularizer_type" in params:
            params["regularizer_type"] = Regularizer_t.parse(params["regularizer_type"], f"{where} regularizer_type")
        if kind is Layer_t.MLP:
            params["act_type"] = Activation_t.parse(params["act_type"], f"{where} act_type")
            params["activations"] = [Activation_t.parse(a, f"{where} activations") for a in params["activations"]]
        return kind, params

    def to_json(self) -> dict:
        kind = self.layer_type.name if isinstance(self.layer_type, _Enum) else self.layer_type
        return {"type": "DenseLayer", "layer_type": kind, "bottom_names": list(self.bottom_names),
                "top_names": list(self.top_names), **_plain(self.params)}

    def __repr__(self) -> str:
        return f"DenseLayer({self.layer_type!r}, bottom_names={self.bottom_names}, top_names={self.top_names})"


def layer_from_json(d: dict):
    """The `Input`, `SparseEmbedding` or `DenseLayer` a `to_json()` dict describes."""
    d = dict(d)
    kind = d.pop("type", None)
    if kind == "Input":
        return Input(**d)
    if kind == "SparseEmbedding":
        return SparseEmbedding(**d)
    if kind == "DenseLayer":
        return DenseLayer(d.pop("layer_type", None), d.pop("bottom_names", ()), d.pop("top_names", ()), **d)
    raise CTRError(f"graph JSON: a layer must have type Input, SparseEmbedding or DenseLayer, found {kind!r}")
