"""`python -m kpro internalize`: train (or evaluate) explicit-CoT, no-CoT and internalized models.

    python -m kpro internalize --task 4x4 --out runs/4x4                 # stepwise internalization
    python -m kpro internalize --task 4x4 --out runs/4x4-cot --no-removal   # explicit-CoT baseline
    python -m kpro internalize --task 4x4 --out runs/4x4-nocot --no-cot     # no-CoT baseline
    python -m kpro internalize --train train.txt --valid valid.txt --model llama-dir --out runs/mine

A run directory holds the generated data (`data/`), `metrics.jsonl`, checkpoints `step-*/` (each one a
model directory with its tokenizer), the final `model/`, and `eval.json`. Running the same command again
resumes from the newest checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import re
import sys
from pathlib import Path

import torch

from .._files import write_atomic
from .._run_lock import holding
from .._run_record import claimed_run_directory
from .._torchrun import world_size
from ..checkpoint import load_pretrained, save_pretrained
from ..cli_args import (add_device_argument, check_batch_split, check_input_file, check_output_dir, check_seed,
                        directory_path, file_path, fit_setting_flag, input_path, other_setting_refusal,
                        other_settings_refusal, past_steps_refusal, resolve_device)
from ..config import LlamaConfig
from ..distributed import main_decides, on_main
from ..errors import OtherSettings, StoppedAndSaid, listed
from ..model import Llama
from ..tokenizer import load_tokenizer
from ..train import latest_checkpoint
from ..train.data import OtherExamples, OtherSetting
from ..train.loop import PastSteps
from ..train.progress import CountProgress
from ..train.distributed import init_distributed
from .data import PUBLISHED_TASKS, read_examples, read_published
from .evaluation import evaluate, evaluation_positions
from .loop import (NO_REMOVAL, OFFICIAL_WEIGHT_DECAY, REMOVE_EVERYTHING, ValidationAccuracy, fit_internalization,
                   lr_schedule, mean_cot_tokens)
from .multiplication import (PUBLISHED_SIZES, multiplication_lines, multiplication_operands, multiplication_pairs,
                             write_multiplication_training_set)
from .schedule import RemovalSchedule
from .tokenization import multiplication_tokenizer, symbol_tokenizer_for, tokenize_examples

PAPER_TRAIN_SIZE = 808_000
# From-scratch model shapes: (layers, hidden, heads, intermediate); --layers etc. override any of them.
SIZES = {"tiny": (4, 128, 4, 512), "small": (6, 256, 8, 1024), "base": (12, 768, 12, 3072)}
SCRATCH_LR, PRETRAINED_LR = 1e-3, 5e-5  # the paper fine-tuned GPT-2 at 5e-5; a small model from scratch needs more
MAX_STEPS = 2 ** 63 - 1  # the longest run the flags may ask for
MULTIPLICATION_TASK = re.compile(r"([1-9][0-9]*)x\1")


TRAINING_OPTIONS = ("no_removal", "no_cot", "batch_size", "steps", "epochs", "steps_per_epoch", "remove_per_epoch",
                    "smoothing_lambda", "remove_all_after", "keep_optimizer", "weight_decay", "select_best", "lr",
                    "decay_steps", "warmup_steps", "seed", "save_every", "keep_last", "train", "train_size",
                    "eval_every", "eval_examples", "precision")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "internalize", help="stepwise internalization of chain-of-thought (ICoT-SI), and its two baselines",
        description="Train a model on `input||cot #### answer` examples while CoT tokens are removed from the left, "
                    "a few more every epoch (ICoT-SI), or the explicit-CoT (--no-removal) and no-CoT (--no-cot) "
                    "baselines; then report accuracy and examples/s on the valid and test sets. Running the same "
                    "command again resumes from the newest checkpoint in --out.")
    p.add_argument("--out", required=True, metavar="DIR", type=directory_path,
                   help="run directory: generated data, metrics.jsonl, checkpoints, model/, eval.json")

    data = p.add_argument_group("data")
    data.add_argument("--task", metavar="TASK",
                      help="NxN (e.g. 4x4): n-digit multiplication, the training set generated without the valid/test "
                           f"pairs; valid/test are the published sets for {', '.join(f'{n}x{n}' for n in PUBLISHED_SIZES)} "
                           "and generated for other n. gsm8k: the published valid/test sets (pass --train). Default: none "
                           "(then --train and --valid)")
    data.add_argument("--train", type=file_path, metavar="FILE", help="training examples `input||cot #### answer`, one a "
                      "line (default: the --task's generated set); generated valid/test sets leave its pairs out, "
                      "with --eval-only too")
    data.add_argument("--valid", type=file_path, metavar="FILE", help="validation examples (default: the task's; a "
                      "generated one leaves out the pairs of --test FILE)")
    data.add_argument("--test", type=file_path, metavar="FILE", help="test examples (default: the task's, if any; a "
                      "generated one leaves out the pairs of --valid FILE)")
    data.add_argument("--train-size", type=int, default=PAPER_TRAIN_SIZE, metavar="N",
                      help=f"examples in a generated training set (default {PAPER_TRAIN_SIZE:,}, the paper's)")
    data.add_argument("--eval-size", type=int, default=1000, metavar="N",
                      help="examples in each generated valid/test set, for tasks with no published ones (default 1000)")
    data.add_argument("--data-seed", type=int, default=0, metavar="N", help="seed of the generated sets (default 0)")

    model = p.add_argument_group("model")
    model.add_argument("--model", type=input_path, metavar="DIR",
                       help="start from this HF-layout checkpoint and its tokenizer (tokenizer.model or "
                            "tokenizer.json, or a kpro symbol/char tokenizer file); default: a new LLaMA with a symbol "
                            "tokenizer of the data")
    model.add_argument("--size", choices=sorted(SIZES),
                       help="shape of a new model: " + "; ".join(f"{name} {layers} layers x {hidden}, {heads} heads, "
                                                                 f"MLP {mlp}" for name, (layers, hidden, heads, mlp)
                                                                 in SIZES.items()) + " (default tiny)")
    model.add_argument("--layers", type=int, metavar="N", help="layers of a new model (default: --size's)")
    model.add_argument("--hidden", type=int, metavar="N", help="hidden size of a new model (default: --size's)")
    model.add_argument("--heads", type=int, metavar="N", help="attention heads of a new model (default: --size's)")
    model.add_argument("--kv-heads", type=int, metavar="N", help="key/value heads of a new model (default: --heads)")
    model.add_argument("--intermediate", type=int, metavar="N", help="MLP size of a new model (default: --size's)")

    train = p.add_argument_group("training")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--no-removal", action="store_true",
                      help="explicit-CoT baseline: train on the whole CoT, remove nothing")
    mode.add_argument("--no-cot", action="store_true", help="no-CoT baseline: train with the whole CoT removed")
    mode.add_argument("--eval-only", action="store_true", help="no training: evaluate --model on the valid/test sets")
    train.add_argument("--batch-size", type=int, default=32, metavar="B", help="examples per step (default 32)")
    train.add_argument("--steps", type=int, metavar="N",
                       help="optimizer steps (default: until the schedule has removed the longest training CoT, or "
                            "passed --remove-all-after, plus one epoch; the same for the baselines)")
    train.add_argument("--epochs", type=float, metavar="E", help="the run's length in epochs of --steps-per-epoch steps, instead "
                       "of --steps (default: none, --steps decides)")
    train.add_argument("--steps-per-epoch", type=int, metavar="N",
                       help="the schedule's epoch in steps (default: training examples // batch size)")
    train.add_argument("--remove-per-epoch", type=float, default=8, metavar="D",
                       help="CoT tokens removed per epoch (default 8): one more every round(steps-per-epoch / D) steps")
    train.add_argument("--smoothing-lambda", type=float, default=4.0, metavar="L",
                       help="removal smoothing: each example removes o more tokens, P(o) ~ exp(-L o) (default 4; "
                            "inf: none)")
    train.add_argument("--remove-all-after", type=int, metavar="N",
                       help="remove the whole CoT once more than N tokens are scheduled (default: never)")
    train.add_argument("--keep-optimizer", action="store_true",
                       help="keep one optimizer throughout (default: a new AdamW each time the scheduled count goes up, "
                            "while the previous batch had CoT left, as the official code)")
    train.add_argument("--weight-decay", type=float, default=OFFICIAL_WEIGHT_DECAY, metavar="WD",
                       help=f"AdamW's weight decay, on every parameter (default {OFFICIAL_WEIGHT_DECAY:g}, the official "
                            "code's; 0: none)")
    train.add_argument("--select-best", action=argparse.BooleanOptionalAction, default=True,
                       help="keep the weights of the best validation accuracy reached once no training batch has CoT "
                            "left, evaluated every --eval-every steps (default: every epoch), as the official code "
                            "reports (default on; --no-select-best keeps the final weights)")
    train.add_argument("--lr", type=float, metavar="LR",
                       help=f"AdamW's learning rate (default {PRETRAINED_LR:g} with --model, {SCRATCH_LR:g} "
                            "from scratch), constant unless --warmup-steps or --decay-steps; gradients are clipped "
                            "to norm 1")
    train.add_argument("--decay-steps", type=int, default=0, metavar="N",
                       help="decay the learning rate linearly to 0 over the last N steps (default 0: constant "
                            "throughout, as the official code)")
    train.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                       help="raise the learning rate linearly from 0 over the first N steps (default 0: none, as the "
                            "official code; the demo's act warms up its from-scratch runs over 500)")
    train.add_argument("--seed", type=int, default=0, metavar="N",
                       help="model initialisation, data order and removal offsets: 0 to 2**61 - 2 (default 0)")
    train.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default: only at the end "
                       "and on Ctrl-C or SIGTERM)")
    train.add_argument("--keep-last", type=int, default=2, metavar="K", help="checkpoints to keep (default 2)")

    run = p.add_argument_group("evaluation and hardware")
    run.add_argument("--eval-every", type=int, metavar="N",
                     help="report validation accuracy every N steps (default: every epoch under --select-best, the "
                          "default for ICoT-SI and --no-cot; never otherwise)")
    run.add_argument("--eval-examples", type=int, default=200, metavar="N",
                     help="validation examples for --eval-every and --select-best (the first N; default 200)")
    run.add_argument("--eval-batch-size", type=int, default=256, metavar="B",
                     help="rows decoded at once in evaluation (default 256)")
    add_device_argument(run)
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="training precision (default auto: bf16 autocast on CUDA, fp32 on the CPU)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's choice)")
    # What --eval-only (or published evaluation sets) would ignore: refused when given otherwise than its default
    p.set_defaults(run=run_command, option_defaults={name: p.get_default(name)
                                                     for name in TRAINING_OPTIONS + ("eval_size", "data_seed")})


def run_command(args) -> None:
    _check_args(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    env = init_distributed()
    # One run at a time in --out, from the start: another run's directory gets no data of this one's. fit, below,
    # holds it again (re-entrant in this thread). Under torchrun rank 0 holds it, as fit does; a refusal there
    # reaches every rank.
    try:
        with contextlib.ExitStack() as hold:
            on_main(lambda: hold.enter_context(holding(out)), env, f"hold {out}")
            hold.enter_context(claimed_run_directory(out, "internalize"))  # before its data is written there
            _run(args, out, env)
    finally:  # kpro.cli.main called in a process that goes on (a notebook, a test) gets its thread count back
        torch.set_num_threads(threads)


def _run(args, out: Path, env) -> None:
    train_examples, evaluation_sets = _load_data(args, out, env.is_main)
    # A resume (or a finished run evaluated again) of a new model keeps the run's tokenizer and positions: built
    # again from this session's files, another --valid or --test renumbered the symbols or resized the model.
    saved_tokenizer, saved_positions = (None, None) if args.model is not None else \
        main_decides(lambda: _saved_run(out), f"read the run saved in {out}", env)
    if args.model is not None:
        model = load_pretrained(args.model, dtype=torch.float32, device=args.device)  # fp32 weights to train
        tokenizer, resumed = load_tokenizer(args.model), False
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer of {args.model} has {tokenizer.vocab_size} tokens but the model only "
                             f"{model.config.vocab_size} embeddings")
    elif _multiplication_size(args.task) and args.train is None:
        tokenizer, resumed = multiplication_tokenizer(), False
    else:
        tokenizer, resumed = saved_tokenizer, saved_tokenizer is not None
        if not resumed:
            tokenizer = symbol_tokenizer_for([*train_examples,
                                              *(e for examples in evaluation_sets.values() for e in examples)])
    source = (f"; the run in --out {out} keeps the tokenizer saved with its checkpoints: pass another --out for "
              "a new run") if resumed else ""
    tokenized = _tokenize(train_examples, tokenizer, _data_name(args, "train"), source)
    needs = _positions_needed(tokenizer, {_data_name(args, "train"): tokenized,
                                          **{_data_name(args, split): examples
                                             for split, examples in evaluation_sets.items()}}, source)
    positions = max(needs.values())
    if saved_positions is not None:  # the run's model keeps its size: another would resume as "a different model"
        name = max(needs, key=needs.get)
        if positions > saved_positions:
            raise ValueError(f"{name} takes {positions} positions, and the run in --out {out} has a model of "
                             f"{saved_positions} (sized by the sets of its first session): pass sets it can take, "
                             "or another --out for a new run")
        positions = saved_positions
    if args.model is None:
        torch.manual_seed(args.seed)
        model = Llama(_new_model_config(args, tokenizer, positions)).to(args.device)
    elif model.config.max_position_embeddings < positions:
        raise ValueError(f"{args.model} handles {model.config.max_position_embeddings} positions; the data needs {positions}")

    if args.eval_only:
        label = f"model {args.model}"
    else:
        label = "explicit CoT" if args.no_removal else "no CoT" if args.no_cot else "internalized"
        _train(args, model, tokenizer, tokenized, evaluation_sets, out, env)

    def finish():
        if not args.eval_only:
            save_pretrained(model, out / "model")
            tokenizer.save(out / "model")
            print(f"saved the final model to {out / 'model'}")
        try:
            _final_evaluation(args, model, tokenizer, evaluation_sets, label, out)
        except KeyboardInterrupt:
            saved = "" if args.eval_only else f"the model is saved in {out / 'model'}; "
            with contextlib.suppress(OSError):  # a hung-up terminal takes no line
                print(f"interrupted during the final evaluation: {saved}run the same command again to evaluate",
                      file=sys.stderr)
            raise StoppedAndSaid from None
    # Under torchrun every rank holds the same weights: rank 0 alone saves and evaluates, while the others wait
    # (one that exits first can abort gloo's background work on its way out) and learn of a failure there.
    on_main(finish, env, "save and evaluate the final model")


def _train(args, model, tokenizer, tokenized, evaluation_sets, out: Path, env) -> None:
    steps_per_epoch = args.steps_per_epoch or len(tokenized) // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(tokenized)} training examples do not fill one batch of {args.batch_size}")
    baseline = args.no_removal or args.no_cot
    # A baseline removes nothing by the schedule: it needs one only for its default length.
    needs_schedule = not baseline or (args.steps is None and args.epochs is None)
    if needs_schedule and round(steps_per_epoch / args.remove_per_epoch) < 1:
        raise ValueError(f"--remove-per-epoch {args.remove_per_epoch:g} would remove more than one token per step in an "
                         f"epoch of {steps_per_epoch} steps; lower it, or lengthen the epoch with --steps-per-epoch"
                         + (", or pass --steps (a baseline's default length follows the schedule)" if baseline else ""))
    schedule = (RemovalSchedule(steps_per_epoch, args.remove_per_epoch, args.smoothing_lambda, args.remove_all_after)
                if needs_schedule else None)
    steps = _total_steps(args, steps_per_epoch, schedule, max(example.cot_length for example in tokenized))
    removal = NO_REMOVAL if args.no_removal else REMOVE_EVERYTHING if args.no_cot else schedule
    lr = args.lr or (PRETRAINED_LR if args.model is not None else SCRATCH_LR)
    if args.warmup_steps + args.decay_steps > steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps:,} and --decay-steps {args.decay_steps:,} together are "
                         f"longer than the run ({steps:,} steps)")
    warmup = f" warming up over the first {args.warmup_steps:,} steps" if args.warmup_steps else ""
    decay = f"{',' if warmup else ''} decaying to 0 over the last {args.decay_steps:,} steps" if args.decay_steps else ""
    status = sys.stderr if env.is_main else io.StringIO()  # rank 0 alone prints
    print(f"{len(tokenized):,} training examples, {steps:,} steps of {args.batch_size} "
          f"({steps / steps_per_epoch:.2f} epochs of {steps_per_epoch:,} steps), lr {lr:g}{warmup}{decay}, weight decay "
          f"{args.weight_decay:g}, model {model.num_parameters() / 1e6:.2f}M parameters on {args.device}",
          file=status)
    if removal is schedule:
        print(f"removal: one more CoT token every {schedule.steps_per_token:,} steps"
              + (f", the whole CoT once more than {args.remove_all_after} are scheduled" if args.remove_all_after is not None
                 else "") + ("" if args.keep_optimizer else "; a new optimizer at each increase"), file=status)
    callbacks = []
    select_best = args.select_best and removal != NO_REMOVAL  # explicit CoT: the CoT is never gone
    if args.eval_every or select_best:
        callbacks.append(ValidationAccuracy(tokenizer, evaluation_sets["valid"][:args.eval_examples],
                                            args.eval_every or steps_per_epoch, batch_size=args.eval_batch_size,
                                            select_best=select_best))
    try:
        fit_internalization(model, tokenized, out, removal=removal, steps=steps, batch_size=args.batch_size,
                            pad_id=tokenizer.pad_id, lr=lr,
                            schedule=lr_schedule(steps, args.decay_steps, args.warmup_steps), seed=args.seed,
                            reset_optimizer=not args.keep_optimizer, weight_decay=args.weight_decay,
                            tokenizer=tokenizer, callbacks=callbacks, save_every=args.save_every,
                            keep_last=args.keep_last, precision=args.precision)
    except OtherExamples as err:
        raise _other_examples(err, args) from None
    except OtherSettings as err:
        raise _other_settings(err, args.out) from None
    except PastSteps as err:
        asked = (f"--steps {args.steps}" if args.steps is not None else f"the {err.steps:,} steps of --epochs "
                 f"{args.epochs:g}" if args.epochs is not None else f"the run's default length ({err.steps:,} steps)")
        raise past_steps_refusal(args.out, err.step, asked) from None
    except OtherSetting as err:
        flags = _SETTING_FLAGS.get(err.setting)
        if flags is None:  # none the command can set otherwise
            raise
        raise other_setting_refusal(args.out, "trained", flags(err.had), flags(err.now)) from None


# fit's names of the settings these flags set (the learning rate and weight decay: fit_setting_flag)
_FIT_SETTING_FLAGS = {"precision": "--precision", "schedule warmup_steps": "--warmup-steps",
                      "schedule decay_steps": "--decay-steps"}


def _other_settings(err, out) -> ValueError:
    """A resume refused by fit for other settings (`err`, an OtherSettings) in this command's flags, where fit names
    its param groups and the schedule's fields, and advises in Python's terms. The schedule's kind (constant or
    linear) follows --decay-steps, and a field the schedule leaves unset (None) is the flag's 0."""
    lines = {}
    for name, (saved, now) in err.differences.items():
        if name == "schedule kind" and "schedule decay_steps" in err.differences:
            continue
        if name.startswith("schedule "):
            saved, now = saved or 0, now or 0
        lines[fit_setting_flag(name, _FIT_SETTING_FLAGS)] = f"{saved} in the run, {now} now"
    return other_settings_refusal(out, "trained", lines)


