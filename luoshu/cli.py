"""The `luoshu` command line: a table of subcommands, each a parser set-up and a run function.

A subcommand is one entry in `COMMANDS`. The work itself lives in the library (`luoshu/train/` for
`luoshu train`, `luoshu/distributed/launch.py` for `luoshu launch`, `luoshu/onnx` for `luoshu export-onnx`,
`luoshu/serving/server.py` for `luoshu serve`), so this file stays thin.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from luoshu.core.errors import Error


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit status
    description: str | None = None
    epilog: Callable[[], str] | None = None  # computed only when the subcommand's parser is built


# --- luoshu train -------------------------------------------------------------------------------------

def _key_value(text: str) -> tuple[str, object]:
    """`name=value` with the value read as YAML (so 256 is an int, [64, 32] a list, v2 a string)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, found {text!r}")
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return name.strip(), value


def _train_arguments(p: argparse.ArgumentParser) -> None:
    s = argparse.SUPPRESS  # flags left out do not override the config file
    p.add_argument("--config", default=s, metavar="FILE", help="YAML or JSON file of settings; flags override it")
    p.add_argument("--model", default=s, help="model from the zoo (see the list below); default dcn")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_key_value, default=s,
                   metavar="NAME=VALUE", help="model config override, e.g. --model-arg mlp_dims=[256,128] (repeatable)")
    p.add_argument("--dataset", default=s, help="dataset (see the list below); default synthetic-ctr")
    p.add_argument("--data-path", default=s, metavar="PATH", help="local files of a dataset that needs them")
    p.add_argument("--data-arg", dest="data_args", action="append", type=_key_value, default=s,
                   metavar="NAME=VALUE", help="dataset option, e.g. --data-arg num_samples=50000 (repeatable)")
    p.add_argument("--optimizer", default=s, help="sgd, momentum, nesterov, adam, adamw, adagrad, rmsprop, lamb")
    p.add_argument("--optimizer-arg", dest="optimizer_args", action="append", type=_key_value, default=s,
                   metavar="NAME=VALUE", help="optimizer option, e.g. --optimizer-arg momentum=0.9 (repeatable)")
    p.add_argument("--lr", type=float, default=s, help="learning rate")
    p.add_argument("--weight-decay", type=float, default=s)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=s)
    p.add_argument("--warmup-steps", type=int, default=s)
    p.add_argument("--max-grad-norm", type=float, default=s, help="clip the global gradient norm to this")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=s,
                   help="bf16/fp16: mixed precision with fp32 master weights (fp16 with loss scaling)")
    p.add_argument("--epochs", type=int, default=s)
    p.add_argument("--max-steps", type=int, default=s, help="train this many steps (instead of --epochs)")
    p.add_argument("--batch-size", type=int, default=s)
    p.add_argument("--eval-batch-size", type=int, default=s, help="default: 4 x batch size")
    p.add_argument("--device", default=s, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--eval-interval", type=int, default=s, metavar="STEPS",
                   help="steps between evaluations (default: every epoch, and always at the end)")
    p.add_argument("--checkpoint-interval", type=int, default=s, metavar="STEPS",
                   help="steps between checkpoints (default: at every evaluation; 0: only at the end)")
    p.add_argument("--checkpoint-dir", default=s, metavar="DIR", help="default: <out>/checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=s, metavar="N", help="newest N kept (default 3; 0: all)")
    p.add_argument("--log-interval", type=int, default=s, metavar="STEPS",
                   help="steps between train-loss points in TensorBoard (default 10)")
    p.add_argument("--num-workers", type=int, default=s, help="threads preparing batches ahead (default 1)")
    p.add_argument("--resume", action="store_true", default=s,
                   help="continue from the newest checkpoint in the checkpoint dir")
    p.add_argument("--seed", type=int, default=s)
    p.add_argument("--out", default=s, metavar="DIR",
                   help="job directory for metrics.csv, TensorBoard events and checkpoints "
                        "(default: runs/<model>-<dataset>)")
    p.add_argument("--quiet", action="store_true", default=s, help="no progress bar")
    p.add_argument("--profile-memory", dest="profile_memory", action="store_true", default=s,
                   help="account the first training step's memory (peak, its step, parameters / optimizer state / "
                        "gradients / activations): printed and written to memory.json")
    p.add_argument("--compile", action="store_true", default=s,
                   help="run each training step (forward, backward, update) as one TorchInductor-compiled graph; "
                        "a step that cannot be lowered runs uncompiled, with a warning naming the op")
    p.add_argument("--dp", type=int, default=s, help="data-parallel size (under luoshu launch; dp x tp x pp = "
                   "the processes)")
    p.add_argument("--tp", type=int, default=s, help="tensor-parallel size (language models)")
    p.add_argument("--pp", type=int, default=s, help="pipeline-parallel stages (language models)")
    p.add_argument("--micro-batches", type=int, default=s, help="micro-batches per step of a pipeline")
    p.add_argument("--pipeline-schedule", choices=["1f1b", "gpipe"], default=s)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=s,
                   help="ZeRO stage over the data-parallel workers: 1 shards the optimizer state, 2 also the "
                        "gradients, 3 also the parameters (with --dp/--tp: over the DP axis)")
    p.add_argument("--sequence-parallel", action="store_true", default=s,
                   help="keep activations between tensor-parallel regions split on the sequence")
    p.add_argument("--parallel", choices=["auto"], default=s,
                   help="auto: the strategy search (profiled cost model) picks the (dp, tp) of a gpt2/llama job "
                        "on synthetic-lm under luoshu launch")
    p.add_argument("--memory-budget-mb", type=float, default=s, metavar="MIB",
                   help="with --parallel auto: memory per device the chosen strategy must fit in")
    p.add_argument("--recompute", nargs="?", const=True, default=s, metavar="SCOPE",
                   help="recompute activations in the backward: every block, or SCOPE 'attention' (language models)")


