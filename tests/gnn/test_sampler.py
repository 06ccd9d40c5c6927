"""NeighborSampler / NeighborLoader: fan-out and depth, determinism under a seed, every
sampled edge exists, id maps, prefetch threads, and per-rank slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from luoshu.gnn import SparseGraph
from luoshu.gnn.sampler import NeighborLoader, NeighborSampler


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(0)
    n = 2000
    ei = np.stack([rng.integers(0, n, 30000), rng.integers(0, n, 30000)])
    return SparseGraph(ei, n)


def _edge_set(graph):
    return set(zip(graph.col.tolist(), graph.row.tolist()))


def test_blocks_respect_fanout_depth_and_exist(graph):
    fanouts = [10, 4]
    seeds = np.arange(0, 2000, 7)
    batch = NeighborSampler(graph, fanouts, seed=1).sample(seeds)
    assert len(batch.blocks) == 2
    edges = _edge_set(graph)
    in_degree = graph.in_degree().numpy()
    nodes = torch.as_tensor(seeds)
    # blocks[-1] is the seeds' own hop (fanouts[0]); blocks[0] the outermost
    for block, fanout in zip(batch.blocks[::-1], fanouts):
        assert torch.equal(block.dst_nodes, nodes)
        assert torch.equal(block.src_nodes[: block.num_nodes], nodes)  # targets first among the sources
        assert len(torch.unique(block.src_nodes)) == block.num_src_nodes
        deg = block.in_degree().numpy()
        np.testing.assert_array_equal(deg, np.minimum(in_degree[nodes.numpy()], fanout))
        src_global = block.src_nodes[block.col].tolist()
        dst_global = block.dst_nodes[block.row].tolist()
        pairs = list(zip(src_global, dst_global))
        assert set(pairs) <= edges
        # without replacement: no (node, edge) picked twice beyond the graph's own duplicates
        counts = {}
        for p in pairs:
            counts[p] = counts.get(p, 0) + 1
        multiplicity = {}
        for p in zip(graph.col.tolist(), graph.row.tolist()):
            multiplicity[p] = multiplicity.get(p, 0) + 1
        assert all(c <= multiplicity[p] for p, c in counts.items())
        nodes = block.src_nodes
    assert torch.equal(batch.input_nodes, batch.blocks[0].src_nodes)


def test_fanout_minus_one_takes_every_neighbour(graph):
    batch = NeighborSampler(graph, [-1]).sample([5, 9])
    np.testing.assert_array_equal(batch.blocks[0].in_degree().numpy(), graph.in_degree().numpy()[[5, 9]])


def test_deterministic_under_a_seed(graph):
    a = NeighborSampler(graph, [5, 5], seed=3).sample(np.arange(100), epoch=2, batch=1)
    b = NeighborSampler(graph, [5, 5], seed=3).sample(np.arange(100), epoch=2, batch=1)
    c = NeighborSampler(graph, [5, 5], seed=4).sample(np.arange(100), epoch=2, batch=1)
    for x, y in zip(a.blocks, b.blocks):
        assert torch.equal(x.edge_index, y.edge_index) and torch.equal(x.src_nodes, y.src_nodes)
    assert any(not torch.equal(x.src_nodes, z.src_nodes) for x, z in zip(a.blocks, c.blocks))


def test_a_nodes_sample_does_not_depend_on_the_rest_of_the_batch(graph):
    # counter-based keys: node 7's neighbours are the same alone or within a larger batch
    sampler = NeighborSampler(graph, [3], seed=0)
    alone = sampler.sample([7]).blocks[0]
    within = sampler.sample([7, 1, 2, 3]).blocks[0]
    mine = within.src_nodes[within.col[within.row == 0]]
    assert sorted(alone.src_nodes[alone.col].tolist()) == sorted(mine.tolist())


def test_samples_uniformly(graph):
    # one node with 40 distinct in-neighbours, fan-out 4: each is picked ~10% of the time
    star = SparseGraph(np.stack([np.arange(1, 41), np.zeros(40, np.int64)]), 41)
    sampler = NeighborSampler(star, [4])
    counts = np.zeros(41)
    for b in range(500):
        block = sampler.sample([0], batch=b).blocks[0]
        counts[block.src_nodes[block.col].numpy()] += 1
    freq = counts[1:] / 500
    assert abs(freq.mean() - 0.1) < 1e-12 and freq.min() > 0.05 and freq.max() < 0.16


def test_loader_threads_give_the_same_batches(graph):
    serial = list(NeighborLoader(graph, [4, 2], batch_size=300, seed=5))
    threaded = list(NeighborLoader(graph, [4, 2], batch_size=300, seed=5, num_workers=2))
    assert len(serial) == len(threaded) == 7
    for a, b in zip(serial, threaded):
        assert torch.equal(a.seeds, b.seeds)
        for x, y in zip(a.blocks, b.blocks):
            assert torch.equal(x.edge_index, y.edge_index) and torch.equal(x.src_nodes, y.src_nodes)
    seen = np.sort(np.concatenate([b.seeds.numpy() for b in serial]))
    np.testing.assert_array_equal(seen, np.arange(2000))
    second = list(NeighborLoader(graph, [4, 2], batch_size=300, seed=5))  # same epoch 0 again
    assert torch.equal(second[0].seeds, serial[0].seeds)


def test_rank_slices_partition_the_global_batch(graph):
    full = list(NeighborLoader(graph, [3], batch_size=200, seed=2, drop_last=True))
    ranks = [
        list(NeighborLoader(graph, [3], batch_size=100, seed=2, drop_last=True, rank=r, world_size=2)) for r in range(2)
    ]
    assert len(full) == len(ranks[0]) == len(ranks[1]) == 10
    for f, a, b in zip(full, *ranks):
        assert torch.equal(f.seeds, torch.cat([a.seeds, b.seeds]))
        # the same neighbourhoods: each seed's sampled sources match the full batch's
        for part, offset in ((a, 0), (b, 100)):
            blk, fblk = part.blocks[0], f.blocks[0]
            for i in (0, 57, 99):
                ours = sorted(blk.src_nodes[blk.col[blk.row == i]].tolist())
                theirs = sorted(fblk.src_nodes[fblk.col[fblk.row == i + offset]].tolist())
                assert ours == theirs