def _removal_flags(removal) -> str:
    """CoTRemoval's saved `removal` (describe_removal: "none", "all", or a RemovalSchedule's repr) in the flags."""
    if removal in (NO_REMOVAL, REMOVE_EVERYTHING):
        return "--no-removal" if removal == NO_REMOVAL else "--no-cot"
    fields = dict(re.findall(r"(\w+)=([^,)]+)", str(removal)))
    return " ".join(f"--{name.replace('_', '-')} {float(value):g}" if name != "remove_all_after" else
                    f"--remove-all-after {value}" for name, value in fields.items()
                    if not (name == "remove_all_after" and value == "None"))


# What a resume refused for another setting (OtherSetting.setting) was given as, in this command's flags
_SETTING_FLAGS = {"batch_size": lambda value: f"--batch-size {value}", "seed": lambda value: f"--seed {value}",
                  "reset_optimizer": lambda value: "no --keep-optimizer" if value else "--keep-optimizer",
                  "removal": _removal_flags}


def _other_examples(err, args) -> ValueError:
    """A resume refused by Batches for other training examples (`err`, an OtherExamples), named by the flags that
    chose them: Batches' hint ("the same cut into rows of another length (seq_len)") is fit's, no option here."""
    if args.train is not None:
        source, flags = f"--train {args.train} holds", "--train"
    else:
        source = f"--task {args.task} --train-size {args.train_size} --data-seed {args.data_seed} generates"
        flags = ("--task, --train-size and --data-seed (the generated set leaves out the problems of the valid and "
                 "test sets: the same --valid, --test and --eval-size too)")
    what = (f"{err.had:,} examples, and {source} {err.now:,}" if err.had != err.now
            else f"other examples than the {err.now:,} that {source} (as many)")
    return ValueError(f"--out {args.out} holds a run trained on {what}: resume with the run's {flags}, or pass "
                      "another --out for a new run")


