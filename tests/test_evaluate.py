import torch

from stacklm.config import Config
from stacklm.evaluate import Continuation


def test_continuation_scores_the_second_half_in_either_architecture():
    windows = torch.arange(2 * 9).view(2, 9) + 100  # (B, T + 1) with T = 8: halves of 4
    decoder = Continuation(Config.load("configs/tiny.yaml").model, eos_id=0).batch(windows)
    assert decoder["idx"].equal(windows[:, :-1])
    assert (decoder["targets"][:, :4] == -100).all() and decoder["targets"][:, 4:].equal(windows[:, 5:])
    model = Config.load("configs/tiny.yaml", ["model.arch=encoder_decoder", "train.objective.kind=ul2"]).model
    both = Continuation(model, eos_id=0, encoder_input=[7]).batch(windows)
    assert both["targets"].equal(windows[:, 5:])  # the same tokens scored
    assert both["encoder_ids"].equal(torch.cat((torch.full((2, 1), 7), windows[:, :5]), dim=1))
    assert both["idx"].equal(torch.cat((torch.zeros(2, 1, dtype=torch.long), windows[:, 5:-1]), dim=1))
