"""Modules, layers, initialisers and the functional API (`luoshu.nn.functional`)."""

from luoshu.nn import functional, init
from luoshu.nn.layers import (
    ELU,
    GELU,
    Embedding,
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

__all__ = [
    "ELU", "GELU", "Embedding", "Flatten", "Identity", "LeakyReLU", "Linear", "LogSoftmax", "Module",
    "Parameter", "ReLU", "Sequential", "SiLU", "Sigmoid", "Softmax", "Softplus", "Tanh", "functional", "init",
]
