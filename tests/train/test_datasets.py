"""luoshu.train.datasets: the dataset table and the readers behind it, each training a tiny job."""

import struct
from pathlib import Path

import numpy as np
import pytest

import luoshu as ls
from luoshu import models
from luoshu.data import synthetic_ctr, write_criteo, write_ctr_parquet
from luoshu.train import DATASETS, TrainConfig, TrainConfigError, Trainer, train
from luoshu.train.datasets import _crop_and_flip


def _movielens(path: Path, users=40, items=120, groups=4, per_user=15, seed=0):
    """u.data ratings where each user rates items of their group's quarter of the catalogue."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(users):
        group = u % groups
        chosen = rng.choice(np.arange(group, items, groups), per_user, replace=False)
        lines += [f"{u + 1}\t{i + 1}\t{rng.integers(1, 6)}\t{1000 + t}" for t, i in enumerate(chosen)]
    path.write_text("\n".join(lines) + "\n")



def test_ncf_on_movielens_beats_chance(tmp_path):
    _movielens(tmp_path / "u.data")
    metrics = train(TrainConfig(model="ncf", dataset="movielens", data_path=str(tmp_path / "u.data"),
                                model_args={"gmf_dim": 8, "mlp_dims": [16, 8]}, batch_size=128, epochs=6, lr=0.01,
                                out=str(tmp_path / "job"), progress=False))
    # 1 held-out item among 100 candidates: chance is HR@10 = 0.1; a user's group makes it learnable
    assert metrics["hr@10"] > 0.3, metrics
    assert 0 < metrics["ndcg@10"] <= metrics["hr@10"]



@pytest.mark.parametrize("fmt", ["criteo", "parquet"])
def test_ctr_files_train(tmp_path, fmt):
    data = synthetic_ctr(1200, slot_sizes=[20] * 26, seed=3)
    path = tmp_path / ("day_0.tsv" if fmt == "criteo" else "part.parquet")
    write_criteo(path, data) if fmt == "criteo" else write_ctr_parquet(path, data)
    data_args = {"num_buckets": 64} if fmt == "criteo" else {}
    metrics = train(TrainConfig(model="wdl", dataset=fmt, data_path=str(path), data_args=data_args,
                                model_args={"embedding_dim": 4, "mlp_dims": [16]}, batch_size=100, max_steps=6,
                                out=str(tmp_path / "job"), progress=False))
    assert 0 <= metrics["auc"] <= 1 and metrics["log_loss"] > 0



def _write_image_files(root: Path, kind: str) -> None:
    """Tiny MNIST (IDX) or CIFAR-10 (binary batch) files in the real formats."""
    rng = np.random.default_rng(0)
    if kind == "mnist":
        for split, n in (("train", 24), ("t10k", 8)):
            for name, data in ((f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                               (f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))):
                header = struct.pack(">BBBB", 0, 0, 0x08, data.ndim) + struct.pack(f">{data.ndim}I", *data.shape)
                (root / name).write_bytes(header + data.tobytes())
        return
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, (6, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
        (root / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())



@pytest.mark.parametrize("dataset,model,model_args", [
    ("mnist", "lenet", {}),
    ("cifar10", "lenet", {}),
])
def test_image_files_train(tmp_path, dataset, model, model_args):
    _write_image_files(tmp_path, dataset)
    trainer = Trainer(TrainConfig(model=model, dataset=dataset, data_path=str(tmp_path), model_args=model_args,
                                  batch_size=8, max_steps=2, out=str(tmp_path / "job"), progress=False))
    channels = 1 if dataset == "mnist" else 3
    assert trainer.feeds["image"].shape == (None, channels, 28 if dataset == "mnist" else 32, 28 if
                                            dataset == "mnist" else 32)
    metrics = trainer.fit()
    assert 0 <= metrics["accuracy"] <= 1 and len(trainer.data.eval["label"]) == (8 if dataset == "mnist" else 6)



def test_cifar_augmentation_is_a_seeded_crop_and_flip():
    images = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    out = _crop_and_flip(images, np.random.default_rng(5))
    again = _crop_and_flip(images, np.random.default_rng(5))
    np.testing.assert_array_equal(out, again)
    rng = np.random.default_rng(5)
    top, left, flip = rng.integers(0, 9, 16), rng.integers(0, 9, 16), rng.random(16) < 0.5
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(16):
        expected = padded[i, :, top[i]:top[i] + 8, left[i]:left[i] + 8]
        np.testing.assert_array_equal(out[i], expected[:, :, ::-1] if flip[i] else expected)



def test_dataset_table_is_complete():
    assert {"digits", "mnist", "cifar10", "cifar100", "movielens", "criteo", "parquet", "synthetic-ctr", "copy",
            "reverse", "synthetic-lm"} <= set(DATASETS)
    served = {t for spec in DATASETS.values() for t in spec.tasks}
    assert {task for _, _, task in models.MODELS.values()} <= served



def test_streaming_needs_eval_data_and_a_length(tmp_path):
    write_criteo(tmp_path / "day_0", synthetic_ctr(100, slot_sizes=[5] * 26))
    with pytest.raises(TrainConfigError, match="needs eval data"):
        Trainer(TrainConfig(model="lr", dataset="criteo", data_path=str(tmp_path / "day_0"),
                            data_args={"stream": True}, out=str(tmp_path / "job")))
    with pytest.raises(TrainConfigError, match="unknown length: give --max-steps"):
        Trainer(TrainConfig(model="lr", dataset="criteo", data_path=str(tmp_path / "day_0"),
                            data_args={"stream": True, "eval_path": str(tmp_path / "day_0")},
                            out=str(tmp_path / "job")))


def _ctr_columns(n: int = 600, seed: int = 3) -> dict:
    from luoshu.data import ctr_to_columns

    return ctr_to_columns(synthetic_ctr(n, slot_sizes=[20] * 26, seed=seed))


def _parquet_job(tmp_path, data_path, **kw):
    return TrainConfig(**{"model": "lr", "dataset": "parquet", "data_path": str(data_path), "batch_size": 100,
                          "max_steps": 2, "out": str(tmp_path / "job"), "progress": False, **kw})


@pytest.mark.parametrize("stream", [False, True])
def test_parquet_with_strings_in_an_id_column_is_refused_by_name(tmp_path, stream):
    from luoshu.data import write_parquet

    columns = _ctr_columns()
    columns["C3"] = np.array([f"id{v}" for v in columns["C3"]])
    write_parquet(tmp_path / "a.parquet", columns)
    write_parquet(tmp_path / "b.parquet", columns)
    with pytest.raises(ls.Error, match=r"a.parquet: column 'C3' holds string values; the sparse columns C1.. hold "
                                       "integer ids"):
        Trainer(_parquet_job(tmp_path, tmp_path, data_args={"stream": stream}, max_steps=2))
    columns = _ctr_columns()
    columns["I2"] = np.array(["x"] * len(columns["I2"]))
    write_parquet(tmp_path / "a.parquet", columns)
    with pytest.raises(ls.Error, match="column 'I2' holds string values; expected numbers"):
        Trainer(_parquet_job(tmp_path, tmp_path / "a.parquet"))


def test_streamed_eval_file_missing_a_column_is_refused(tmp_path):
    from luoshu.data import write_parquet

    write_parquet(tmp_path / "train.parquet", _ctr_columns())
    held = _ctr_columns(seed=4)
    del held["C26"]
    write_parquet(tmp_path / "eval.parquet", held)
    with pytest.raises(ls.Error, match=r"eval.parquet does not have the columns of .*train.parquet: it lacks "
                                       r"\['C26'\]"):
        Trainer(_parquet_job(tmp_path, tmp_path / "train.parquet",
                             data_args={"stream": True, "eval_path": str(tmp_path / "eval.parquet")}))


def test_parquet_missing_feature_columns_is_stated_and_refused_when_the_model_names_them(tmp_path, capsys):
    from luoshu.data import write_parquet

    columns = _ctr_columns()
    del columns["I5"], columns["C7"]
    write_parquet(tmp_path / "part.parquet", columns)
    trainer = Trainer(_parquet_job(tmp_path, tmp_path / "part.parquet"))
    assert "no column I5, C7; training on 12 dense and 25 sparse columns" in capsys.readouterr().err
    assert trainer.data.train["dense"].shape[1] == 12 and trainer.data.train["sparse"].shape[1] == 25
    with pytest.raises(TrainConfigError, match="dense_dim=13 does not fit the dataset, which needs dense_dim=12"):
        Trainer(_parquet_job(tmp_path, tmp_path / "part.parquet", model_args={"dense_dim": 13}))
    with pytest.raises(TrainConfigError, match="slot_sizes"):
        Trainer(_parquet_job(tmp_path, tmp_path / "part.parquet", model_args={"slot_sizes": [21] * 26}))
    capsys.readouterr()
    write_parquet(tmp_path / "part.parquet", _ctr_columns())  # the full layout: nothing to state
    Trainer(_parquet_job(tmp_path, tmp_path / "part.parquet"))
    assert "no column" not in capsys.readouterr().err


def test_nan_labels_are_reported_as_bad_data_not_divergence(tmp_path):
    from luoshu.data import write_parquet

    columns = _ctr_columns()
    columns["label"][17] = np.nan
    write_parquet(tmp_path / "part.parquet", columns)
    with pytest.raises(ls.data.DataError, match=r"NaN or infinite values \(1 in 'label'\).*not divergence"):
        train(_parquet_job(tmp_path, tmp_path / "part.parquet", data_args={"eval_fraction": 0.5}, max_steps=3))
