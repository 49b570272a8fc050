"""The CLI end to end on the tiny preset: train, generate, eval, bad input."""

import json
from pathlib import Path

import pytest
import torch

import stacklm
import stacklm.inference
import stacklm.training.trainer
from stacklm.cli import main, stretch
from stacklm.data import prepare_data
from stacklm.evaluate import Continuation, evaluate


@pytest.fixture
def args(tmp_path, cache_dir):
    return ["configs/tiny.yaml", f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={cache_dir}",
            "train.progress=false", "train.steps=12"]


@pytest.mark.parametrize("model", [[], ["model.ffn.kind=sparse", "model.ffn.block_size=8",
                                        "model.attention.qkv=multiplicative_conv"]], ids=["dense", "sparse"])
def test_train_generate_eval(args, tmp_path, capsys, model):
    assert main(["train", *args, *model]) == 0
    out = capsys.readouterr().out
    assert "validation after 12 steps: loss" in out and "bits-per-byte" in out and "sample (40 tokens" in out
    run = str(tmp_path / "run")
    assert main(["generate", run, "--prompt", "import ", "--max-new-tokens", "10", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main(["eval", run, "--json", "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"loss", "ppl", "bpb", "tokens"} and result["tokens"] == 2 * 8 * 64
    text = tmp_path / "other.txt"
    text.write_text("print('hello world')\n" * 200)
    assert main(["eval", run, "--data", str(text)]) == 0
    assert f"{text}: loss" in capsys.readouterr().out
    assert main(["train", "--resume", run, "train.steps=14"]) == 0
    assert "validation after 14 steps" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/tiny.yaml", "model.d_modle=3"], "unknown config key model.d_modle"),
    (["train", "configs/missing.yaml"], "config file not found"),
    (["train", "configs/tiny.yaml", "data.source=/no/such/dir"], "does not exist"),
    (["train", "configs/tiny.yaml", "oops"], "not of the form section.key=value"),
    (["generate", "/no/such/run"], "not a stacklm run directory"),
    (["eval", "/no/such/run"], "not a stacklm run directory"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not Path("runs/tiny").exists()  # nothing written for a run that could not start


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "tiny", "model.d_model=32"]) == 0
    assert "d_model: 32" in capsys.readouterr().out


def test_help_explains_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "eval", "export", "import-hf"):
        assert command in out


def test_eval_context_sweep_writes_table_and_plot(args, tmp_path, capsys):
    assert main(["train", *args, "train.steps=4", "model.position.kind=alibi", "eval.sample_tokens=0"]) == 0
    run, out = str(tmp_path / "run"), tmp_path / "sweep"
    capsys.readouterr()
    # 256 is past max_seq_len (128): ALiBi needs no table, so the model is built longer
    assert main(["eval", run, "--context", "64,32,256", "--tokens", "2048", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ppl / ppl@32" in printed and "context.png" in printed
    rows = json.loads((out / "context.json").read_text())[run]
    assert [r["context"] for r in rows] == [32, 64, 256]
    assert [r["tokens"] for r in rows] == [2048, 2048, 2048]  # --tokens scored at every length
    assert (out / "context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["eval", run, "--context", "64", "model.d_model=8"]) == 2
    assert "eval can change only model.position.* and model.attention.*" in capsys.readouterr().err
    for weights_change in ("model.attention.kind=lsh", "model.position.kind=learned"):  # no key projection; a table
        assert main(["eval", run, weights_change]) == 2
        err = capsys.readouterr().err
        assert "does not fit the model" in err and err.count("\n") == 1


def test_eval_context_past_learned_positions_is_refused(args, tmp_path, capsys):
    assert main(["train", *args, "train.steps=2", "model.position.kind=learned", "eval.sample_tokens=0"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--context", "64,256"]) == 2
    assert "learned positions exist for 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["ul2", "prefix_lm"])
def test_train_with_a_denoising_objective(args, tmp_path, objective, capsys, monkeypatch):
    validated = []

    def spy_evaluate(*a, head=None, **kwargs):
        validated.append(head)
        return real_evaluate(*a, head=head, **kwargs)

    real_evaluate = stacklm.training.trainer.evaluate
    monkeypatch.setattr(stacklm.training.trainer, "evaluate", spy_evaluate)
    assert main(["train", *args, "train.steps=3", f"train.objective.kind={objective}", "eval.sample_tokens=0"]) == 0
    assert "validation after 3 steps: loss" in capsys.readouterr().out
    run = str(tmp_path / "run")
    assert main(["eval", run, "--json", "--batches", "1", "--continuation"]) == 0
    result = json.loads(capsys.readouterr().out)  # causal loss, and each denoiser's
    assert len(result["denoising"]) == 7 and result["denoising"]["S"] > 0 and "R(3, 0.15)" in result["denoising"]
    # the causal loss after the mode head, the continuation as the S-denoiser's prefix
    loaded = stacklm.load_run(run)
    tok, config = loaded.tokenizer, loaded.config
    modes = [tok.token_id("[S2S]")] if objective == "ul2" else []  # UL2's language-model mode token
    assert validated and all(head == modes for head in validated)
    data = prepare_data(config.data, config.model.vocab_size, tok, progress=False, log=lambda m: None)
    cpu, seq_len, batch = torch.device("cpu"), config.data.seq_len, config.eval.batch_size
    assert result["loss"] == pytest.approx(evaluate(loaded.model, data.val, seq_len, batch, 1, cpu, head=modes)["loss"])
    prefix_lm = Continuation(config.model, tok.eos_id, modes, prefix_lm=True)
    assert result["continuation"] == pytest.approx(
        evaluate(loaded.model, data.val, seq_len, batch, 1, cpu, objective=prefix_lm)["loss"])
    # a --context as long as the model's positions leaves room for the head
    longest = config.model.max_seq_len
    assert stretch(run, [], [longest]) == ([f"model.max_seq_len={longest + 1}"] if modes else [])
    seen = {}

    def spy(model, prompt, *rest, **kwargs):
        seen["prompt"] = prompt[0].tolist()
        return real(model, prompt, *rest, **kwargs)

    real = stacklm.inference.generate
    monkeypatch.setattr(stacklm.inference, "generate", spy)
    assert main(["generate", run, "--prompt", "def f", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert seen["prompt"] == modes + tok.encode("def f")


@pytest.mark.parametrize("objective", ["ul2", "span_corruption"])
def test_encoder_decoder_train_generate_eval_resume(args, tmp_path, objective, capsys, monkeypatch):
    model = ["model.arch=encoder_decoder", "model.encoder_layers=1", f"train.objective.kind={objective}"]
    assert main(["train", *args, "train.steps=3", *model]) == 0
    out = capsys.readouterr().out
    assert "validation after 3 steps: loss" in out and "sample (40 tokens" in out
    run = str(tmp_path / "run")
    seen = {}

    def spy(model, prompt, *rest, encoder_ids=None, **kwargs):
        seen.update(prompt=prompt[0].tolist(), encoder=None if encoder_ids is None else encoder_ids[0].tolist())
        return real(model, prompt, *rest, encoder_ids=encoder_ids, **kwargs)

    real = stacklm.inference.generate
    monkeypatch.setattr(stacklm.inference, "generate", spy)
    monkeypatch.setattr(stacklm, "generate", spy)  # generate_text's
    assert main(["generate", run, "--system", "def add(a, b):", "--prompt", "    return",
                 "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("    return")
    tok = stacklm.load_run(run).tokenizer
    modes = [tok.token_id("[S2S]")] if objective == "ul2" else []  # the S-denoiser's input layout
    expected = {"encoder": modes + tok.encode("def add(a, b):"), "prompt": [tok.eos_id, *tok.encode("    return")]}
    assert seen == expected
    seen.clear()
    assert stacklm.generate_text(run, "    return", max_new_tokens=3, seed=0, system="def add(a, b):").startswith("    return")
    assert seen == expected  # the same layout from Python
    assert main(["generate", run, "--system", "x = 1\n" * 200]) == 2
    assert "the system prompt is" in capsys.readouterr().err
    assert main(["eval", run, "--json", "--batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0 and result["continuation"] > 0 and len(result["denoising"]) == 7
    assert main(["export", run, str(tmp_path / "hf")]) == 2
    assert "model.arch='encoder_decoder' cannot be exported" in capsys.readouterr().err
    assert main(["train", "--resume", run, "train.steps=4"]) == 0
    assert "validation after 4 steps" in capsys.readouterr().out


def test_system_prompt_needs_an_encoder(args, tmp_path, capsys):
    assert main(["train", *args, "train.steps=1", "eval.sample_tokens=0"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--system", "hello"]) == 2
    assert "--system is read by an encoder" in capsys.readouterr().err


def test_sweep_trains_each_point_once_and_resumes(args, tmp_path, capsys):
    out = tmp_path / "sweep"
    grid = ["sweep", *args[:3], "train.steps=2", "eval.sample_tokens=0", "model.parametrization=mup",
            "model.base_width=32", "--widths", "32,64", "--lr", "1e-3,4e-3", "--out", str(out), "--json"]
    assert main(grid) == 0
    first = json.loads(capsys.readouterr().out)
    assert [(p["width"], p["lr"]) for p in first["points"]] == [(32, 1e-3), (32, 4e-3), (64, 1e-3), (64, 4e-3)]
    assert set(first["best_lr"]) == {"32", "64"} and (out / "w64-lr0.004" / "config.yaml").exists()
    assert (out / "sweep.json").exists() and (out / "sweep.png").exists()
    assert main(grid) == 0  # everything finished: nothing retrained
    captured = capsys.readouterr()
    assert json.loads(captured.out) == first and "training width" not in captured.err
    assert main(["sweep", *args[:3], "--widths", "32,x", "--lr", "1e-3"]) == 2
    assert "--widths '32,x': expected positive ints" in capsys.readouterr().err


def test_mup_coord_check_writes_table_and_plot(args, tmp_path, capsys):
    out = tmp_path / "cc"
    assert main(["mup", "coord-check", *args[:3], "model.base_width=32", "--widths", "32,64",
                 "--steps", "2", "--batches", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "standard: mean |x| at step 2" in printed and "mup: mean |x| at step 2" in printed
    assert "block1.ffn" in printed and "slope" in printed
    rows = json.loads((out / "coord_check.json").read_text())
    assert {r["width"] for r in rows["mup"]} == {32, 64} and {r["step"] for r in rows["mup"]} == {1, 2}
    assert (out / "coord_check.png").read_bytes()[:4] == b"\x89PNG"
