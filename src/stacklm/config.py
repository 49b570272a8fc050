"""Typed configuration: dataclasses for model / data / train / eval, YAML presets, dotted overrides.

Every value is checked when the config is built. A wrong key, type or range raises `UserError`
with one line that names the dotted key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from stacklm.data.tokenizer import special_tokens
from stacklm.errors import UserError
from stacklm.model.attention import AttentionConfig
from stacklm.model.ffn import SwiGLUConfig
from stacklm.model.norm import RMSNormConfig
from stacklm.model.position import RoPEConfig
from stacklm.objectives.causal import CausalConfig
from stacklm.registry import ATTENTION, FFN, NORM, OBJECTIVE, POSITION, ComponentConfig, Registry, option

PRESET_DIR = Path("configs")


@dataclasses.dataclass
class ModelConfig:
    arch: str = option("decoder", choices=("decoder", "encoder_decoder"), help="decoder: decoder-only; "
                       "encoder_decoder: a bidirectional encoder and a decoder with cross-attention (T5)")
    vocab_size: int = option(8192, ge=1, help="vocabulary size (the tokenizer is trained to it)")
    d_model: int = option(256, ge=1, help="residual stream width")
    n_layers: int = option(4, ge=1, help="number of transformer blocks (of the decoder)")
    encoder_layers: int | None = option(None, ge=1, help="encoder_decoder: encoder blocks; default n_layers")
    n_heads: int = option(4, ge=1, help="attention query heads")
    n_kv_heads: int | None = option(None, ge=1, help="key/value heads (GQA/MQA); default n_heads")
    d_ff: int | None = option(None, ge=1, help="FFN hidden width; default 8/3 d_model, rounded up to 64")
    max_seq_len: int = option(1024, ge=1, help="longest sequence the model (and its KV cache) handles")
    tie_embeddings: bool = option(True, help="share the input embedding and the output projection")
    dropout: float = option(0.0, ge=0.0, lt=1.0, help="dropout on attention and residual branches")
    init_std: float = option(0.02, gt=0.0, help="std of the normal init of weight matrices")
    parametrization: str = option("standard", choices=("standard", "mup"), help="mup: the maximal update "
                                  "parametrization (Yang et al. 2022): init, learning rates and multipliers "
                                  "scaled by width, so that hyperparameters tuned at base_width transfer")
    base_width: int = option(256, ge=1, help="mup: the d_model at which mup is the standard parametrization "
                             "(where the hyperparameters were tuned)")
    output_mult: float = option(1.0, gt=0.0, help="mup: multiplier of the logits at base_width "
                                "(they are multiplied by output_mult * base_width / d_model)")
    norm: ComponentConfig = option(factory=RMSNormConfig, registry=NORM)
    attention: ComponentConfig = option(factory=AttentionConfig, registry=ATTENTION)
    ffn: ComponentConfig = option(factory=SwiGLUConfig, registry=FFN)
    position: ComponentConfig = option(factory=RoPEConfig, registry=POSITION)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def encoder_position(self) -> ComponentConfig:
        """The encoder's position options: the bidirectional variant where the kind has one."""
        if hasattr(self.position, "bidirectional"):
            return dataclasses.replace(self.position, bidirectional=True)
        return self.position

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-int(8 * self.d_model / 3) // 64) * 64


@dataclasses.dataclass
class DataConfig:
    source: str = option("default", help="'default' (the Python standard library), a file, directory, "
                         "glob, .jsonl/.parquet file, or hf:NAME for a Hugging Face dataset")
    seq_len: int = option(256, ge=2, help="training sequence length in tokens")
    val_fraction: float = option(0.01, gt=0.0, lt=0.5, help="share of documents held out, by hash")
    max_bytes: int | None = option(None, ge=1, help="read at most this many bytes of text (None: all)")
    tokenizer_train_bytes: int = option(8_000_000, ge=1, help="bytes of training text the BPE is fit on")
    sentinel_tokens: int = option(100, ge=0, help="reserved <extra_id_N> tokens for span corruption")
    text_field: str = option("text", help="field holding the text in JSONL, Parquet and HF data")
    cache_dir: str = option("~/.cache/stacklm", help="where tokenizers and token shards are cached")


