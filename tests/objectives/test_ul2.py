import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stacklm.config import Config
from stacklm.data.tokenizer import Tokenizer
from stacklm.errors import UserError
from stacklm.model.transformer import build_model
from stacklm.objectives.ul2 import (
    UL2_MIXTURE,
    UL2R_MIXTURE,
    Denoiser,
    fill_sentinels,
    pack_rows,
    prefix_noise_mask,
    random_spans_noise_mask,
    sample_denoiser,
    span_corrupt,
)
from stacklm.registry import OBJECTIVE

SENTINELS = list(range(1000, 1300))


def spans(mask):
    """Lengths of the runs of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(int), [0])))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


@pytest.mark.parametrize(("density", "mean_span"), [(0.15, 3), (0.15, 8), (0.5, 3), (0.5, 64), (0.15, 64)])
def test_noise_mask_has_the_configured_density_and_mean_span(density, mean_span):
    rng = np.random.default_rng(0)
    length, samples = 512, 2000
    masks = np.stack([random_spans_noise_mask(length, density, mean_span, rng) for _ in range(samples)])
    # T5's mask is exact in the count of noise tokens: round(length * density) in every sample
    assert (masks.sum(1) == round(length * density)).all() and not masks[:, 0].any()
    lengths = np.concatenate([spans(m) for m in masks])
    # and in the count of spans, round(noise / mean_span): the mean span length misses mean_span
    # only by that rounding, at most mean_span / (2 * spans) away
    n_spans = round(round(length * density) / mean_span)
    assert abs(lengths.mean() - mean_span) <= mean_span / (2 * n_spans) + 1e-9
    if n_spans > 1:
        assert lengths.std() > 0.2 * mean_span  # random lengths, not a fixed pattern
    if n_spans >= 10:
        # many spans fall anywhere: a position away from the edges is noise about `density` of the
        # time (binomial standard error sqrt(p (1 - p) / samples) <= 0.011; 5 of them). With few
        # spans T5's layout (kept, noise, ..., kept, noise) pins the last span to the end.
        share = masks[:, 64:448].mean(0)
        assert np.abs(share - density).max() < 5 * np.sqrt(density * (1 - density) / samples) + 0.02
    else:
        assert masks[:, -1].all()


def test_prefix_mask_is_one_span_to_the_end_from_a_uniform_split():
    rng = np.random.default_rng(1)
    masks = [prefix_noise_mask(100, rng) for _ in range(4000)]
    assert all(m[-1] and len(spans(m)) == 1 and not m[0] for m in masks)
    splits = np.array([np.argmax(m) for m in masks])
    assert set(splits) == set(range(1, 100))  # every split point 1 ... 99 occurs
    assert abs(splits.mean() - 50) < 1.5  # uniform: mean 50, standard error 0.45


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 300), density=st.floats(0.01, 0.99), mean_span=st.floats(1, 80),
       seed=st.integers(0, 2**32 - 1))
def test_inputs_and_targets_restore_the_tokens(length, density, mean_span, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, length)
    mask = random_spans_noise_mask(length, density, mean_span, rng)
    inputs, targets = span_corrupt(tokens, mask, SENTINELS)
    assert len(inputs) + len(targets) == length + 2 * len(spans(mask))
    np.testing.assert_array_equal(fill_sentinels(inputs, targets, SENTINELS), tokens)


def test_span_corrupt_layout():
    tokens = np.arange(10, 20)
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    inputs, targets = span_corrupt(tokens, mask, [7, 8, 9])
    assert inputs.tolist() == [10, 11, 7, 14, 15, 16, 8, 18, 19]
    assert targets.tolist() == [7, 12, 13, 8, 17]


def test_too_few_sentinels_is_a_user_error():
    with pytest.raises(UserError, match="sentinel"):
        span_corrupt(np.arange(10), np.array([0, 1, 0, 1, 0, 1, 0, 0, 0, 0], dtype=bool), [7, 8])


@pytest.mark.parametrize("mixture", [UL2_MIXTURE, UL2R_MIXTURE], ids=["ul2", "ul2r"])
def test_mixture_proportions(mixture):
    rng = np.random.default_rng(2)
    draws = 20000
    counts = {d: 0 for d in mixture}
    for _ in range(draws):
        counts[sample_denoiser(mixture, rng)] += 1
    total = sum(d.weight for d in mixture)
    for d, n in counts.items():
        p = d.weight / total
        assert abs(n / draws - p) < 5 * np.sqrt(p * (1 - p) / draws), d
    if mixture is UL2_MIXTURE:  # the paper's reading: S 20%, the six R / X denoisers equal shares
        assert abs(sum(d.weight for d in mixture if d.mode == "S") / total - 0.2) < 1e-9
        assert len({round(d.weight, 12) for d in mixture if d.mode != "S"}) == 1


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x * {i}  # {i * i}" for i in range(300)]
    return Tokenizer.train(texts, 512, n_sentinels=60)


def objective(tokenizer, kind, *overrides):
    config = Config.load("configs/tiny.yaml", [f"train.objective.kind={kind}", *overrides])
    return OBJECTIVE.build(config.train.objective, tokenizer, config.model)


# the paper's denoisers and a causal example
DENOISERS = (*UL2_MIXTURE, Denoiser("C"))
MODE = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]", "C": "[S2S]"}


@pytest.mark.parametrize("denoiser", DENOISERS, ids=lambda d: f"{d.mode}{d.mean_span:g}-{d.corruption:g}")
def test_prefix_lm_layout_restores_the_window(tokenizer, denoiser):
    ul2 = objective(tokenizer, "ul2")
    rng = np.random.default_rng(3)
    window = rng.integers(300, 512, 257)
    tokens, prefix, loss = ul2.example(window, denoiser, rng)
    assert tokens[0] == tokenizer.token_id(MODE[denoiser.mode])
    end = int(np.flatnonzero(loss)[-1]) + 1
    assert loss[prefix:end].all() and not loss[:prefix].any() and (tokens[end:] == tokenizer.pad_id).all()
    inputs, targets = tokens[1:prefix], tokens[prefix:end]
    restored = np.concatenate((inputs, targets)) if denoiser.mode in ("S", "C") else \
        fill_sentinels(inputs, targets, tokenizer.sentinel_ids)
    assert len(restored) > 0.6 * len(window)  # sentinels take some room, not most
    np.testing.assert_array_equal(restored, window[: len(restored)])
    if denoiser.mode == "C":  # a causal example: every token after the mode token is a target
        assert prefix == 1 and len(targets) == len(window) - 1 and loss[1:].all()


def test_batch_targets_cover_the_targets_only_and_repeat_for_the_same_batch(tokenizer):
    ul2 = objective(tokenizer, "ul2")
    batch = torch.randint(300, 512, (8, 65))
    out = ul2.batch(batch)
    inputs, targets, prefix = out["idx"], out["targets"], out["prefix"]
    for row in range(8):
        labelled = torch.nonzero(targets[row] != -100).flatten()
        assert labelled[0] == prefix[row] - 1  # the last prefix position predicts the first target
        assert torch.equal(labelled, torch.arange(labelled[0], labelled[-1] + 1))  # then every target
        inner = labelled[labelled < inputs.size(1) - 1]
        assert torch.equal(targets[row, inner], inputs[row, inner + 1])  # next-token labels
    again = ul2.batch(batch.clone())
    assert out.keys() == again.keys() and all(torch.equal(out[k], again[k]) for k in out)


def test_span_corruption_and_prefix_lm_options(tokenizer):
    t5 = objective(tokenizer, "span_corruption", "train.objective.noise_density=0.3",
                   "train.objective.mean_noise_span_length=2")
    assert [(d.mode, d.mean_span, d.corruption) for d in t5.mixture] == [("R", 2.0, 0.3)]
    assert [d.mode for d in objective(tokenizer, "prefix_lm").mixture] == ["S"]
    assert objective(tokenizer, "ul2", "train.objective.mixture=ul2r").mixture == UL2R_MIXTURE


def test_denoising_needs_full_attention():
    with pytest.raises(UserError, match="model.attention.kind=local cannot; use full"):
        Config.load("configs/tiny.yaml", ["train.objective.kind=ul2", "model.attention.kind=local"])


@pytest.mark.parametrize("denoiser", DENOISERS, ids=lambda d: f"{d.mode}{d.mean_span:g}-{d.corruption:g}")
def test_encoder_decoder_layout_restores_the_window(tokenizer, denoiser):
    ul2 = objective(tokenizer, "ul2", "model.arch=encoder_decoder")
    rng = np.random.default_rng(4)
    window = rng.integers(300, 512, 257)
    encoder, decoder = ul2.encoder_decoder_example(window, denoiser, rng)
    assert encoder[0] == tokenizer.token_id(MODE[denoiser.mode])
    assert decoder[0] == tokenizer.eos_id  # the decoder starts a document
    assert len(encoder) <= 256 and len(decoder) <= 257  # within the model's input length
    inputs, targets = encoder[1:], decoder[1:]
    restored = np.concatenate((inputs, targets)) if denoiser.mode in ("S", "C") else \
        fill_sentinels(inputs, targets, tokenizer.sentinel_ids)
    assert len(restored) > 0.9 * len(window)  # each side has a window's room: little is cut
    np.testing.assert_array_equal(restored, window[: len(restored)])


def test_encoder_decoder_batch(tokenizer):
    ul2 = objective(tokenizer, "ul2", "model.arch=encoder_decoder", "train.objective.pack=false")
    batch = torch.randint(300, 512, (8, 65))
    out = ul2.batch(batch)
    assert set(out) == {"idx", "targets", "encoder_ids", "encoder_lengths"}
    idx, targets, enc, lengths = out["idx"], out["targets"], out["encoder_ids"], out["encoder_lengths"]
    assert enc.size(1) == int(lengths.max()) <= 64 and idx.size(1) <= 64  # padded to the longest only
    for row in range(8):
        assert (enc[row, lengths[row]:] == tokenizer.pad_id).all()
        labelled = torch.nonzero(targets[row] != -100).flatten()
        assert torch.equal(labelled, torch.arange(len(labelled)))  # from the first decoder position
        assert idx[row, 0] == tokenizer.eos_id
        inner = labelled[labelled < idx.size(1) - 1]
        assert torch.equal(targets[row, inner], idx[row, inner + 1])
        inputs, span_targets = enc[row, 1 : lengths[row]].numpy(), targets[row, labelled].numpy()
        restored = np.concatenate((inputs, span_targets)) if enc[row, 0] == tokenizer.token_id("[S2S]") \
            else fill_sentinels(inputs, span_targets, tokenizer.sentinel_ids)
        np.testing.assert_array_equal(restored, batch[row, : len(restored)].numpy())


def test_packed_encoder_decoder_batch_holds_every_example_once(tokenizer):
    ul2 = objective(tokenizer, "ul2", "model.arch=encoder_decoder")
    batch = torch.randint(300, 512, (16, 65))
    out = ul2.batch(batch)
    assert set(out) == {"idx", "targets", "segments", "encoder_ids", "encoder_segments"}
    idx, targets, segments = out["idx"], out["targets"], out["segments"]
    enc, enc_segments = out["encoder_ids"], out["encoder_segments"]
    assert idx.size(0) < 16  # fewer rows than examples
    assert max(idx.size(1), enc.size(1)) <= 128  # model.max_seq_len
    restored = []
    for row in range(idx.size(0)):
        assert (enc[row][enc_segments[row] == 0] == tokenizer.pad_id).all()
        assert (targets[row][segments[row] == 0] == -100).all()
        for segment in range(1, int(segments[row].max()) + 1):
            at = torch.nonzero(segments[row] == segment).flatten()
            at_enc = torch.nonzero(enc_segments[row] == segment).flatten()
            # each example one run on each side, in the same order on both
            assert len(at) and len(at_enc) and torch.equal(at, torch.arange(at[0], at[-1] + 1))
            assert torch.equal(at_enc, torch.arange(at_enc[0], at_enc[-1] + 1))
            assert idx[row, at[0]] == tokenizer.eos_id and (targets[row, at] != -100).all()
            assert torch.equal(targets[row, at[:-1]], idx[row, at[1:]])  # next-token labels
            inputs, span_targets = enc[row, at_enc[1:]].numpy(), targets[row, at].numpy()
            restored.append(np.concatenate((inputs, span_targets)) if enc[row, at_enc[0]] == tokenizer.token_id("[S2S]")
                            else fill_sentinels(inputs, span_targets, tokenizer.sentinel_ids))
    assert len(restored) == 16
    for window in batch.numpy():  # each window restored from exactly one segment
        assert sum(len(r) > 32 and np.array_equal(r, window[: len(r)]) for r in restored) == 1


@given(st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=24))
@settings(max_examples=200, deadline=None)
def test_pack_rows_places_each_example_once_within_the_widths(sizes):
    rows, width_enc, width_dec = pack_rows(sizes, 128, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    assert max(s[0] for s in sizes) <= width_enc <= 128 and max(s[1] for s in sizes) <= width_dec <= 128
    for row in rows:
        assert sum(sizes[i][0] for i in row) <= width_enc and sum(sizes[i][1] for i in row) <= width_dec
    padded = len(sizes) * (max(s[0] for s in sizes) + max(s[1] for s in sizes))
    assert len(rows) * (width_enc + width_dec) <= padded * 1.25  # never much wider than padding


def test_complementary_examples_share_rows():
    rows, width_enc, width_dec = pack_rows([(50, 10), (10, 50)] * 4, 128, 64)
    assert (len(rows), width_enc, width_dec) == (4, 60, 60)
    assert all(sorted(i % 2 for i in row) == [0, 1] for row in rows)
    with pytest.raises(ValueError, match="exceeds the width 40"):
        pack_rows([(50, 10)], 40, 64)


@pytest.mark.parametrize("overrides", [(), ("model.position.kind=t5",), ("model.position.kind=alibi",),
                                       ("model.position.kind=none",), ("model.n_kv_heads=1",),
                                       ("model.encoder_layers=1", "model.attention.qkv=multiplicative"),
                                       ("model.ffn.kind=moe", "model.ffn.dropless=true")])
def test_packed_rows_give_the_padded_batch_loss_and_gradients(tokenizer, overrides):
    """Each example in a packed row attends within itself and reads its own encoder input only:
    the loss and every gradient are the padded batch's."""
    overrides = ("model.arch=encoder_decoder", "model.dropout=0", *overrides)
    packed, padded = objective(tokenizer, "ul2", *overrides), objective(tokenizer, "ul2", *overrides, "train.objective.pack=false")
    torch.manual_seed(0)
    model = build_model(Config.load("configs/tiny.yaml", ["train.objective.kind=ul2", *overrides]))
    batch = torch.randint(300, 512, (16, 65))
    a, b = packed.batch(batch), padded.batch(batch)
    assert a["idx"].size(0) < b["idx"].size(0)
    losses, grads = [], []
    for inputs in (a, b):
        loss = model(**inputs)
        losses.append(loss.item())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides", [("model.position.kind=learned",), ("model.attention.qkv=multiplicative_conv",),
                                       ("model.attention.kind=local",), ("train.objective.pack=false",)])
