"""`python -m kpro bitune`: instruction-tune a checkpoint with Bitune (or plain LoRA) and evaluate it."""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path

from .._run_record import claimed_run_directory
from ..cli_args import (add_device_argument, check_batch_split, check_input_file, check_output_dir, check_seed,
                        directory_path, ends_in_warmup_refusal, input_path, other_setting_refusal,
                        other_settings_refusal, resolve_device)
from .passes import MODES

WEIGHTINGS = ("example", "token")  # training.WEIGHTINGS, named here so that --help needs no torch

DTYPES = ("float32", "bfloat16")

TRAINING = ("lr", "batch_size", "loss_weighting")  # the options only training reads: --steps 0 ignores them


def add_parsers(sub) -> None:
    p = sub.add_parser("bitune", help="instruction-tune with Bitune (or --baseline lora) and score multiple choice",
                       description="Reference defaults: AdamW lr 3e-4, linear schedule with 10% warmup, 3000 steps "
                                   "of 10 examples, no weight decay, clip 1.0, bf16 on GPU, each example's answer "
                                   "tokens averaged and then the examples; prompt 'Question: {instruction}\\n\\nAnswer:', "
                                   "answer ' ' + response + eos; multiple choice asked with the choices listed "
                                   "('Question: q\\n\\nChoices:\\nc1\\nc2\\n\\nAnswer:'), each scored as ' ' + choice.")
    p.add_argument("--model", required=True, type=input_path, help="HF-layout checkpoint directory with its tokenizer")
    p.add_argument("--data", required=True, type=input_path, help="JSONL: instruction (+ optional input), response (or output)")
    p.add_argument("--out", default="runs/bitune", type=directory_path,
                   help="run directory: run/ (checkpoints, metrics), adapters/, results.json")
    p.add_argument("--baseline", choices=["lora"], help="train plain LoRA (one causal adapter) instead of Bitune "
                   "(default: Bitune)")
    p.add_argument("--mode", choices=list(MODES), help="Bitune ablation (default bitune); not with --baseline lora")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps; more than a finished run's extend it "
                   "when run again (0: evaluate the untuned adapters)")
    p.add_argument("--batch-size", type=int, default=10, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (linear schedule, 10%% warmup)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha (the update is scaled by alpha / rank)")
    p.add_argument("--loss-weighting", choices=list(WEIGHTINGS), default="example",
                   help="example (the reference's: each example's answer tokens averaged, then the examples) or token "
                        "(every answer token of a step alike: long answers weigh more) (default: example)")
    p.add_argument("--max-length", type=int, default=None, help="longer examples are dropped (and counted); default "
                   "and most: the model's max_position_embeddings")
    p.add_argument("--eval", action="append", default=[], metavar="FILE", type=input_path,
                   help="multiple-choice JSONL (question, choices, answer) to score zero-shot; repeatable")
    p.add_argument("--eval-batch-size", type=int, default=16,
                   help="rows scored at once, each a question's prompt with one of its choices (a question of 4 "
                        "choices is 4 rows)")
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: only at the end and on "
                   "Ctrl-C or SIGTERM; the newest is kept)")
    p.add_argument("--seed", type=int, default=0, help="adapter initialisation and data order")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (bf16 autocast runs on GPU anyway)")
    add_device_argument(p)
    # What --steps 0, or no --eval, would ignore: refused when given otherwise than its default
    p.set_defaults(run=run, option_defaults={name: p.get_default(name) for name in (*TRAINING, "eval_batch_size")})


