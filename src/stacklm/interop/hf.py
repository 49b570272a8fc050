"""Hugging Face Llama, Mistral and Mixtral interop: `export_hf` writes a run as one of them,
`import_hf` reads one.

A stacklm decoder with SwiGLU, RMSNorm, RoPE and full attention without biases is exactly Llama:
only the parameter names differ, and stacklm fuses q/k/v and gate/up into one matrix each. Its
RoPE rotates the two halves of a head, as HF Llama does, so no weight is permuted. With an MoE FFN
in every layer (top-k router, renormalised gates, dense SwiGLU experts) it is Mixtral, whose
experts HF stores one matrix per expert (w1 gate, w3 up, w2 down); Mixtral never drops a token, so
an imported Mixtral is `dropless`. Mistral is Llama with sliding-window attention: stacklm's
`local` attention, whose window counts the same keys (the query and the window - 1 before it).
RoPE's linear scaling is HF's `linear` rope type.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

from stacklm.config import Config, ModelConfig
from stacklm.data.tokenizer import EOS, FILE_NAME, PAD
from stacklm.errors import UserError
from stacklm.model.transformer import build_model
from stacklm.runs import load_run
from stacklm.training.checkpoint import Checkpointer
from stacklm.training.trainer import CONFIG_FILE

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"

# What a Llama or Mixtral model is, in stacklm's config keys; anything else cannot be exported.
# Both may also have `local` attention (a sliding window: Mistral, or Mixtral's sliding_window).
LLAMA_MODEL = {"arch": "decoder", "parametrization": "standard", "attention.kind": "full", "attention.qkv": "dense",
               "attention.bias": False, "ffn.kind": "swiglu", "ffn.bias": False,
               "norm.kind": "rmsnorm", "position.kind": "rope"}
MIXTRAL_MODEL = {**{k: v for k, v in LLAMA_MODEL.items() if k != "ffn.bias"}, "ffn.kind": "moe",
                 "ffn.router": "topk", "ffn.every": 1, "ffn.shared_expert": False, "ffn.expert.kind": "swiglu"}
SLIDING_WINDOW = {"attention.kind": "local", "attention.full_every": 0}
ROPE_TYPES = {"none": "default", "linear": "linear"}  # stacklm's rope scaling -> HF's rope_type
# The Llama config.json values stacklm runs (each is also LlamaConfig's default, used when absent).
LLAMA_CONFIG = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def weight_map(m: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Each stacklm weight -> the HF Llama weights stacked in its rows, with their row counts."""
    q, kv, ff = m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    names = {"embed.weight": [("model.embed_tokens.weight", m.vocab_size)],
             "norm.weight": [("model.norm.weight", m.d_model)]}
    if not m.tie_embeddings:
        names["lm_head.weight"] = [("lm_head.weight", m.vocab_size)]
    for i in range(m.n_layers):
        s, h = f"blocks.{i}.", f"model.layers.{i}."
        names |= {
            s + "attn_norm.weight": [(h + "input_layernorm.weight", m.d_model)],
            s + "attn.proj.qkv_proj.weight": [(h + f"self_attn.{p}_proj.weight", n)
                                         for p, n in (("q", q), ("k", kv), ("v", kv))],
            s + "attn.proj.out_proj.weight": [(h + "self_attn.o_proj.weight", m.d_model)],
            s + "ffn_norm.weight": [(h + "post_attention_layernorm.weight", m.d_model)],
        }
        if m.ffn.kind == "moe":  # stacked (E, 2F, D) and (E, D, F), read as (E*2F, D) and (E*D, F)
            e = h + "block_sparse_moe."
            names |= {
                s + "ffn.router.weight": [(e + "gate.weight", m.ffn.n_experts)],
                s + "ffn.experts.gate_up_proj": [(e + f"experts.{j}.{w}.weight", ff)
                                                 for j in range(m.ffn.n_experts) for w in ("w1", "w3")],
                s + "ffn.experts.out_proj": [(e + f"experts.{j}.w2.weight", m.d_model)
                                             for j in range(m.ffn.n_experts)],
            }
        else:
            names |= {
                s + "ffn.gate_up_proj.weight": [(h + f"mlp.{p}_proj.weight", ff) for p in ("gate", "up")],
                s + "ffn.out_proj.weight": [(h + "mlp.down_proj.weight", m.d_model)],
            }
    return names


def rows(weight: torch.Tensor) -> torch.Tensor:
    """A weight as the 2-D stack of rows that `weight_map` names (stacked experts are 3-D)."""
    return weight.flatten(0, -2) if weight.dim() > 2 else weight


