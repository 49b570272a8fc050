import pytest
import torch

from stacklm.config import Config
from stacklm.inference import generate, sample_next
from stacklm.inference.generate import compiled_decode_step
from stacklm.model.transformer import build_model


def model(*overrides):
    return build_model(Config.load("configs/tiny.yaml", list(overrides))).eval()


def test_greedy_generation_equals_argmax_of_full_forward():
    m = model()
    prompt = torch.randint(0, 512, (2, 7))
    out = generate(m, prompt, 20, temperature=0)
    assert out.shape == (2, 27) and out[:, :7].equal(prompt)
    logits = m(out[:, :-1])
    assert logits[:, 6:].argmax(-1).equal(out[:, 7:])


def test_stops_at_eos_and_pads_finished_rows():
    m = model()
    with torch.no_grad():
        m.lm_head.weight[5] += 100.0  # make token 5 overwhelmingly likely
    out = generate(m, torch.randint(0, 512, (2, 3)), 10, temperature=0, eos_id=5)
    assert out.shape == (2, 4) and (out[:, 3] == 5).all()


def test_stops_at_max_seq_len():
    m = model()
    out = generate(m, torch.randint(0, 512, (1, 120)), 50, temperature=0)
    assert out.shape == (1, 128)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # nucleus 0.7 keeps the smallest set whose mass reaches 0.7: tokens 0 and 1
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.85, generator=g).tolist()) == {0, 1, 2}
    counts = torch.bincount(sample_next(logits, 1.0, generator=g), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)
    assert sample_next(logits[:1], 0.0).item() == 0


def test_seeded_sampling_is_reproducible():
    m = model()
    prompt = torch.randint(0, 512, (1, 5))
    a = generate(m, prompt, 15, generator=torch.Generator().manual_seed(7))
    b = generate(m, prompt, 15, generator=torch.Generator().manual_seed(7))
    assert a.equal(b)


@pytest.mark.parametrize("overrides", [(), ("model.ffn.kind=sparse", "model.ffn.block_size=8",
                                           "model.attention.qkv=multiplicative_conv")])
def test_compiled_decode_step_matches_eager(overrides):
    """compile=True: the compiled one-token step gives the eager logits at every cache length (the
    sparse model's step with the fused sparse FFN kernel where it builds)."""
    m = model(*overrides)
    prompt = torch.randint(0, 512, (1, 6))
    eager = generate(m, prompt, 24, temperature=0, fused=False)  # the modules' steps, not the C++ step
    assert generate(m, prompt, 24, temperature=0, compile=True, fused=False).equal(eager)
    step, state = compiled_decode_step(m), m.new_state(1)
    with torch.no_grad():
        m(eager[:, :6], state)
        got = torch.cat([step(eager[:, t : t + 1], state) for t in range(6, 30)], dim=1)
        torch.testing.assert_close(got, m(eager)[:, 6:], atol=1e-4, rtol=1e-4)


def test_compiled_local_attention_generation_past_its_window():
    """The compiled local attention step needs another graph once the cache fills its window
    (Dynamo guards on the cache length): the tokens stay eager's across the change."""
    m = model("model.attention.kind=local", "model.attention.window=8")
    prompt = torch.randint(0, 512, (1, 2))
    eager = generate(m, prompt, 12, temperature=0)
    assert generate(m, prompt, 12, temperature=0, compile=True).equal(eager)