def _total_steps(args, steps_per_epoch: int, schedule: RemovalSchedule | None, longest_cot: int) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        steps, why, hint = max(1, round(args.epochs * steps_per_epoch)), f"--epochs {args.epochs:g}", "fewer --epochs"
    else:
        tokens = longest_cot if args.remove_all_after is None else min(longest_cot, args.remove_all_after + 1)
        steps, why = (tokens * schedule.steps_per_token + schedule.steps_per_epoch,
                      f"removing {tokens} CoT tokens at --remove-per-epoch {args.remove_per_epoch:g}")
        hint = "a larger --remove-per-epoch, or --steps"
    if steps > MAX_STEPS:
        raise ValueError(f"{why} in epochs of {steps_per_epoch:,} steps makes a run of {steps:,} steps, more than "
                         f"2**63 - 1: pass {hint}")
    return steps


def _final_evaluation(args, model, tokenizer, evaluation_sets, label: str, out: Path) -> None:
    model.eval()
    threads = f", {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}" if args.device == "cpu" else ""
    report = {"model": label, "device": args.device, "batch_size": args.eval_batch_size,
              "threads": torch.get_num_threads() if args.device == "cpu" else None}
    for split, examples in evaluation_sets.items():
        with CountProgress(f"{label}, {split}", "examples decoded") as progress:  # a line every 10 s: minutes a set
            result = evaluate(model, tokenizer, examples, batch_size=args.eval_batch_size, progress=progress)
        cot = mean_cot_tokens(result, tokenizer.eos_id)
        report[split] = {"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
                         "examples_per_second": round(result.examples_per_second, 2),
                         "seconds": round(result.seconds, 6), "cot_tokens": round(cot, 3)}
        print(f"{label}, {split}: accuracy {result.accuracy:.3f} ({result.correct}/{result.total}), "
              f"{result.examples_per_second:,.1f} examples/s (batches of {args.eval_batch_size} on {args.device}"
              f"{threads}), {cot:.1f} CoT tokens per example")
    write_atomic(out / "eval.json", json.dumps(report, indent=2) + "\n")  # a failed rewrite keeps the old one


