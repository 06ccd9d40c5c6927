"""Checkpoint package format: round trip, and refusal of anything corrupt or mismatched."""

import json

import numpy as np
import pytest

import luoshu as ls
from luoshu import checkpoint, nn


def _model(seed=0, hidden=8):
    ls.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _train(model, opt, steps, rng):
    losses = []
    for _ in range(steps):
        x = ls.tensor(rng.standard_normal((8, 4)).astype(np.float32))
        y = ls.tensor(rng.integers(0, 3, 8))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _snapshot(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_round_trip_continues_the_same_trajectory(tmp_path):
    model = _model()
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 3, np.random.default_rng(0))
    ls.save(tmp_path / "ckpt", model, opt, metadata={"epoch": 3})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["graph.json", "manifest.json", "optimizer.json", "optimizer.safetensors",
                     "weights.safetensors"]
    expected = _train(model, opt, 3, np.random.default_rng(1))

    restored = _model(seed=5)
    opt2 = ls.optim.Adam(restored.parameters(), lr=0.01)
    assert ls.load(tmp_path / "ckpt", restored, opt2) == {"epoch": 3}
    np.testing.assert_allclose(_train(restored, opt2, 3, np.random.default_rng(1)), expected, rtol=1e-6)


def _saved(tmp_path):
    model = _model()
    ls.save(tmp_path / "ckpt", model)
    return tmp_path / "ckpt"


def _assert_refused(path, match):
    target = _model(seed=9)
    before = _snapshot(target)
    with pytest.raises(ls.CheckpointError, match=match):
        ls.load(path, target)
    for k, v in _snapshot(target).items():
        np.testing.assert_array_equal(v, before[k])


def test_corrupted_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    f = path / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    _assert_refused(path, "corrupt")


def test_truncated_weights_are_refused(tmp_path):
    path = _saved(tmp_path)
    f = path / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _assert_refused(path, "truncated")


def test_missing_manifest_and_wrong_version_are_refused(tmp_path):
    path = _saved(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    _assert_refused(path, "version")
    (path / "manifest.json").unlink()
    _assert_refused(path, "missing")
    _assert_refused(tmp_path / "nowhere", "no checkpoint")


def test_shape_mismatch_is_refused(tmp_path):
    ls.save(tmp_path / "big", _model(hidden=16))
    _assert_refused(tmp_path / "big", r"'0\.(weight|bias)' expects shape \(8.*found \(16")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    good = (path / "weights.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError):
        ls.save(path, _model(seed=1))
    assert (path / "weights.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    ls.load(path, _model(seed=2))
