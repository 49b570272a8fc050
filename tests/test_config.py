import pytest

from stacklm.config import Config, apply_override
from stacklm.errors import UserError


def test_presets_load_and_validate():
    for name in ("tiny", "default"):
        config = Config.load(f"configs/{name}.yaml")
        assert config.model.d_model % config.model.n_heads == 0


def test_overrides_are_typed_and_nested():
    config = Config.load("configs/tiny.yaml", ["train.steps=7", "train.lr=1e-3", "model.d_model=96",
                                               "model.n_heads=3", "model.ffn.kind=gelu",
                                               "model.n_kv_heads=null", "data.source=some/dir"])
    assert config.train.steps == 7 and config.train.lr == 1e-3  # YAML reads "1e-3" as a string
    assert config.model.d_model == 96 and config.model.ffn.kind == "gelu"
    assert config.model.n_kv_heads is None and config.data.source == "some/dir"


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=3", "unknown config key model.d_modle (did you mean model.d_model?)"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.steps=1.5", "train.steps must be an integer"),
    ("train.compile=maybe", "train.compile must be true or false"),
    ("train.dtype=fp8", "train.dtype: 'fp8' is not valid"),
    ("train.data_parallel=zero3", "train.data_parallel: 'zero3' is not valid"),
    ("model.ffn.kind=swiglo", "unknown ffn kind 'swiglo' (did you mean 'swiglu'?)"),
    ("model.ffn.nope=1", "unknown config key model.ffn.nope"),
    ("modle.d_model=3", "unknown config key modle (did you mean model?)"),
    ("model.n_heads=5", "must be divisible by model.n_heads"),
    ("model.n_kv_heads=3", "must be a multiple of model.n_kv_heads"),
    ("data.seq_len=4096", "exceeds model.max_seq_len"),
    ("model.vocab_size=270", "model.vocab_size (270) must be >= 278"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        Config.load("configs/tiny.yaml", [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="config file not found: nope.yaml"):
        Config.load("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        Config.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a mapping"):
        Config.load(bad)
    with pytest.raises(UserError, match="not of the form"):
        apply_override({}, "train.steps")


def test_save_and_reload_round_trip(tmp_path):
    config = Config.load("configs/tiny.yaml", ["model.ffn.kind=gelu", "train.lr=2e-3"])
    config.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == config


def test_preset_name_resolves():
    assert Config.load("tiny") == Config.load("configs/tiny.yaml")
