"""luoshu.onnx on luoshu.ctr packages: the HugeCTR-style DCN (keys in, key -> row step in the graph,
by slot offsets or by the hash index's search) and multi-hot mean bags match under onnxruntime at
two batch sizes."""

from __future__ import annotations

import numpy as np
import onnx

from luoshu import onnx as lonnx
from luoshu import serving
from tests.onnx.test_export import _session
from tests.serving import zoo


def _parity(onnx_path, loaded, make_inputs):
    session = _session(onnx_path)
    rng = np.random.default_rng(5)
    for batch in (1, 17):
        feeds = make_inputs(rng, batch)
        np.testing.assert_allclose(session.run(None, feeds)[0], loaded(feeds)["prediction"], rtol=1e-5, atol=1e-5)


def test_hugectr_dcn(tmp_path):
    _, graph_json, dense, sparse = zoo.hugectr_dcn_files(tmp_path)
    package = serving.export_ctr_files(tmp_path / "dcn", graph_json, dense, sparse)
    path = lonnx.export(package, tmp_path / "dcn.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Gather", "Where"} <= ops  # the embedding lookup and the key -> row step
    _parity(path, serving.load(package), zoo.hugectr_inputs)


def test_hash_indexed_dcn(tmp_path):
    """The key index's binary search (gather, compare, select) runs in onnxruntime as in luoshu."""
    _, graph_json, dense, sparse = zoo.hugectr_dcn_files(tmp_path, hashed=True)
    package = serving.export_ctr_files(tmp_path / "dcn", graph_json, dense, sparse)
    path = lonnx.export(package, tmp_path / "dcn.onnx")
    _parity(path, serving.load(package), zoo.hugectr_inputs)


def test_multi_hot_mean_bags(tmp_path):
    package = serving.export_ctr(tmp_path / "bags", zoo.hugectr_bag_model())
    path = lonnx.export(package, tmp_path / "bags.onnx")
    _parity(path, serving.load(package), zoo.hugectr_bag_inputs)
