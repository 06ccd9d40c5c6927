"""luoshu.train.tasks: every task's wiring (inputs, loss, metrics) on a tiny job, BERT's masked-LM inputs."""


import numpy as np
import pytest

from luoshu.train import TrainConfig, Trainer
from tests.train.harness import TINY_CTR

# one tiny job per task the zoo serves: the data, the model and the metrics fit together
WIRING = [
    ("mlp", "digits", {"hidden": [16]}, {}),
    ("lenet", "digits", {"image_size": 8}, {}),
    ("lstm", "synthetic-text", {"embed_dim": 8, "hidden_size": 8}, {"num_samples": 128, "eval_samples": 32}),
    ("transformer", "reverse", {"d_model": 16, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                                "dim_feedforward": 32}, {"num_samples": 128, "eval_samples": 32, "max_len": 6}),
    ("gpt2", "copy", {"n_layer": 1, "n_head": 2, "n_embd": 16}, {"num_samples": 128, "eval_samples": 32,
                                                                 "max_len": 6}),
    ("llama", "synthetic-lm", {"dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 8},
     {"num_docs": 40, "vocab": 32, "seq_len": 8, "max_len": 32}),
    ("bert", "synthetic-lm", {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
     {"num_docs": 40, "vocab": 32, "seq_len": 8, "max_len": 32}),
    ("dlrm", "synthetic-ctr", {"embedding_dim": 4, "mlp_dims": [8], "bottom_mlp_dims": [8]}, TINY_CTR),
]



@pytest.mark.parametrize("model,dataset,model_args,data_args", WIRING, ids=[w[0] for w in WIRING])
def test_every_task_trains_and_evaluates(tmp_path, model, dataset, model_args, data_args):
    trainer = Trainer(TrainConfig(model=model, dataset=dataset, model_args=model_args, data_args=data_args,
                                  batch_size=32, max_steps=2, out=str(tmp_path), progress=False))
    metrics = trainer.fit()
    assert trainer.step == 2 and set(metrics) == set(trainer.task.metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    if trainer.task_name == "lm":  # perplexity is exp(mean NLL) over the scored tokens: at most ~vocab early on
        assert 1 < metrics["perplexity"] < 4 * trainer.data.min_info["vocab_size"]



def test_masked_lm_inputs_for_bert(tmp_path):
    trainer = Trainer(TrainConfig(model="bert", dataset="synthetic-lm", model_args=WIRING[6][2],
                                  data_args=WIRING[6][3], batch_size=32, max_steps=1, out=str(tmp_path),
                                  progress=False))
    assert trainer.model.config.vocab_size == 33  # 32 tokens and [MASK]
    tokens = trainer.data.train["tokens"][:64]
    batch = trainer.data.transform({"tokens": tokens, "targets": tokens}, np.random.default_rng(0), True)
    scored = batch["targets"] != -100
    np.testing.assert_array_equal(batch["targets"][scored], tokens[scored])
    assert 0.1 < scored.mean() < 0.2
    assert np.mean(batch["tokens"][scored] == 32) > 0.6 and not np.any(batch["tokens"][~scored] == 32)
