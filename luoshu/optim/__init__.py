"""Optimizers, learning-rate schedulers, gradient clipping and dynamic loss scaling."""

from luoshu.optim.loss_scaler import LossScaler
from luoshu.optim.optimizer import Optimizer, OptimizerUpdate, clip_grad_norm_
from luoshu.optim.optimizers import (
    LAMB,
    SGD,
    AdaGrad,
    Adagrad,
    Adam,
    AdamW,
    Momentum,
    Nesterov,
    RMSProp,
    RMSprop,
)
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
    "LAMB", "SGD", "AdaGrad", "Adagrad", "Adam", "AdamW", "CosineAnnealingLR", "CosineWarmup",
    "ExponentialLR", "LRScheduler", "LinearWarmup", "LossScaler", "Momentum", "MultiStepLR", "Nesterov",
    "Optimizer", "OptimizerUpdate", "RMSProp", "RMSprop", "ReduceLROnPlateau", "StepLR", "clip_grad_norm_",
]
