"""luoshu.train.config: settings from files and mappings, and the one check that refuses a bad job."""


import pytest

import luoshu as ls
from luoshu.train import TrainConfig, TrainConfigError, Trainer, load_config
from luoshu.train import config as config_module
from tests.train.harness import TINY_CTR


@pytest.mark.parametrize("values,match", [
    ({"model": "dcnn"}, r"unknown model 'dcnn' \(did you mean 'dcn'\?\)"),
    ({"dataset": "cifar"}, r"unknown dataset 'cifar'"),
    ({"optimizer": "adamax"}, r"unknown optimizer 'adamax'.*known optimizers: sgd"),
    ({"model": "resnet18"},
     r"'resnet18' \(image task\) does not fit dataset 'synthetic-ctr' \(ctr data\); models for it: dcn"),
    ({"dataset": "mnist", "model": "lenet"}, r"reads local files: pass --data-path"),
    ({"dataset": "criteo", "data_path": "/no/such/file.tsv"}, r"data path /no/such/file.tsv does not exist"),
    ({"model_args": {"hiden": 3}}, r"model 'dcn' has no config field 'hiden'"),
    ({"data_args": {"samples": 3}}, r"dataset 'synthetic-ctr' has no option 'samples'"),
    ({"data_args": {"num_samples": "abc"}}, r"option num_samples='abc' must be a non-negative integer"),
    ({"data_args": {"max_slot_size": 1.5}}, r"option max_slot_size=1.5 must be a non-negative integer"),
    ({"data_args": {"dist": 3}}, r"option dist=3 must be a string"),
    ({"device": "tpu"}, r"device 'tpu'"),
    ({"device": "cuda:7"}, r"device 'cuda:7' is not available"),
    ({"model": "ncf", "dataset": "movielens", "data_path": "."}, None),  # a directory: the reader names the file
])
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, values, match):
    out = tmp_path / "job"
    with pytest.raises(ls.Error, match=match):
        Trainer(TrainConfig(**values, out=str(out), progress=False)).fit()
    assert not out.exists()



def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    (tmp_path / "job.yaml").write_text("lr: 3e-4\nweight_decay: 1e-5\n")
    config = TrainConfig.from_dict(load_config(tmp_path / "job.yaml"))
    assert config.lr == 3e-4 and config.weight_decay == 1e-5



@pytest.mark.parametrize("values,match", [
    ({"epochs": 0}, "epochs must be a positive integer"),
    ({"lr": -1}, "lr must be a positive number"),
    ({"bogus": 1}, "unknown setting 'bogus'"),
    ({"lr_schedule": "linear"}, "lr_schedule must be 'constant' or 'cosine'"),
])
def test_bad_settings(values, match):
    with pytest.raises(TrainConfigError, match=match):
        TrainConfig.from_dict(values)


def test_a_config_is_checked_once_and_again_once_changed(tmp_path, monkeypatch):
    passes = []
    check_values = config_module._check_values
    monkeypatch.setattr(config_module, "_check_values",
                        lambda config, source: (passes.append(source), check_values(config, source)))
    config = TrainConfig.from_dict({"model": "lr", "data_args": dict(TINY_CTR), "epochs": 1, "out": str(tmp_path),
                                    "progress": False}, "luoshu train")
    Trainer(config)  # the command line's path: from_dict checked it, the Trainer does not again
    assert passes == ["luoshu train"]
    config.epochs = True  # equal to the 1 that passed, but not an integer setting
    with pytest.raises(TrainConfigError, match="config: epochs must be a positive integer, found True"):
        Trainer(config)
    config.epochs = 1
    config.model_args["hiden"] = 3  # a mapping changed in place is a change too
    with pytest.raises(TrainConfigError, match="model 'lr' has no config field 'hiden'"):
        Trainer(config)
    assert passes == ["luoshu train", "config", "config"]
    assert not (tmp_path / "metrics.csv").exists()
