"""luoshu.train: the Trainer end to end, exact resume, the dataset readers behind it, every task's wiring."""

import csv
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

import luoshu as ls
from luoshu import models
from luoshu.data import synthetic_ctr, write_criteo, write_ctr_parquet
from luoshu.train import (
    DATASETS,
    TrainConfig,
    TrainConfigError,
    Trainer,
    latest_checkpoint,
    list_checkpoints,
    train,
)

TINY_CTR = {"num_samples": 3000, "eval_samples": 1000, "num_slots": 6, "max_slot_size": 50}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the TFRecord checksum, written here independently of tensorboardX."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: Path) -> list:
    """The events of one TFRecord file, checking each record's framing and CRCs."""
    from tensorboardX.proto.event_pb2 import Event

    raw, pos, events = path.read_bytes(), 0, []
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[pos + 8:pos + 12])[0] == _masked(_crc32c(header))
        data = raw[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])[0] == _masked(_crc32c(data))
        pos += 16 + length
        events.append(Event.FromString(data))
    return events


def read_scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the job's TensorBoard event files, as TensorBoard shows them: files in time order,
    and a SessionLog START at step s (a resumed run) drops the points logged earlier at steps >= s."""
    from tensorboardX.proto.event_pb2 import SessionLog

    files = [_records(f) for f in job.glob("events.out.tfevents.*")]
    assert files, f"no event file in {job}"
    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_ctr_job_writes_csv_tensorboard_and_checkpoints_that_match_sklearn(tmp_path):
    job = tmp_path / "job"
    config = TrainConfig(model="dcn", dataset="synthetic-ctr", data_args=TINY_CTR, batch_size=128, epochs=2,
                         lr=3e-3, eval_interval=10, keep_checkpoints=2, log_interval=5,
                         model_args={"embedding_dim": 4, "mlp_dims": [32, 16], "num_cross_layers": 2},
                         out=str(job), progress=False)
    metrics = train(config)
    steps = 2 * (3000 // 128)  # 46
    rows = _rows(job / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "train_loss", "auc", "log_loss", "samples_per_s", "lr"]
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40, 46]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["auc"]) == pytest.approx(metrics["auc"], abs=1e-5) and metrics["auc"] > 0.6

    scalars = read_scalars(job)
    assert [s for s, _ in scalars["eval/auc"]] == [10, 20, 30, 40, 46]
    np.testing.assert_allclose([v for _, v in scalars["eval/auc"]], [float(r["auc"]) for r in rows], rtol=1e-5)
    assert [s for s, _ in scalars["train/loss"]] == list(range(5, steps + 1, 5))
    assert all(v > 0 for _, v in scalars["train/samples_per_s"])

    # the newest two checkpoints are kept; the last one is the final model: score it independently
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [40, 46]
    ls.manual_seed(123)
    model = models.build("dcn", dense_dim=13, slot_sizes=[int(v) for v in np.geomspace(4, 50, 6).round()],
                         embedding_dim=4, mlp_dims=(32, 16), num_cross_layers=2)
    meta = ls.load(latest_checkpoint(job / "checkpoints"), model)
    assert meta["step"] == steps and meta["epoch"] == 2 and meta["config"]["model"] == "dcn"
    data = synthetic_ctr(4000, slot_sizes=[int(v) for v in np.geomspace(4, 50, 6).round()], seed=0)
    dense = np.log1p(data["dense"][3000:])
    logits = model(ls.tensor(dense), ls.tensor(data["sparse"][3000:])).numpy()
    assert roc_auc_score(data["label"][3000:], logits) == pytest.approx(metrics["auc"], abs=1e-6)
    prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert sk_log_loss(data["label"][3000:], prob) == pytest.approx(metrics["log_loss"], rel=1e-5)
    assert (job / "config.yaml").is_file()


def _interrupt_after(monkeypatch, steps: int):
    """Makes the trainer's graph raise KeyboardInterrupt (as Ctrl-C would) when step `steps + 1` starts."""
    calls = {"n": 0}
    original = ls.Graph.run

    def run(self, fetches, feed_dict=None):
        if isinstance(fetches, list) and len(fetches) == 2:  # [loss, train_op]: a training step
            calls["n"] += 1
            if calls["n"] > steps:
                raise KeyboardInterrupt
        return original(self, fetches, feed_dict)

    monkeypatch.setattr(ls.Graph, "run", run)


def _weights(checkpoint: Path) -> dict[str, np.ndarray]:
    out = {f"w.{k}": v for k, v in load_file(checkpoint / "weights.safetensors").items()}
    out.update({f"opt.{k}": v for k, v in load_file(checkpoint / "optimizer.safetensors").items()})
    return out


