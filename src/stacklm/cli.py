"""The `stacklm` command line: train, generate, eval, export, import-hf, config, scaling, mup, sweep."""

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
  stacklm generate runs/t5 --system "def add(a, b):" --prompt "    return"   encoder-decoder
  stacklm eval runs/default --data 'docs/**/*.md'
  stacklm eval runs/alibi runs/rope --context 256,512,1024,2048   perplexity vs length, PNG plot
  stacklm export runs/default --format hf out/llama
  stacklm import-hf out/llama --out runs/imported
  stacklm scaling fit runs/sweep/* --json > fit.json     Chinchilla's L(N, D) with bootstrap intervals
  stacklm scaling plan --flops 1e21 --fit fit.json       compute-optimal N and D for a FLOP budget
  stacklm sweep configs/default.yaml model.parametrization=mup --widths 64,128 --lr 1e-3,2e-3
  stacklm mup coord-check configs/tiny.yaml model.base_width=32 --widths 32,64,128
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
                  seed: int | None, compile: bool = False, system: str | None = None) -> str:
    """Generate from `prompt`, printing the text as it is made; returns the whole text. An
    encoder-decoder's encoder reads `system` (as its objective lays out an input)."""
    import torch

    from stacklm.inference import generate

    tok = run.tokenizer
    device = next(run.model.parameters()).device
    ids, encoder = run.prompt_ids(prompt, system)
    encoder_ids = torch.tensor([encoder], device=device) if encoder else None
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

    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None  # where it samples
    generate(run.model, torch.tensor([ids], device=device), max_new_tokens, temperature, top_k, top_p,
             eos_id=tok.eos_id, generator=generator, on_token=on_token, compile=compile,
             encoder_ids=encoder_ids)
    sys.stdout.write("\n")
    return prompt + shown


def cmd_generate(args) -> None:
    from stacklm.device import resolve_device, resolve_dtype
    from stacklm.runs import load_run

    device = resolve_device(args.device)
    run = load_run(args.run, device, resolve_dtype(args.dtype, device))
    temperature = 0.0 if args.greedy else args.temperature
    stream_sample(run, args.prompt, args.max_new_tokens, temperature, args.top_k, args.top_p, args.seed,
                  args.compile, args.system)


# Settings `stacklm eval` may change on a trained model: how it attends, not what its weights are.
EVAL_OVERRIDABLE = ("model.position.", "model.attention.")


def cmd_eval(args) -> None:
    from stacklm.data import prepare_data
    from stacklm.device import resolve_device
    from stacklm.evaluate import Continuation, context_sweep, denoising_losses, evaluate
    from stacklm.registry import OBJECTIVE
    from stacklm.runs import load_run

    runs = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if not runs:
        raise UserError("name at least one run directory")
    for item in overrides:
        if not item.startswith(EVAL_OVERRIDABLE):
            raise UserError(f"{item!r}: eval can change only {' and '.join(k + '*' for k in EVAL_OVERRIDABLE)} "
                            f"of a trained model")
    contexts = sorted(set(parse_numbers(args.context, int, "--context"))) if args.context else None
    if contexts and args.seq_len:
        raise UserError("give --seq-len or --context, not both")
    device = resolve_device(args.device)
    sweeps = {}
    for run_dir in runs:
        run = load_run(run_dir, device, overrides=overrides + stretch(run_dir, overrides, contexts))
        data_cfg = run.config.data
        if args.data is not None:
            data_cfg.source = args.data
        data = prepare_data(data_cfg, run.config.model.vocab_size, run.tokenizer, split=args.data is None,
                            progress=False, log=lambda m: print(m, file=sys.stderr))
        which = "validation split" if args.data is None else args.data
        objective = OBJECTIVE.build(run.config.train.objective, run.tokenizer, run.config.model)
        head = objective.mode_head()  # a UL2 run's [S2S]: the mode its causal loss is read in
        if contexts:
            sweeps[run_dir] = context_sweep(run.model, data.val, contexts, args.tokens,
                                            run.config.eval.batch_size * data_cfg.seq_len, device,
                                            head=head)
            if not args.json:
                print_sweep(run_dir, which, sweeps[run_dir], data_cfg.seq_len)
            continue
        seq_len = args.seq_len or data_cfg.seq_len
        if seq_len > run.config.model.max_seq_len:
            raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len ({run.config.model.max_seq_len})")
        batches = args.batches if args.batches else run.config.eval.max_batches
        result = evaluate(run.model, data.val, seq_len, run.config.eval.batch_size, batches, device,
                          head=head)
        if args.continuation or run.config.model.arch == "encoder_decoder":
            # a denoising run reads the first half as the S-denoiser's prefix (both ways), unless
            # an evaluation override gave it an attention kind that cannot
            prefix_lm = objective.prefix_lm and run.config.model.attention.kind == "full"
            layout = Continuation(run.config.model, run.tokenizer.eos_id, head, prefix_lm=prefix_lm)
            result["continuation"] = evaluate(run.model, data.val, seq_len, run.config.eval.batch_size,
                                              batches, device, objective=layout)["loss"]
        if args.denoisers or run.config.train.objective.kind != "causal":
            if run.config.model.arch == "decoder" and run.config.model.attention.kind != "full":
                raise UserError(f"--denoisers: denoising attends both ways over its inputs, which "
                                f"model.attention.kind={run.config.model.attention.kind} cannot")
            result["denoising"] = denoising_losses(run.model, data.val, seq_len, run.config.eval.batch_size,
                                                   batches, device, run.tokenizer)
        if args.json:
            print(json.dumps({"run": run_dir, **result}) if len(runs) > 1 else json.dumps(result))
            continue
        print(f"{run_dir}: {which}: loss {result['loss']:.4f}  perplexity {result['ppl']:.2f}  "
              f"bits-per-byte {result['bpb']:.4f}  ({result['tokens']} tokens)")
        if "continuation" in result:
            print(f"  continuation loss (second half of each window given the first): {result['continuation']:.4f}")
        for name, loss in result.get("denoising", {}).items():
            print(f"  denoising loss, {name}: {loss:.4f}")
    if contexts:
        write_sweeps(sweeps, args.out or os.path.join(runs[0], "context"), args.json)


def stretch(run_dir: str, overrides: list[str], contexts: list[int] | None) -> list[str]:
    """The override that lets the model run the longest context, and the mode head a decoder-only
    UL2 run reads before it (`NextToken`), if it needs one."""
    from stacklm.config import Config
    from stacklm.data.tokenizer import Tokenizer
    from stacklm.registry import OBJECTIVE
    from stacklm.training.trainer import CONFIG_FILE, TOKENIZER_FILE

    if not contexts:
        return []
    config = Config.load(os.path.join(run_dir, CONFIG_FILE), overrides)
    model, head = config.model, 0
    if model.arch == "decoder":
        tokenizer = Tokenizer.load(os.path.join(run_dir, TOKENIZER_FILE))
        head = len(OBJECTIVE.build(config.train.objective, tokenizer, model).mode_head())
    if max(contexts) + head <= model.max_seq_len:
        return []
    if model.position.kind == "learned":
        if max(contexts) <= model.max_seq_len:
            return []  # the head takes the place of the window's first token (`after_head`)
        raise UserError(f"{run_dir}: learned positions exist for {model.max_seq_len} positions "
                        f"(model.max_seq_len); --context can go up to that")
    return [f"model.max_seq_len={max(contexts) + head}"]


def print_sweep(run_dir: str, which: str, rows: list[dict], trained: int) -> None:
    print(f"{run_dir}: {which}, trained at {trained} tokens")
    print(f"{'context':>8} {'loss':>8} {'perplexity':>11} {'bits/byte':>10} {'ppl / ppl@' + str(rows[0]['context']):>14}")
    for row in rows:
        print(f"{row['context']:>8} {row['loss']:>8.4f} {row['ppl']:>11.2f} {row['bpb']:>10.4f} "
              f"{row['ppl'] / rows[0]['ppl']:>14.3f}")


def write_sweeps(sweeps: dict[str, list[dict]], out: str, as_json: bool) -> None:
    from pathlib import Path

    from stacklm.plots import line_plot

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "context.json").write_text(json.dumps(sweeps, indent=2))
    series = {Path(run).name: ([r["context"] for r in rows], [r["ppl"] for r in rows]) for run, rows in sweeps.items()}
    plotted = line_plot(out_dir / "context.png", series, "evaluation context (tokens)", "perplexity",
                        "Perplexity vs evaluation context", logx=True)
    if as_json:
        print(json.dumps(sweeps))
        return
    print(f"wrote {out_dir / 'context.json'}" + (f" and {out_dir / 'context.png'}" if plotted else
          " (no plot: pip install 'stacklm[plot]' for matplotlib)"))


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


def cmd_scaling_fit(args) -> None:
    import dataclasses

    from stacklm.scaling import bootstrap, fit_scaling_law, fit_table, intervals, load_points, read_csv

    if bool(args.runs) == bool(args.csv):
        raise UserError("give run directories or --csv FILE, not both" if args.runs else
                        "name the run directories to fit, or give --csv FILE")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: give a number of resamples, 0 for none")
    N, D, loss = read_csv(args.csv) if args.csv else load_points(args.runs)
    fit = fit_scaling_law(N, D, loss)
    if args.bootstrap:
        fit = dataclasses.replace(fit, ci=intervals(bootstrap(N, D, loss, fit, args.bootstrap, args.seed)))
    if args.json:
        print(json.dumps({**fit.to_dict(), "bootstrap": args.bootstrap}))
    else:
        print(fit_table(fit, args.bootstrap))


def cmd_scaling_plan(args) -> None:
    import dataclasses

    from stacklm.scaling import PUBLISHED, compute_optimal, read_fit

    if not args.flops > 0:
        raise UserError(f"--flops {args.flops}: give the training compute in FLOPs, e.g. 1e21")
    fit = PUBLISHED[args.published] if args.published else read_fit(args.fit)
    plan = compute_optimal(args.flops, fit)
    constants = args.published or args.fit
    if args.json:
        print(json.dumps({**dataclasses.asdict(plan), "tokens_per_param": plan.tokens_per_param,
                          "constants": constants}))
        return
    print(f"compute-optimal for {plan.flops:.3g} FLOPs under C = 6 N D (constants: {constants}):")
    print(f"  parameters N        {plan.N:.3g}")
    print(f"  training tokens D   {plan.D:.3g}")
    print(f"  tokens / parameter  {plan.tokens_per_param:.1f}")
    print(f"  predicted loss      {plan.loss:.4f}")


def parse_numbers(text: str, kind: type, flag: str) -> list:
    """`256,512,1024` -> [256, 512, 1024] (of `kind`); one clear line otherwise."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{flag} {text!r}: expected positive {kind.__name__}s separated by commas")
    return values


def cmd_mup(args) -> None:
    from pathlib import Path

    from stacklm.config import Config
    from stacklm.coord_check import coord_check, width_slopes
    from stacklm.data import PackedLoader, prepare_data
    from stacklm.plots import line_plots

    path, overrides = split_overrides(args.items)
    widths = sorted(parse_numbers(args.widths, int, "--widths"))
    if args.steps < 1 or args.batches < 1:
        raise UserError(f"--steps ({args.steps}) and --batches ({args.batches}) must be at least 1")
    base = Config.load(path, overrides)
    data = prepare_data(base.data, base.model.vocab_size, progress=False, log=lambda m: print(m, file=sys.stderr))
    loader = PackedLoader(data.train, base.data.seq_len, base.train.batch_size, base.train.seed)
    batches = [next(loader) for _ in range(args.batches)]
    parametrizations = ("standard", "mup") if args.parametrization == "both" else (args.parametrization,)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, panels = {}, []
    for parametrization in parametrizations:
        config = Config.load(path, [*overrides, f"model.parametrization={parametrization}"])
        rows = coord_check(config, widths, args.steps, batches)
        results[parametrization] = rows
        slopes = width_slopes(rows, args.steps)
        print(f"{parametrization}: mean |x| at step {args.steps}, and its slope against width (log-log)")
        last = [r for r in rows if r["step"] == args.steps]
        table = [[layer, *(f"{r['scale']:.3g}" for r in last if r["layer"] == layer), f"{slope:+.2f}"]
                 for layer, slope in slopes.items()]
        print(format_table(table, ["layer", *(f"width {w}" for w in widths), "slope"]))
        for step in (1, args.steps):
            panels.append((f"{parametrization}, step {step}", {
                layer: (widths, [r["scale"] for r in rows if r["layer"] == layer and r["step"] == step])
                for layer in slopes}))
    (out / "coord_check.json").write_text(json.dumps(results))
    plotted = line_plots(out / "coord_check.png", panels, "d_model", "mean |x|", logx=True, logy=True, columns=2)
    print(f"wrote {out / 'coord_check.json'}" + (f" and {out / 'coord_check.png'}" if plotted else ""))


def cmd_sweep(args) -> None:
    from pathlib import Path

    from stacklm.plots import line_plot
    from stacklm.sweep import best_lr, run_sweep

    path, overrides = split_overrides(args.items)
    widths = parse_numbers(args.widths, int, "--widths")
    lrs = parse_numbers(args.lr, float, "--lr")
    out = Path(args.out)
    rows = run_sweep(path, overrides, widths, lrs, out, log=lambda m: print(m, file=sys.stderr))
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    series = {f"width {w}": ([r["lr"] for r in rows if r["width"] == w], [r["loss"] for r in rows if r["width"] == w])
              for w in widths}
    plotted = line_plot(out / "sweep.png", series, "learning rate", "validation loss", "learning-rate sweep", logx=True)
    if args.json:
        print(json.dumps({"points": rows, "best_lr": best_lr(rows)}))
        return
    table = [[w, *(f"{r['loss']:.4f}" for r in rows if r["width"] == w), f"{best_lr(rows)[w]:g}"] for w in widths]
    print(format_table(table, ["width", *(f"lr {lr:g}" for lr in lrs), "best lr"]))
    print(f"wrote {out / 'sweep.json'}" + (f" and {out / 'sweep.png'}" if plotted else ""))


def format_table(rows: list[list], header: list[str]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stacklm", description="Train, evaluate, sample and export stacklm language models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (under torchrun: data-parallel, DDP or FSDP2)",
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
    p.add_argument("--system", default=None, help="encoder-decoder runs: text the encoder reads (a system "
                   "prompt); the decoder continues --prompt")
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
                        "then several times faster per token on CPU (worth it for long outputs). Not needed "
                        "for one sequence on the CPU where the model's components allow stacklm's C++ step "
                        "(dense or Scaling Transformer blocks): that step is taken anyway, and is faster "
                        "(STACKLM_CPU_KERNELS=0 in the environment turns it and the other C++ kernels off)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a run on any data",
                       description="Evaluate runs on their validation split, or on every document of --data. "
                                   "key=value items change model.position.* or model.attention.* for the "
                                   "evaluation (e.g. model.position.scaling=ntk model.position.factor=4).")
    p.add_argument("items", nargs="+", metavar="RUN_DIR [RUN_DIR ...] [key=value ...]")
    p.add_argument("--data", default=None, help="a data.source: file, directory, glob, .jsonl, 'default'")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--batches", type=int, default=None, help="at most this many batches")
    p.add_argument("--denoisers", action="store_true",
                   help="also the loss of each UL2 denoiser (always for runs trained with a denoising objective)")
    p.add_argument("--continuation", action="store_true",
                   help="also the loss on each window's second half given its first (always for "
                        "encoder-decoder runs, whose encoder then reads the first half)")
    p.add_argument("--context", default=None, metavar="N,N,...",
                   help="perplexity at each context length (e.g. 256,512,1024,2048) on the same text; "
                        "writes context.json and context.png to --out")
    p.add_argument("--tokens", type=int, default=131072, help="with --context: tokens scored at each length")
    p.add_argument("--out", default=None, help="with --context: output directory (default RUN_DIR/context)")
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

    p = sub.add_parser("scaling", help="fit a Chinchilla scaling law to runs; plan compute-optimal N and D",
                       description="Chinchilla's L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "
                                   "approach 3); see docs/scaling.md.")
    scaling = p.add_subparsers(dest="scaling_command", required=True, metavar="SUBCOMMAND")
    q = scaling.add_parser("fit", help="fit the law to runs or to a CSV table",
                           description="Fit L(N, D) to runs (N: parameters in matmuls; D: tokens trained; L: "
                                       "the last validation loss) or to a CSV table with columns N, D, loss: Huber "
                                       "loss on log L, L-BFGS from Hoffmann et al.'s grid of 4,500 starts.")
    q.add_argument("runs", nargs="*", metavar="RUN_DIR")
    q.add_argument("--csv", default=None, metavar="FILE", help="a table with columns N, D, loss, not runs")
    q.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="resamples of the points for the 95%% percentile intervals (0: no intervals)")
    q.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's resamples")
    q.add_argument("--json", action="store_true", help="print the fit as one JSON line (for plan --fit)")
    q.set_defaults(func=cmd_scaling_fit)
    q = scaling.add_parser("plan", help="the compute-optimal N and D for a FLOP budget",
                           description="Minimise L(N, D) under C = 6 N D, in closed form.")
    q.add_argument("--flops", type=float, required=True, metavar="C", help="training compute, e.g. 1e21")
    constants = q.add_mutually_exclusive_group(required=True)
    constants.add_argument("--fit", default=None, metavar="FILE.json", help="what `scaling fit --json` printed")
    constants.add_argument("--published", default=None, choices=("chinchilla", "besiroglu"),
                           help="Hoffmann et al. 2022's constants or Besiroglu et al. 2024's refit")
    q.add_argument("--json", action="store_true", help="print one JSON line")
    q.set_defaults(func=cmd_scaling_plan)

    p = sub.add_parser("mup", help="muP tools: the coordinate check", description="See docs/mup.md.")
    mup = p.add_subparsers(dest="mup_command", required=True, metavar="SUBCOMMAND")
    q = mup.add_parser("coord-check", help="activation scales of every layer against width",
                       description="Train CONFIG's model at each width for a few steps (AdamW at the constant "
                                   "train.lr, on the config's data) and report the mean |x| of every layer's "
                                   "output and its slope against width: near 0 under muP, growing under the "
                                   "standard parametrization (Tensor Programs V, section 8).")
    q.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    q.add_argument("--widths", default="64,128,256,512", help="d_model values (default 64,128,256,512)")
    q.add_argument("--steps", type=int, default=5, help="training steps per width (default 5)")
    q.add_argument("--batches", type=int, default=4, help="distinct training batches, reused in turn")
    q.add_argument("--parametrization", choices=("both", "standard", "mup"), default="both")
    q.add_argument("--out", default="runs/coord_check", help="where coord_check.json and .png go")
    q.set_defaults(func=cmd_mup)

    p = sub.add_parser("sweep", help="train a grid of widths x learning rates (resumable)",
                       description="Train CONFIG at every width (model.d_model) and learning rate (train.lr), "
                                   "one run directory per point in --out; a second call skips finished points "
                                   "and resumes an interrupted one. Prints the final validation losses and the "
                                   "best learning rate per width; writes sweep.json and sweep.png.")
    p.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    p.add_argument("--widths", required=True, help="d_model values, e.g. 64,128,256")
    p.add_argument("--lr", required=True, help="learning rates, e.g. 1e-3,2e-3,4e-3")
    p.add_argument("--out", default="runs/sweep", help="the sweep's directory (default runs/sweep)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value items may follow the options (`stacklm eval RUN --context 512 model.position.factor=2`)
    if extra and (not hasattr(args, "items") or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra
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