def _train_epilog() -> str:
    from luoshu.train import DATASETS, OPTIMIZERS, model_table

    by_task: dict[str, list[str]] = {}
    for name, (_, _, task) in sorted(model_table().items()):
        by_task.setdefault(task, []).append(name)
    lines = ["models (by task):"]
    lines += [f"  {task:9} {', '.join(names)}" for task, names in sorted(by_task.items())]
    lines.append("datasets:")
    lines += [f"  {name:14} {'/'.join(spec.tasks):12} {spec.help}" for name, spec in DATASETS.items()]
    lines.append(f"optimizers: {', '.join(OPTIMIZERS)}")
    lines.append("With no arguments, trains the default job: DCN on synthetic click logs (about ten seconds on "
                 "2 cores), writing runs/dcn-synthetic-ctr/{metrics.csv, events.out.tfevents.*, checkpoints/}.")
    return "\n".join(lines)


def _run_train(args: argparse.Namespace) -> int:
    import copy

    from luoshu.train import DEFAULT_JOB, TrainConfig, load_config, train

    given = {k: v for k, v in vars(args).items() if k != "command"}
    if "config" in given:
        values = load_config(given.pop("config"))
    elif "model" in given or "dataset" in given:
        values = {}
    else:  # the embedded default job, which the other flags adjust
        values = copy.deepcopy(DEFAULT_JOB)
    for key in ("model_args", "data_args", "optimizer_args"):  # flags add to the file's mapping
        if key in given:
            values[key] = {**(values.get(key) or {}), **dict(given.pop(key))}
    if given.pop("quiet", False):
        values["progress"] = False
    if "recompute" in given:  # a field of the language models' configs
        values["model_args"] = {**(values.get("model_args") or {}), "recompute": given.pop("recompute")}
    values.update(given)
    # the messages' source: main() already prefixes "luoshu train: error:"
    config = TrainConfig.from_dict(values, f"config file {args.config}" if "config" in vars(args) else "settings")
    metrics = train(config)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    print(f"{config.model} on {config.dataset}: {shown}; metrics in {config.job_dir / 'metrics.csv'}, "
          f"TensorBoard events in {config.job_dir}, checkpoints in {config.checkpoint_path}")
    return 0


# --- luoshu launch ------------------------------------------------------------------------------------

def _launch_arguments(p: argparse.ArgumentParser) -> None:
    from luoshu.distributed import launch

    launch.add_arguments(p)


def _run_launch(args: argparse.Namespace) -> int:
    from luoshu.distributed import launch

    return launch.main(args)


# --- luoshu tune -------------------------------------------------------------------------------------

def _tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="the `luoshu train` config (YAML/JSON) to tune")
    p.add_argument("--space", required=True, metavar="FILE", help="search space (YAML/JSON): name -> range")
    p.add_argument("--trials", type=int, default=20, help="trials this process runs (default 20)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop starting trials after this")
    p.add_argument("--storage", default=None, help="study storage shared by parallel processes: a journal file "
                   "path (recommended) or an RDB URL such as sqlite:///study.db (one writer only)")
    p.add_argument("--study-name", default="luoshu", help="the study's name in the storage")
    p.add_argument("--metric", default=None, help="eval metric to optimise (default: the task's first)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--seed", type=int, default=None, help="the TPE sampler's seed")
    p.add_argument("--out", default="runs/tune", metavar="DIR",
                   help="trial jobs, best.yaml, trials.csv and plots go here (default runs/tune)")


def _run_tune(args: argparse.Namespace) -> int:
    from luoshu.train import load_config
    from luoshu.train.tune import tune_job

    result = tune_job(load_config(args.job), load_config(args.space), n_trials=args.trials, timeout=args.timeout,
                      storage=args.storage, study_name=args.study_name, metric=args.metric, pruner=args.pruner,
                      seed=args.seed, out=args.out)
    print(f"best {result.best_value:.6g} with {result.best_params}; trials {result.counts}; "
          f"ready config {result.files['best']} (luoshu train --config {result.files['best']}), "
          f"all trials {result.files['trials']}, plots in {args.out}")
    return 0


# --- luoshu serve -------------------------------------------------------------------------------------

