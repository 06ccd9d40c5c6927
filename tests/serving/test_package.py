"""luoshu.serving.package: every zoo model round-trips through a package and runs without its class;
corrupt, truncated and tampered packages and bad feeds are refused by name."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import luoshu as ls
from luoshu import serving
from luoshu.core.errors import CheckpointError, FeedError
from tests.serving import zoo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Every zoo model exported once (traced on batch 2), with the live model beside it."""
    root = tmp_path_factory.mktemp("packages")
    out = {}
    for name in zoo.ZOO:
        model = zoo.make(name)
        out[name] = (serving.export(root / name, model, zoo.inputs(name, 2), name=name, version=3), model)
    return out


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_round_trip_matches_the_live_model(packages, name):
    path, model = packages[name]
    loaded = serving.load(path)
    assert loaded.name == name and loaded.version == "3"
    feeds = zoo.inputs(name, 2)
    assert [s.name for s in loaded.inputs] == list(feeds)
    for spec, value in zip(loaded.inputs, feeds.values()):
        assert spec.dtype == value.dtype.name and spec.shape == (-1, *value.shape[1:])
    for batch in (1, 5):  # the batch is dynamic: neither size is the traced one
        feeds = zoo.inputs(name, batch, seed=batch)
        got = loaded(feeds)
        want = zoo.live_outputs(model, feeds)
        assert list(got) == [s.name for s in loaded.outputs] and len(got) == len(want)
        for spec, g, w in zip(loaded.outputs, got.values(), want):
            assert g.shape == w.shape and g.shape[0] == batch and spec.dtype == g.dtype.name
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_packages_load_and_run_without_the_model_classes(packages, tmp_path):
    """A fresh interpreter in which importing the zoo (or luoshu.ctr) fails loads and runs every package."""
    feeds = {name: zoo.inputs(name, 3, seed=7) for name in packages}
    np.savez(tmp_path / "feeds.npz", **{f"{n}/{k}": v for n, f in feeds.items() for k, v in f.items()})
    script = textwrap.dedent(f"""
        import sys, numpy as np

        class NoZoo:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(("luoshu.models", "luoshu.ctr")):
                    raise ImportError("the loader must not need " + name)

        sys.meta_path.insert(0, NoZoo())
        from luoshu import serving
        feeds = np.load({str(tmp_path / "feeds.npz")!r})
        results = {{}}
        for name, path in { ({n: str(p) for n, (p, _) in packages.items()})!r}.items():
            model = serving.load(path)
            inputs = {{k.split("/", 1)[1]: feeds[k] for k in feeds.files if k.startswith(name + "/")}}
            for out, value in model(inputs).items():
                results[name + "/" + out] = value
        assert not [m for m in sys.modules if m.startswith(("luoshu.models", "luoshu.ctr"))]
        np.savez({str(tmp_path / "out.npz")!r}, **results)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env, cwd=tmp_path)
    results = np.load(tmp_path / "out.npz")
    for name, (_, model) in packages.items():
        want = zoo.live_outputs(model, feeds[name])
        got = [results[k] for k in results.files if k.startswith(name + "/")]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_package_files_and_graph_json(packages):
    path, _ = packages["lenet"]
    assert sorted(p.name for p in path.iterdir()) == ["graph.json", "manifest.json", "weights.safetensors"]
    doc = json.loads((path / "graph.json").read_text())
    assert doc["format"] == "luoshu-package" and doc["format_version"] == 1
    graph = doc["graph"]
    assert graph["kind"] == "inference" and graph["version"] == 1
    assert graph["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 1, 12, 12]}]
    assert graph["outputs"][0]["shape"] == [-1, 10]
    assert {op["op"] for op in graph["ops"]} >= {"convolution", "max_pool2d", "linear"}
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((path / name).read_bytes()).hexdigest()


# --- refusing bad packages ---------------------------------------------------------------------
def _rehash(path: Path) -> None:
    """Rewrites the manifest to match the files (a consistent but tampered package)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def mlp_package(tmp_path):
    return serving.export(tmp_path / "mlp", zoo.make("mlp"), zoo.inputs("mlp", 2))


def _edit_graph(path: Path, edit) -> None:
    doc = json.loads((path / "graph.json").read_text())
    edit(doc)
    (path / "graph.json").write_text(json.dumps(doc))
    _rehash(path)


def test_corrupt_weights_are_refused(mlp_package):
    f = mlp_package / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="weights.safetensors is corrupt"):
        serving.load(mlp_package)


def test_truncated_weights_are_refused(mlp_package):
    f = mlp_package / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        serving.load(mlp_package)
    _rehash(mlp_package)  # even with a matching manifest, a cut safetensors file does not parse
    with pytest.raises(CheckpointError, match="cannot be read"):
        serving.load(mlp_package)


