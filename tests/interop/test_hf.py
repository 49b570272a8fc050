import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from stacklm.cli import main
from stacklm.config import Config
from stacklm.data.tokenizer import Tokenizer
from stacklm.errors import UserError
from stacklm.interop.hf import export_hf, import_hf
from stacklm.model.transformer import build_model
from stacklm.runs import load_run
from stacklm.training.checkpoint import Checkpointer

transformers = pytest.importorskip("transformers")

TEXT = "def area(r):\n    return 3.14159 * r ** 2  # café ☕"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x, y):\n    return x * {i} + y ** {i % 7}  # note {i * i}" for i in range(300)]
    return Tokenizer.train(texts, 512, n_sentinels=4)


@pytest.fixture
def make_run(tmp_path, tokenizer):
    """A run directory with a random model (norm gains too, so a swapped norm shows) and no training."""

    def make(name="run", **model) -> Config:
        run_dir = tmp_path / name
        config = Config.from_dict({
            "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "max_seq_len": 64, **model},
            "data": {"seq_len": 32, "sentinel_tokens": 4},
            "train": {"out_dir": str(run_dir)},
        })
        model = build_model(config)
        for p in model.parameters():
            if p.dim() == 1:
                nn.init.uniform_(p, 0.5, 1.5)
        run_dir.mkdir()
        config.save(run_dir / "config.yaml")
        tokenizer.save(run_dir / "tokenizer.json")
        Checkpointer(run_dir / "checkpoints").save(step=0, model=model, state={})
        return run_dir

    return make


def hf_logits(hf_dir, ids, architecture="LlamaForCausalLM"):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True,
                                                              attn_implementation="eager").eval()
    assert type(model).__name__ == architecture and model.dtype == torch.float32
    with torch.no_grad():
        return model(ids).logits


def logits(run_dir, ids):
    with torch.no_grad():
        return load_run(run_dir).model(ids)


@pytest.mark.parametrize("tie", [True, False])
def test_exported_llama_gives_the_same_logits(make_run, tmp_path, tie):
    run_dir = make_run(tie_embeddings=tie, position={"kind": "rope", "theta": 5000.0})
    export_hf(run_dir, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == 2
    ids = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), logits(run_dir, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("loader", ["AutoTokenizer", "PreTrainedTokenizerFast"])
def test_exported_tokenizer_loads_in_transformers(make_run, tmp_path, tokenizer, loader):
    export_hf(make_run(), tmp_path / "hf")
    hf_tok = getattr(transformers, loader).from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)
    assert hf_tok.encode(TEXT) == tokenizer.encode(TEXT)  # stacklm adds no BOS, and neither does the export
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<eos>", "<pad>")
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert hf_tok.decode(tokenizer.encode(TEXT)) == TEXT


@pytest.mark.parametrize("tie", [True, False])
def test_export_import_round_trip(make_run, tmp_path, tie):
    run_dir = make_run(tie_embeddings=tie, norm={"kind": "rmsnorm", "eps": 1e-6})
    export_hf(run_dir, tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    original, imported = load_run(run_dir), load_run(back)
    assert imported.config.model == dataclasses.replace(original.config.model, d_ff=192)  # 8/3 * 64, rounded
    assert imported.config.train.out_dir == str(tmp_path / "back")
    for (name, a), (_, b) in zip(original.model.state_dict().items(), imported.model.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert imported.tokenizer.encode(TEXT) == original.tokenizer.encode(TEXT)


@pytest.mark.parametrize("rope_format", ["transformers5", "transformers4"])
def test_transformers_llama_imports(make_run, tmp_path, rope_format):
    export_hf(make_run(), tmp_path / "ours")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=48,
                                      rope_theta=500.0, rms_norm_eps=1e-6)
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").exists()
    raw = {k: v for k, v in json.loads((hf_dir / "config.json").read_text()).items()
           if k not in ("rope_parameters", "rope_theta", "rope_scaling")}
    raw |= ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}} if rope_format == "transformers5"
            else {"rope_theta": 500.0, "rope_scaling": None})
    (hf_dir / "config.json").write_text(json.dumps(raw))
    shutil.copyfile(tmp_path / "ours" / "tokenizer.json", hf_dir / "tokenizer.json")
    run = load_run(import_hf(hf_dir, tmp_path / "imported"))
    assert (run.config.model.position.theta, run.config.model.norm.eps) == (500.0, 1e-6)
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids), model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


MIXTRAL = {"kind": "moe", "router": "topk", "n_experts": 4, "top_k": 2, "dropless": True}


@pytest.mark.parametrize("model, architecture, expected", [
    ({"ffn": MIXTRAL}, "MixtralForCausalLM", {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}),
    # local attention is Mistral's sliding window; 40 tokens are five windows
    ({"attention": {"kind": "local", "window": 8}}, "MistralForCausalLM", {"model_type": "mistral", "sliding_window": 8}),
], ids=["mixtral", "mistral"])
def test_exported_variant_gives_the_same_logits(make_run, tmp_path, model, architecture, expected):
    run_dir = make_run(**model)
    export_hf(run_dir, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {key: config[key] for key in expected} == expected
    ids = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids, architecture), logits(run_dir, ids),
                               atol=1e-4, rtol=1e-4)


