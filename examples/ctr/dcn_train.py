"""HugeCTR's DCN quick start, step 2: train on the data `dcn_generate.py` wrote.

    python examples/ctr/dcn_train.py [--max-iter 150] [--mlp 1024]

HugeCTR's `dcn_parquet_train.py` with the import changed; the MLP width and iteration count
are command-line options (defaults sized for seconds on 2 CPU cores, ~8 s measured:
`--mlp 1024 --max-iter 5120 --batch 1024` is the original). Writes dcn.json, the snapshot
packages dcn_dense_*.model / dcn0_sparse_*.model and dcn_metrics.csv.
"""
# doc-test: needs dcn_generate.py
# doc-test: args --max-iter 10


import argparse

from luoshu import ctr as hugectr

parser = argparse.ArgumentParser()
parser.add_argument("--max-iter", type=int, default=150)
parser.add_argument("--batch", type=int, default=512)
parser.add_argument("--mlp", type=int, default=256)
args = parser.parse_args()

solver = hugectr.CreateSolver(max_eval_batches=8,
                              batchsize_eval=1024,
                              batchsize=args.batch,
                              lr=0.001,
                              vvgpu=[[0]],
                              repeat_dataset=True)
reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet,
                                  source=["./dcn_parquet/file_list.txt"],
                                  eval_source="./dcn_parquet/file_list_test.txt",
                                  slot_size_array=[39884, 39043, 17289, 7420, 20263, 3, 7120, 1543, 39884, 39043,
                                                   17289, 7420, 20263, 3, 7120, 1543, 63, 63, 39884, 39043, 17289,
                                                   7420, 20263, 3, 7120, 1543])
optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam,
                                    update_type=hugectr.Update_t.Global)
model = hugectr.Model(solver, reader, optimizer)
model.add(hugectr.Input(label_dim=1, label_name="label",
                        dense_dim=13, dense_name="dense",
                        data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 1, True, 26)]))
model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.DistributedSlotSparseEmbeddingHash,
                                  workspace_size_per_gpu_in_mb=75,
                                  embedding_vec_size=16,
                                  combiner="sum",
                                  sparse_embedding_name="sparse_embedding1",
                                  bottom_name="data1",
                                  optimizer=optimizer))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Reshape,
                             bottom_names=["sparse_embedding1"],
                             top_names=["reshape1"],
                             leading_dim=416))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Concat,
                             bottom_names=["reshape1", "dense"], top_names=["concat1"]))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.MultiCross,
                             bottom_names=["concat1"],
                             top_names=["multicross1"],
                             num_layers=6))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.InnerProduct,
                             bottom_names=["concat1"],
                             top_names=["fc1"],
                             num_output=args.mlp))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.ReLU,
                             bottom_names=["fc1"],
                             top_names=["relu1"]))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Dropout,
                             bottom_names=["relu1"],
                             top_names=["dropout1"],
                             dropout_rate=0.5))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.Concat,
                             bottom_names=["dropout1", "multicross1"],
                             top_names=["concat2"]))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.InnerProduct,
                             bottom_names=["concat2"],
                             top_names=["fc2"],
                             num_output=1))
model.add(hugectr.DenseLayer(layer_type=hugectr.Layer_t.BinaryCrossEntropyLoss,
                             bottom_names=["fc2", "label"],
                             top_names=["loss"]))
model.compile()
model.summary()
model.graph_to_json(graph_config_file="dcn.json")
model.fit(max_iter=args.max_iter, display=25, eval_interval=75, snapshot=args.max_iter, snapshot_prefix="dcn")
