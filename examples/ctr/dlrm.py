"""DLRM in HugeCTR's layer API (as HugeCTR's samples/dlrm), reduced for CPU.

    python examples/ctr/dlrm.py [--max-iter 150]

Bottom MLP on the dense features, DLRM's dot-product Interaction with the slot embeddings,
top MLP to one logit (HugeCTR: vector size 128, MLPs 512-256-128 and 1024-1024-512-256-1).
"""
# doc-test: args --max-iter 10


import argparse

from _data import SLOTS, generate

from luoshu import ctr as hugectr

parser = argparse.ArgumentParser()
parser.add_argument("--max-iter", type=int, default=150)
args = parser.parse_args()
source, eval_source = generate("./dlrm_parquet")

solver = hugectr.CreateSolver(max_eval_batches=8, batchsize_eval=1024, batchsize=512, lr=0.001, vvgpu=[[0]],
                              repeat_dataset=True)
reader = hugectr.DataReaderParams(data_reader_type=hugectr.DataReaderType_t.Parquet, source=[source],
                                  eval_source=eval_source, slot_size_array=SLOTS)
optimizer = hugectr.CreateOptimizer(optimizer_type=hugectr.Optimizer_t.Adam, update_type=hugectr.Update_t.Local)
model = hugectr.Model(solver, reader, optimizer)
model.add(hugectr.Input(label_dim=1, label_name="label", dense_dim=13, dense_name="dense",
                        data_reader_sparse_param_array=[hugectr.DataReaderSparseParam("data1", 1, True, 26)]))
model.add(hugectr.SparseEmbedding(embedding_type=hugectr.Embedding_t.LocalizedSlotSparseEmbeddingHash,
                                  workspace_size_per_gpu_in_mb=100, embedding_vec_size=16, combiner="sum",
                                  sparse_embedding_name="sparse_embedding1", bottom_name="data1",
                                  optimizer=optimizer))
L = hugectr.Layer_t
model.add(hugectr.DenseLayer(layer_type=L.MLP, bottom_names=["dense"], top_names=["mlp1"],
                             num_outputs=[128, 64, 16], act_type=hugectr.Activation_t.Relu))
model.add(hugectr.DenseLayer(layer_type=L.Interaction, bottom_names=["mlp1", "sparse_embedding1"],
                             top_names=["interaction1", "interaction_grad"]))
model.add(hugectr.DenseLayer(layer_type=L.MLP, bottom_names=["interaction1"], top_names=["mlp2"],
                             num_outputs=[256, 128, 1],
                             activations=[hugectr.Activation_t.Relu, hugectr.Activation_t.Relu,
                                          hugectr.Activation_t.Non]))
model.add(hugectr.DenseLayer(layer_type=L.BinaryCrossEntropyLoss, bottom_names=["mlp2", "label"],
                             top_names=["loss"]))
model.compile()
model.summary()
model.graph_to_json(graph_config_file="dlrm.json")
model.fit(max_iter=args.max_iter, display=25, eval_interval=75, snapshot=args.max_iter, snapshot_prefix="dlrm")
