"""luoshu.ml.io: the libsvm reader (against scikit-learn's), model packages, corrupt files."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn import datasets
from sklearn.datasets import dump_svmlight_file, load_svmlight_file

import luoshu as ls
from luoshu import ml


def test_libsvm_reader_equals_sklearn(tmp_path):
    X, y = datasets.load_breast_cancer(return_X_y=True)
    X = np.where(X > np.median(X, 0), X, 0.0)
    path = tmp_path / "bc.libsvm"
    dump_svmlight_file(X, y, str(path), zero_based=False, comment="made by sklearn")
    ours_X, ours_y = ml.load_libsvm(path)
    ref_X, ref_y = load_svmlight_file(str(path))
    assert sp.issparse(ours_X) and ours_X.shape == ref_X.shape
    np.testing.assert_array_equal(ours_X.toarray(), ref_X.toarray())
    np.testing.assert_array_equal(ours_y, ref_y)
    wide, _ = ml.load_libsvm(path, n_features=40)
    assert wide.shape == (len(y), 40)


def test_libsvm_zero_based_qid_and_comments(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("# header comment\n1 qid:3 0:1.5 4:-2\n\n0 2:3e-1 # trailing\n-1\n")
    X, y = ml.load_libsvm(path)
    np.testing.assert_array_equal(y, [1, 0, -1])
    np.testing.assert_array_equal(X.toarray(), [[1.5, 0, 0, 0, -2], [0, 0, 0.3, 0, 0], [0, 0, 0, 0, 0]])


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 3:1 x:2", "expected an integer index"),
        ("1 3:1 5", "expected index:value"),
        ("yes 1:1", "label must be a number"),
        ("1 4:1 2:1", "must increase"),
        ("1 -1:1", "non-negative"),
        ("1 1:abc", "expected an integer index and a number"),
    ],
)
def test_malformed_libsvm_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.libsvm"
    path.write_text("1 1:0.5 2:1\n0 2:1\n" + line + "\n")
    with pytest.raises(ml.DataError, match=message) as info:
        ml.load_libsvm(path)
    assert f"{path}:3" in str(info.value)


def test_libsvm_file_problems(tmp_path):
    with pytest.raises(ml.DataError, match="cannot open"):
        ml.load_libsvm(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ml.DataError, match="no samples"):
        ml.load_libsvm(tmp_path / "empty.txt")
    (tmp_path / "narrow.txt").write_text("1 7:1\n")
    with pytest.raises(ml.DataError, match="n_features=3"):
        ml.load_libsvm(tmp_path / "narrow.txt", n_features=3)


def _fitted():
    X, y = datasets.load_iris(return_X_y=True)
    Xb, yb = X[y < 2], np.where(y[y < 2] == 1, "yes", "no")
    Xr, yr = datasets.load_diabetes(return_X_y=True)
    return [
        (ml.LogisticRegression(C=0.5).fit(X, y), X),
        (ml.LogisticRegression(penalty="l1").fit(Xb, yb), Xb),
        (ml.Ridge(alpha=0.1).fit(Xr, yr), Xr),
        (ml.LinearRegression().fit(Xr, np.stack([yr, yr], 1)), Xr),
        (ml.LinearSVC().fit(X, y), X),
        (ml.GBDTClassifier(n_estimators=5, num_leaves=4).fit(X, y), X),
        (ml.GBDTRegressor(n_estimators=5, n_iter_no_change=2).fit(Xr, yr), Xr),
        (ml.RandomForestClassifier(n_estimators=3).fit(Xb, yb), Xb),
        (ml.RandomForestRegressor(n_estimators=3, max_depth=4).fit(Xr, yr), Xr),
    ]


@pytest.mark.parametrize("index", range(9))
def test_save_load_round_trip_predicts_the_same(tmp_path, index):
    est, X = _fitted()[index]
    est.save(tmp_path / "model")
    back = ml.load(tmp_path / "model")
    assert type(back) is type(est) and back.get_params() == est.get_params()
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    if hasattr(est, "predict_proba"):
        np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"graph.json", "weights.safetensors"}
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "model").iterdir())


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    X, y = datasets.load_iris(return_X_y=True)
    est = ml.GBDTClassifier(n_estimators=3).fit(X, y)
    est.save(tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ls.CheckpointError, match="corrupt"):
        ml.load(tmp_path / "m")
    est.save(tmp_path / "m")  # a good save replaces the corrupt one
    graph = tmp_path / "m" / "graph.json"
    g = json.loads(graph.read_text())
    g["metadata"]["estimator"] = "os.system"
    graph.write_text(json.dumps(g))
    with pytest.raises(ls.CheckpointError, match="corrupt|truncated"):
        ml.load(tmp_path / "m")
    with pytest.raises(ls.CheckpointError, match="no checkpoint directory"):
        ml.load(tmp_path / "nothing")
    with pytest.raises(ml.NotFittedError):
        ml.GBDTClassifier().save(tmp_path / "unfitted")


def test_a_model_checkpoint_is_not_an_estimator(tmp_path):
    model = ls.nn.Linear(3, 2)
    ls.save(tmp_path / "ckpt", model)
    with pytest.raises(ls.CheckpointError, match="not a luoshu.ml model"):
        ml.load(tmp_path / "ckpt")