def test_resume_after_interruption_reaches_the_uninterrupted_parameters(tmp_path, monkeypatch):
    # dropout (random generator), momentum state and a cosine schedule must all survive the restart
    base = dict(model="mlp", dataset="digits", model_args={"hidden": [32], "dropout": 0.2}, optimizer="momentum",
                lr=0.05, lr_schedule="cosine", warmup_steps=3, batch_size=64, epochs=2, eval_interval=8,
                progress=False)
    whole = tmp_path / "whole"
    train(TrainConfig(**base, out=str(whole)))

    cut = tmp_path / "cut"
    _interrupt_after(monkeypatch, 13)  # mid-epoch, between two evaluations
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(cut)))
    monkeypatch.undo()
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000013"
    # the interrupted run also wrote a checkpoint at step 8; resume takes the newest
    resumed = Trainer(TrainConfig(**base, out=str(cut), resume=True))
    resumed.fit()

    final_whole, final_cut = latest_checkpoint(whole / "checkpoints"), latest_checkpoint(cut / "checkpoints")
    assert final_whole.name == final_cut.name == f"step-{2 * (1437 // 64):08d}"
    a, b = _weights(final_whole), _weights(final_cut)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows_whole, rows_cut = _rows(whole / "metrics.csv"), _rows(cut / "metrics.csv")
    drop = ("samples_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_whole] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows_cut]
    assert float(rows_cut[-1]["accuracy"]) > 0.85
    # TensorBoard: the resumed run's points continue the first file's, without duplicates
    steps = [s for s, _ in read_scalars(cut)["eval/accuracy"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) == len(rows_cut)


def test_fresh_run_starts_over_and_resume_refuses_another_job(tmp_path):
    job = tmp_path / "job"
    base = dict(model="lr", dataset="synthetic-ctr", data_args=TINY_CTR, batch_size=256, max_steps=4,
                out=str(job), progress=False)
    train(TrainConfig(**base, seed=1))
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [4]
    with pytest.raises(TrainConfigError, match=r"trained with seed=1, this job has seed=2"):
        Trainer(TrainConfig(**base, seed=2, resume=True)).fit()
    train(TrainConfig(**{**base, "max_steps": 3}, seed=2))  # not resuming: the old checkpoints go
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [3]
    assert len(_rows(job / "metrics.csv")) == 1
    with pytest.raises(TrainConfigError, match="no checkpoint in"):
        Trainer(TrainConfig(**{**base, "out": str(tmp_path / "empty")}, resume=True)).fit()


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


# one tiny job per task the zoo serves: the data, the model and the metrics fit together
WIRING = [
    ("mlp", "digits", {"hidden": [16]}, {}),
    ("lenet", "digits", {"image_size": 8}, {}),
    ("lstm", "synthetic-text", {"embed_dim": 8, "hidden_size": 8}, {"num_samples": 128, "eval_samples": 32}),
    ("transformer", "reverse", {"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                                "dim_feedforward": 32}, {"num_samples": 128, "eval_samples": 32, "max_len": 6}),
    ("gpt2", "copy", {"n_layer": 1, "n_head": 2, "n_embd": 16}, {"num_samples": 128, "eval_samples": 32,
                                                                 "max_len": 6}),
    ("llama", "synthetic-lm", {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 8},
     {"num_docs": 40, "vocab": 32, "seq_len": 8, "max_len": 32}),
    ("bert", "synthetic-lm", {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
     {"num_docs": 40, "vocab": 32, "seq_len": 8, "max_len": 32}),
    ("dlrm", "synthetic-ctr", {"embedding_dim": 4, "mlp_dims": [8], "bottom_mlp_dims": [8]}, TINY_CTR),
]


@pytest.mark.parametrize("model,dataset,model_args,data_args", WIRING, ids=[w[0] for w in WIRING])
def test_every_task_trains_and_evaluates(tmp_path, model, dataset, model_args, data_args):
    trainer = Trainer(TrainConfig(model=model, dataset=dataset, model_args=model_args, data_args=data_args,
                                  batch_size=32, max_steps=2, out=str(tmp_path), progress=False))
    metrics = trainer.fit()
    assert trainer.step == 2 and set(metrics) == set(trainer.task.metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    if trainer.task_name == "lm":  # perplexity is exp(mean NLL) over the scored tokens: at most ~vocab early on
        assert 1 < metrics["perplexity"] < 4 * trainer.data.min_info["vocab_size"]


def test_masked_lm_inputs_for_bert(tmp_path):
    trainer = Trainer(TrainConfig(model="bert", dataset="synthetic-lm", model_args=WIRING[6][2],
                                  data_args=WIRING[6][3], batch_size=32, max_steps=1, out=str(tmp_path),
                                  progress=False))
    assert trainer.model.config.vocab_size == 33  # 32 tokens and [MASK]
    tokens = trainer.data.train["tokens"][:64]
    batch = trainer.data.transform({"tokens": tokens, "targets": tokens}, np.random.default_rng(0), True)
    scored = batch["targets"] != -100
    np.testing.assert_array_equal(batch["targets"][scored], tokens[scored])
    assert 0.1 < scored.mean() < 0.2
    assert np.mean(batch["tokens"][scored] == 32) > 0.6 and not np.any(batch["tokens"][~scored] == 32)


def test_cifar_augmentation_is_a_seeded_crop_and_flip():
    from luoshu.train import _crop_and_flip

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
    from luoshu.train import load_config

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


def test_model_args_that_contradict_the_data(tmp_path):
    with pytest.raises(TrainConfigError, match=r"num_classes=5 does not fit the dataset, which needs num_classes=10"):
        Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"num_classes": 5}, out=str(tmp_path)))
    with pytest.raises(TrainConfigError, match=r"vocab_size=8 is too small for the dataset"):
        Trainer(TrainConfig(model="gpt2", dataset="copy", model_args={"vocab_size": 8}, out=str(tmp_path)))
    with pytest.raises(ls.Error, match="dropout"):
        Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"dropout": 2.0}, out=str(tmp_path)))