def _load_data(args, out: Path, is_main: bool = True):
    """(training examples, {"valid": [...], "test": [...]}): from files, the published sets, or generated.

    Generated sets are written under `out/data/`, named by their parameters, and read back on a resume. Under
    torchrun every rank generates and reads them (atomic writes); `is_main` says whether this one reports it.
    """
    n = _multiplication_size(args.task)
    generate_eval = n is not None and n not in PUBLISHED_SIZES  # no published valid/test sets for this n
    evaluation_sets = {}
    for split in ("valid", "test"):
        path = getattr(args, split)
        if path is not None:
            evaluation_sets[split] = _read(path)
        elif args.task is not None and not generate_eval:
            evaluation_sets[split] = read_published(args.task, split)
    train = _read(args.train) if args.train is not None else None  # with --eval-only: only the pairs to leave out
    if generate_eval and len(evaluation_sets) < 2:
        # Drawn from the pairs neither a given training file (a generated one leaves these out instead) nor a
        # given --valid/--test file holds, so the valid and test sets share no problem; and named by them:
        # --eval-only --train FILE draws the sets the training run drew
        given = [*(train or ()), *(e for examples in evaluation_sets.values() for e in examples)]
        excluded = set(_operand_pairs(given, n))
        without = f"-without-{_digest(excluded)}" if excluded else ""
        with _naming("--eval-size", args.eval_size, "the valid and test sets draw twice as many"):
            pairs = multiplication_pairs(n, 2 * args.eval_size, args.data_seed + 1, exclude=excluded)
        for split, chunk in (("valid", pairs[:args.eval_size]), ("test", pairs[args.eval_size:])):
            if split not in evaluation_sets:
                path = out / "data" / f"{split}-{n}x{n}-{args.eval_size}-seed{args.data_seed}{without}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                # atomic: under torchrun every rank writes the same file while another may be reading it
                write_atomic(path, "".join(line + "\n" for line in multiplication_lines(chunk, n)))
                evaluation_sets[split] = _read(path)
    if "valid" not in evaluation_sets:
        raise ValueError("no validation set: pass --valid FILE, or a --task")
    if args.eval_only:
        return [], evaluation_sets
    if train is not None:
        return train, evaluation_sets
    held_out = {pair for examples in evaluation_sets.values() for pair in _operand_pairs(examples, n)}
    # Named by the pairs it leaves out too: a rerun with another --eval-size (or --valid, --test) must not
    # train on the file that left out only the earlier sets' pairs.
    path = out / "data" / f"train-{n}x{n}-{args.train_size}-seed{args.data_seed}-without-{_digest(held_out)}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_main:
            print(f"generating {args.train_size:,} {n}x{n} training examples into {path}", file=sys.stderr, flush=True)
        with _naming("--train-size", args.train_size, "pass a smaller one"):
            write_multiplication_training_set(path, n, args.train_size, args.data_seed, exclude=held_out)
    return _read(path), evaluation_sets


