"""Update operators: the optimizer step of a define-and-run graph and the parameter-server
steps that replace it, with the one description of their inputs.

An update op's inputs are the flattened gradients of the parameters it updates. Its
attributes `params` (the optimizer's parameter indices) and `kinds` (one letter per
parameter) say how to read them: "d" dense, one input; "s" sparse, two inputs (indices
and values, only those rows updated); "g" sparse applied globally (indices and values
standing for a dense gradient that is zero elsewhere, every row updated).
`update_entries` reads that layout and `update_inputs` writes it; the optimizer, the
gradient all-reduce pass and the parameter-server modes all go through them.

`optimizer_update` also has a `lower` (the update as pure tensor math, for whole-step
compilation); the other update ops drive servers and collectives and are not lowered.

The ops reach the Python objects they drive (an optimizer, a loss scaler, a sync mode)
through `luoshu.core.live` keys, so their attributes stay plain JSON.
"""

from __future__ import annotations

from typing import NamedTuple

from luoshu.core import live
from luoshu.core.errors import OpError
from luoshu.core.op import OpDef, register
from luoshu.core.tensor import TensorMeta

KINDS = ("d", "s", "g")
# The third element of a sparse gradient pair applied to every row (kind "g").
GLOBAL = "global"


class UpdateEntry(NamedTuple):
    """One parameter of an update op: its optimizer index, kind, and its inputs (1 or 2)."""

    index: int
    kind: str
    inputs: list


def _width(kind: str) -> int:
    return 1 if kind == "d" else 2


def update_entries(params, kinds: str, inputs) -> list[UpdateEntry]:
    """The (index, kind, inputs) of each parameter of an update op's flat `inputs` (tensors
    or values alike)."""
    expected = sum(_width(k) for k in kinds)
    if len(params) != len(kinds) or len(inputs) != expected or set(kinds) - set(KINDS):
        raise OpError(f"update op: {len(params)} parameters with kinds {kinds!r} need {expected} gradient "
                      f"inputs, found {len(inputs)}")
    entries, pos = [], 0
    for index, kind in zip(params, kinds):
        width = _width(kind)
        entries.append(UpdateEntry(index, kind, list(inputs[pos:pos + width])))
        pos += width
    return entries


def update_inputs(entries) -> tuple[tuple, str, list]:
    """`(params, kinds, flat inputs)` of `entries`: the inverse of `update_entries`."""
    entries = list(entries)
    return (tuple(e.index for e in entries), "".join(e.kind for e in entries),
            [t for e in entries for t in e.inputs])


def gradient_pairs(params, kinds: str, values) -> list:
    """Torch values as the optimizer takes them: `(index, tensor)` for a dense gradient,
    `(index, (indices, values))` for a sparse one, `(index, (indices, values, GLOBAL))` for
    a global one."""
    if len(kinds) == len(params) == len(values) and kinds.count("d") == len(kinds):  # all dense: one input each
        return list(zip(params, values))
    pairs = []
    for e in update_entries(params, kinds, values):
        if e.kind == "d":
            pairs.append((e.index, e.inputs[0]))
        elif e.kind == "s":
            pairs.append((e.index, (e.inputs[0], e.inputs[1])))
        else:
            pairs.append((e.index, (e.inputs[0], e.inputs[1], GLOBAL)))
    return pairs


@register
class OptimizerUpdate(OpDef):
    """Applies one optimizer step in place (`Optimizer.apply_gradients`); inputs are the
    flattened gradients in the layout above. The output is a token: fetching it gives None."""

    name = "optimizer_update"
    attrs = {"optimizer": -1, "params": (), "kinds": "", "loss_scaler": -1}
    differentiable = False
    tested_by = "tests/optim/test_optimizers.py"

    def infer(self, inputs, optimizer, params, kinds, loss_scaler):
        update_entries(params, kinds, inputs)
        return TensorMeta((), "float32")

    def compute(self, *values, optimizer, params, kinds, loss_scaler):
        return self.bind({"optimizer": optimizer, "params": params, "kinds": kinds,
                          "loss_scaler": loss_scaler})(*values)

    def bind(self, attrs):
        # the optimizer and the loss scaler are looked up per run (either may be gone), the layout
        # of the inputs is read once: all dense (the common step) pairs them with the indices as they are
        name, optimizer, params, kinds, loss_scaler = (self.name, attrs["optimizer"], attrs["params"],
                                                       attrs["kinds"], attrs["loss_scaler"])
        dense = len(kinds) == len(params) and kinds.count("d") == len(kinds)

        def kernel(*values):
            opt = live.lookup(optimizer, "optimizer", name)
            scaler = live.lookup(loss_scaler, "loss scaler", name) if loss_scaler >= 0 else None
            pairs = list(zip(params, values)) if dense and len(values) == len(params) else \
                gradient_pairs(params, kinds, values)
            opt.apply_gradients(pairs, scaler)

        return kernel

    def lower(self, *, optimizer, params, kinds, loss_scaler):
        """The update as pure tensor math for whole-step compilation (`luoshu.compiler.inductor`):
        the optimizer's `LoweredUpdate`; an `Error` says what cannot be lowered."""
        if loss_scaler >= 0 and live.lookup(loss_scaler, "loss scaler", self.name).enabled:
            raise OpError(f"{self.name}: a loss scaler skips steps on overflow (a data-dependent branch), "
                          "which is not lowered")
        return live.lookup(optimizer, "optimizer", self.name).lowered_update(params, kinds)


@register
class PSStep(OpDef):
    """The "ps" sync mode's update: pushes every gradient (inputs as `optimizer_update`'s) to
    the parameter servers and pulls the updated dense parameters back; the output is a token."""

    name = "ps_step"
    attrs = {"strategy": -1, "params": (), "kinds": ""}
    differentiable = False
    tested_by = "tests/parallel/test_ps_modes.py"

    def infer(self, inputs, strategy, params, kinds):
        update_entries(params, kinds, inputs)
        return TensorMeta((), "float32")

    def compute(self, *values, strategy, params, kinds):
        live.lookup(strategy, "DataParallel sync mode", self.name).synchronize(gradient_pairs(params, kinds, values))
        return None


@register
class ShardedUpdate(PSStep):
    """The ZeRO sync mode's update: the mode shard-reduces the gradients (inputs as
    `optimizer_update`'s), updates this rank's shards and gathers the parameters; a token."""

    name = "sharded_update"
    tested_by = "tests/parallel/test_zero.py"


@register
class PSSparsePush(OpDef):
    """The "hybrid" sync mode: pushes the tables' gradients (index, values pairs) and ends every
    table's step; passes its last input on when it has an odd count (the update reads it after)."""

    name = "ps_sparse_push"
    attrs = {"strategy": -1, "params": ()}
    differentiable = False
    tested_by = "tests/parallel/test_ps_modes.py"

    def infer(self, inputs, strategy, params):
        if len(inputs) - len(inputs) % 2 != 2 * len(params):
            raise OpError(f"ps_sparse_push: {len(params)} tables need {2 * len(params)} inputs (and optionally one "
                          f"to pass on), found {len(inputs)}")
        if len(inputs) % 2:
            return TensorMeta(inputs[-1].shape, inputs[-1].dtype)
        return TensorMeta((), "float32")

    def compute(self, *values, strategy, params):
        mode = live.lookup(strategy, "DataParallel sync mode", self.name)
        mode.push_tables([(i, (values[2 * k], values[2 * k + 1])) for k, i in enumerate(params)])
        return values[-1] if len(values) % 2 else None


__all__: list[str] = []