def check_free(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose a new output directory")


@contextlib.contextmanager
def fresh_dir(out: Path):
    """A scratch directory that becomes `out` only if the body succeeds, so no half directory is left."""
    check_free(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # POSIX renames over an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_hf(run_dir: str | Path, out_dir: str | Path) -> None:
    """Write the latest checkpoint of a run as a Hugging Face Llama directory in float32; with
    local attention a Mistral one, with an MoE FFN a Mixtral one.

    `out_dir` gets config.json, model.safetensors and the tokenizer files, and loads with
    `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`. Raises UserError for
    a model none of them can express (another FFN, norm, position or attention kind, biases, a
    switch router, NTK RoPE scaling).
    """
    check_free(Path(out_dir))  # before the slow part
    run = load_run(run_dir)
    m = run.model.config
    arch, required = ("Mixtral", MIXTRAL_MODEL) if m.ffn.kind == "moe" else ("Llama", LLAMA_MODEL)
    window = m.attention.window if m.attention.kind == "local" else None
    if window is not None:
        arch, required = ("Mistral" if arch == "Llama" else arch), {**required, **SLIDING_WINDOW}
    for key, supported in required.items():
        value = functools.reduce(getattr, key.split("."), m)
        if value != supported:
            raise UserError(f"{run_dir}: model.{key}={value!r} cannot be exported; a Hugging Face {arch} "
                            f"model needs model.{key}={supported!r}")
    if m.position.scaling not in ROPE_TYPES:
        raise UserError(f"{run_dir}: model.position.scaling={m.position.scaling!r} cannot be exported; "
                        f"Hugging Face rope types match stacklm's {' and '.join(map(repr, ROPE_TYPES))}")
    rope = {"rope_type": ROPE_TYPES[m.position.scaling], "rope_theta": m.position.theta}
    if m.position.scaling != "none":
        rope["factor"] = m.position.factor
    tok = run.tokenizer
    config = {
        "architectures": [f"{arch}ForCausalLM"], "model_type": arch.lower(), "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm.eps,
        # transformers < 5 reads rope_theta and rope_scaling; 5.x reads rope_parameters (and takes it first)
        "rope_theta": m.position.theta, "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if "factor" in rope else None,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": m.init_std,
        # stacklm has no BOS: <eos> separates documents and also starts one
        "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }
    if arch in ("Mistral", "Mixtral"):
        config["sliding_window"] = window
    if arch == "Mixtral":
        config |= {"num_local_experts": m.ffn.n_experts, "num_experts_per_tok": m.ffn.top_k,
                   "router_aux_loss_coef": m.ffn.load_balance_coef, "router_jitter_noise": m.ffn.jitter,
                   "output_router_logits": False}
    specials = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    state = run.model.state_dict()
    weights = {hf: w.clone() for name, parts in weight_map(m).items()
               for (hf, _), w in zip(parts, rows(state[name]).split([n for _, n in parts]), strict=True)}
    with fresh_dir(Path(out_dir)) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.copyfile(Path(run_dir) / FILE_NAME, tmp / FILE_NAME)
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": m.max_seq_len,
             "clean_up_tokenization_spaces": False, **specials}, indent=2))


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; a Hugging Face model directory has one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object")
    return raw


