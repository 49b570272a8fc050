"""stacklm: sparse, efficient language models on one PyTorch codebase.

    import stacklm
    config = stacklm.Config.load("configs/tiny.yaml", overrides=["train.steps=100"])
    result = stacklm.train(config)
    model = stacklm.load(result.run_dir)          # eval mode; model(ids) -> logits
    text = stacklm.generate_text(result.run_dir, "def ", max_new_tokens=50)
"""

from stacklm.config import Config
from stacklm.errors import TrainingError, UserError
from stacklm.evaluate import evaluate
from stacklm.inference import generate
from stacklm.model.transformer import Transformer, build_model
from stacklm.runs import Run, load, load_run
from stacklm.training.trainer import TrainResult, train

__version__ = "0.1.0"


def generate_text(run_dir, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, top_p: float = 1.0, seed: int | None = None,
                  system: str | None = None) -> str:
    """Continue `prompt` with a trained run; returns the prompt and its continuation. An
    encoder-decoder's encoder reads `system`."""
    import torch

    run = load_run(run_dir)
    ids, encoder = run.prompt_ids(prompt, system)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = generate(run.model, torch.tensor([ids]), max_new_tokens, temperature, top_k, top_p,
                   eos_id=run.tokenizer.eos_id, generator=generator,
                   encoder_ids=torch.tensor([encoder]) if encoder else None)
    new = [t for t in out[0, len(ids):].tolist() if t != run.tokenizer.eos_id]
    return prompt + run.tokenizer.decode(new)


__all__ = ["Config", "Run", "TrainResult", "TrainingError", "Transformer", "UserError", "build_model",
           "evaluate", "generate", "generate_text", "load", "load_run", "train"]