def test_transformers_mixtral_imports(make_run, tmp_path):
    export_hf(make_run(), tmp_path / "ours")
    config = transformers.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                        num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    model = transformers.MixtralForCausalLM(config)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            nn.init.uniform_(p, 0.5, 1.5)
        if name.endswith("gate.weight"):  # routes that differ clearly from token to token
            nn.init.normal_(p, std=1.0)
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tmp_path / "ours" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    run = load_run(import_hf(tmp_path / "hf", tmp_path / "imported"))
    ffn = run.config.model.ffn
    assert (ffn.kind, ffn.router, ffn.n_experts, ffn.top_k, ffn.dropless) == ("moe", "topk", 4, 2, True)
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids), model.eval()(ids).logits, atol=1e-4, rtol=1e-4)
    export_hf(tmp_path / "imported", tmp_path / "again")  # and back, weight for weight
    again, original = load_file(tmp_path / "again" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_transformers_mistral_imports_as_local_attention(make_run, tmp_path):
    export_hf(make_run(), tmp_path / "ours")
    config = transformers.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=6, attn_implementation="eager")
    model = transformers.MistralForCausalLM(config)
    model.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tmp_path / "ours" / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    run = load_run(import_hf(tmp_path / "hf", tmp_path / "imported"))
    assert (run.config.model.attention.kind, run.config.model.attention.window) == ("local", 6)
    ids = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids), model.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_linear_rope_scaling_exports_and_imports(make_run, tmp_path):
    run_dir = make_run(position={"kind": "rope", "scaling": "linear", "factor": 4.0})
    export_hf(run_dir, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "linear"
    ids = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", ids), logits(run_dir, ids), atol=1e-4, rtol=1e-4)
    position = load_run(import_hf(tmp_path / "hf", tmp_path / "back")).config.model.position
    assert (position.scaling, position.factor) == ("linear", 4.0)


@pytest.mark.parametrize("model, message", [
    ({"position": {"kind": "rope", "scaling": "ntk", "factor": 2.0}}, "scaling='ntk' cannot be exported"),
    ({"position": {"kind": "alibi"}}, "position.kind='alibi' cannot be exported"),
    ({"attention": {"kind": "local", "full_every": 2}}, "full_every=2 cannot be exported"),
    ({"attention": {"kind": "lsh"}}, "attention.kind='lsh' cannot be exported"),
    ({"parametrization": "mup", "base_width": 32}, "parametrization='mup' cannot be exported"),
])
def test_export_refuses_what_hf_cannot_express(make_run, tmp_path, model, message):
    with pytest.raises(UserError, match=message):
        export_hf(make_run(**model), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_defaults_to_runs_name(make_run, tmp_path, monkeypatch):
    export_hf(make_run(), tmp_path / "my-llama")
    monkeypatch.chdir(tmp_path)
    assert import_hf("my-llama") == tmp_path.joinpath("runs", "my-llama").relative_to(tmp_path)
    assert load_run(tmp_path / "runs" / "my-llama").config.train.out_dir == "runs/my-llama"


@pytest.mark.parametrize("model, key", [({"ffn": "gelu"}, "model.ffn.kind='gelu'"),
                                        ({"position": "none"}, "model.position.kind='none'"),
                                        ({"norm": "layernorm"}, "model.norm.kind='layernorm'"),
                                        ({"attention": {"bias": True}}, "model.attention.bias=True"),
                                        ({"ffn": "sparse"}, "model.ffn.kind='sparse'"),
                                        ({"attention": {"qkv": "multiplicative_conv"}, "n_kv_heads": None},
                                         "model.attention.qkv='multiplicative_conv'"),
                                        ({"ffn": {**MIXTRAL, "router": "switch"}}, "model.ffn.router='switch'"),
                                        ({"ffn": {**MIXTRAL, "every": 2}}, "model.ffn.every=2"),
                                        ({"ffn": {**MIXTRAL, "expert": "sparse"}}, "model.ffn.expert.kind='sparse'")])
def test_export_refuses_what_llama_cannot_express(make_run, tmp_path, model, key):
    run_dir = make_run(**model)
    with pytest.raises(UserError, match=key.replace("(", r"\(")):
        export_hf(run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_export_refusal_is_one_line(make_run, tmp_path, capsys):
    assert main(["export", str(make_run(ffn="gelu")), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.ffn.kind='gelu'" in err and "swiglu" in err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_non_empty_out_dir(make_run, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_hf(make_run(), tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


def patch_config(**changes):
    def patch(hf_dir):
        raw = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps(raw | changes))
    return patch


def rename_eos(hf_dir):
    path = hf_dir / "tokenizer.json"
    path.write_text(path.read_text().replace("<eos>", "</s>"))


@pytest.mark.parametrize("damage, message", [
    (patch_config(model_type="gpt2"), "model_type 'gpt2'"),
    (patch_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "'llama3'"),
    (patch_config(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (patch_config(attention_bias=True), "attention_bias=True"),
    (patch_config(hidden_act="gelu"), "hidden_act='gelu'"),
    (patch_config(head_dim=32), "head_dim=32"),
    (patch_config(intermediate_size=128), "has shape"),
    (patch_config(model_type="falcon"), "model_type 'falcon'"),
    (patch_config(model_type="mixtral", num_local_experts=4), "has no weight .*block_sparse_moe"),
    (lambda d: (d / "config.json").write_text("{not json"), "cannot read"),
    (lambda d: (d / "config.json").unlink(), "config.json not found"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors not found"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (rename_eos, "no <eos> token"),
])
def test_import_refuses_what_stacklm_cannot_read(make_run, tmp_path, damage, message):
    export_hf(make_run(), tmp_path / "hf")
    damage(tmp_path / "hf")
    with pytest.raises(UserError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_import_refuses_a_missing_dir(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        import_hf(tmp_path / "nowhere")
