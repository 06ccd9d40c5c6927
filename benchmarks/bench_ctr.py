"""luoshu.ctr (HugeCTR API) DCN with the quick-start shapes vs PyTorch doing the same maths, samples/s, in one run.

13 dense features, 26 slots with the quick start's slot sizes (390k rows), vector size 16,
6 cross layers, MLP 1024 (the quick start's fc1; no dropout on either side), batch 1024, Adam.

luoshu's MultiCross (luoshu.models.CrossNetwork v1) computes the cross network in factored form,
x_l = x0 * s_l + c_l (one (batch, dim) x (dim, layers) product and per-sample scalars). The
references compute the same thing, with the best optimizers PyTorch has:

  luoshu.ctr Global        Update_t.Global (the quick start's setting): every row's Adam state moves
  luoshu.ctr Local         Update_t.Local: only the rows in the batch (IndexedSlices gradient)
  ... compiled             (--compile) the same with CreateSolver(compile_step=True): forward, backward, the
                           dense Adam and the table's update (luoshu.optim.lowered_sparse) as one Inductor graph
  (a) torch Global maths   factored cross, dense nn.Embedding, Adam(fused=True) over everything
                           (every row moves, as Global)                       <- reference of Global
  (b) torch Local maths    factored cross, nn.Embedding(sparse=True) + SparseAdam for the table,
                           Adam(fused=True) for the rest (row-sparse, as Local) <- reference of Local
  (b, foreach)             (b) with Adam(foreach=True)
  (a) / (b) torch.compile  (--compile) (a) with the whole model compiled by torch.compile; (b) with the towers
                           after the lookup compiled (inductor cannot handle the sparse gradient), optimizers eager
  textbook (other algo.)   the paper's layer-by-layer cross network, dense table, Adam(fused=True):
                           a different algorithm; luoshu's gain over it is the algorithm's
  (c) TorchRec EmbeddingBagCollection with a fused optimizer: skipped. torchrec 1.9.2 needs
      fbgemm-gpu(-cpu) 1.9.0, whose kernels are built for another torch release: with torch
      2.13.0 `import fbgemm_gpu` fails (undefined symbol in fbgemm_gpu_tbe_index_select.so),
      and a matching fbgemm would replace the pinned torch.

luoshu.ctr's timing includes its own input pipeline (Parquet reader, key → row mapping,
feeding the graph); the PyTorch steps get ready-made tensors. Repeats are interleaved.

    .venv/bin/python benchmarks/bench_ctr.py [--steps 10] [--repeats 3] [--batch 1024] [--compile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from _timing import interleaved

from luoshu import ctr as hugectr
from luoshu.compiler import LoweringWarning
from luoshu.ctr.tools import DataGenerator, DataGeneratorParams

SLOTS = [39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 63,
         39884, 39043, 17289, 7420, 20263, 3, 7120, 1543]
VEC, CROSS, MLP = 16, 6, 1024


def make_data(folder: Path, batch: int, batches: int):
    DataGenerator(DataGeneratorParams(
        format=hugectr.DataReaderType_t.Parquet, label_dim=1, dense_dim=13, num_slot=26,
        source=str(folder / "file_list.txt"), eval_source=str(folder / "file_list_test.txt"), slot_size_array=SLOTS,
        power_law_type=hugectr.PowerLaw_t.Short, num_files=1, eval_num_files=1,
        num_samples_per_file=batch * batches)).generate()
    table = pq.read_table(hugectr.read_file_list(folder / "file_list.txt")[0])
    label = table.column("label").to_numpy().astype(np.float32)
    dense = np.stack([table.column(f"I{i + 1}").to_numpy() for i in range(13)], 1).astype(np.float32)
    sparse = np.stack([table.column(f"C{i + 1}").to_numpy() for i in range(26)], 1).astype(np.int64)
    return [(dense[i:i + batch], sparse[i:i + batch], label[i:i + batch]) for i in range(0, len(label), batch)]


def luoshu_step(folder: Path, batch: int, update, compiled: bool = False):
    solver = hugectr.CreateSolver(batchsize=batch, batchsize_eval=batch, max_eval_batches=1, lr=0.001,
                                  repeat_dataset=True, compile_step=compiled)
    reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet,
                                      source=[str(folder / "file_list.txt")],
                                      eval_source=str(folder / "file_list_test.txt"), slot_size_array=SLOTS)
    optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam, update_type=update, epsilon=1e-8)
    model = hugectr.Model(solver, reader, optimizer)
    model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=13, dense_name="dense",
                            data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 1, True, 26)]))
    model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                      workspace_size_per_gpu_in_mb=75, embedding_vec_size=VEC, combiner="sum",
                                      sparse_embedding_name="sparse_embedding1", bottom_name="data1",
                                      optimizer=optimizer))
    L = hugectr.Layer_t
    for kind, bottoms, tops, params in [
        (L.Reshape, ["sparse_embedding1"], ["reshape1"], {"leading_dim": 26 * VEC}),
        (L.Concat, ["reshape1", "dense"], ["concat1"], {}),
        (L.MultiCross, ["concat1"], ["multicross1"], {"num_layers": CROSS}),
        (L.InnerProduct, ["concat1"], ["fc1"], {"num_output": MLP}),
        (L.ReLU, ["fc1"], ["relu1"], {}),
        (L.Concat, ["relu1", "multicross1"], ["concat2"], {}),
        (L.InnerProduct, ["concat2"], ["fc2"], {"num_output": 1}),
        (L.BinaryCrossEntropyLoss, ["fc2", "label"], ["loss"], {}),
    ]:
        model.add(hugectr.DenseLayer(layer_type=kind, bottom_names=bottoms, top_names=tops, **params))
    model.compile()
    if compiled:  # a fallback to the plan would time the plan under the compiled row's name
        warnings.simplefilter("error", LoweringWarning)
    return lambda i: model.train()


class TorchDCN(torch.nn.Module):
    def __init__(self, sparse: bool, factored: bool = False):
        super().__init__()
        self.factored = factored
        self.embedding = torch.nn.Embedding(sum(SLOTS), VEC, sparse=sparse)
        self.register_buffer("offsets", torch.tensor(np.concatenate([[0], np.cumsum(SLOTS)[:-1]])))
        dim = 13 + 26 * VEC
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(dim) / dim ** 0.5) for _ in range(CROSS)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(dim)) for _ in range(CROSS)])
        self.fc1 = torch.nn.Linear(dim, MLP)
        self.fc2 = torch.nn.Linear(dim + MLP, 1)

    def forward(self, dense, sparse):
        return self.towers(dense, self.embedding(sparse + self.offsets))

    def towers(self, dense, emb):
        x0 = x = torch.cat([emb.flatten(1), dense], 1)
        if self.factored:  # x_l = x0 * s_l + c_l, as luoshu's CrossNetwork computes it
            x0w = torch.nn.functional.linear(x0, torch.stack(list(self.w)))  # x0 . w_l for every layer
            s, c = torch.ones_like(x0w[:, :1]), torch.zeros_like(self.b[0])
            for i, (w, b) in enumerate(zip(self.w, self.b)):
                s = s + s * x0w[:, i:i + 1] + c @ w
                c = c + b
            x = x0 * s + c
        else:
            for w, b in zip(self.w, self.b):
                x = x0 * (x @ w).unsqueeze(1) + b + x
        return self.fc2(torch.cat([torch.relu(self.fc1(x0)), x], 1)).squeeze(1)


def torch_step(data, sparse: bool, factored: bool, adam: dict, compile: bool = False):
    torch.manual_seed(0)
    model = TorchDCN(sparse, factored)
    forward = model
    if compile and not sparse:
        forward = torch.compile(model)
    elif compile:  # inductor cannot trace sparse gradients: the lookup stays eager, the towers compile
        towers = torch.compile(model.towers)

        def forward(dense, keys):
            return towers(dense, model.embedding(keys + model.offsets))
    if sparse:
        table = [model.embedding.weight]
        rest = [p for n, p in model.named_parameters() if n != "embedding.weight"]
        opts = [torch.optim.SparseAdam(table, lr=1e-3), torch.optim.Adam(rest, lr=1e-3, **adam)]
    else:
        opts = [torch.optim.Adam(model.parameters(), lr=1e-3, **adam)]
    tdata = [tuple(torch.from_numpy(a) for a in b) for b in data]

    def step(i):
        dense, keys, label = tdata[i % len(tdata)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(dense, keys), label)
        loss.backward()
        for o in opts:
            o.step()
        loss.item()

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="add the compiled rows (compiling takes a while)")
    args = parser.parse_args()
    fused, foreach = {"fused": True}, {"foreach": True}
    G, Lo = hugectr.Update_t.Global, hugectr.Update_t.Local
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = make_data(folder, args.batch, 8)
        contenders = {
            "luoshu.ctr Global": luoshu_step(folder, args.batch, G),
            "luoshu.ctr Local": luoshu_step(folder, args.batch, Lo),
            "(a) torch Global maths": torch_step(data, False, True, fused),
            "(b) torch Local maths": torch_step(data, True, True, fused),
            "(b, foreach)": torch_step(data, True, True, foreach),
            "textbook (other algo.)": torch_step(data, False, False, fused),
        }
        if args.compile:
            contenders.update({
                "luoshu.ctr Global compiled": luoshu_step(folder, args.batch, G, compiled=True),
                "luoshu.ctr Local compiled": luoshu_step(folder, args.batch, Lo, compiled=True),
                "(a) torch.compile": torch_step(data, False, True, fused, compile=True),
                "(b) torch.compile": torch_step(data, True, True, fused, compile=True),
            })
        rates = interleaved(contenders, args.steps, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} interleaved rounds of {args.steps} steps (noisy on a shared CPU), "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, rate in rates.items():
        print(f"{name:<27} {rate * args.batch:>10,.0f} samples/s")
    print("(c) TorchRec                 skipped: fbgemm-gpu-cpu 1.9.0 does not load with torch 2.13.0 (see docstring)")
    local_ref = max(("(b) torch Local maths", "(b, foreach)"), key=rates.get)
    suffixes = ("", " compiled") if args.compile else ("",)
    for suffix in suffixes:
        glob, local = rates[f"luoshu.ctr Global{suffix}"], rates[f"luoshu.ctr Local{suffix}"]
        print(f"luoshu.ctr Global{suffix} vs (a), the same maths: {glob / rates['(a) torch Global maths']:.2f}x")
        print(f"luoshu.ctr Local{suffix}  vs {local_ref}, the same maths: {local / rates[local_ref]:.2f}x")
        if args.compile:
            print(f"luoshu.ctr Global{suffix} vs (a) torch.compile: {glob / rates['(a) torch.compile']:.2f}x; "
                  f"Local{suffix} vs (b) torch.compile: {local / rates['(b) torch.compile']:.2f}x")
    print(f"luoshu.ctr Local  vs the textbook algorithm (a different algorithm, not a system gain): "
          f"{rates['luoshu.ctr Local'] / rates['textbook (other algo.)']:.2f}x")


if __name__ == "__main__":
    main()
