"""Training objectives, chosen by `train.objective.kind`. Built as OBJECTIVE.build(options, tokenizer).

An objective turns a packed batch of token windows into a scalar loss for the model.
"""

from stacklm.objectives import causal, ul2  # noqa: F401