def _digest(pairs) -> str:
    """A short name for a set of operand pairs, for the files generated without them."""
    return hashlib.sha256(repr(sorted(pairs)).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _naming(option: str, value: int, hint: str):
    """A ValueError of the data generation, with the option whose value asked for it."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{option} {value:,}: {err} ({hint})") from None


def _read(path: Path):
    examples = read_examples(path)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _operand_pairs(examples, n: int):
    """The (a, b) of every n x n multiplication line among `examples` (others are skipped)."""
    for example in examples:
        try:
            a, b, digits = multiplication_operands(example.input)
        except ValueError:
            continue
        if digits == n:
            yield a, b


def _multiplication_size(task: str | None) -> int | None:
    match = MULTIPLICATION_TASK.fullmatch(task or "")
    return int(match.group(1)) if match else None


def _saved_run(out: Path):
    """(tokenizer, max_position_embeddings) of the newest checkpoint in `out` (the one fit resumes), or
    (None, None): a new run."""
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return None, None
    return load_tokenizer(checkpoint), LlamaConfig.from_hf(checkpoint / "config.json").max_position_embeddings


def _data_name(args, split: str) -> str:
    """`--test FILE` for a given file, else "the test set" (generated or published)."""
    path = getattr(args, split)
    return f"--{split} {path}" if path is not None else f"the {'training' if split == 'train' else split} set"


def _tokenize(examples, tokenizer, what: str, source: str = ""):
    """`examples` tokenized; an example the tokenizer cannot take is named with `what` (the set, or the option
    and its file), and `source` (where the tokenizer comes from) follows the error."""
    try:
        return tokenize_examples(examples, tokenizer)
    except ValueError as err:
        # An example read from the option's file names itself FILE:LINE: the option joins it, the file said once
        option, _, path = what.partition(" ")
        named = f"{option} {err}" if option.startswith("--") and str(err).startswith(f"{path}:") else f"{what}: {err}"
        raise ValueError(f"{named}{source}") from None


def _positions_needed(tokenizer, sets: dict, source: str = "") -> dict[str, int]:
    """Positions the model must handle, by set (keyed by their names, for errors): the training set's first,
    tokenized, its longest example; then what evaluating each set takes (its longest prompt plus its longest
    reference plus the decoding margin; not its longest example)."""
    (train_name, tokenized_train), *evaluation_sets = sets.items()
    needs = {train_name: max((len(t.ids) for t in tokenized_train), default=0)}  # none under --eval-only
    for name, examples in evaluation_sets:
        _tokenize(examples, tokenizer, name, source)  # names the set of a symbol the tokenizer lacks
        needs[name] = evaluation_positions(examples, tokenizer)
    return needs


def _new_model_shape(args) -> tuple[int, int, int, int, int]:
    """(layers, hidden, heads, kv_heads, intermediate) of a new model: the flags, else --size's."""
    layers, hidden, heads, intermediate = SIZES[args.size or "tiny"]
    heads = args.heads or heads
    return args.layers or layers, args.hidden or hidden, heads, args.kv_heads or heads, args.intermediate or intermediate


def _check_new_model_shape(args) -> None:
    """What LlamaConfig would refuse naming its fields, and only once the training set was generated."""
    _, hidden, heads, kv_heads, _ = _new_model_shape(args)
    size = f"--size {args.size or 'tiny'}'s"
    hidden_flag = f"--hidden {hidden}" if args.hidden else f"{size} hidden size {hidden}"
    heads_flag = f"--heads {heads}" if args.heads else f"{size} {heads} heads"
    if hidden % heads:
        raise ValueError(f"{hidden_flag} is not a multiple of {heads_flag}")
    if hidden // heads % 2:
        raise ValueError(f"{hidden_flag} / {heads_flag} is {hidden // heads} dimensions per head; rotary embeddings "
                         "need an even number")
    if heads % kv_heads:
        raise ValueError(f"{heads_flag} is not a multiple of --kv-heads {kv_heads}")


def _new_model_config(args, tokenizer, positions: int) -> LlamaConfig:
    layers, hidden, heads, kv_heads, intermediate = _new_model_shape(args)
    return LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=positions, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id)


