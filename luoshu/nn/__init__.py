"""Modules, layers, initialisers and the functional API (`luoshu.nn.functional`).

Graph layers are `luoshu.nn.Module`s too but live in `luoshu.gnn` (`ls.gnn.GCNConv`,
`ls.gnn.SAGEConv`, `ls.gnn.GATConv`, the global pooling functions): DESIGN.md section 1
puts `gnn` among the domains, above `nn`, so this package does not import them.
"""

from luoshu.nn import functional, init
from luoshu.nn.attention import MultiheadAttention
from luoshu.nn.container import ModuleDict, ModuleList
from luoshu.nn.conv import AdaptiveAvgPool2d, AvgPool2d, Conv1d, Conv2d, ConvTranspose2d, MaxPool2d
from luoshu.nn.layers import (
    ELU,
    GELU,
    Dropout,
    Embedding,
    EmbeddingBag,
    Flatten,
    Identity,
    LeakyReLU,
    Linear,
    LogSoftmax,
    ReLU,
    Sequential,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from luoshu.nn.module import Module, Parameter
from luoshu.nn.norm import BatchNorm1d, BatchNorm2d, GroupNorm, LayerNorm, RMSNorm
from luoshu.nn.parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from luoshu.nn.recompute import recompute
from luoshu.nn.recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell
from luoshu.nn.transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "ELU", "GELU", "Embedding", "Flatten", "Identity", "LeakyReLU", "Linear", "LogSoftmax", "Module",
    "Parameter", "ReLU", "Sequential", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh", "functional", "init",
    # convolution and pooling
    "AdaptiveAvgPool2d", "AvgPool2d", "Conv1d", "Conv2d", "ConvTranspose2d", "MaxPool2d",
    # normalisation and regularisation
    "BatchNorm1d", "BatchNorm2d", "Dropout", "GroupNorm", "LayerNorm", "RMSNorm",
    # embeddings, recurrent, attention
    "EmbeddingBag", "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNBase", "RNNCell", "MultiheadAttention",
    "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer",
    # containers
    "ModuleDict", "ModuleList",
    # tensor parallel
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    # memory
    "recompute",
]
