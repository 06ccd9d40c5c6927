"""Checkpoint package format: round trip, and refusal of anything corrupt or mismatched."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

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


def _rehash(path):
    """Rewrites the manifest to match the files now in `path` (hashlib, independent of luoshu's digest),
    as an attacker who edits files and their manifest together would."""
    files = {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
             for f in sorted(path.iterdir()) if f.name != "manifest.json"}
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": files}))


def test_files_the_manifest_does_not_list_are_never_read(tmp_path):
    model = _model()
    opt = ls.optim.Adam(model.parameters(), lr=0.01)
    _train(model, opt, 2, np.random.default_rng(0))
    ls.save(tmp_path / "with_opt", model, opt)
    ls.save(tmp_path / "bare", model)  # saved without an optimizer
    real = load_file(tmp_path / "with_opt" / "optimizer.safetensors")
    tampered = {k: np.full_like(v, 123.0) for k, v in real.items()}
    save_file(tampered, tmp_path / "bare" / "optimizer.safetensors")
    shutil.copy(tmp_path / "with_opt" / "optimizer.json", tmp_path / "bare" / "optimizer.json")
    target = _model(seed=1)
    target_opt = ls.optim.Adam(target.parameters(), lr=0.01)
    before = {k: v.numpy().copy() for k, v in target_opt.state_dict()["tensors"].items()}
    with pytest.raises(ls.CheckpointError, match="optimizer.json, optimizer.safetensors, which the manifest does not"):
        ls.load(tmp_path / "bare", target, target_opt)
    assert all(not np.any(v.numpy() == 123.0) for v in target_opt.state_dict()["tensors"].values())
    assert before.keys() == target_opt.state_dict()["tensors"].keys()
    # a stray file of any name is refused too; a checkpoint without it loads
    (tmp_path / "bare" / "optimizer.json").unlink()
    (tmp_path / "bare" / "optimizer.safetensors").unlink()
    (tmp_path / "bare" / "notes.txt").write_text("hi")
    _assert_refused(tmp_path / "bare", "notes.txt, which the manifest does not list")
    (tmp_path / "bare" / "notes.txt").unlink()
    ls.load(tmp_path / "bare", target)
    with pytest.raises(ls.CheckpointError, match="holds no optimizer state"):
        ls.load(tmp_path / "bare", target, target_opt)


@pytest.mark.parametrize("graph_text", ["[1, 2]", '"text"', "3", "null"])
def test_graph_json_that_is_not_an_object_is_refused(tmp_path, graph_text):
    path = _saved(tmp_path)
    (path / "graph.json").write_text(graph_text)
    _rehash(path)
    _assert_refused(path, "expected a JSON object at the top")


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/hostname", "..", "sub/x"])
def test_manifest_names_outside_the_checkpoint_are_refused(tmp_path, name):
    path = _saved(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"x")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    _assert_refused(path, "is not a file name of the checkpoint")
