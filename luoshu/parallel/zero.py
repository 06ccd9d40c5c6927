"""ZeRO over the data-parallel axis (Rajbhandari et al. 2020), stages 1 and 2.

`DataParallel(model, opt, zero=1 | 2)` shards the optimizer state of the dense parameters over
the data-parallel ranks. At the first step the dense parameters of each parameter group are
laid out in one flat buffer per (group, dtype) — the parameters become views of it — padded to
a multiple of the rank count; rank r owns the r-th contiguous shard. Each step:

- stage 1: the flat gradient is all-reduced (mean) and each rank keeps its shard;
- stage 2: the flat gradient is reduce-scattered (mean): each rank receives only its shard,
  half the bytes of an all-reduce on the wire;
- the global gradient norm (for `max_grad_norm`) is the norm over all shards (each rank's
  sum of squares, all-reduced);
- each rank updates its shard with an optimizer of the same class and hyperparameters over the
  shard (so its state is 1/dp of the plain run's), then the shards are all-gathered into the
  flat parameter buffer, which every parameter views.

The result equals plain data parallelism exactly up to floating-point summation order: the
update rules are elementwise. Sparse (`IndexedSlices`) gradients — embedding tables — keep the
plain path: their rows are all-gathered and the model's own optimizer updates them lazily.
`consolidated_state_dict()` gathers the shards into the plain optimizer's state-dict layout (a
ZeRO checkpoint loads into a plain run), and `load_state_dict` takes a plain one.

Per-parameter rules cannot run on flat shards: LAMB (its trust ratio is a norm per parameter)
and dynamic loss scaling (the overflow check would have to agree across ranks) are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from luoshu.core import live
from luoshu.core.op import get_opdef
from luoshu.core.tensor import Tensor
from luoshu.distributed import env
from luoshu.distributed.env import DistError
from luoshu.optim import OPTIMIZERS, optimizer_name
from luoshu.parallel.data_parallel import SYNC_MODES, AllReduceSync, SyncMode

STAGES = (1, 2)


class _FlatGroup:
    """The dense parameters of one (parameter group, dtype): one padded flat buffer, this
    rank's shard of it and the optimizer over that shard."""

    def __init__(self, indices: list[int], params: list[Tensor], hyper: dict, opt_class, world: int, rank: int):
        self.indices = indices
        self.params = params
        numel = sum(p._value.numel() for p in params)
        self.shard_size = -(-numel // world)
        first = params[0]._value
        self.flat = torch.zeros(self.shard_size * world, dtype=first.dtype, device=first.device)
        self.offsets = []
        pos = 0
        for p in params:
            n = p._value.numel()
            self.flat[pos:pos + n].copy_(p._value.reshape(-1))
            p._value = self.flat[pos:pos + n].view(p._value.shape)  # the parameter now views the flat buffer
            self.offsets.append(pos)
            pos += n
        self.rank, self.world = rank, world
        self.shard = self.flat[rank * self.shard_size:(rank + 1) * self.shard_size]
        self.shard_param = Tensor.from_value(self.shard, requires_grad=True, name="zero_shard", kind="variable")
        self.optimizer = opt_class([self.shard_param])
        self.optimizer.param_groups[0].update(hyper)  # the group's own (already checked) hyperparameters
        self.grad = torch.zeros_like(self.flat)
        self.grad_shard = torch.empty_like(self.shard)


class ZeroSync(SyncMode):
    """DataParallel's ZeRO sync mode (stages 1 and 2); see the module docstring."""

    def __init__(self, dp, stage: int, **options):
        super().__init__(dp, **options)
        if stage not in STAGES:
            raise DistError(f"DataParallel: zero must be one of {STAGES} (stage 3, parameter sharding, is not "
                            f"available yet), found {stage!r}")
        opt = dp.optimizer
        if opt is None:
            raise DistError("DataParallel(zero=...) shards an optimizer: wrap the model and its optimizer, "
                            "DataParallel(model, optimizer, zero=...), or a graph after optimizer.minimize(loss)")
        name = optimizer_name(opt)
        if name is None or name == "lamb":
            raise DistError(f"DataParallel(zero={stage}): {type(opt).__name__} cannot be sharded elementwise; ZeRO "
                            f"runs {sorted(set(OPTIMIZERS) - {'lamb'})}")
        self.stage = stage
        self.plain = AllReduceSync(dp)  # sparse gradients, and the broadcast at setup
        self.groups: list[_FlatGroup] | None = None
        self.owner: dict[int, _FlatGroup] = {}
        self._loaded = False  # a plain state dict was loaded and still has to reach the shards
        self._key = live.register(self)  # what sharded_update names in its attributes

    # --- SyncMode -------------------------------------------------------------------------------
    def setup(self, params, buffers) -> None:
        self.plain.setup(params, buffers)

    def rewrite_update(self, graph, update_op) -> None:
        if update_op.attrs.get("loss_scaler", -1) >= 0:
            raise DistError("DataParallel(zero=...): dynamic loss scaling is not available with ZeRO")
        live.keep_alive(graph, self)  # the graph runs this mode's update op for as long as it lives
        update_op.opdef = get_opdef("sharded_update")
        update_op.attrs = {"strategy": self._key, "params": tuple(update_op.attrs["params"]),
                           "kinds": update_op.attrs["kinds"]}
        graph._plans.clear()

    def reduce_gradients(self, optimizer, pairs) -> list:
        self.synchronize(pairs)
        params = optimizer.parameters()
        for i, _ in pairs:
            params[i].grad = None
        return []

    # --- the step -------------------------------------------------------------------------------
    def _build(self, dense_indices: list[int]) -> None:
        opt = self.dp.optimizer
        world, rank = env.group_size(self.dp.group or None), env.group_rank(self.dp.group or None)
        params = opt.parameters()
        group_of = {id(p): gi for gi, group in enumerate(opt.param_groups) for p in group["params"]}
        by_key: dict[tuple, list[int]] = {}
        for i in dense_indices:
            by_key.setdefault((group_of[id(params[i])], params[i]._value.dtype), []).append(i)
        self.groups = []
        for (gi, _), indices in sorted(by_key.items(), key=lambda kv: kv[1][0]):
            hyper = {k: v for k, v in opt.param_groups[gi].items() if k != "params"}
            group = _FlatGroup(indices, [params[i] for i in indices], hyper, type(opt), world, rank)
            group.group_index = gi
            self.groups.append(group)
            for i in indices:
                self.owner[i] = group
        self.world, self.rank = world, rank
        if self._loaded:
            self._scatter_loaded_state()

    def synchronize(self, pairs: list) -> None:
        """One step: shard-reduce the dense gradients, update this rank's shards, gather them."""
        dense = [(i, g) for i, g in pairs if not isinstance(g, tuple)]
        sparse = [(i, g) for i, g in pairs if isinstance(g, tuple)]
        if self.groups is None:
            self._build(sorted(i for i, _ in dense))
        unknown = [i for i, _ in dense if i not in self.owner]
        if unknown:
            raise DistError(f"DataParallel(zero={self.stage}): parameters {unknown} got a dense gradient for the first "
                            "time after the first step; ZeRO lays out the parameters at the first step")
        pg = env.process_group(self.dp.group or None)
        got = {i: g for i, g in dense}
        opt = self.dp.optimizer
        with torch.no_grad():
            for group in self.groups:
                group.grad.zero_()
                for i, offset, p in zip(group.indices, group.offsets, group.params):
                    g = got.get(i)
                    if g is not None:
                        group.grad[offset:offset + p._value.numel()].copy_(g.reshape(-1))
                group.grad.div_(self.world)
                if pg is None:
                    group.grad_shard.copy_(group.grad[:group.shard_size])
                elif self.stage == 1:
                    torch_dist.all_reduce(group.grad, group=pg)
                    group.grad_shard.copy_(group.grad[self.rank * group.shard_size:(self.rank + 1) * group.shard_size])
                else:
                    torch_dist.reduce_scatter_single(group.grad_shard, group.grad, group=pg)
            gathered = self.plain.reduce_gradients(opt, sparse) if sparse else []
            dense_sq = None
            if opt.max_grad_norm is not None:
                # The global norm over every shard and the (replicated) sparse gradients.
                dense_sq = torch.stack([g.grad_shard.double().pow(2).sum() for g in self.groups]).sum()
                if pg is not None:
                    dense_sq = dense_sq.reshape(1)
                    torch_dist.all_reduce(dense_sq, group=pg)
                    dense_sq = dense_sq.reshape(())
                total = (dense_sq + opt.gradient_norm_squared(gathered)).sqrt()
                coef = torch.clamp(opt.max_grad_norm / (total + 1e-6), max=1.0)
                for group in self.groups:
                    group.grad_shard.mul_(coef.to(group.grad_shard.dtype))
            for group in self.groups:
                # the model optimizer's hyperparameters (a scheduler may have changed lr) hold for its shards
                hyper = {k: v for k, v in opt.param_groups[group.group_index].items() if k != "params"}
                group.optimizer.param_groups[0].update(hyper)
                group.optimizer.apply_gradients([(0, group.grad_shard)])
                if pg is not None:
                    torch_dist.all_gather_single(group.flat, group.shard.clone(), group=pg)
        if gathered:
            opt.apply_gradients(gathered, other_norm_sq=dense_sq)

    # --- memory and checkpoints -----------------------------------------------------------------
    def optimizers(self) -> list:
        """The optimizers this rank steps: the shard optimizers (and the model's own, which
        holds the state of parameters with sparse gradients only)."""
        return [g.optimizer for g in self.groups or []] + [self.dp.optimizer]

    def consolidated_state_dict(self) -> dict:
        """The plain optimizer's `state_dict()` with every shard's state gathered (every rank
        calls it; every rank gets the whole state)."""
        opt = self.dp.optimizer
        plain = opt.state_dict()
        if not self.groups:
            return plain
        pg = env.process_group(self.dp.group or None)
        tensors, state_meta = dict(plain["tensors"]), dict(plain["meta"]["state"])
        for group in self.groups:
            shard = group.optimizer.state_dict()
            entry0 = shard["meta"]["state"].get("0")
            if entry0 is None:
                continue
            step = entry0["step"]
            for name in entry0["tensors"]:
                value = shard["tensors"][f"state.0.{name}"]
                full = torch.empty(group.shard_size * self.world, dtype=value.dtype)
                if pg is None:
                    full.copy_(value)
                else:
                    torch_dist.all_gather_into_tensor(full, value.contiguous(), group=pg)
                for i, offset, p in zip(group.indices, group.offsets, group.params):
                    n = p._value.numel()
                    tensors[f"state.{i}.{name}"] = full[offset:offset + n].view(p._value.shape).clone()
                    entry = state_meta.setdefault(str(i), {"step": step, "tensors": []})
                    entry["tensors"] = sorted(set(entry["tensors"]) | {name})
        return {"tensors": tensors, "meta": {**plain["meta"], "state": state_meta}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Takes a plain optimizer's `state_dict()` (a run without ZeRO, or
        `consolidated_state_dict()`): the model's optimizer checks it whole and nothing changes on
        a mismatch; each shard optimizer then takes its slice (at the first step, when the shards
        are laid out)."""
        self.dp.optimizer.load_state_dict(state_dict)
        self._loaded = True
        if self.groups is not None:
            self._scatter_loaded_state()

    def _scatter_loaded_state(self) -> None:
        """Moves the loaded state of the sharded parameters from the model's optimizer into the
        shard optimizers (this rank's slice); the model's optimizer keeps only the rest."""
        opt = self.dp.optimizer
        plain = opt.state_dict()
        meta_state, tensors = plain["meta"]["state"], plain["tensors"]
        for group in self.groups:
            entries = [meta_state.get(str(i)) for i in group.indices]
            if all(e is None for e in entries):
                continue
            steps = {e["step"] for e in entries if e is not None}
            names = {tuple(e["tensors"]) for e in entries if e is not None}
            if None in entries or len(steps) != 1 or len(names) != 1:
                raise DistError(f"DataParallel(zero={self.stage}): the loaded state holds parameters "
                                f"{group.indices} at different steps or with different state; ZeRO shards them "
                                "as one flat tensor")
            step, names = steps.pop(), names.pop()
            shard_tensors = {}
            for name in names:
                flat = torch.zeros_like(group.flat)
                for i, offset, p in zip(group.indices, group.offsets, group.params):
                    flat[offset:offset + p._value.numel()].copy_(tensors[f"state.{i}.{name}"].reshape(-1))
                shard_tensors[f"state.0.{name}"] = flat[self.rank * group.shard_size:
                                                        (self.rank + 1) * group.shard_size].clone()
            shard = group.optimizer.state_dict()
            shard["meta"]["state"] = {"0": {"step": step, "tensors": list(names)}}
            group.optimizer.load_state_dict({"tensors": shard_tensors, "meta": shard["meta"]})
            for i in group.indices:  # the model's optimizer no longer holds what the shards do
                meta_state.pop(str(i), None)
                for name in names:
                    tensors.pop(f"state.{i}.{name}", None)
        opt.load_state_dict(plain)
        self._loaded = False


SYNC_MODES["zero"] = ZeroSync  # DataParallel(..., zero=stage) builds this mode