@dataclasses.dataclass
class TrainConfig:
    out_dir: str = option("runs/default", help="run directory: config, tokenizer, checkpoints, metrics")
    steps: int = option(1000, ge=1, help="optimizer steps")
    batch_size: int = option(16, ge=1, help="sequences per micro-batch on each process")
    grad_accum: int = option(1, ge=1, help="micro-batches per optimizer step")
    lr: float = option(1e-3, gt=0.0, help="peak learning rate")
    min_lr_ratio: float = option(0.1, ge=0.0, le=1.0, help="final lr as a fraction of the peak (cosine)")
    warmup_steps: int = option(100, ge=0, help="linear warmup steps")
    weight_decay: float = option(0.1, ge=0.0, help="AdamW decay (not on norms, biases, embeddings)")
    beta1: float = option(0.9, ge=0.0, lt=1.0)
    beta2: float = option(0.95, ge=0.0, lt=1.0)
    eps: float = option(1e-8, gt=0.0)
    grad_clip: float = option(1.0, ge=0.0, help="max global grad norm (0: no clipping)")
    dtype: str = option("auto", choices=("auto", "float32", "bfloat16"), help="autocast compute dtype "
                        "(weights stay float32); auto: bfloat16 where the hardware runs it natively")
    compile: bool = option(False, help="torch.compile the model")
    data_parallel: str = option("ddp", choices=("ddp", "fsdp"), help="under torchrun: ddp keeps a whole "
                                "replica on each rank; fsdp (FSDP2) shards parameters, gradients and "
                                "optimizer state across the ranks, gathering each block's weights as it runs")
    expert_parallel: bool = option(False, help="under torchrun, shard each MoE layer's experts across "
                                   "the ranks (tokens travel by all_to_all); the rest stays data-parallel "
                                   "(train.data_parallel: replicated by DDP or sharded by FSDP)")
    expert_parallel_size: int | None = option(None, ge=1, help="with train.expert_parallel: the ranks each "
                                              "layer's experts are split across (None: all); it must divide "
                                              "the number of processes, and n_experts must be a multiple of "
                                              "it; groups of consecutive ranks, each holding every expert")
    device: str = option("auto", help="auto, cpu, cuda, cuda:N or mps")
    seed: int = option(1337, ge=0)
    deterministic: bool = option(False, help="use deterministic algorithms (bitwise-repeatable on CPU)")
    threads: int | None = option(None, ge=1, help="torch CPU threads (None: torch's default)")
    log_every: int = option(10, ge=1, help="steps between metric records")
    eval_every: int = option(250, ge=0, help="steps between validations (0: only at the end)")
    eval_batches: int = option(20, ge=1, help="validation batches per evaluation")
    ckpt_every: int = option(250, ge=0, help="steps between checkpoints (0: only at the end)")
    keep_last: int = option(2, ge=1, help="checkpoints kept in the run directory")
    max_nonfinite: int = option(5, ge=1, help="abort after this many non-finite steps in a row")
    progress: bool = option(True, help="show a progress bar")
    objective: ComponentConfig = option(factory=CausalConfig, registry=OBJECTIVE)


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = option(16, ge=1)
    max_batches: int | None = option(100, ge=1, help="batches `stacklm eval` reads (None: all)")
    sample_prompt: str = option("def ", help="prompt of the sample printed after training")
    sample_tokens: int = option(120, ge=0, help="tokens in that sample (0: none)")
    temperature: float = option(0.8, ge=0.0, help="0 means greedy")
    top_k: int | None = option(50, ge=1)
    top_p: float = option(1.0, gt=0.0, le=1.0)


