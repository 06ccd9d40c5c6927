"""luoshu.train.builders: a model's config fields that the data decides."""


import pytest

import luoshu as ls
from luoshu.train import TrainConfig, TrainConfigError, Trainer


def test_model_args_that_contradict_the_data(tmp_path):
    with pytest.raises(TrainConfigError, match=r"num_classes=5 does not fit the dataset, which needs num_classes=10"):
        Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"num_classes": 5}, out=str(tmp_path)))
    with pytest.raises(TrainConfigError, match=r"vocab_size=8 is too small for the dataset"):
        Trainer(TrainConfig(model="gpt2", dataset="copy", model_args={"vocab_size": 8}, out=str(tmp_path)))
    with pytest.raises(ls.Error, match="dropout"):
        Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"dropout": 2.0}, out=str(tmp_path)))


def test_every_zoo_default_passes_the_model_arg_check():
    """The type/range check of --model-arg must accept each config field's own default (every model)."""
    import dataclasses

    from luoshu.train.builders import check_model_args, model_table

    for name, (config_class, _, _) in model_table().items():
        for f in dataclasses.fields(config_class):
            if f.default is not dataclasses.MISSING:
                check_model_args(name, {f.name: f.default})
            elif f.default_factory is not dataclasses.MISSING:
                check_model_args(name, {f.name: f.default_factory()})
