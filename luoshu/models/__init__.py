"""The model zoo: each model is built from a small config object; `MODELS` and `build` name them.

`MODELS[name] = (ConfigClass, ModelClass, task)`, and `build(name, **fields)` returns
`ModelClass(ConfigClass(**fields))`. What a task's model takes and returns:

- "image": (B, C, H, W) float images (the MLP: any (B, ...)) -> (B, num_classes) logits.
- "sequence": (B, L) int64 ids -> (B, num_classes) logits ((B, L, num_classes) with per_token).
- "seq2seq": `forward(src (B, S), tgt (B, T))` int64 ids -> (B, T, tgt_vocab_size) logits.
- "lm": (B, L) int64 ids -> (B, L, vocab_size) next-token logits; "bert" (BertForPreTraining)
  returns `(mlm_logits (B, L, vocab), nsp_logits (B, 2))`.
- "ctr": `forward(dense (B, dense_dim) float, sparse (B, num_slots) int64)` -> (B,) click logits.
- "rating": `forward(users (B,), items (B,))` int64 -> (B,) interaction logits.
- "node": `forward(x (N, in_features), graph)` -> (N, num_classes) logits; `graph` a
  `luoshu.gnn.SparseGraph` or a sampled `MiniBatch`'s blocks (see `luoshu.gnn.models`).
"""

from __future__ import annotations

import dataclasses

from luoshu.core.errors import Error
from luoshu.gnn.models import GAT, GCN, GATConfig, GCNConfig, GraphSAGE, GraphSAGEConfig
from luoshu.models.language import (
    GPT2,
    Attention,
    Bert,
    BertConfig,
    BertForPreTraining,
    GPTConfig,
    Llama,
    LlamaConfig,
    LSTMClassifier,
    LSTMClassifierConfig,
    Transformer,
    TransformerConfig,
    apply_rotary,
    rotary_tables,
    sinusoidal_positions,
)
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
from luoshu.models.vision import (
    MLP,
    VGG16,
    AlexNet,
    AlexNetConfig,
    BasicBlock,
    Bottleneck,
    LeNet,
    LeNetConfig,
    MLPConfig,
    ResNet,
    ResNet18Config,
    ResNet34Config,
    ResNet50Config,
    ResNetConfig,
    VGG16Config,
    resnet18,
    resnet34,
    resnet50,
)

TASKS = ("image", "sequence", "seq2seq", "lm", "ctr", "rating", "node")

MODELS: dict[str, tuple[type, type, str]] = {
    "mlp": (MLPConfig, MLP, "image"),
    "lenet": (LeNetConfig, LeNet, "image"),
    "alexnet": (AlexNetConfig, AlexNet, "image"),
    "vgg16": (VGG16Config, VGG16, "image"),
    "resnet": (ResNetConfig, ResNet, "image"),
    "resnet18": (ResNet18Config, ResNet, "image"),
    "resnet34": (ResNet34Config, ResNet, "image"),
    "resnet50": (ResNet50Config, ResNet, "image"),
    "lstm": (LSTMClassifierConfig, LSTMClassifier, "sequence"),
    "transformer": (TransformerConfig, Transformer, "seq2seq"),
    "bert": (BertConfig, BertForPreTraining, "lm"),
    "gpt2": (GPTConfig, GPT2, "lm"),
    "llama": (LlamaConfig, Llama, "lm"),
    "wdl": (CTRConfig, WideAndDeep, "ctr"),
    "deepfm": (CTRConfig, DeepFM, "ctr"),
    "dcn": (CTRConfig, DCN, "ctr"),
    "dlrm": (CTRConfig, DLRM, "ctr"),
    "lr": (CTRConfig, LogisticRegression, "ctr"),
    "ncf": (NCFConfig, NCF, "rating"),
    "gcn": (GCNConfig, GCN, "node"),
    "graphsage": (GraphSAGEConfig, GraphSAGE, "node"),
    "gat": (GATConfig, GAT, "node"),
}


def build(name: str, **config_kwargs):
    """`MODELS[name]`'s model from its config built with `config_kwargs`; a clear `luoshu.Error`
    for an unknown name, an unknown or missing config field, or a value the config refuses."""
    if name not in MODELS:
        raise Error(f"build: unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    config_class, model_class, _ = MODELS[name]
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(config_kwargs) - set(known))
    if unknown:
        raise Error(f"build({name!r}): unknown config field(s) {unknown}; {config_class.__name__} has {known}")
    required = [f.name for f in dataclasses.fields(config_class)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in config_kwargs]
    if missing:
        raise Error(f"build({name!r}): {config_class.__name__} needs field(s) {missing}")
    try:
        config = config_class(**config_kwargs)
    except Error:
        raise
    except (TypeError, ValueError) as exc:
        raise Error(f"build({name!r}): bad {config_class.__name__} {config_kwargs}: {exc}") from exc
    return model_class(config)


__all__ = [
    "MODELS", "TASKS", "build",
    # vision
    "AlexNet", "AlexNetConfig", "BasicBlock", "Bottleneck", "LeNet", "LeNetConfig", "MLP", "MLPConfig", "ResNet",
    "ResNet18Config", "ResNet34Config", "ResNet50Config", "ResNetConfig", "VGG16", "VGG16Config", "resnet18",
    "resnet34", "resnet50",
    # language
    "Attention", "Bert", "BertConfig", "BertForPreTraining", "GPT2", "GPTConfig", "LSTMClassifier",
    "LSTMClassifierConfig", "Llama", "LlamaConfig", "Transformer", "TransformerConfig", "apply_rotary",
    "rotary_tables", "sinusoidal_positions",
    # recommendation
    "CTRConfig", "CrossNetwork", "DCN", "DLRM", "DeepFM", "LogisticRegression", "NCF", "NCFConfig",
    "SlotEmbedding", "WideAndDeep",
    # graphs
    "GAT", "GATConfig", "GCN", "GCNConfig", "GraphSAGE", "GraphSAGEConfig",
]