def run(args) -> None:
    from .._run_lock import holding

    if args.baseline and args.mode:
        raise ValueError(f"--mode {args.mode} is a Bitune ablation; --baseline {args.baseline} trains plain LoRA")
    args.mode = args.mode or "bitune"
    args.device = resolve_device(args.device)
    for name in ("steps", "batch_size", "rank", "max_length", "eval_batch_size", "save_every"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "steps" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'steps' else 'positive'}")
    if not 0 < args.lr < math.inf:  # else refused by tune, after the model and the data had loaded
        raise ValueError(f"--lr must be a positive finite number, got {args.lr:g}")
    if not math.isfinite(args.alpha) or args.alpha == 0:  # lora.check_rank_alpha's rule, named by the flag
        raise ValueError(f"--alpha must be a finite number other than 0 (0 makes every adapter a no-op that learns "
                         f"nothing), got {args.alpha:g}")
    check_seed(args.seed)  # Batches' range, within what the adapters' torch.Generator takes
    defaults = getattr(args, "option_defaults", {})
    given = [f"--{name.replace('_', '-')}" for name in defaults if getattr(args, name) != defaults[name]]
    untrained = [flag for flag in given if flag != "--eval-batch-size"]
    if args.steps == 0 and untrained:  # refused: --steps 0 would otherwise ignore them silently
        raise ValueError(f"{', '.join(untrained)} shape{'s' if len(untrained) == 1 else ''} training; --steps 0 "
                         "trains nothing (it saves the untuned adapters and scores them on --eval): "
                         f"drop {'it' if len(untrained) == 1 else 'them'}, or pass --steps N")
    if args.steps == 0 and args.save_every is not None:
        raise ValueError(f"--save-every {args.save_every} checkpoints training, and --steps 0 trains nothing (it saves "
                         "the untuned adapters and scores them on --eval): drop it, or pass --steps N")
    if not args.eval and "--eval-batch-size" in given:
        raise ValueError(f"--eval-batch-size {args.eval_batch_size} sizes the scoring of --eval files, and none is "
                         "given: pass --eval FILE, or drop it")
    if args.steps > 0:
        check_batch_split(args.batch_size)
    check_input_file(args.data, "--data")
    for path in args.eval:
        check_input_file(path, "--eval")
    named_twice = [path for i, path in enumerate(args.eval) if Path(path).resolve() in
                   {Path(other).resolve() for other in args.eval[:i]}]
    if named_twice:  # scored once, or twice under another spelling of the path
        raise ValueError(f"--eval {named_twice[0]} is named twice")
    check_output_dir(args.out)
    from ..distributed import on_main
    from ..train.distributed import init_distributed

    env = init_distributed()  # under torchrun: the process group, for rank 0's lock below
    # One run at a time in --out, from the start to results.json: fit holds only --out/run, and only while it
    # trains (a second run started meanwhile would save its adapters and results, and this one write over them).
    # Rank 0 holds it, as fit holds its run directory: under torchrun each process taking it refused the others.
    with contextlib.ExitStack() as hold:
        on_main(lambda: hold.enter_context(holding(args.out)), env, f"hold --out {args.out}")
        hold.enter_context(claimed_run_directory(args.out, "bitune"))
        _run(args, env)


def _run(args, env) -> None:
    import torch

    from .._files import write_atomic
    from .._safetensors import check_checkpoint_directory
    from ..checkpoint import load_pretrained
    from ..distributed import on_main
    from ..tokenizer import load_tokenizer
    from ..errors import EndsInWarmup, OtherSettings, StoppedAndSaid
    from ..train.data import OtherExamples, OtherSetting
    from ..train.progress import CountProgress
    from .data import read_instructions, read_multiple_choice, tokenize_instructions
    from .evaluation import encode_multiple_choice, multiple_choice_accuracy
    from .training import FewerSteps, tune

    questions = {path: read_multiple_choice(path) for path in args.eval}  # fail early on bad files
    check_checkpoint_directory(Path(args.model))
    tok = load_tokenizer(args.model)  # a checkpoint without one is refused before its weights load
    model = load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer of {args.model} has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    limit = model.config.max_position_embeddings
    if args.max_length is not None and args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} is more than the model's max_position_embeddings={limit}")
    args.max_length = args.max_length or limit
    for path, qs in questions.items():  # every question encodable and short enough, before any training
        try:
            encode_multiple_choice(tok, qs, limit)
        except ValueError as err:
            raise ValueError(f"--eval {path}: {err}") from None
    instructions = read_instructions(args.data)
    pairs, dropped = tokenize_instructions(tok, instructions, args.max_length)  # a bad one named FILE:LINE
    if env.is_main:
        print(f"{len(pairs)} examples, {dropped} dropped for being longer than {args.max_length} tokens",
              file=sys.stderr)
    if not pairs:
        raise ValueError(f"no example of {args.data} fits --max-length {args.max_length}")
    if args.steps > 0 and args.batch_size > len(pairs):  # else refused by Batches, after the base was hashed
        kept, fix = f"{len(pairs)} examples of {args.data}", f"pass --batch-size {len(pairs)} or less"
        if dropped:
            kept += f" kept at --max-length {args.max_length} ({dropped} longer one{'s' * (dropped > 1)} dropped)"
            if args.max_length < limit:
                fix += f", or a larger --max-length (at most the model's {limit})"
        raise ValueError(f"--batch-size {args.batch_size} is more than the {kept}: a step takes one full batch; {fix}")
    method = args.baseline or "bitune"
    try:
        tuned = tune(model, pairs, method, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     rank=args.rank, alpha=args.alpha, mode=args.mode, weighting=args.loss_weighting, seed=args.seed,
                     pad_id=tok.pad_id, save_every=args.save_every)
    except OtherExamples as err:
        raise _other_examples(err, args, len(pairs)) from None
    except OtherSettings as err:
        raise _other_settings(err, args) from None
    except FewerSteps as err:
        raise _fewer_steps(err, args) from None
    except EndsInWarmup as err:
        raise ends_in_warmup_refusal(args.out, err, "10% of the --steps it started with") from None
    except OtherSetting as err:  # Batches' refusal of another seed or batch size, in its parameters' names
        flag = {"batch_size": "--batch-size", "seed": "--seed"}.get(err.setting)
        if flag is None:  # none of this command's flags sets it
            raise
        raise other_setting_refusal(args.out, "tuned", f"{flag} {err.had}", f"{flag} {err.now}") from None
    results = {"method": method, "mode": args.mode if method == "bitune" else None,
               "loss_weighting": args.loss_weighting, "examples": len(pairs),
               "dropped": dropped, "steps": args.steps, "eval": {}}

    def score_and_write() -> None:
        print(f"adapters saved to {Path(args.out) / 'adapters'}")
        for path, qs in questions.items():
            # a line every 10 s on stderr: a file scores for minutes
            try:
                with CountProgress(str(path), "choices scored") as progress:
                    scores = multiple_choice_accuracy(tuned, tok, qs, batch_size=args.eval_batch_size,
                                                      progress=progress)
            except KeyboardInterrupt:  # the training is saved: say so, not a bare "interrupted"
                with contextlib.suppress(OSError):  # a hung-up terminal takes no line
                    print(f"interrupted while scoring {path}: the adapters are saved in "
                          f"{Path(args.out) / 'adapters'}; run the same command again to score --eval (it trains "
                          "no further)", file=sys.stderr)
                raise StoppedAndSaid from None
            results["eval"][path] = scores
            print(f"{path}: acc {scores['acc']:.4f}  acc_norm {scores['acc_norm']:.4f}  "
                  f"({scores['questions']} questions)")
        write_atomic(Path(args.out) / "results.json", json.dumps(results, indent=2) + "\n")

    # Under torchrun rank 0 (which saved the adapters, in tune) scores and writes alone; the others wait for it
    # and hear of its failure: a rank that exits while another still works was seen to abort at teardown.
    on_main(score_and_write, env, f"score --eval and write {Path(args.out) / 'results.json'}")