def test_dataset_table_is_complete():
    assert {"digits", "mnist", "cifar10", "cifar100", "movielens", "criteo", "parquet", "synthetic-ctr", "copy",
            "reverse", "synthetic-lm"} <= set(DATASETS)
    served = {t for spec in DATASETS.values() for t in spec.tasks}
    assert {task for _, _, task in models.MODELS.values()} <= served


def test_bf16_precision_keeps_fp32_weights_and_learns(tmp_path):
    trainer = Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"hidden": [64]}, precision="bf16",
                                  lr=3e-3, batch_size=32, epochs=3, out=str(tmp_path), progress=False))
    metrics = trainer.fit()
    assert trainer.eval_output.dtype == "bfloat16" and trainer.loss.dtype == "float32"
    weights = load_file(latest_checkpoint(tmp_path / "checkpoints") / "weights.safetensors")
    assert all(w.dtype == np.float32 for w in weights.values())
    assert metrics["accuracy"] > 0.9, metrics


@pytest.mark.parametrize("fmt", ["criteo", "parquet"])
def test_streamed_ctr_files_resume_exactly(tmp_path, monkeypatch, fmt):
    """stream=true: files read batch by batch while training, eval data held out, several passes, and a
    resumed run (which re-reads the pass up to its batch) ends with the uninterrupted run's weights."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for day in range(3):  # days 0, 1 train; day 2 (the last file) is the eval set
        data = synthetic_ctr(200, slot_sizes=[30] * 26, seed=day)
        if fmt == "criteo":
            write_criteo(data_dir / f"day_{day}", data, chunk_rows=128)
        else:
            write_ctr_parquet(data_dir / f"day_{day}.parquet", data, row_group_size=100)
    data_args = {"stream": True, **({"num_buckets": 32} if fmt == "criteo" else {})}
    base = dict(model="wdl", dataset=fmt, data_path=str(data_dir), data_args=data_args, batch_size=64,
                model_args={"embedding_dim": 4, "mlp_dims": [8]}, eval_interval=4, progress=False)
    # 400 training rows = 6 batches of 64 per pass: 12 steps make two passes
    length = {"max_steps": 12} if fmt == "criteo" else {"epochs": 2}
    whole = Trainer(TrainConfig(**base, **length, out=str(tmp_path / "whole")))
    assert whole.data.train == {} and len(whole.data.eval["label"]) == 200
    metrics = whole.fit()
    # a Criteo pass is known to be over only once the files run out: the 12th step ends before that
    assert whole.epoch == (1 if fmt == "criteo" else 2) and 0 <= metrics["auc"] <= 1
    _interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, **length, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    resumed = Trainer(TrainConfig(**base, **length, out=str(tmp_path / "cut"), resume=True))
    resumed.fit()
    assert resumed.step == whole.step
    a = _weights(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    b = _weights(latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_streaming_needs_eval_data_and_a_length(tmp_path):
    write_criteo(tmp_path / "day_0", synthetic_ctr(100, slot_sizes=[5] * 26))
    with pytest.raises(TrainConfigError, match="needs eval data"):
        Trainer(TrainConfig(model="lr", dataset="criteo", data_path=str(tmp_path / "day_0"),
                            data_args={"stream": True}, out=str(tmp_path / "job")))
    with pytest.raises(TrainConfigError, match="unknown length: give --max-steps"):
        Trainer(TrainConfig(model="lr", dataset="criteo", data_path=str(tmp_path / "day_0"),
                            data_args={"stream": True, "eval_path": str(tmp_path / "day_0")},
                            out=str(tmp_path / "job")))
