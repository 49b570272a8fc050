import math

import torch

from stacklm.config import Config
from stacklm.model.position import RoPEConfig, RotaryPosition


def test_rope_matches_hand_computed_rotation():
    cfg = Config.load("configs/tiny.yaml", ["model.d_model=16", "model.n_heads=4"]).model  # head dim 4
    rope = RotaryPosition(RoPEConfig(theta=100.0), cfg)
    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    out, _ = rope.rotate(q, q, start=3)
    # pairs (0, 2) and (1, 3) rotate by 3 * 100^(-0/4) and 3 * 100^(-2/4) radians
    a, b = 3.0, 3.0 / 10.0
    expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))


def test_rope_scores_depend_on_relative_position_only():
    cfg = Config.load("configs/tiny.yaml").model
    rope = RotaryPosition(RoPEConfig(), cfg)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)
    scores = []
    for start in (0, 17):
        rq, _ = rope.rotate(q, q, start + 5)
        _, rk = rope.rotate(k, k, start)
        scores.append((rq * rk).sum())
    torch.testing.assert_close(scores[0], scores[1])
