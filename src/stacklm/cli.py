"""The `stacklm` command line: train, generate, eval, export, import-hf, config."""

from __future__ import annotations

import argparse
import json
import os
import sys

from stacklm.errors import TrainingError, UserError

EPILOG = """examples:
  stacklm train configs/default.yaml                     train on the built-in corpus
  stacklm train configs/tiny.yaml train.steps=100 model.d_model=128
  stacklm train --resume runs/default train.steps=2000   continue (and extend) a run
  torchrun --standalone --nproc_per_node 2 --no-python stacklm train configs/default.yaml
  stacklm generate runs/default --prompt "def main(" --max-new-tokens 100
  stacklm eval runs/default --data 'docs/**/*.md'
  stacklm export runs/default --format hf out/llama
  stacklm import-hf out/llama --out runs/imported
"""


def split_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] key=value ...` -> (CONFIG or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    for item in items:
        if "=" not in item:
            raise UserError(f"{item!r}: expected section.key=value (the config file comes first)")
    return None, items


def cmd_train(args) -> None:
    from stacklm.config import Config
    from stacklm.training.trainer import CONFIG_FILE, train

    path, overrides = split_overrides(args.items)
    resume_dir = args.resume if isinstance(args.resume, str) else None
    if path is None and resume_dir is not None:
        path = f"{resume_dir}/{CONFIG_FILE}"
    if resume_dir is not None:
        overrides = [f"train.out_dir={resume_dir}", *overrides]
    config = Config.load(path, overrides)
    result = train(config, resume=bool(args.resume), overwrite=args.overwrite)
    if not is_main_process():
        return
    val = result.val
    print(f"validation after {result.step} steps: loss {val['loss']:.4f}  perplexity {val['ppl']:.2f}  "
          f"bits-per-byte {val['bpb']:.4f}  ({val['tokens']} tokens)")
    if config.eval.sample_tokens:
        from stacklm.runs import load_run

        run = load_run(result.run_dir)
        print(f"sample ({config.eval.sample_tokens} tokens, temperature {config.eval.temperature}):")
        stream_sample(run, config.eval.sample_prompt, config.eval.sample_tokens, config.eval.temperature,
                      config.eval.top_k, config.eval.top_p, seed=config.train.seed)
    print(f"run saved in {result.run_dir}")


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def stream_sample(run, prompt: str, max_new_tokens: int, temperature: float, top_k, top_p: float,
                  seed: int | None, compile: bool = False) -> str:
    """Generate from `prompt`, printing the text as it is made; returns the whole text."""
    import torch

    from stacklm.inference import generate

    tok = run.tokenizer
    ids = tok.encode(prompt) or [tok.eos_id]  # <eos> also starts a document
    limit = run.config.model.max_seq_len
    if len(ids) >= limit:
        raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {limit}")
    new: list[int] = []
    shown = ""
    sys.stdout.write(prompt)

    def on_token(token):
        nonlocal shown
        new.append(int(token[0]))
        if new[-1] == tok.eos_id:
            return
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # hold back a partly decoded UTF-8 character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = next(run.model.parameters()).device
    generate(run.model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
             eos_id=tok.eos_id, generator=generator, on_token=on_token, compile=compile)
    sys.stdout.write("\n")
    return prompt + shown


def cmd_generate(args) -> None:
    from stacklm.device import resolve_device, resolve_dtype
    from stacklm.runs import load_run

    device = resolve_device(args.device)
    run = load_run(args.run, device, resolve_dtype(args.dtype, device))
    temperature = 0.0 if args.greedy else args.temperature
    stream_sample(run, args.prompt, args.max_new_tokens, temperature, args.top_k, args.top_p, args.seed,
                  args.compile)


def cmd_eval(args) -> None:
    from stacklm.data import prepare_data
    from stacklm.device import resolve_device
    from stacklm.evaluate import evaluate
    from stacklm.runs import load_run

    device = resolve_device(args.device)
    run = load_run(args.run, device)
    data_cfg = run.config.data
    if args.data is not None:
        data_cfg.source = args.data
    data = prepare_data(data_cfg, run.config.model.vocab_size, run.tokenizer, split=args.data is None,
                        progress=False, log=lambda m: print(m, file=sys.stderr))
    seq_len = args.seq_len or data_cfg.seq_len
    if seq_len > run.config.model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len ({run.config.model.max_seq_len})")
    result = evaluate(run.model, data.val, seq_len, run.config.eval.batch_size,
                      args.batches if args.batches else run.config.eval.max_batches, device)
    if args.json:
        print(json.dumps(result))
    else:
        which = "validation split" if args.data is None else args.data
        print(f"{which}: loss {result['loss']:.4f}  perplexity {result['ppl']:.2f}  "
              f"bits-per-byte {result['bpb']:.4f}  ({result['tokens']} tokens)")


def cmd_export(args) -> None:
    from stacklm.interop.hf import export_hf

    export_hf(args.run, args.out)
    print(f"wrote a Hugging Face Llama directory to {args.out}")


def cmd_import_hf(args) -> None:
    from stacklm.interop.hf import import_hf

    run_dir = import_hf(args.dir, args.out)
    print(f"imported {args.dir} as the stacklm run {run_dir}")


def cmd_config(args) -> None:
    import yaml

    from stacklm.config import Config

    path, overrides = split_overrides(args.items)
    print(yaml.safe_dump(Config.load(path, overrides).to_dict(), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stacklm", description="Train, evaluate, sample and export stacklm language models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (under torchrun: data-parallel)",
                       description="Train a model. CONFIG is a YAML file or a preset name from configs/; "
                                   "section.key=value pairs override it (see `stacklm config`).")
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue from the latest checkpoint of train.out_dir (or of RUN_DIR)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in train.out_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="sample text from a trained run",
                       description="Continue a prompt with the run's latest checkpoint, streaming to stdout.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="float32",
                   help="weight dtype for decoding (auto: bfloat16 where the hardware runs it natively)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile: tens of seconds to start, "
                        "then several times faster per token on CPU (worth it for long outputs)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a run on any data",
                       description="Evaluate a run on its validation split, or on every document of --data.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--data", default=None, help="a data.source: file, directory, glob, .jsonl, 'default'")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--batches", type=int, default=None, help="at most this many batches")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a run in another format",
                       description="Export the latest checkpoint of a run.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: a Hugging Face Llama directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="read a Hugging Face Llama directory as a stacklm run")
    p.add_argument("dir", metavar="HF_DIR")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="default: runs/<name of HF_DIR>")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("config", help="print a resolved config with its overrides applied")
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"stacklm: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"stacklm: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stacklm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