def _check_args(args) -> None:
    """Refuse flags that cannot run, before anything is generated or loaded. The checks run in this order so that
    the first error names the first thing to fix."""
    _check_data_given(args)
    args.device = resolve_device(args.device)
    _check_inputs(args)
    _check_validation(args)
    _check_paths(args)
    _check_numbers(args)


def _given(args, names) -> list[str]:
    """The flags among `names` set to other than their defaults."""
    defaults = getattr(args, "option_defaults", {})
    return [f"--{'no-' if defaults[name] is True else ''}{name.replace('_', '-')}" for name in names
            if name in defaults and getattr(args, name) != defaults[name]]


def _check_data_given(args) -> None:
    if args.task is not None and args.task not in PUBLISHED_TASKS and _multiplication_size(args.task) is None:
        raise ValueError(f"unknown --task {args.task!r}: NxN multiplication (e.g. 3x3, 4x4) or gsm8k")
    if args.task is None and (args.train is None and not args.eval_only or args.valid is None):
        raise ValueError("pass --task, or --train FILE and --valid FILE")


def _check_inputs(args) -> None:
    """The model and data sets a run reads, and the flags that apply to them."""
    if args.eval_only and args.model is None:
        raise ValueError("--eval-only evaluates a trained model: pass --model DIR")
    training = [name for name in TRAINING_OPTIONS if name != "train"]  # --eval-only --train FILE: pairs to leave out
    if args.eval_only and _given(args, training):  # refused: --eval-only would otherwise ignore them silently
        raise ValueError(f"{', '.join(_given(args, training))} shape a training run; --eval-only evaluates --model "
                         "as it is")
    shape = [f"--{name.replace('_', '-')}" for name in ("size", "layers", "hidden", "heads", "kv_heads", "intermediate")
             if getattr(args, name) is not None]
    if args.model is not None and shape:
        raise ValueError(f"{', '.join(shape)} shape a new model; --model {args.model} has its own shape")
    for name in ("train", "valid", "test"):
        if getattr(args, name) is not None:
            check_input_file(getattr(args, name), f"--{name}")
    if args.train is not None and _given(args, ["train_size"]):
        raise ValueError(f"--train-size sizes a generated training set; --train {args.train} is read as it is")
    n = _multiplication_size(args.task)  # as _load_data decides what it generates
    generated_eval = n is not None and n not in PUBLISHED_SIZES and (args.valid is None or args.test is None)
    generated_train = n is not None and args.train is None and not args.eval_only
    if args.task is not None and n is None and args.train is None and not args.eval_only:  # the first thing to fix
        raise ValueError(f"--task {args.task} has no generated training set: pass --train FILE")
    why = (f"--valid {args.valid} and --test {args.test} are read as they are" if args.valid and args.test
           else f"--task {args.task} has published ones" if args.task else "none are generated without --task NxN")
    if args.eval_only and args.train is not None and not generated_eval:  # it would be read for nothing
        raise ValueError(f"--eval-only --train {args.train} only leaves its pairs out of generated valid and test "
                         f"sets; {why}")
    if args.task is not None and args.valid is not None and args.test is not None and (
            args.train is not None or args.eval_only):  # refused: --task would otherwise be ignored silently
        sets = "--valid and --test" if args.eval_only else "--train, --valid and --test"
        raise ValueError(f"--task {args.task} chooses data sets, and {sets} give them all"
                         f"{' under --eval-only' if args.eval_only else ''}: drop --task")
    if not generated_eval and _given(args, ["eval_size", "data_seed"]):
        if _given(args, ["eval_size"]):
            raise ValueError(f"--eval-size sizes generated valid and test sets; {why}")
        if not generated_train:  # it seeds a generated training set too
            train = (f"--train {args.train} is read as it is" if args.train is not None and not args.eval_only
                     else "--eval-only trains on none" if args.eval_only else f"--task {args.task} generates none")
            raise ValueError(f"--data-seed seeds generated data sets; {why}, and {train}")


