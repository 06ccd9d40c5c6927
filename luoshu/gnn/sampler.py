"""GraphSAGE neighbour sampling: per-layer bipartite blocks for mini-batch training, and the
loader that samples them in `luoshu.data`'s prefetch threads.

Sampling is vectorised over a whole frontier (no Python loop per node) and its randomness
is counter-based: the key that ranks an edge among its target's incoming edges is a hash
of (seed, epoch, batch, layer, edge id). So a node's sampled neighbours do not depend on
which thread samples the batch, nor on which worker of a data-parallel job holds the
seed: two workers that each sample half of a batch see exactly the neighbourhoods one
process sees for the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from luoshu.data.dataset import Dataset
from luoshu.data.loader import DataLoader
from luoshu.gnn.graph import GraphInputError, SparseGraph

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """A logical (unsigned) right shift of int64 values."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (multiplications wrap modulo 2**64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _salt(*parts: int) -> int:
    z = 0
    for p in parts:
        z = int(_splitmix(torch.tensor([_signed(z * 31 + int(p) * 0x9E3779B97F4A7C15)]))[0])
    return z


@dataclass
class MiniBatch:
    """One sampled mini-batch: `blocks[0]` is applied first (the outermost hop), the last
    block's targets are the `seeds`. `input_nodes` are the global ids of the first block's
    sources, whose features feed the model."""

    seeds: torch.Tensor
    blocks: list[SparseGraph]

    @property
    def input_nodes(self) -> torch.Tensor:
        return self.blocks[0].src_nodes

    def __repr__(self) -> str:
        sizes = " -> ".join(f"{b.num_src_nodes}" for b in self.blocks) + f" -> {len(self.seeds)}"
        return f"MiniBatch(nodes {sizes}, edges {[b.num_edges for b in self.blocks]})"


def _check_fanouts(fanouts, num_layers: int | None) -> tuple[int, ...]:
    try:
        fanouts = tuple(int(f) for f in fanouts)
    except (TypeError, ValueError):
        raise GraphInputError(f"fanouts must be a list of ints (one per layer), found {fanouts!r}") from None
    if not fanouts or any(f == 0 or f < -1 for f in fanouts):
        raise GraphInputError(
            f"fanouts must be a non-empty list of positive ints (-1 = every neighbour), found {list(fanouts)}"
        )
    if num_layers is not None and len(fanouts) != num_layers:
        raise GraphInputError(
            f"fanouts {list(fanouts)} give {len(fanouts)} hops but the model has {num_layers} "
            f"layers; give one fan-out per layer"
        )
    return fanouts


