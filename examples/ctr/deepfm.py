"""DeepFM in HugeCTR's layer API (as HugeCTR's samples/deepfm), reduced for CPU.

    python examples/ctr/deepfm.py [--max-iter 150]

One 11-dim embedding per slot: 10 dims feed the FM and the MLP, 1 dim is the first-order
weight; dense features get latent vectors through WeightMultiply.
"""
# doc-test: args --max-iter 10


import argparse

from _data import SLOTS, generate

from luoshu import ctr as hugectr

parser = argparse.ArgumentParser()
parser.add_argument("--max-iter", type=int, default=150)
args = parser.parse_args()
source, eval_source = generate("./deepfm_parquet")

solver = hugectr.CreateSolver(max_eval_batches=8, batchsize_eval=1024, batchsize=512, lr=0.001, vvgpu=[[0]],
                              repeat_dataset=True)
reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet, source=[source],
                                  eval_source=eval_source, slot_size_array=SLOTS)
optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam, update_type=hugectr.Update_t.Global)
model = hugectr.Model(solver, reader, optimizer)
model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=13, dense_name="dense",
                        data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 1, True, 26)]))
model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                  workspace_size_per_gpu_in_mb=61, embedding_vec_size=11, combiner="sum",
                                  sparse_embedding_name="sparse_embedding1", bottom_name="data1",
                                  optimizer=optimizer))
L = hugectr.Layer_t


def add(kind, bottoms, tops, **params):
    model.add(hugectr.DenseLayer(layer_type=kind, bottom_names=bottoms, top_names=tops, **params))


add(L.Reshape, ["sparse_embedding1"], ["reshape1"], leading_dim=11)
add(L.Slice, ["reshape1"], ["slice11", "slice12"], ranges=[(0, 10), (10, 11)])
add(L.Reshape, ["slice11"], ["reshape2"], leading_dim=260)
add(L.Reshape, ["slice12"], ["reshape3"], leading_dim=26)
add(L.WeightMultiply, ["dense"], ["weight_multiply1"], weight_dims=[13, 10])
add(L.WeightMultiply, ["dense"], ["weight_multiply2"], weight_dims=[13, 1])
add(L.Concat, ["reshape2", "weight_multiply1"], ["concat1"])
add(L.InnerProduct, ["concat1"], ["fc1"], num_output=256)
add(L.ReLU, ["fc1"], ["relu1"])
add(L.Dropout, ["relu1"], ["dropout1"], dropout_rate=0.5)
add(L.InnerProduct, ["dropout1"], ["fc2"], num_output=256)
add(L.ReLU, ["fc2"], ["relu2"])
add(L.Dropout, ["relu2"], ["dropout2"], dropout_rate=0.5)
add(L.InnerProduct, ["dropout2"], ["fc3"], num_output=1)
add(L.FmOrder2, ["concat1"], ["fmorder2"], out_dim=10)
add(L.ReduceSum, ["fmorder2"], ["reducesum1"], axis=1)
add(L.Concat, ["reshape3", "weight_multiply2"], ["concat2"])
add(L.ReduceSum, ["concat2"], ["reducesum2"], axis=1)
add(L.Add, ["fc3", "reducesum1", "reducesum2"], ["add"])
add(L.BinaryCrossEntropyLoss, ["add", "label"], ["loss"])
model.compile()
model.summary()
model.graph_to_json(graph_config_file="deepfm.json")
model.fit(max_iter=args.max_iter, display=25, eval_interval=75, snapshot=args.max_iter, snapshot_prefix="deepfm")
