"""batch_norm's running statistics update in place, in both modes, as torch's do."""

import numpy as np
import torch

import luoshu as ls


def test_running_stats_follow_torch_in_eager_and_graph():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 3)).astype(np.float32) for _ in range(3)]
    trm, trv = torch.zeros(3), torch.ones(3)
    for b in batches:
        torch.nn.functional.batch_norm(torch.from_numpy(b), trm, trv, training=True, momentum=0.3)

    rm, rv = ls.tensor(np.zeros(3, np.float32)), ls.tensor(np.ones(3, np.float32))
    for b in batches:
        ls.ops.batch_norm(ls.tensor(b), rm, rv, training=True, momentum=0.3)
    np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-6)

    rm, rv = ls.tensor(np.zeros(3, np.float32)), ls.tensor(np.ones(3, np.float32))
    with ls.Graph() as g:
        x = ls.placeholder("x", (None, 3))
        y = ls.ops.batch_norm(x, rm, rv, training=True, momentum=0.3)
    for b in batches:
        g.run(y, {x: b})
    np.testing.assert_allclose(rm.numpy(), trm.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rv.numpy(), trv.numpy(), rtol=1e-6)
