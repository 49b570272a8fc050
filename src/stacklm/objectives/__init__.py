"""Training objectives, chosen by `train.objective.kind`. Built as
OBJECTIVE.build(options, tokenizer, model_config).

An objective turns a packed batch of token windows (B, T + 1) into the model's keyword inputs
(`batch`: idx and targets, -100 off the loss, plus a prefix-LM `prefix` or an encoder-decoder's
`encoder_ids` and `encoder_lengths`, or in packed rows `encoder_ids`, `segments` and
`encoder_segments`) and a scalar loss (`loss`); `encoder_input(ids)` is what an
encoder-decoder's encoder reads for a text it is given (a system prompt).
"""

from stacklm.objectives import causal, ul2  # noqa: F401
