"""The one bucketing rule of data parallelism (graph pass and eager sync alike)."""

from __future__ import annotations

from luoshu.compiler.gradient_allreduce import BucketFiller, plan_buckets


def test_buckets_close_before_overflowing_and_keep_one_dtype():
    sizes = [40, 40, 30, 100, 10, 10]
    dtypes = ["f32", "f32", "f64", "f32", "f64", "f32"]
    assert plan_buckets(sizes, dtypes, 80) == [[0, 1], [2, 4], [3], [5]]


def test_an_oversized_tensor_gets_a_bucket_of_its_own():
    assert plan_buckets([10, 500, 10], ["f"] * 3, 100) == [[0], [1], [2]]


def test_filler_returns_each_closed_bucket_as_it_closes():
    filler = BucketFiller(100)
    assert filler.add("a", 60, "f") is None
    assert filler.add("b", 60, "f") == ["a"]
    assert filler.add("c", 30, "f") is None
    assert filler.close() == [["b", "c"]]
    assert filler.close() == []
