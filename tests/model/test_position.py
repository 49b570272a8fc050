import math

import pytest
import torch

from stacklm.config import Config
from stacklm.model.position import RoPEConfig, RotaryPosition, alibi_slopes
from stacklm.registry import POSITION


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


def position(kind, *overrides):
    cfg = Config.load("configs/tiny.yaml", ["model.d_model=16", "model.n_heads=4", "model.max_seq_len=64",
                                            f"model.position.kind={kind}", *overrides]).model
    return POSITION.build(cfg.position, cfg)


def test_rope_linear_scaling_interpolates_positions():
    plain, linear = position("rope"), position("rope", "model.position.scaling=linear", "model.position.factor=2")
    q = torch.randn(1, 1, 1, 4)
    torch.testing.assert_close(linear.rotate(q, q, 10)[0], plain.rotate(q, q, 5)[0])


def test_rope_ntk_scaling_slows_the_lowest_frequency_by_the_factor():
    ntk = position("rope", "model.position.scaling=ntk", "model.position.factor=4", "model.position.theta=100")
    q = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)  # pair 1: (x1, x3)
    out, _ = ntk.rotate(q, q, 6)
    # head dim 4: theta' = 100 * 4^(4/2), so pair 1 turns by 6 * theta'^(-1/2) = 6 / (10 * 4)
    a = 6 / 40
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, math.cos(a), 0.0, math.sin(a)]))
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)  # pair 0 keeps frequency 1
    torch.testing.assert_close(ntk.rotate(e0, e0, 6)[0].flatten(), torch.tensor([math.cos(6), 0, math.sin(6), 0]))


def test_xpos_score_decays_with_distance_only():
    xpos = position("xpos")  # scale_base 512, gamma 0.4
    e0 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    for n, m in ((10, 3), (40, 33)):
        q, _ = xpos.rotate(e0, e0, n)
        _, k = xpos.rotate(e0, e0, m)
        # pair 0: zeta_0 = (0 + 0.4) / 1.4, angle (n - m) * 1
        expected = ((0.4 / 1.4) ** (7 / 512)) * math.cos(7)
        assert abs((q * k).sum().item() - expected) < 1e-5


def test_alibi_slopes_match_press_et_al():
    assert position("alibi").slopes.tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    six = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]  # the paper's code for 6 heads
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))
    distance = torch.tensor([[0, 1], [3, 2]]).view(1, 1, 2, 2)
    bias = position("alibi").bias(distance)
    assert bias.shape == (1, 4, 2, 2) and bias[0, 0].tolist() == [[0.0, -0.25], [-0.75, -0.5]]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_buckets_match_transformers(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    t5 = position("t5", f"model.position.bidirectional={bidirectional}")
    distance = torch.arange(-300, 300).view(1, 1, 1, -1)
    expected = T5Attention._relative_position_bucket(-distance, bidirectional=bidirectional,
                                                     num_buckets=32, max_distance=128)
    assert torch.equal(t5.buckets(distance), expected)
    with torch.no_grad():
        t5.table.copy_(torch.arange(4 * 32, dtype=torch.float).view(4, 32))
    assert torch.equal(t5.bias(distance)[0, 2], 64 + expected[0, 0].float())  # head 2's row


def test_learned_positions_add_their_rows():
    learned = position("learned")
    x = torch.zeros(1, 3, 16)
    torch.testing.assert_close(learned.embed(x, 5)[0], learned.table.weight[5:8])


def test_xpos_refuses_lengths_its_scales_cannot_represent():
    from stacklm.errors import UserError

    with pytest.raises(UserError, match="raise model.position.scale_base"):
        position("xpos", "model.max_seq_len=100000")
    position("xpos", "model.max_seq_len=100000", "model.position.scale_base=2048")
