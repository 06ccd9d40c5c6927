"""Wide & Deep in HugeCTR's layer API (as HugeCTR's samples/wdl), reduced for CPU.

    python examples/ctr/wdl.py [--max-iter 150]

Two sparse inputs from one file: 2 "wide" slots (a linear part: 1-dim embeddings summed)
and 26 "deep" slots (16-dim embeddings into an MLP), added into one logit.
"""
# doc-test: args --max-iter 10


import argparse

from _data import SLOTS, generate

from luoshu import ctr as hugectr

parser = argparse.ArgumentParser()
parser.add_argument("--max-iter", type=int, default=150)
args = parser.parse_args()
slots = SLOTS + [5000, 5000]  # the last two play HugeCTR's crossed wide features
source, eval_source = generate("./wdl_parquet", slots)

solver = hugectr.CreateSolver(max_eval_batches=8, batchsize_eval=1024, batchsize=512, lr=0.001, vvgpu=[[0]],
                              repeat_dataset=True)
# the wide slots are the file's last two, so the Input lists the deep input first
reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet, source=[source],
                                  eval_source=eval_source, slot_size_array=slots)
optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam, update_type=hugectr.Update_t.Global,
                                    beta1=0.9, beta2=0.999, epsilon=0.0000001)
model = hugectr.Model(solver, reader, optimizer)
model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=13, dense_name="dense",
                        data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("deep_data", 1, True, 26),
                                                        hugectr.DataReaderSparseParam("wide_data", 1, True, 2)]))
model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                  workspace_size_per_gpu_in_mb=23, embedding_vec_size=1, combiner="sum",
                                  sparse_embedding_name="sparse_embedding2", bottom_name="wide_data",
                                  optimizer=optimizer))
model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                  workspace_size_per_gpu_in_mb=358, embedding_vec_size=16, combiner="sum",
                                  sparse_embedding_name="sparse_embedding1", bottom_name="deep_data",
                                  optimizer=optimizer))
L = hugectr.Layer_t
model.add(hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["sparse_embedding1"], top_names=["reshape1"],
                             leading_dim=416))
model.add(hugectr.DenseLayer(layer_type=L.Reshape, bottom_names=["sparse_embedding2"], top_names=["reshape2"],
                             leading_dim=2))
model.add(hugectr.DenseLayer(layer_type=L.ReduceSum, bottom_names=["reshape2"], top_names=["wide_redn"], axis=1))
model.add(hugectr.DenseLayer(layer_type=L.Concat, bottom_names=["reshape1", "dense"], top_names=["concat1"]))
model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["concat1"], top_names=["fc1"], num_output=256))
model.add(hugectr.DenseLayer(layer_type=L.ReLU, bottom_names=["fc1"], top_names=["relu1"]))
model.add(hugectr.DenseLayer(layer_type=L.Dropout, bottom_names=["relu1"], top_names=["dropout1"], dropout_rate=0.5))
model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["dropout1"], top_names=["fc2"], num_output=256))
model.add(hugectr.DenseLayer(layer_type=L.ReLU, bottom_names=["fc2"], top_names=["relu2"]))
model.add(hugectr.DenseLayer(layer_type=L.Dropout, bottom_names=["relu2"], top_names=["dropout2"], dropout_rate=0.5))
model.add(hugectr.DenseLayer(layer_type=L.InnerProduct, bottom_names=["dropout2"], top_names=["fc3"], num_output=1))
model.add(hugectr.DenseLayer(layer_type=L.Add, bottom_names=["fc3", "wide_redn"], top_names=["add1"]))
model.add(hugectr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["add1", "label"],
                             top_names=["loss"]))
model.compile()
model.summary()
model.graph_to_json(graph_config_file="wdl.json")
model.fit(max_iter=args.max_iter, display=25, eval_interval=75, snapshot=args.max_iter, snapshot_prefix="wdl")