@dataclasses.dataclass
class Config:
    """The whole configuration of a run. Build it with `Config.load` or `Config.from_dict`."""

    model: ModelConfig = option(factory=ModelConfig)
    data: DataConfig = option(factory=DataConfig)
    train: TrainConfig = option(factory=TrainConfig)
    eval: EvalConfig = option(factory=EvalConfig)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Read a YAML file (or a preset name from `configs/`) and apply `a.b=value` overrides."""
        raw: dict = {}
        if path is not None:
            raw = read_yaml(resolve_preset(path))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> Config:
        config = build_dataclass(cls, raw, "")
        config.validate()
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> None:
        m = self.model
        if m.d_model % m.n_heads:
            raise UserError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
        if m.n_heads % m.kv_heads:
            raise UserError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads "
                            f"({m.kv_heads})")
        reserved = 256 + len(special_tokens(self.data.sentinel_tokens))
        if m.vocab_size < reserved:
            raise UserError(f"model.vocab_size ({m.vocab_size}) must be >= {reserved}: 256 byte tokens "
                            f"plus {reserved - 256} reserved tokens (lower data.sentinel_tokens?)")
        if self.data.seq_len > m.max_seq_len:
            raise UserError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len "
                            f"({m.max_seq_len}); raise model.max_seq_len or lower data.seq_len")
        if m.parametrization == "mup" and m.base_width % m.n_heads:
            raise UserError(f"model.base_width ({m.base_width}) must be a multiple of model.n_heads ({m.n_heads}), "
                            f"as d_model is")
        if m.arch == "decoder" and m.encoder_layers is not None:
            raise UserError("model.encoder_layers is set but model.arch=decoder has no encoder; "
                            "set model.arch=encoder_decoder or drop model.encoder_layers")
        if self.train.expert_parallel_size is not None and not self.train.expert_parallel:
            raise UserError("train.expert_parallel_size is set but train.expert_parallel is false; set "
                            "train.expert_parallel=true or drop train.expert_parallel_size")
        components = [m.attention, m.ffn, m.position, m.norm, self.train.objective]
        if m.arch == "encoder_decoder":
            if m.position.kind == "xpos":  # its decay is causal: keys after a query would grow
                raise UserError("model.position.kind=xpos decays attention to earlier keys only, which a "
                                "bidirectional encoder cannot use; with model.arch=encoder_decoder use "
                                f"one of: {', '.join(k for k in POSITION.kinds if k != 'xpos')}")
            components.append(m.encoder_position)
        for options in components:
            check = getattr(options, "check", None)
            if check is not None:
                check(m)


def resolve_preset(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    preset = PRESET_DIR / f"{path}.yaml"
    if preset.exists():
        return preset
    known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
    hint = f"; presets in {PRESET_DIR}/: {', '.join(known)}" if known else ""
    raise UserError(f"config file not found: {path}{hint}")


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of sections (model, data, train, eval)")
    return raw


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override to a raw config dict; the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r} is not of the form section.key=value "
                        f"(e.g. train.steps=300)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # a list given in the YAML: `denoisers.2.weight` is its entry 2
            node = node[list_index(node, part, ".".join(parts[:i]), item)]
            continue
        child = node.setdefault(part, {})
        if isinstance(child, str):  # `ffn: moe` is short for `ffn: {kind: moe}`
            child = node[part] = {"kind": child}
        if not isinstance(child, (dict, list)):
            raise UserError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    if isinstance(node, list):
        node[list_index(node, parts[-1], ".".join(parts[:-1]), item)] = value
    else:
        node[parts[-1]] = value


def list_index(items: list, part: str, where: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise UserError(f"override {item!r}: {where} is a list of {len(items)}; give an index 0-{len(items) - 1}")
    return int(part)


def build_dataclass(cls: type, raw: Any, prefix: str):
    """Build dataclass `cls` from a raw mapping, checking keys, types and ranges."""
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            did_you_mean = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise UserError(f"unknown config key {prefix}{key}{did_you_mean}; "
                            f"valid keys in {where}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        registry = f.metadata.get("registry")
        if registry is not None:
            values[name] = build_component(registry, raw.get(name), f, key)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = build_dataclass(hints[name], raw.get(name), key + ".")
        elif name in raw and dataclass_list(hints[name]) is not None:
            values[name] = build_list(cls, name, dataclass_list(hints[name]), raw, key)
        elif name in raw:
            value = coerce(raw[name], hints[name], key)
            check_range(value, f.metadata, key)
            values[name] = value
    return cls(**values)


def dataclass_list(tp: Any) -> type | None:
    """X for a `list[X]` (or `list[X] | None`) of dataclasses X, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    if len(args) == 1 and typing.get_origin(args[0]) is list:
        inner = typing.get_args(args[0])[0]
        return inner if dataclasses.is_dataclass(inner) else None
    return None


def build_list(cls: type, name: str, item_cls: type, raw: dict, key: str) -> list | None:
    """A list of `item_cls` from a list of mappings, or from a mapping {index: changes} that
    changes entries of the list `cls.default_<name>(raw)` starts from (`a.list.2.weight=0.5`)."""
    value = raw[name]
    if value is None:
        return None
    if isinstance(value, dict):
        base = [dataclasses.asdict(x) for x in getattr(cls, f"default_{name}")(raw)]
        for index, changes in value.items():
            if not (isinstance(index, int) or str(index).isdigit()) or int(index) >= len(base):
                raise UserError(f"{key}.{index}: {key} has {len(base)} entries; give an index 0-{len(base) - 1}")
            if not isinstance(changes, dict):
                raise UserError(f"{key}.{index} must be a mapping of its fields, got {changes!r}")
            base[int(index)].update(changes)
        value = base
    if not isinstance(value, list) or not value:
        raise UserError(f"{key} must be a non-empty list of mappings ({', '.join(f.name for f in dataclasses.fields(item_cls))}), "
                        f"got {value!r}")
    return [build_dataclass(item_cls, item, f"{key}.{i}.") for i, item in enumerate(value)]


def build_component(registry: Registry, raw: Any, f: dataclasses.Field, key: str) -> ComponentConfig:
    if isinstance(raw, str):  # `ffn: swiglu` is short for `ffn: {kind: swiglu}`
        raw = {"kind": raw}
    raw = dict(raw or {})
    kind = registry.canonical(raw.get("kind", f.default_factory().kind))
    if "kind" in raw:
        raw["kind"] = kind
    config_cls = registry.config_class(kind, f"{key}.kind")
    return build_dataclass(config_cls, raw, key + ".")


def coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} must be a string, got {value!r}")
    raise TypeError(f"config field {key} has an unsupported type {tp}")


def check_range(value: Any, meta: dict, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(f"{key}: {value!r} is not valid{did_you_mean}; "
                        f"valid: {', '.join(map(str, choices))}")
    bounds = (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b))
    for name, symbol, ok in bounds:
        limit = meta.get(name)
        if limit is not None and not ok(value, limit):
            raise UserError(f"{key} must be {symbol} {limit}, got {value!r}")
