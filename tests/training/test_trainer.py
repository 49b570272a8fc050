import math

import pytest
import torch

from stacklm.errors import TrainingError, UserError
from stacklm.objectives.causal import CausalLM
from stacklm.runs import load_run
from stacklm.training.checkpoint import Checkpointer
from stacklm.training.metrics import read_metrics
from stacklm.training.optim import lr_at, param_groups
from stacklm.training.trainer import train

QUIET = dict(log=lambda m: None)
EXACT = ("train.deterministic=true", "train.dtype=float32", "train.log_every=1", "train.threads=1")


def test_training_reduces_loss_and_writes_a_run(tiny):
    result = train(tiny("train.steps=40", "train.ckpt_every=15", "train.eval_every=20"), **QUIET)
    assert result.step == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    run = result.run_dir
    assert (run / "config.yaml").exists() and (run / "tokenizer.json").exists()
    assert [p.name for p in Checkpointer(run / "checkpoints").all()] == ["step_00000030", "step_00000040"]
    val = read_metrics(run, "val")
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["bpb"] == pytest.approx(val[-1]["loss"] / math.log(2) / (val[-1]["loss"] / val[-1]["bpb"] / math.log(2)))
    assert math.isclose(val[-1]["ppl"], math.exp(val[-1]["loss"]), rel_tol=1e-6)
    model = load_run(run).model
    assert not model.training


SPARSE = ("model.ffn.kind=sparse", "model.ffn.block_size=8", "model.attention.qkv=multiplicative_conv")


@pytest.mark.parametrize("model", [(), SPARSE, ("train.objective.kind=ul2",),
                                   ("train.objective.kind=ul2", "model.arch=encoder_decoder"),
                                   ("model.parametrization=mup", "model.base_width=32")],
                         ids=["dense", "sparse", "ul2", "ul2-encoder-decoder", "mup"])
def test_resume_is_bitwise_exact(tiny, tmp_path, stopped_copy, model):
    """N steps straight == N/2 steps, a crash, resume, N/2 more: the same losses, bit for bit
    (the sparse FFN draws random numbers every step: the RNG state is part of the checkpoint;
    UL2 draws its corruption from the batch itself)."""
    run = ("train.steps=16", "train.ckpt_every=8", "train.keep_last=5", *EXACT, *model)
    straight = train(tiny(*run, f"train.out_dir={tmp_path / 'a'}"), **QUIET)
    crashed = stopped_copy(tmp_path / "a", 8, tmp_path / "b")
    rest = train(tiny(*run, f"train.out_dir={crashed}"), resume=True, **QUIET)
    assert rest.losses == straight.losses[8:]
    assert [r["step"] for r in read_metrics(crashed, "train")] == list(range(1, 17))
    a = load_run(tmp_path / "a").model.state_dict()
    b = load_run(tmp_path / "b").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_saved_before_optimizer_layouts_still_resume(tiny, tmp_path, stopped_copy):
    """A trainer state from before the `layout` key (an `expert_parallel` flag instead) resumes."""
    run = ("train.steps=4", "train.ckpt_every=2", "train.keep_last=5", *EXACT)
    straight = train(tiny(*run, f"train.out_dir={tmp_path / 'a'}"), **QUIET)
    old = stopped_copy(tmp_path / "a", 2, tmp_path / "b")
    path = old / "checkpoints" / "step_00000002" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    del state["layout"], state["trained_tokens"]
    torch.save({**state, "expert_parallel": False}, path)
    assert train(tiny(*run, f"train.out_dir={old}"), resume=True, **QUIET).losses == straight.losses[2:]
    assert read_metrics(old, "val")[-1]["trained_tokens"] == 4 * 8 * 64  # steps x batch x seq_len


def test_existing_run_is_not_overwritten(tiny):
    train(tiny("train.steps=2"), **QUIET)
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny("train.steps=2"), **QUIET)
    train(tiny("train.steps=3"), overwrite=True, **QUIET)
    with pytest.raises(UserError, match="model.d_model differs"):
        train(tiny("train.steps=5", "model.d_model=32"), resume=True, **QUIET)


def test_resume_without_checkpoint_is_an_error(tiny):
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny(), resume=True, **QUIET)


def test_nonfinite_steps_are_skipped_then_abort(tiny, monkeypatch):
    real = CausalLM.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += 1
        loss, count = real(self, model, batch)
        return (loss * float("nan") if calls["n"] in (3, 4) else loss), count

    monkeypatch.setattr(CausalLM, "loss", sometimes_nan)
    result = train(tiny("train.steps=8", "train.ckpt_every=2"), **QUIET)
    assert result.skipped_steps == 2
    assert all(math.isfinite(p.sum().item()) for p in load_run(result.run_dir).model.parameters())

    monkeypatch.setattr(CausalLM, "loss", lambda self, model, batch: (real(self, model, batch)[0] * float("inf"), 1))
    with pytest.raises(TrainingError, match="non-finite for 5 steps in a row"):
        train(tiny("train.steps=20"), resume=False, overwrite=True, **QUIET)


def test_no_weight_decay_on_norms_biases_embeddings(tiny):
    from stacklm.model.transformer import build_model

    model = build_model(tiny("model.attention.bias=true"))
    decay, no_decay = param_groups(model, 0.1)
    assert model.embed.weight in [p for p in no_decay["params"]]
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p.dim() == 1 for p in no_decay["params"])


def test_param_groups_of_a_module_whose_config_is_not_stacklms():
    # the benchmarks build an optimizer for transformers' Llama with the same groups
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["lr_mult"] == no_decay["lr_mult"] == 1.0
    assert model.model.embed_tokens.weight in no_decay["params"]


def test_lr_schedule_warms_up_then_decays_to_the_floor(tiny):
    tcfg = tiny("train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    lrs = [lr_at(s, tcfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, tcfg) == pytest.approx(0.1)


def test_grad_accumulation_matches_a_bigger_batch(tiny, tmp_path):
    one = train(tiny("train.steps=3", "train.batch_size=8", *EXACT, f"train.out_dir={tmp_path / 'a'}"), **QUIET)
    acc = train(tiny("train.steps=3", "train.batch_size=4", "train.grad_accum=2", *EXACT,
                     f"train.out_dir={tmp_path / 'b'}"), **QUIET)
    assert acc.losses == pytest.approx(one.losses, rel=1e-4)


def test_bf16_autocast_trains(tiny):
    result = train(tiny("train.steps=10", "train.dtype=bfloat16"), **QUIET)
    assert all(math.isfinite(x) for x in result.losses)
    assert load_run(result.run_dir).model.embed.weight.dtype == torch.float32


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny, tmp_path):
    eager = train(tiny("train.steps=4", *EXACT, f"train.out_dir={tmp_path / 'a'}"), **QUIET)
    compiled = train(tiny("train.steps=4", "train.compile=true", *EXACT, f"train.out_dir={tmp_path / 'b'}"), **QUIET)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)


def test_tensorboard_events_when_installed(tiny):
    pytest.importorskip("tensorboard")
    result = train(tiny("train.steps=2"), **QUIET)
    assert any((result.run_dir / "tensorboard").iterdir())


def test_no_weight_decay_on_multiplicative_scales(tiny):
    from stacklm.model.transformer import build_model

    model = build_model(tiny("model.attention.qkv=multiplicative_conv"))
    decay, no_decay = param_groups(model, 0.1)
    shared = model.blocks[0].attn.proj.shared
    assert any(p is shared.multiplier for p in no_decay["params"])
    assert any(p is shared.weight for p in decay["params"])