class NeighborSampler:
    """Samples up to `fanouts[i]` incoming neighbours per node, hop by hop from the seeds
    (`fanouts[0]` for the seeds' own neighbours, as PyG's `num_neighbors`), without
    replacement; -1 takes every neighbour. `num_layers`, when given, must equal the number
    of fan-outs."""

    def __init__(self, graph: SparseGraph, fanouts: Sequence[int], seed: int = 0, num_layers: int | None = None):
        if not isinstance(graph, SparseGraph) or graph.is_bipartite:
            raise GraphInputError("NeighborSampler needs a square luoshu.gnn.SparseGraph")
        self.graph = graph
        self.fanouts = _check_fanouts(fanouts, num_layers)
        self.seed = int(seed)

    def _sample_hop(self, nodes: torch.Tensor, fanout: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For targets `nodes` (n,): the (target position, global source) of each sampled edge,
        grouped by target."""
        g = self.graph
        starts, counts = g.indptr[nodes], g.indptr[nodes + 1] - g.indptr[nodes]
        total = int(counts.sum())
        owner = torch.repeat_interleave(torch.arange(len(nodes)), counts, output_size=total)
        offsets = torch.cumsum(counts, 0) - counts  # where each target's run starts
        edge = starts[owner] + torch.arange(total) - offsets[owner]  # global CSR edge ids
        if fanout != -1 and total:
            keys = _shift_right(_splitmix(edge * _GOLDEN + salt), 24)  # 40 random bits
            if len(nodes) < 1 << 23:  # one sort ranks every target's edges: the target is the high part
                order = torch.argsort((owner << 40) | keys)
            else:
                by_key = torch.argsort(keys)
                order = by_key[torch.argsort(owner[by_key], stable=True)]
            rank = torch.arange(total) - offsets[owner]
            keep = order[rank < fanout]  # the first `fanout` of each target's run
            owner, edge = owner[keep], edge[keep]
        return owner, g.col[edge]

    def sample(self, seeds, epoch: int = 0, batch: int = 0) -> MiniBatch:
        """The blocks for `seeds` (global node ids); `(epoch, batch)` pick the random draw."""
        seeds = torch.as_tensor(np.asarray(seeds), dtype=torch.int64).reshape(-1)
        n = self.graph.num_nodes
        if seeds.numel() == 0:
            raise GraphInputError("sample needs at least one seed node, found none")
        if int(seeds.min()) < 0 or int(seeds.max()) >= n:
            raise GraphInputError(f"seed nodes must be in [0, {n}), found {int(seeds.min())}..{int(seeds.max())}")
        if len(torch.unique(seeds)) != len(seeds):
            raise GraphInputError("seed nodes must be distinct")
        blocks = []
        nodes = seeds
        for layer, fanout in enumerate(self.fanouts):
            owner, sources = self._sample_hop(nodes, fanout, _salt(self.seed, epoch, batch, layer))
            # the block's sources: its targets first (in order), then new nodes by first appearance
            combined = torch.cat([nodes, sources])
            unique, inverse = torch.unique(combined, return_inverse=True)
            first = torch.full((len(unique),), len(combined), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(len(combined)), "amin")
            order = torch.argsort(first)
            local = torch.empty_like(order)
            local[order] = torch.arange(len(order))
            src_local = local[inverse[len(nodes) :]]
            block = SparseGraph(torch.stack([src_local, owner]), len(nodes), num_src_nodes=len(unique))
            block.src_nodes, block.dst_nodes = unique[order], nodes
            blocks.append(block)
            nodes = block.src_nodes
        return MiniBatch(seeds, blocks[::-1])


class _SeedBatches(Dataset):
    """Batch `i` of one epoch (already a batch: the loader runs with batch_size=None)."""

    def __init__(self, sampler: NeighborSampler, batches: list[tuple[int, np.ndarray]], epoch: int):
        self.sampler, self.batches, self.epoch = sampler, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> MiniBatch:
        index, seeds = self.batches[i]
        return self.sampler.sample(seeds, self.epoch, index)


class NeighborLoader:
    """Mini-batches of seed nodes with their sampled blocks, sampled in `num_workers`
    background threads of a `luoshu.data.DataLoader`.

    `seeds`: node ids or a boolean mask (default: every node). Each epoch shuffles them
    (seeded by `(seed, epoch)`) into global batches of `batch_size * world_size`; a worker of
    a data-parallel job (`rank`, `world_size`) takes its contiguous slice of each.
    """

    def __init__(
        self,
        graph: SparseGraph,
        fanouts: Sequence[int],
        seeds=None,
        batch_size: int = 512,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        prefetch: int = 2,
        rank: int = 0,
        world_size: int = 1,
        num_layers: int | None = None,
    ):
        self.sampler = NeighborSampler(graph, fanouts, seed, num_layers)
        if seeds is None:
            seeds = torch.arange(graph.num_nodes)
        seeds = torch.as_tensor(np.asarray(seeds))
        if seeds.dtype == torch.bool:
            if seeds.shape != (graph.num_nodes,):
                raise GraphInputError(
                    f"a seed mask needs one entry per node ({graph.num_nodes}), found shape {tuple(seeds.shape)}"
                )
            seeds = torch.nonzero(seeds).reshape(-1)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise GraphInputError(
                f"NeighborLoader needs batch_size >= 1 and 0 <= rank < world_size, found "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if world_size > 1 and not drop_last:
            # a short last global batch would leave some workers a batch fewer than the others,
            # and their all-reduce would wait for a step that never comes
            raise GraphInputError(
                f"NeighborLoader with world_size={world_size} needs drop_last=True so every worker "
                f"gets the same number of batches"
            )
        self.seeds = seeds.to(torch.int64).numpy()
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.num_workers, self.prefetch = num_workers, prefetch
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(len(self.seeds))
            if self.shuffle
            else np.arange(len(self.seeds))
        )
        ids = self.seeds[order]
        step = self.batch_size * self.world_size
        stop = len(ids) - len(ids) % step if self.drop_last else len(ids)
        out = []
        for index, start in enumerate(range(0, stop, step)):
            part = ids[start : start + step]
            mine = part[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if len(mine):
                out.append((index, mine))
        return out

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        return len(self.seeds) // step if self.drop_last else math.ceil(len(self.seeds) / step)

    def __iter__(self) -> Iterator[MiniBatch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        dataset = _SeedBatches(self.sampler, self._batches(epoch), epoch)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch=self.prefetch))
