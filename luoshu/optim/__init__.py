"""Optimizers, learning-rate schedulers, gradient clipping and dynamic loss scaling."""

from luoshu.optim.loss_scaler import LossScaler
from luoshu.optim.optimizer import Optimizer, clip_grad_norm_, gradient_value
from luoshu.optim.optimizers import (
    LAMB,
    OPTIMIZERS,
    SGD,
    AdaGrad,
    Adagrad,
    Adam,
    AdamW,
    Momentum,
    Nesterov,
    RMSProp,
    RMSprop,
    optimizer_name,
)
from luoshu.optim.rules import UpdateRule
from luoshu.optim.scheduler import (
    CosineAnnealingLR,
    CosineWarmup,
    ExponentialLR,
    LinearWarmup,
    LRScheduler,
    MultiStepLR,
    ReduceLROnPlateau,
    StepLR,
)

__all__ = [
    "LAMB", "OPTIMIZERS", "SGD", "AdaGrad", "Adagrad", "Adam", "AdamW", "CosineAnnealingLR", "CosineWarmup",
    "ExponentialLR", "LRScheduler", "LinearWarmup", "LossScaler", "Momentum", "MultiStepLR", "Nesterov", "Optimizer",
    "RMSProp", "RMSprop", "ReduceLROnPlateau", "StepLR", "UpdateRule", "clip_grad_norm_", "gradient_value",
    "optimizer_name",
]
