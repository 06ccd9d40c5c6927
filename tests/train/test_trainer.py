"""luoshu.train.trainer: a job end to end (metrics.csv, TensorBoard, checkpoints scored independently),
exact resume after an interruption, starting over, mixed precision."""


import numpy as np
import pytest
from safetensors.numpy import load_file
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

import luoshu as ls
from luoshu import models
from luoshu.data import synthetic_ctr, write_criteo, write_ctr_parquet
from luoshu.train import TrainConfig, TrainConfigError, Trainer, latest_checkpoint, list_checkpoints, train
from tests.train.harness import TINY_CTR, checkpoint_arrays, interrupt_after, read_rows, read_scalars


def test_ctr_job_writes_csv_tensorboard_and_checkpoints_that_match_sklearn(tmp_path):
    job = tmp_path / "job"
    config = TrainConfig(model="dcn", dataset="synthetic-ctr", data_args=TINY_CTR, batch_size=128, epochs=2,
                         lr=3e-3, eval_interval=10, keep_checkpoints=2, log_interval=5,
                         model_args={"embedding_dim": 4, "mlp_dims": [32, 16], "num_cross_layers": 2},
                         out=str(job), progress=False)
    metrics = train(config)
    steps = 2 * (3000 // 128)  # 46
    rows = read_rows(job / "metrics.csv")
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



def test_resume_after_interruption_reaches_the_uninterrupted_parameters(tmp_path, monkeypatch):
    # dropout (random generator), momentum state and a cosine schedule must all survive the restart
    base = dict(model="mlp", dataset="digits", model_args={"hidden": [32], "dropout": 0.2}, optimizer="momentum",
                lr=0.05, lr_schedule="cosine", warmup_steps=3, batch_size=64, epochs=2, eval_interval=8,
                progress=False)
    whole = tmp_path / "whole"
    train(TrainConfig(**base, out=str(whole)))

    cut = tmp_path / "cut"
    interrupt_after(monkeypatch, 13)  # mid-epoch, between two evaluations
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(cut)))
    monkeypatch.undo()
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000013"
    # the interrupted run also wrote a checkpoint at step 8; resume takes the newest
    resumed = Trainer(TrainConfig(**base, out=str(cut), resume=True))
    resumed.fit()

    final_whole, final_cut = latest_checkpoint(whole / "checkpoints"), latest_checkpoint(cut / "checkpoints")
    assert final_whole.name == final_cut.name == f"step-{2 * (1437 // 64):08d}"
    a, b = checkpoint_arrays(final_whole), checkpoint_arrays(final_cut)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    rows_whole, rows_cut = read_rows(whole / "metrics.csv"), read_rows(cut / "metrics.csv")
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
    assert len(read_rows(job / "metrics.csv")) == 1
    with pytest.raises(TrainConfigError, match="no checkpoint in"):
        Trainer(TrainConfig(**{**base, "out": str(tmp_path / "empty")}, resume=True)).fit()



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
    interrupt_after(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, **length, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    resumed = Trainer(TrainConfig(**base, **length, out=str(tmp_path / "cut"), resume=True))
    resumed.fit()
    assert resumed.step == whole.step
    a = checkpoint_arrays(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    b = checkpoint_arrays(latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _job_files(job):
    return {str(p.relative_to(job)): p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()}


def _fail_at_step(monkeypatch, step: int, how: str):
    """Training step `step` fails: "nan" returns a NaN loss (divergence), "raise" raises KeyboardInterrupt."""
    calls = {"n": 0}
    original = ls.Graph.run

    def run(self, fetches, feed_dict=None):
        if isinstance(fetches, list) and len(fetches) == 2:
            calls["n"] += 1
            if calls["n"] == step:
                if how == "raise":
                    raise KeyboardInterrupt
                out = original(self, fetches, feed_dict)
                return [np.float32("nan"), *out[1:]]
        return original(self, fetches, feed_dict)

    monkeypatch.setattr(ls.Graph, "run", run)


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_rerun_that_fails_before_its_first_checkpoint_leaves_the_previous_run_as_it_was(tmp_path, monkeypatch,
                                                                                          how, capsys):
    job = tmp_path / "job"
    base = dict(model="lr", dataset="synthetic-ctr", data_args=TINY_CTR, batch_size=256, max_steps=4,
                checkpoint_interval=2, out=str(job), progress=False)
    train(TrainConfig(**base))
    before = _job_files(job)
    assert "metrics.csv" in before and any(k.startswith("events.out") for k in before)
    _fail_at_step(monkeypatch, 1 if how == "raise" else 2, how)  # before the run's first checkpoint (step 2)
    with pytest.raises(ls.Error if how == "nan" else KeyboardInterrupt):
        train(TrainConfig(**base, lr=0.5))
    monkeypatch.undo()
    assert _job_files(job) == before, "the previous run's checkpoints, metrics and events must survive"
    assert "back as they were" in capsys.readouterr().err
    # the previous run is still resumable, and a re-run that gets to its first checkpoint replaces it
    Trainer(TrainConfig(**{**base, "max_steps": 6}, resume=True)).fit()
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [2, 4, 6]
    train(TrainConfig(**{**base, "max_steps": 2}, lr=0.5))
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [2]
    assert not any(".previous-run" in k for k in _job_files(job)) and len(read_rows(job / "metrics.csv")) == 1


def test_a_rerun_killed_before_its_first_checkpoint_is_recovered_at_the_next_start(tmp_path):
    from luoshu.train.checkpoints import PreviousRun

    job = tmp_path / "job"
    base = dict(model="lr", dataset="synthetic-ctr", data_args=TINY_CTR, batch_size=256, max_steps=4,
                out=str(job), progress=False)
    train(TrainConfig(**base))
    before = _job_files(job)
    PreviousRun(job, job / "checkpoints").set_aside()  # what a re-run does first; then it was SIGKILLed
    (job / "metrics.csv").write_text("step\n")  # ... after writing a little
    (job / "checkpoints" / "step-00000001").mkdir()  # and half a checkpoint (no manifest)
    assert latest_checkpoint(job / "checkpoints") is None
    Trainer(TrainConfig(**{**base, "max_steps": 6}, resume=True)).fit()  # --resume finds the previous run
    assert [s for s, _ in list_checkpoints(job / "checkpoints")] == [4, 6]
    assert read_rows(job / "metrics.csv")[0] == read_rows_from(before["metrics.csv"])[0]


def read_rows_from(data: bytes) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(data.decode())))


def test_resume_passes_over_a_corrupt_newest_checkpoint_and_says_so(tmp_path, capsys):
    job, whole = tmp_path / "job", tmp_path / "whole"
    base = dict(model="mlp", dataset="digits", model_args={"hidden": [16]}, optimizer="adam", lr=1e-2, batch_size=64,
                checkpoint_interval=2, keep_checkpoints=0, progress=False)
    train(TrainConfig(**base, max_steps=6, out=str(whole)))
    train(TrainConfig(**base, max_steps=4, out=str(job)))
    weights = job / "checkpoints" / "step-00000004" / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    capsys.readouterr()
    Trainer(TrainConfig(**base, max_steps=6, out=str(job), resume=True)).fit()
    err = capsys.readouterr().err
    assert "step-00000004" in err and "corrupt" in err and "resuming from" in err and "step-00000002" in err
    a, b = checkpoint_arrays(latest_checkpoint(whole / "checkpoints")), checkpoint_arrays(latest_checkpoint(
        job / "checkpoints"))
    for key in a:  # resumed at step 2: the same parameters as the run that was never interrupted
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for _, path in list_checkpoints(job / "checkpoints"):
        ls.checkpoint.verify(path)  # step 4 was written again, good this time
    for _, path in list_checkpoints(job / "checkpoints"):
        (path / "graph.json").write_text("[]")
    with pytest.raises(ls.CheckpointError, match="no checkpoint in .* can be used: step-00000006"):
        Trainer(TrainConfig(**base, max_steps=8, out=str(job), resume=True)).fit()


def test_sigterm_finishes_the_step_saves_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    import os
    import signal

    from luoshu.train.errors import Terminated

    base = dict(model="mlp", dataset="digits", model_args={"hidden": [16], "dropout": 0.1}, optimizer="momentum",
                lr=0.05, batch_size=64, max_steps=8, eval_interval=4, progress=False)
    train(TrainConfig(**base, out=str(tmp_path / "whole")))
    calls = {"n": 0}
    original = ls.Graph.run

    def run(self, fetches, feed_dict=None):
        if isinstance(fetches, list) and len(fetches) == 2:
            calls["n"] += 1
            if calls["n"] == 3:  # Kubernetes stops the pod during step 3
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, fetches, feed_dict)

    monkeypatch.setattr(ls.Graph, "run", run)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        train(TrainConfig(**base, out=str(tmp_path / "cut")))
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is previous  # the trainer's handler is gone again
    assert latest_checkpoint(tmp_path / "cut" / "checkpoints").name == "step-00000003"  # step 3 completed
    Trainer(TrainConfig(**base, out=str(tmp_path / "cut"), resume=True)).fit()
    a = checkpoint_arrays(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    b = checkpoint_arrays(latest_checkpoint(tmp_path / "cut" / "checkpoints"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_fp16_precision_scales_the_loss_keeps_fp32_weights_and_learns(tmp_path):
    trainer = Trainer(TrainConfig(model="mlp", dataset="digits", model_args={"hidden": [64]}, precision="fp16",
                                  lr=5e-3, batch_size=64, epochs=3, out=str(tmp_path), progress=False))
    assert trainer.loss_scaler is not None and trainer.loss_scaler.get_scale() == 2.0 ** 16
    metrics = trainer.fit()
    assert trainer.eval_output.dtype == "float16" and trainer.loss.dtype == "float32"
    weights = load_file(latest_checkpoint(tmp_path / "checkpoints") / "weights.safetensors")
    assert all(w.dtype == np.float32 for w in weights.values())
    assert metrics["accuracy"] > 0.9, metrics
    # every step went through the scaler (clean steps counted towards growth), and its state was saved
    saved = ls.checkpoint.verify(latest_checkpoint(tmp_path / "checkpoints"))["metadata"]["loss_scaler"]
    assert saved["_growth_tracker"] == trainer.step == 3 * (1437 // 64)