def test_models_that_read_across_positions_stay_padded(tokenizer, overrides):
    ul2 = objective(tokenizer, "ul2", "model.arch=encoder_decoder", *overrides)
    assert "segments" not in ul2.batch(torch.randint(300, 512, (8, 65)))


def test_examples_of_one_size_stay_padded(tokenizer):
    """T5's span corruption gives every window the same sizes: two to a row would take twice the
    width and save no positions, so the cheapest layout is one a row, and the batch stays padded."""
    t5 = objective(tokenizer, "span_corruption", "model.arch=encoder_decoder")
    out = t5.batch(torch.randint(300, 512, (8, 65)))
    assert "segments" not in out and out["idx"].size(0) == 8


def test_mixture_entries_are_overridable(tokenizer):
    patched = objective(tokenizer, "ul2", "train.objective.denoisers.6.weight=0.5",
                        "train.objective.denoisers.0.mean_span=5")
    assert patched.mixture[6] == Denoiser("S", weight=0.5) and patched.mixture[0].mean_span == 5
    assert patched.mixture[1:6] == UL2_MIXTURE[1:6]
    ul2r = objective(tokenizer, "ul2", "train.objective.mixture=ul2r", "train.objective.denoisers.2.corruption=0.3")
    assert ul2r.mixture == (*UL2R_MIXTURE[:2], Denoiser("X", 32, 0.3, 0.25))
    own = objective(tokenizer, "ul2", "train.objective.denoisers=[{mode: S}, {mode: X, mean_span: 16, corruption: 0.5}, "
                    "{mode: C, weight: 2}]")
    assert own.mixture == (Denoiser("S"), Denoiser("X", 16, 0.5), Denoiser("C", weight=2.0))


