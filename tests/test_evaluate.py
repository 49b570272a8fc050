import pytest
import torch

import stacklm
from stacklm.config import Config
from stacklm.data import prepare_data
from stacklm.evaluate import Continuation, NextToken, evaluate
from stacklm.registry import OBJECTIVE

WINDOWS = torch.arange(2 * 9).view(2, 9) + 100  # (B, T + 1) with T = 8: halves of 4


def test_continuation_scores_the_second_half_in_either_architecture():
    windows = WINDOWS
    decoder = Continuation(Config.load("configs/tiny.yaml").model, eos_id=0).batch(windows)
    assert decoder["idx"].equal(windows[:, :-1]) and "prefix" not in decoder
    assert (decoder["targets"][:, :4] == -100).all() and decoder["targets"][:, 4:].equal(windows[:, 5:])
    model = Config.load("configs/tiny.yaml", ["model.arch=encoder_decoder", "train.objective.kind=ul2"]).model
    both = Continuation(model, eos_id=0, head=[7]).batch(windows)
    assert both["targets"].equal(windows[:, 5:])  # the same tokens scored
    assert both["encoder_ids"].equal(torch.cat((torch.full((2, 1), 7), windows[:, :5]), dim=1))
    assert both["idx"].equal(torch.cat((torch.zeros(2, 1, dtype=torch.long), windows[:, 5:-1]), dim=1))


def test_a_prefix_lm_reads_the_first_half_both_ways_after_its_mode_token():
    """The S-denoiser's layout: [S2S] and tokens 0 ... half as the prefix, whose last position
    predicts the first scored token; the scored tokens are the causal layout's."""
    windows = WINDOWS
    s = Continuation(Config.load("configs/tiny.yaml").model, eos_id=0, head=[7], prefix_lm=True).batch(windows)
    assert s["idx"].equal(torch.cat((torch.full((2, 1), 7), windows[:, :-1]), dim=1))
    assert s["prefix"].tolist() == [6, 6]  # [S2S] and tokens 0 ... 4
    assert (s["targets"][:, :5] == -100).all() and s["targets"][:, 5:].equal(windows[:, 5:])
    # the prefix's last position (token 4) predicts token 5, the first scored
    assert s["idx"][0, s["prefix"][0] - 1] == windows[0, 4] and s["targets"][0, s["prefix"][0] - 1] == windows[0, 5]
    # without prefix_lm the same tokens are read causally: no prefix
    causal = Continuation(Config.load("configs/tiny.yaml").model, eos_id=0, head=[7]).batch(windows)
    assert causal["idx"].equal(s["idx"]) and causal["targets"].equal(s["targets"]) and "prefix" not in causal


def test_next_token_layout_puts_the_mode_head_before_the_window_and_scores_the_same_tokens():
    model = Config.load("configs/tiny.yaml").model
    plain = NextToken(model).batch(WINDOWS)
    assert plain["idx"].equal(WINDOWS[:, :-1]) and plain["targets"].equal(WINDOWS[:, 1:])
    headed = NextToken(model, head=[7]).batch(WINDOWS)
    assert headed["idx"].equal(torch.cat((torch.full((2, 1), 7), WINDOWS[:, :-1]), dim=1))
    assert headed["targets"][:, 0].eq(-100).all() and headed["targets"][:, 1:].equal(WINDOWS[:, 1:])
    model.max_seq_len = 8  # the head and 8 tokens do not fit: the window's first token gives way
    short = NextToken(model, head=[7]).batch(WINDOWS)
    assert short["idx"].size(1) == 8 and short["idx"][:, 1:].equal(WINDOWS[:, 1:-1])
    assert short["targets"][:, 1:].equal(WINDOWS[:, 2:])
    encoder_decoder = Config.load("configs/tiny.yaml", ["model.arch=encoder_decoder", "train.objective.kind=ul2"]).model
    both = NextToken(encoder_decoder, head=[7]).batch(WINDOWS)
    assert both["idx"].equal(WINDOWS[:, :-1]) and both["encoder_ids"].equal(torch.full((2, 1), 7))


@pytest.mark.parametrize("objective, modes", [("causal", False), ("ul2", True), ("ul2", False), ("prefix_lm", False)])
def test_mode_head_is_the_s_denoisers_paradigm_token(tiny, objective, modes):
    config = tiny(f"train.objective.kind={objective}",
                  *([f"train.objective.mode_tokens={str(modes).lower()}"] if objective == "ul2" else []))
    data = prepare_data(config.data, config.model.vocab_size, progress=False, log=lambda m: None)
    built = OBJECTIVE.build(config.train.objective, data.tokenizer, config.model)
    assert built.mode_head() == ([data.tokenizer.token_id("[S2S]")] if modes else [])
    assert built.prefix_lm == (objective != "causal")  # how a decoder reads a continuation's context


def test_evaluate_reads_the_head_first(tiny):
    config = tiny()
    data = prepare_data(config.data, config.model.vocab_size, progress=False, log=lambda m: None)
    model = stacklm.build_model(config).eval()
    cpu = torch.device("cpu")
    plain = evaluate(model, data.val, 32, 2, 1, cpu)
    headed = evaluate(model, data.val, 32, 2, 1, cpu, head=[data.tokenizer.token_id("[S2S]")])
    assert headed["tokens"] == plain["tokens"]  # the same tokens scored
    assert headed["loss"] != plain["loss"]  # with one more token of context
    window = torch.from_numpy(data.val.window(0, 32, data.val.chunk_table(32)).astype("int64"))
    ids = torch.cat((torch.tensor([data.tokenizer.token_id("[S2S]")]), window[:-1]))[None]
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(model(ids)[0, 1:], window[1:])
    one = evaluate(model, data.val, 32, 1, 1, cpu, head=[data.tokenizer.token_id("[S2S]")])
    assert one["loss"] == pytest.approx(first.item(), rel=1e-5)
