import pytest
import torch
import torch.nn.functional as F

from stacklm.model.loss import linear_cross_entropy
from tests.model.test_transformer import small


def reference(hidden, proj, targets):
    return F.cross_entropy(F.linear(hidden, proj).flatten(0, -2).float(), targets.flatten())


def leaves(n_tokens=300, dim=48, vocab=97):
    hidden = torch.randn(3, n_tokens // 3, dim).requires_grad_()
    proj = (0.3 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (3, n_tokens // 3))
    return hidden, proj, targets


def grads(loss_fn, hidden, proj, targets):
    hidden.grad = proj.grad = None
    loss = loss_fn(hidden, proj, targets)
    (2.5 * loss).backward()  # a non-unit upstream gradient, as gradient accumulation gives
    return loss.detach(), hidden.grad.clone(), proj.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 1000])
def test_equals_logits_then_cross_entropy(chunk):
    """Loss and both gradients match the unfused reference whatever the chunking."""
    hidden, proj, targets = leaves()
    targets[0, :5] = -100
    targets[2, -3:] = -100
    want = grads(reference, hidden, proj, targets)
    got = grads(lambda h, w, y: linear_cross_entropy(h, w, y, chunk=chunk), hidden, proj, targets)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_matches_autocast_reference():
    hidden, proj, targets = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(reference, hidden, proj, targets)
        got = grads(linear_cross_entropy, hidden, proj, targets)
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-2)


def test_bf16_keeps_the_gradient_of_confident_tokens():
    """Where p_target is near 1 its gradient p_target - 1 is tiny, and must not round to 0."""
    hidden, proj, _ = leaves()
    with torch.no_grad():
        proj.mul_(6.0)
        logits = F.linear(hidden, proj)
        targets = logits.argmax(-1)
        confident = logits.softmax(-1).amax(-1).flatten() > 0.99
    assert confident.sum() > 20
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = grads(reference, hidden, proj, targets)[1].flatten(0, 1)[confident]
        got = grads(linear_cross_entropy, hidden, proj, targets)[1].flatten(0, 1)[confident]
    error = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert error.max() < 0.05, error.max()


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, proj, targets = leaves()
    loss, grad_hidden, grad_proj = grads(linear_cross_entropy, hidden, proj, torch.full_like(targets, -100))
    assert loss == 0 and not grad_hidden.any() and not grad_proj.any()


def test_no_grad_gives_the_same_loss():
    hidden, proj, targets = leaves()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, proj, targets), reference(hidden, proj, targets))


@pytest.mark.parametrize("overrides", [(), ("model.tie_embeddings=false",)])
def test_model_with_targets_returns_the_loss_of_its_logits(overrides):
    model = small(*overrides).train()
    x, y = torch.randint(0, 512, (2, 2, 33))
    loss = model(x, targets=y)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    reference_loss.backward()
    torch.testing.assert_close(loss, reference_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