@pytest.mark.parametrize(("override", "message"), [
    ("train.objective.denoisers.7.weight=1", "has 7 entries; give an index 0-6"),
    ("train.objective.denoisers.1.mode=Q", "'Q' is not valid; valid: R, X, S, C"),
    ("train.objective.denoisers.1.corruption=1.5", "corruption must be < 1.0"),
    ("train.objective.denoisers=[]", "must be a non-empty list"),
])
def test_bad_mixture_entries_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        Config.load("configs/tiny.yaml", ["train.objective.kind=ul2", override])


def test_causal_examples_without_mode_tokens(tokenizer):
    """Decoder-only, a C example without its mode token is plain causal LM: no prefix, every
    next token labelled. An encoder-decoder's C example would have an empty encoder input:
    refused at config time."""
    plain = objective(tokenizer, "ul2", "train.objective.denoisers=[{mode: C}]", "train.objective.mode_tokens=false")
    batch = torch.randint(300, 512, (4, 65))
    out = plain.batch(batch)
    assert (out["prefix"] == 0).all()
    assert torch.equal(out["idx"], batch[:, :-1]) and torch.equal(out["targets"], batch[:, 1:])
    with pytest.raises(UserError, match="mode_tokens=false an encoder-decoder would read nothing"):
        Config.load("configs/tiny.yaml", ["train.objective.kind=ul2", "model.arch=encoder_decoder",
                                          "train.objective.mode_tokens=false", "train.objective.denoisers=[{mode: C}]"])