def stacklm_config(raw: dict, path: Path, out: Path, n_sentinels: int) -> Config:
    """The stacklm Config of a Llama, Mistral or Mixtral config.json; UserError for what stacklm
    cannot run."""
    if raw.get("model_type") not in ("llama", "mistral", "mixtral"):
        raise UserError(f"{path}: model_type {raw.get('model_type')!r} is not supported; import-hf reads "
                        f"Llama, Mistral and Mixtral models (model_type 'llama', 'mistral' or 'mixtral')")
    max_len = raw.get("max_position_embeddings", 2048)
    attention = {"kind": "full"}
    # MistralConfig's default window is 4096, so a config.json without the key has one
    window = raw.get("sliding_window", 4096 if raw["model_type"] == "mistral" else None)
    if window is not None and window < max_len:
        attention = {"kind": "local", "window": window}
    ffn = {"kind": "swiglu"}
    if raw["model_type"] == "mixtral":
        ffn = {"kind": "moe", "router": "topk", "n_experts": raw.get("num_local_experts", 8),
               "top_k": raw.get("num_experts_per_tok", 2), "dropless": True,
               "load_balance_coef": raw.get("router_aux_loss_coef", 0.001),
               "jitter": raw.get("router_jitter_noise", 0.0)}
    for key, supported in LLAMA_CONFIG.items():
        if raw.get(key, supported) != supported:
            raise UserError(f"{path}: {key}={raw[key]!r} is not supported; stacklm needs {key}={supported!r}")
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = {v: k for k, v in ROPE_TYPES.items()}.get(rope_type)
    if scaling is None:
        raise UserError(f"{path}: RoPE scaling {rope_type!r} is not supported; stacklm reads rope_type "
                        f"{' or '.join(map(repr, ROPE_TYPES.values()))}")
    position = {"kind": "rope", "theta": rope.get("rope_theta", raw.get("rope_theta", 1e4)), "scaling": scaling}
    if scaling != "none":
        position["factor"] = rope["factor"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    if head_dim * raw["num_attention_heads"] != raw["hidden_size"]:
        raise UserError(f"{path}: head_dim={head_dim} is not supported; stacklm needs "
                        f"head_dim = hidden_size / num_attention_heads")
    try:
        return Config.from_dict({
            "model": {"vocab_size": raw["vocab_size"], "d_model": raw["hidden_size"],
                      "n_layers": raw["num_hidden_layers"], "n_heads": raw["num_attention_heads"],
                      "n_kv_heads": raw.get("num_key_value_heads"), "d_ff": raw["intermediate_size"],
                      "max_seq_len": max_len, "tie_embeddings": raw.get("tie_word_embeddings", False),
                      "init_std": raw.get("initializer_range", 0.02), "ffn": ffn,
                      "norm": {"kind": "rmsnorm", "eps": raw.get("rms_norm_eps", 1e-6)},
                      "attention": attention, "position": position},
            "data": {"seq_len": min(256, max_len), "sentinel_tokens": n_sentinels},
            "train": {"out_dir": str(out)},
        })
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / INDEX
    files = sorted(set(read_json(index).get("weight_map", {}).values())) if index.exists() else [WEIGHTS]
    weights = {}
    for name in files:
        if not (hf_dir / name).exists():
            raise UserError(f"{hf_dir / name} not found; import-hf reads {WEIGHTS} or a sharded {INDEX}")
        weights |= load_file(str(hf_dir / name))
    return weights


def import_hf(hf_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read a Hugging Face Llama, Mistral or Mixtral directory into a new stacklm run directory (default
    runs/<name>).

    The directory needs config.json, model.safetensors (or a sharded index) and a tokenizer.json
    that has stacklm's <eos> and <pad> tokens; a tokenizer without them (such as Meta's Llama
    tokenizers, whose end token is </s> or <|end_of_text|>) is refused rather than given made-up
    ids. Returns the run directory, which `stacklm.runs.load_run` reads.
    """
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; import-hf reads a Hugging Face model directory")
    out = Path(out_dir) if out_dir is not None else Path("runs") / hf_dir.resolve().name
    check_free(out)  # before the slow part
    if not (hf_dir / FILE_NAME).exists():
        raise UserError(f"{hf_dir} has no {FILE_NAME}; stacklm needs a `tokenizers` JSON tokenizer")
    try:
        tok = HFTokenizer.from_file(str(hf_dir / FILE_NAME))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise UserError(f"cannot load {hf_dir / FILE_NAME}: {e}") from None
    for token in (EOS, PAD):
        if tok.token_to_id(token) is None:
            raise UserError(f"{hf_dir / FILE_NAME} has no {token} token; stacklm needs {EOS} and {PAD} "
                            f"in the vocabulary (add them to the tokenizer first)")
    n_sentinels = 0
    while tok.token_to_id(f"<extra_id_{n_sentinels}>") is not None:
        n_sentinels += 1
    config = stacklm_config(read_json(hf_dir / "config.json"), hf_dir / "config.json", out, n_sentinels)
    hf = read_weights(hf_dir)
    model = build_model(config)
    expected = model.state_dict()
    state = {}
    for name, parts in weight_map(config.model).items():
        missing = [h for h, _ in parts if h not in hf]
        if missing:
            raise UserError(f"{hf_dir} has no weight {missing[0]}")
        stacked = torch.cat([hf[h] for h, _ in parts]).float()
        want = rows(expected[name]).shape
        if stacked.shape != want:
            names = parts[0][0] if len(parts) < 4 else f"{parts[0][0]}, ... ({len(parts)} weights)"
            raise UserError(f"{hf_dir}: {names} has shape {tuple(stacked.shape)} stacked, but config.json "
                            f"implies {tuple(want)}")
        state[name] = stacked.view_as(expected[name])
    if config.model.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    with fresh_dir(out) as tmp:
        config.save(tmp / CONFIG_FILE)
        shutil.copyfile(hf_dir / FILE_NAME, tmp / FILE_NAME)
        Checkpointer(tmp / "checkpoints").save(step=0, model=model, state={})
    return out