def test_missing_files_and_wrong_format_version_are_refused(mlp_package):
    manifest = json.loads((mlp_package / "manifest.json").read_text())
    (mlp_package / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(CheckpointError, match="version 2"):
        serving.load(mlp_package)
    (mlp_package / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        serving.load(mlp_package)


def test_tampered_graphs_are_refused(mlp_package):
    def rename_op(doc):
        doc["graph"]["ops"][1]["op"] = "no_such_op"

    _edit_graph(mlp_package, rename_op)
    with pytest.raises(serving.PackageError, match=r"op 1 \(no_such_op\).*unknown op 'no_such_op'"):
        serving.load(mlp_package)


def test_a_graph_whose_metas_disagree_with_the_ops_is_refused(mlp_package):
    def wrong_meta(doc):
        graph = doc["graph"]
        graph["values"][graph["ops"][1]["outputs"][0]]["shape"] = [-1, 99]

    _edit_graph(mlp_package, wrong_meta)
    with pytest.raises(serving.PackageError, match=r"op 1 \(linear\) output has float32 \[-1, 16\].*\[-1, 99\]"):
        serving.load(mlp_package)


def test_a_weight_in_a_file_the_manifest_does_not_list_is_never_read(mlp_package):
    (mlp_package / "extra.safetensors").write_bytes(b"not listed")

    def move_weight(doc):
        key = next(iter(doc["graph"]["weights"]))
        doc["graph"]["weights"][key]["files"] = ["extra.safetensors"]

    _edit_graph(mlp_package, move_weight)
    with pytest.raises(serving.PackageError, match="extra.safetensors.*manifest does not list"):
        serving.load(mlp_package)


def test_a_training_checkpoint_is_not_an_inference_package(tmp_path):
    path = ls.save(tmp_path / "ckpt", zoo.make("mlp"))
    with pytest.raises(serving.PackageError, match="holds no inference graph"):
        serving.load(path)


def test_a_failed_export_keeps_the_previous_package(mlp_package, monkeypatch):
    before = (mlp_package / "graph.json").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serving.package, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        serving.export(mlp_package, zoo.make("mlp"), zoo.inputs("mlp", 2))
    assert (mlp_package / "graph.json").read_bytes() == before
    serving.load(mlp_package)


# --- feeds -------------------------------------------------------------------------------------
def test_bad_feeds_are_refused_naming_the_input(packages):
    model = serving.load(packages["dcn"][0])
    good = zoo.inputs("dcn", 4)
    cases = [
        ({"dense": good["dense"]}, r"missing \['sparse'\]"),
        ({**good, "extra": good["dense"]}, r"unexpected \['extra'\]"),
        ({**good, "sparse": good["sparse"].astype(np.int32)}, "input 'sparse': expected dtype int64, found int32"),
        ({**good, "dense": good["dense"][:, :2]}, r"input 'dense': expected shape \[-1, 3\].*found \[4, 2\]"),
        (
            {**good, "dense": good["dense"][:3]},
            "input 'sparse': batch size 4 differs from the batch size 3 of input 'dense'",
        ),
        ([good["dense"], good["sparse"]], "feeds must be a mapping"),
    ]
    for feeds, match in cases:
        with pytest.raises(FeedError, match=match):
            model(feeds)
    np.testing.assert_allclose(
        model(good)["output"], zoo.live_outputs(packages["dcn"][1], good)[0], rtol=1e-5, atol=1e-6
    )


# --- shards, names --------------------------------------------------------------------------------
def test_large_tables_are_stored_as_row_shards(tmp_path):
    model = zoo.make("dcn")
    table = model.embedding.weight
    shard_bytes = 3 * table.shape[1] * 4  # three rows per shard
    path = serving.export(tmp_path / "dcn", model, zoo.inputs("dcn", 2), max_shard_bytes=shard_bytes)
    shards = sorted(p.name for p in path.glob("shard-*.safetensors"))
    assert len(shards) >= -(-table.shape[0] // 3)  # the table and every other big weight, in row pieces
    doc = json.loads((path / "graph.json").read_text())
    assert len(doc["graph"]["weights"]["embedding.weight"]["files"]) == -(-table.shape[0] // 3)
    feeds = zoo.inputs("dcn", 6)
    np.testing.assert_allclose(
        serving.load(path)(feeds)["output"], zoo.live_outputs(model, feeds)[0], rtol=1e-5, atol=1e-6
    )
    pieces = list(serving.weight_rows(path, "embedding.weight"))  # shard by shard, as a store would read them
    assert [start for start, _ in pieces] == list(range(0, table.shape[0], 3))
    np.testing.assert_array_equal(np.concatenate([rows for _, rows in pieces]), table.numpy())
    with pytest.raises(serving.PackageError, match="no weight 'nope'"):
        next(serving.weight_rows(path, "nope"))


def test_export_refuses_bad_names_and_arguments(tmp_path):
    model = zoo.make("mlp")
    with pytest.raises(ls.Error, match="name must be"):
        serving.export(tmp_path / "a", model, zoo.inputs("mlp", 2), name="a/b")
    with pytest.raises(ls.Error, match="2 input_names for 1 example inputs"):
        serving.export(tmp_path / "a", model, zoo.inputs("mlp", 2)["x"], input_names=["x", "y"])
    with pytest.raises(ls.Error, match="expected a luoshu.nn.Module"):
        serving.export(tmp_path / "a", object(), zoo.inputs("mlp", 2))
    assert not (tmp_path / "a").exists()


def test_names_and_outputs_can_be_chosen(tmp_path):
    model = zoo.make("bert")
    feeds = zoo.inputs("bert", 2)
    path = serving.export(tmp_path / "bert", model, feeds, output_names=["mlm_logits", "nsp_logits"], version="v2")
    loaded = serving.load(path)
    assert [s.name for s in loaded.outputs] == ["mlm_logits", "nsp_logits"] and loaded.version == "v2"
    assert loaded.outputs[0].shape == (-1, 8, 50) and loaded.outputs[1].shape == (-1, 2)
