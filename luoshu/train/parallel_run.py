"""The parallel side of a `luoshu train` job: dp x tp x pp over the processes of `luoshu launch`.

`ParallelRun(config)` joins the job, builds the `DeviceMesh(dp, tp, pp)` and applies the
strategies of `luoshu.parallel` to the model the trainer built (before its optimizer):

- tp > 1 (or dp > 1 without pipeline): `parallelize(model, mesh, sequence_parallel)`; the
  trainer's one define-and-run graph compiles to this rank's tensor-parallel plan and the DP
  axis averages gradients with the bucketed all-reduce; each rank feeds its DP share of the
  global batch (`mesh.batch_slice`);
- pp > 1: `pipeline(model, mesh, micro_batches, schedule, zero)` trains each step (every rank
  passes the global batch; the first stage reads the tokens, the last the targets); `zero = 1 | 2 | 3`
  shards each stage (its TP blocks) over its DP group.

Every rank sees the same data order (the seed decides it) and the same logged loss (the mean
over the DP shares). Only rank 0 writes the job directory; checkpoints are written by rank 0
with full tensors (`luoshu.parallel.checkpoint.save`), so a job of any layout, or one
process, resumes from them. A pipeline rank trains only its stage's parameters: before an
evaluation or a checkpoint the stages' values (and optimizer state, for a checkpoint) are
broadcast from the stage that trains them, so every rank holds the whole model (under ZeRO-3 for
the evaluation's duration: `whole_model`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as torch_dist

from luoshu.distributed import env
from luoshu.distributed.mesh import DeviceMesh
from luoshu.nn.module import Module
from luoshu.optim.optimizer import Optimizer
from luoshu.parallel import checkpoint as parallel_checkpoint
from luoshu.parallel.pipeline import Pipeline
from luoshu.parallel.tensor_parallel import parallelize


class ParallelRun:
    """One rank's view of a parallel `luoshu train` job (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        env.init()
        self.mesh = DeviceMesh(dp=config.dp, tp=config.tp, pp=config.pp)
        self.rank = env.rank()
        self.pipe: Pipeline | None = None

    @property
    def writes(self) -> bool:
        """Whether this rank writes the job directory (rank 0)."""
        return self.rank == 0

    def prepare(self, model: Module) -> None:
        """Splits the model's parameters over the TP axis (rank 0's values everywhere); before the optimizer."""
        c = self.config
        if c.tp > 1 or c.pp == 1:
            parallelize(model, self.mesh, sequence_parallel=c.sequence_parallel)
        elif env.is_distributed():  # a pipeline without TP: every rank starts from rank 0's values
            for p in model.parameters():
                torch_dist.broadcast(p._value, src=0)

    def build_pipeline(self, model: Module, optimizer: Optimizer, task, example: dict) -> Pipeline:
        """This rank's stage, compiled from the task's inputs and target."""
        c = self.config
        pipe = Pipeline(model, self.mesh, micro_batches=c.micro_batches, schedule=c.pipeline_schedule, zero=c.zero)

        def spec(key):
            value = np.asarray(example[key])
            integer = np.issubdtype(value.dtype, np.integer)  # the rule of Task.placeholders
            return (key, (None,) + value.shape[1:], "int64" if integer else "float32")

        def loss_fn(output, target):
            return task.loss(output[0] if isinstance(output, tuple) else output, target)  # BERT: (mlm, nsp)

        pipe.compile([spec(k) for k in task.inputs], [spec(task.target)], loss_fn, optimizer)
        self.pipe = pipe
        return pipe

    def share(self, batch: dict) -> dict:
        """This rank's rows of a global batch (its DP share)."""
        rows = self.mesh.batch_slice(len(next(iter(batch.values()))))
        return {k: v[rows] for k, v in batch.items()}

    def pipeline_step(self, batch: dict, task) -> float:
        """One pipeline step on the global batch; the mean loss, on every rank."""
        loss = self.pipe.step([batch[k] for k in task.inputs], [batch[task.target]])
        return self._mean_over_last_stage(loss)

    def pipeline_memory(self, batch: dict, task) -> tuple[float, list[dict]]:
        """`pipeline_step` with the stage plans' memory accounted (`Pipeline.memory`): the mean loss
        and every rank's bytes (in rank order, on every rank: a collective)."""
        report = self.pipe.memory([batch[k] for k in task.inputs], [batch[task.target]])
        loss = report.pop("loss")
        mine = {"rank": self.rank, "stage": self.pipe.stage, "dp": self.mesh.index("dp"), "tp": self.mesh.index("tp"),
                **report}
        everyone: list = [None] * env.world_size()
        torch_dist.all_gather_object(everyone, mine)
        return self._mean_over_last_stage(loss), everyone

    def mean_loss(self, loss: float) -> float:
        """The loss of the whole global batch: the mean over the DP shares (TP peers hold the same value)."""
        if not env.is_distributed():
            return loss
        t = torch.tensor([loss / (self.config.dp * self.config.tp)], dtype=torch.float64)
        torch_dist.all_reduce(t)
        return float(t.item())

    def _mean_over_last_stage(self, loss: float | None) -> float:
        c = self.config
        t = torch.tensor([0.0 if loss is None else loss / (c.dp * c.tp)], dtype=torch.float64)
        torch_dist.all_reduce(t)  # only the last stage's ranks add their share
        return float(t.item())

    @contextlib.contextmanager
    def whole_model(self):
        """A context in which every rank of a pipeline holds the whole model (an evaluation): every
        parameter from the stage that trains it (`Pipeline.gather_stages`, a collective); under ZeRO-3
        the stage's own parameters stay gathered over its DP group until the context ends (then each
        rank keeps its shard again)."""
        pipe = self.pipe
        if pipe is None:
            yield
            return
        with pipe.zero.gathered_parameters() if pipe.zero is not None else contextlib.nullcontext():
            pipe.gather_stages()
            yield

    def save(self, path, model: Module, optimizer: Optimizer, metadata: dict) -> None:
        """The full-tensor checkpoint, written by rank 0 (a collective; the layout hook gathers the stages)."""
        parallel_checkpoint.save(path, model, optimizer, self.mesh, metadata)
    def barrier(self) -> None:
        env.barrier()


__all__ = ["ParallelRun"]