def _other_examples(err, args, kept: int) -> ValueError:
    """A resume refused by Batches for other examples (`err`, an OtherExamples), said in this command's terms:
    Batches' hint ("the same cut into rows of another length (seq_len)") is fit's, and the examples here are
    --data's kept at --max-length."""
    source = f"--data {args.data} at --max-length {args.max_length}"
    what = (f"{err.had} examples, and {source} keeps {kept}" if err.had != kept
            else f"other examples than the {kept} that {source} keeps (as many)")
    return ValueError(f"--out {args.out} holds a run tuned on {what}: resume with the run's --data and --max-length, "
                      "or pass another --out for a new run")


# The settings tune and fit record of a run (OtherSettings.differences) set by this command's flags
SETTING_FLAGS = {"rank": "--rank", "alpha": "--alpha", "mode": "--mode", "weighting": "--loss-weighting",
                 "base_dtype": "--dtype", "param_dtypes": "--dtype"}


def _other_settings(err, args) -> ValueError:
    """A resume refused by tune or fit for other settings (`err`, an OtherSettings), said in this command's flags:
    their messages name tune's arguments and fit's param groups ("optimizer param group 0 peak_lr"), and fit's
    advice (fewer total steps are fine, the weights load with kpro.load_pretrained) is wrong here."""
    differences, lines = err.differences, {}
    for name, (saved, now) in differences.items():
        if name == "method":
            said = {"bitune": "none (Bitune)", "lora": "lora"}
            lines["--baseline"] = f"{said.get(saved, saved)} in the run, {said.get(now, now)} now"
        elif name == "mode" and "method" in differences:  # follows from --baseline
            continue
        elif name == "base_model":  # the run keeps a digest of its base, not a path
            lines["--model"] = "another base model than the run's"
        elif name == "base_model or dtype":  # a run saved before tune recorded the dtype
            lines["--model, --dtype"] = "another base model than the run's, or another --dtype of it"
        elif name == "precision":
            lines["--device"] = f"{saved} in the run, {now} now (bf16: autocast on a GPU)"
        elif re.fullmatch(r"optimizer param group \d+ peak_lr", name):  # every group has the one --lr
            lines["--lr"] = f"{saved} in the run, {now} now"
        else:  # a flag's, or by its own name one that no flag sets (a run in --out/run that other code set up)
            lines[SETTING_FLAGS.get(name, name)] = f"{saved} in the run, {now} now"
    return other_settings_refusal(args.out, "tuned", lines)


def _fewer_steps(err, args) -> ValueError:
    """tune's refusal of fewer steps than --out's run holds (`err`, a FewerSteps), in this command's flags."""
    if err.steps == 0:
        return ValueError(f"--out {args.out} holds a run tuned for {err.done} steps: --steps 0 would save untuned "
                          f"adapters over its adapters; pass --steps {err.done} to score its adapters (more to tune "
                          "them further), or another --out for a new run")
    return ValueError(f"--out {args.out} holds a run of {err.done} steps already, more than --steps {err.steps}: "
                      f"pass --steps {err.done} or more (more extend it), or another --out for a new run")
