"""luoshu.onnx: every zoo model inference uses exports from its package, passes onnx.checker, and
onnxruntime (CPU) reproduces luoshu's outputs at two batch sizes; unmapped ops are refused by name."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import luoshu as ls
from luoshu import cli, serving
from luoshu import onnx as lonnx
from luoshu.nn.module import Module
from luoshu.serving.package import trace
from tests.serving import zoo


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _assert_parity(onnx_path, loaded, batches=(1, 4)):
    session = _session(onnx_path)
    assert [i.name for i in session.get_inputs()] == [s.name for s in loaded.inputs]
    assert [o.name for o in session.get_outputs()] == [s.name for s in loaded.outputs]
    for batch in batches:
        feeds = zoo.inputs(loaded.name, batch, seed=batch + 10)
        want = loaded(feeds)
        got = session.run(None, feeds)
        for (name, w), g in zip(want.items(), got):
            assert g.shape == w.shape, name
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{loaded.name} {name} batch {batch}")


def test_every_zoo_model_is_covered():
    from luoshu.models import MODELS

    covered = {zoo_name for zoo_name, _, _ in zoo.ZOO.values()}
    # "resnet" and "resnet34" are the ResNet class of resnet18 (basic blocks) at another depth;
    # the graph models (task "node") take a SparseGraph, and luoshu.ops.sparse has no ONNX mapping yet
    assert set(MODELS) - covered == {"resnet", "resnet34", "gcn", "graphsage", "gat"}


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_packages")
    return {name: serving.export(root / name, zoo.make(name), zoo.inputs(name, 2), name=name) for name in zoo.ZOO}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_onnxruntime_matches_luoshu(packages, tmp_path, name):
    path = lonnx.export(packages[name], tmp_path / f"{name}.onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # dynamic batch
    ops = {n.op_type for n in proto.graph.node}
    assert not any(op.startswith("ATen") or op == "PythonOp" for op in ops)
    _assert_parity(path, serving.load(packages[name]))


@pytest.mark.parametrize("name", ["llama", "deepfm", "resnet18"])
def test_opset_18_reductions(packages, tmp_path, name):
    """From opset 18 ReduceMean & co. take their axes as an input."""
    path = lonnx.export(packages[name], tmp_path / f"{name}.onnx", opset=18)
    assert onnx.load(str(path)).opset_import[0].version == 18
    _assert_parity(path, serving.load(packages[name]), batches=(3,))


def test_static_batch_and_live_module(tmp_path):
    model = zoo.make("lenet")
    path = lonnx.export(
        model, tmp_path / "lenet.onnx", dynamic_batch=False, batch_size=4, example_inputs=zoo.inputs("lenet", 2)
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 1, 12, 12]
    feeds = zoo.inputs("lenet", 4)
    np.testing.assert_allclose(
        _session(path).run(None, feeds)[0], zoo.live_outputs(model, feeds)[0], rtol=1e-5, atol=1e-5
    )


def test_external_data(packages, tmp_path):
    path = lonnx.export(packages["resnet18"], tmp_path / "resnet18.onnx", external_data=True)
    data = tmp_path / "resnet18.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    onnx.checker.check_model(str(path))
    assert path.stat().st_size < data.stat().st_size  # the weights live beside the graph
    _assert_parity(path, serving.load(packages["resnet18"]), batches=(2,))


def test_external_data_is_chosen_past_the_protobuf_limit(packages, tmp_path, monkeypatch):
    from luoshu.onnx import exporter as export_module

    # A stand-in for 2 GB so the test stays small: the choice is the same comparison
    monkeypatch.setattr(export_module, "PROTO_LIMIT", export_module._HEADROOM + 1000)
    path = lonnx.export(packages["resnet18"], tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    _assert_parity(path, serving.load(packages["resnet18"]), batches=(1,))


def test_cli_export_onnx(packages, tmp_path, capsys):
    out = tmp_path / "ncf.onnx"
    assert cli.main(["export-onnx", str(packages["ncf"]), str(out)]) == 0
    assert "dynamic batch" in capsys.readouterr().out
    _assert_parity(out, serving.load(packages["ncf"]), batches=(5,))
    fixed = tmp_path / "ncf3.onnx"
    assert cli.main(["export-onnx", str(packages["ncf"]), str(fixed), "--opset", "18", "--static-batch", "3"]) == 0
    proto = onnx.load(str(fixed))
    assert proto.opset_import[0].version == 18 and proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert cli.main(["export-onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 1
    assert "no checkpoint directory" in capsys.readouterr().err


class _Finite(Module):
    def forward(self, x):
        return ls.ops.isfinite(x)


def test_unmapped_op_is_refused_by_name(tmp_path, monkeypatch):
    with pytest.raises(lonnx.OnnxExportError, match="without an ONNX mapping: 'isfinite'"):
        lonnx.export(_Finite(), tmp_path / "f.onnx", example_inputs=np.zeros((2, 3), np.float32))
    monkeypatch.delitem(lonnx.MAPPINGS, "relu")
    with pytest.raises(lonnx.OnnxExportError, match="model 'mlp' uses op\\(s\\) without an ONNX mapping: 'relu'"):
        lonnx.export(zoo.make("mlp"), tmp_path / "m.onnx", example_inputs=zoo.inputs("mlp", 2))
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(packages, tmp_path):
    with pytest.raises(lonnx.OnnxExportError, match="opset must be an int >= 17"):
        lonnx.export(packages["mlp"], tmp_path / "m.onnx", opset=13)
    with pytest.raises(lonnx.OnnxExportError, match="needs example_inputs"):
        lonnx.export(zoo.make("mlp"), tmp_path / "m.onnx")
    with pytest.raises(lonnx.OnnxExportError, match="expected a package directory"):
        lonnx.export(42, tmp_path / "m.onnx")


class _BigTable(Module):
    """A 2.3 GB embedding table: past protobuf's limit, so the weights must go to external data."""

    def __init__(self):
        super().__init__()
        from luoshu.nn.module import Parameter

        table = np.zeros((9_000_000, 64), np.float32)
        table[:1000] = np.random.default_rng(0).standard_normal((1000, 64))
        table[-1000:] = np.random.default_rng(1).standard_normal((1000, 64))
        self.weight = Parameter(table, requires_grad=False)

    def forward(self, ids):
        return ls.ops.sum(ls.nn.functional.embedding(ids, self.weight), axis=1)


@pytest.mark.slow
def test_a_model_past_2gb_keeps_its_weights_in_external_data(tmp_path):
    model = trace(_BigTable(), np.zeros((2, 3), np.int64))
    path = lonnx.export(model, tmp_path / "big.onnx")
    data = tmp_path / "big.onnx.data"
    assert data.stat().st_size >= 9_000_000 * 64 * 4 and path.stat().st_size < 1 << 20
    onnx.checker.check_model(str(path))
    ids = np.array([[0, 5, 999], [8_999_999, 8_999_000, 3]], np.int64)
    np.testing.assert_allclose(_session(path).run(None, {"ids": ids})[0], model({"ids": ids})["output"], rtol=1e-6)
