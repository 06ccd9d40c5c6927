"""luoshu.train.checkpoints: which directories count as checkpoints, the newest, the generator state."""

import torch

import luoshu as ls
from luoshu.core.random import generator
from luoshu.train import latest_checkpoint, list_checkpoints
from luoshu.train.checkpoints import checkpoint_dir, generator_state, set_generator_state


def test_only_complete_step_directories_count_oldest_first(tmp_path):
    for step, complete in ((12, True), (5, True), (100, False)):  # step 100: no manifest yet (being written)
        path = checkpoint_dir(tmp_path, step)
        path.mkdir()
        if complete:
            (path / "manifest.json").write_text("{}")
    for odd in ("step-abc", "best"):
        (tmp_path / odd).mkdir()
        (tmp_path / odd / "manifest.json").write_text("{}")
    (tmp_path / "step-00000200").write_text("a file, not a checkpoint")
    assert [(s, p.name) for s, p in list_checkpoints(tmp_path)] == [(5, "step-00000005"), (12, "step-00000012")]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000012"
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


def test_generator_state_round_trips_through_text():
    ls.manual_seed(7)
    saved = generator_state("cpu")
    assert isinstance(saved, str)
    first = torch.rand(8, generator=generator("cpu"))
    set_generator_state("cpu", saved)
    again = torch.rand(8, generator=generator("cpu"))
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    reference = torch.Generator().manual_seed(7)  # luoshu's CPU generator is torch's, seeded the same way
    torch.testing.assert_close(first, torch.rand(8, generator=reference), rtol=0, atol=0)
