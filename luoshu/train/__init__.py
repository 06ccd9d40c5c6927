"""Training jobs from a config (`luoshu train`): settings, the model, optimizer, dataset and task tables,
and the define-and-run `Trainer`.

A job is a model from the zoo (`luoshu.models.MODELS`), a dataset from `DATASETS` and an optimizer from
`OPTIMIZERS`. The model's task ("image", "sequence", "seq2seq", "lm", "ctr", "rating") picks the inputs,
the loss and the eval metrics (`TASKS`). The trainer records one define-and-run graph (a training branch
and an eval branch that share the parameters), runs it over seeded, prefetched batches with a progress
bar, and writes `metrics.csv`, a TensorBoard event file and checkpoints in the core's package format
under the job directory. A checkpoint holds the model, the optimizer and the training position (step,
epoch, batch, random-generator and scheduler state), so `resume=True` continues at the same step and,
the data order being seeded, reaches the same parameters as a run that was never interrupted.

Modules: `config` (settings and their one check), `builders` (model and optimizer tables), `datasets`,
`tasks`, `batches`, `checkpoints` (checkpoint bookkeeping) and `trainer`.
"""

from luoshu.train.batches import epoch_order
from luoshu.train.builders import OPTIMIZERS, build_model, build_optimizer, model_table
from luoshu.train.checkpoints import CHECKPOINT_PREFIX, latest_checkpoint, list_checkpoints
from luoshu.train.config import DEFAULT_JOB, TrainConfig, TrainConfigError, check_config, load_config
from luoshu.train.datasets import DATASETS, DatasetSpec, DataSplits
from luoshu.train.tasks import TASKS, CTRTask, ImageTask, LMTask, RatingTask, Seq2SeqTask, SequenceTask, Task
from luoshu.train.trainer import Trainer, train

resolve = check_config  # the name of the check (and task/spec look-up) before the package split

__all__ = [
    "CHECKPOINT_PREFIX", "CTRTask", "DATASETS", "DEFAULT_JOB", "DataSplits", "DatasetSpec", "ImageTask", "LMTask",
    "OPTIMIZERS", "RatingTask", "Seq2SeqTask", "SequenceTask", "TASKS", "Task", "TrainConfig", "TrainConfigError",
    "Trainer", "build_model", "build_optimizer", "check_config", "epoch_order", "latest_checkpoint",
    "list_checkpoints", "load_config", "model_table", "resolve", "train",
]