def _check_validation(args) -> None:
    # validation during training, as _train runs it (explicit CoT never selects: its CoT is never gone)
    validates = args.eval_every is not None or (args.select_best and not args.no_removal)
    if not args.eval_only and not validates and _given(args, ["eval_examples"]):
        raise ValueError(f"--eval-examples {args.eval_examples} sizes the validation during training, and none runs "
                         f"with {'--no-removal' if args.no_removal else '--no-select-best'}: pass --eval-every N too")
    # ValidationAccuracy(select_best=True) refuses it too, but only in fit, after the data and metrics are written
    processes = world_size()
    if processes > 1 and not args.eval_only and args.select_best and not args.no_removal:
        raise ValueError(f"--select-best (the default) evaluates in one process, and torchrun started {processes} "
                         "(WORLD_SIZE): pass --no-select-best (the final model is kept), or run without torchrun")


def _check_paths(args) -> None:
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(f"--model {args.model} does not exist")
    check_output_dir(args.out)
    if args.eval_only:  # its eval.json is that run's final evaluation
        out = Path(args.out)
        run_files = [name for name in ("metrics.jsonl", "model") if (out / name).exists()] + \
            sorted(path.name for path in out.glob("step-*") if path.is_dir())
        if run_files:
            raise ValueError(f"--out {args.out} holds a training run ({listed(run_files, 3)}), whose eval.json "
                             "--eval-only would overwrite: give it another --out")