def _serve_arguments(p: argparse.ArgumentParser) -> None:
    from luoshu.serving.server import DEFAULT_GRPC_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, ServerConfig

    d = ServerConfig()
    p.add_argument("packages", nargs="+", metavar="PACKAGE", help="model package directories (luoshu.serving.export)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default {DEFAULT_HOST}; 0.0.0.0: all)")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP/REST port (0: any free; -1: none)")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (0: any free; -1: none)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"most rows per request and per batched run (default {d.max_batch_size})")
    p.add_argument("--max-queue-delay-ms", type=float, default=d.max_queue_delay_ms,
                   help=f"longest wait for a fuller batch (default {d.max_queue_delay_ms})")
    p.add_argument("--no-dynamic-batching", action="store_true", help="run every request alone")
    p.add_argument("--workers", type=int, default=d.workers, help="threads running each model (default 1)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20),
                   help="largest request body / gRPC message accepted, MiB (default 64)")
    p.add_argument("--embedding-store", metavar="CONFIG.json",
                   help="serve the packages' embedding tables named in this store config from the tiered store "
                        "(hot cache -> host memory -> RocksDB); see luoshu/serving/embedding_store.py")


def _run_serve(args: argparse.Namespace) -> int:
    from luoshu.serving.server import InferenceServer, ServerConfig, store_backed_sources

    config = ServerConfig(host=args.host, http_port=None if args.http_port < 0 else args.http_port,
                          grpc_port=None if args.grpc_port < 0 else args.grpc_port,
                          max_batch_size=args.max_batch_size, max_queue_delay_ms=args.max_queue_delay_ms,
                          dynamic_batching=not args.no_dynamic_batching, workers=args.workers,
                          max_body_bytes=int(args.max_body_mb * (1 << 20)))
    sources, stores = list(args.packages), []
    if args.embedding_store:
        sources, store = store_backed_sources(args.packages, args.embedding_store)
        stores.append(store)
    server = InferenceServer(sources, config, stores=stores)

    def announce() -> None:
        server.wait_ready()
        print(f"luoshu serve: ready, HTTP on {config.host}:{server.http_port}, gRPC on {config.host}:"
              f"{server.grpc_port}, models {', '.join(server.model_names())}", flush=True)

    import threading

    threading.Thread(target=lambda: _quietly(announce), daemon=True).start()
    try:
        server.serve_forever()
    finally:
        for store in stores:
            store.close()
    return 0


def _quietly(fn) -> None:
    try:
        fn()
    except Error:
        pass  # serve_forever reports the loading error


# --- luoshu export-onnx -------------------------------------------------------------------------------

def _export_onnx_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("package", metavar="PACKAGE", help="model package directory (luoshu.serving.export)")
    p.add_argument("out", metavar="OUT.onnx", help="ONNX file to write (weights over 2 GB go to OUT.onnx.data)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or later; default 17)")
    p.add_argument("--static-batch", type=int, default=None, metavar="N",
                   help="fix the batch dimension to N instead of leaving it dynamic")


def _run_export_onnx(args: argparse.Namespace) -> int:
    from luoshu.onnx import export

    static = args.static_batch
    path = export(args.package, args.out, opset=args.opset, dynamic_batch=static is None, batch_size=static or 1)
    print(f"wrote {path} (opset {args.opset}, {'batch ' + str(static) if static else 'dynamic batch'})")
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a model from the zoo on a dataset (default: DCN on synthetic click logs)",
                     _train_arguments, _run_train,
                     description="Train a model from a config file and/or flags (flags win). Writes metrics.csv, "
                                 "a TensorBoard event file and resumable checkpoints in the job directory.",
                     epilog=_train_epilog),
    "launch": Command("run a training script on N worker (+ S parameter-server) processes per node",
                      _launch_arguments, _run_launch,
                      description="Start a script on N worker processes (and S parameter servers) per node through "
                                  "torchrun's elastic agent; multi-node with --nnodes/--node-rank/--rdzv-endpoint."),
    "tune": Command("search a training job's hyper-parameters (Optuna: TPE, pruning; shared storage)",
                    _tune_arguments, _run_tune,
                    description="Run trials of a `luoshu train` job over a search space; processes given the same "
                                "--storage work on one study. Writes best.yaml, trials.csv and plots to --out."),
    "serve": Command("serve model packages over the Open Inference Protocol (KServe v2), HTTP and gRPC",
                     _serve_arguments, _run_serve,
                     description="Serve model packages over HTTP/REST and gRPC with the KServe v2 / Triton protocol, "
                                 "batching requests dynamically per model. Stops gracefully on SIGINT/SIGTERM."),
    "export-onnx": Command("convert a model package to ONNX (walking luoshu's IR; checked with onnx.checker)",
                           _export_onnx_arguments, _run_export_onnx),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luoshu", description="luoshu: distributed deep learning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        # the epilog (which imports the model zoo) is built only for the subcommand being run
        epilog = command.epilog() if command.epilog is not None and name == wanted else None
        p = sub.add_parser(name, help=command.help, description=command.description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except Error as exc:
        print(f"luoshu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # the trainer saved a checkpoint first; SIGTERM arrives as its subclass
        from luoshu.train.errors import Terminated

        if isinstance(exc, Terminated):
            print(f"luoshu {args.command}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print(f"luoshu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