def _check_numbers(args) -> None:
    positive = ("train_size", "eval_size", "batch_size", "steps", "steps_per_epoch", "save_every", "keep_last",
                "eval_every", "eval_examples", "eval_batch_size", "threads", "layers", "hidden", "heads", "kv_heads",
                "intermediate")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if not args.eval_only:  # split across torchrun's processes; fit checks it only after the data is written
        check_batch_split(args.batch_size)
    # What the run's length is computed from, in floats: a larger one would overflow (an OverflowError traceback,
    # after the training set is generated). A run of 2**63 steps or more is more than any can be.
    if args.steps_per_epoch is not None and args.steps_per_epoch >= MAX_STEPS + 1:
        raise ValueError(f"--steps-per-epoch must be a positive integer below 2**63, got {args.steps_per_epoch}")
    if args.model is None:
        _check_new_model_shape(args)
    if not 0 <= args.weight_decay < 1:
        raise ValueError(f"--weight-decay must be in [0, 1), got {args.weight_decay}")
    for name in ("epochs", "remove_per_epoch", "lr"):
        value = getattr(args, name)
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive finite number, got {value:g}")
    # Epochs have at least one step, so more than 2**63 of them are too many steps; a token removed every
    # steps_per_epoch / remove_per_epoch steps, at least one step per epoch, the same below 2**-63 tokens.
    if args.epochs is not None and args.epochs > MAX_STEPS + 1:
        raise ValueError(f"--epochs must be at most 2**63 (a run of at most 2**63 - 1 steps), got {args.epochs:g}")
    if args.remove_per_epoch < 1 / (MAX_STEPS + 1):
        raise ValueError("--remove-per-epoch must be at least 2**-63 (one more token every 2**63 - 1 steps at most), "
                         f"got {args.remove_per_epoch:g}")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("pass --steps or --epochs, not both")
    if args.decay_steps < 0:
        raise ValueError(f"--decay-steps must be >= 0 (0: a constant learning rate), got {args.decay_steps}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0 (0: no warmup), got {args.warmup_steps}")
    # Batches shuffles with --seed, and torch.manual_seed takes it; the generated data draw from --data-seed
    check_seed(args.seed)  # Batches' range, within what torch.manual_seed takes
    if args.data_seed < 0:
        raise ValueError(f"--data-seed must be >= 0, got {args.data_seed}")
    if args.remove_all_after is not None and args.remove_all_after < 0:
        raise ValueError(f"--remove-all-after must be >= 0, got {args.remove_all_after}")
    if not args.smoothing_lambda > 0:
        raise ValueError(f"--smoothing-lambda must be > 0 (inf: no smoothing), got {args.smoothing_lambda}")
