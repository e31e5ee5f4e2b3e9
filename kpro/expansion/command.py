"""`python -m kpro expand` and `python -m kpro train-expanded`: block expansion of a checkpoint on disk,
and post-pretraining of its new blocks."""
from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from .._run_record import claimed_run_directory
from .._torchrun import refuse_processes
from ..cli_args import (DEVICE_HELP, DTYPES, SHARD_SIZE_FLAG, add_device_argument, block_list, check_batch_split,
                        check_output_dir, check_seed, directory_path, ends_in_warmup_refusal, fit_setting_flag,
                        in_flag_terms, input_path, other_setting_refusal, other_settings_refusal, past_steps_refusal,
                        positive_int, resolve_device)
from .layout import POSITIONS


def add_parsers(sub) -> None:
    p = sub.add_parser("expand", help="LLaMA Pro block expansion of a checkpoint, streamed tensor by tensor",
                       description="Insert identity-initialised copies of blocks (o_proj and down_proj zero) into an "
                                   "HF-layout checkpoint. Tensors are copied byte for byte through a fixed buffer, "
                                   "never loaded whole; tokenizer files come along; the output appears atomically.")
    p.add_argument("src", type=input_path, help="source checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", type=directory_path, help="new directory for the expanded checkpoint")
    p.add_argument("--blocks", type=positive_int, required=True, help="number of new blocks P")
    p.add_argument("--position", choices=POSITIONS, default="interleave",
                   help="interleave: after every N/P blocks (P must divide N); top: after the last; bottom: before the first")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace the model in DST if it exists, keeping other "
                   "files there (never SRC, nor a directory holding it or inside it)")
    p.set_defaults(run=cmd_expand)

    p = sub.add_parser("train-expanded", help="post-pretrain the new blocks of an expanded checkpoint on a text corpus",
                       description="Train only the new blocks (kpro.train_only: the rest frozen, with gradient skipping) "
                                   "on packed sequences of a corpus. Checkpoints go to OUT/step-*; running the same "
                                   "command again resumes; the final model is saved to OUT/final.")
    p.add_argument("dir", type=input_path, help="expanded checkpoint (from `python -m kpro expand`) with its tokenizer")
    p.add_argument("--data", action="append", required=True, type=input_path,
                   help="corpus file: plain text, documents separated by blank lines, or .jsonl with a \"text\" "
                        "field; repeat for several. Or one token shard directory (`python -m kpro tokenize`), "
                        "read from disk as training goes: a corpus of any size")
    p.add_argument("--out", type=directory_path, help="run directory (default: <name>-post beside the directory DIR "
                   "names, a symbolic link's target and named after it)")
    p.add_argument("--train-blocks", type=block_list, help="blocks to train, e.g. 4,9,14 (default: the new blocks "
                   "recorded in DIR/kpro_expansion.json); every block is full training: the embeddings, final norm "
                   "and lm_head train too")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="optimizer steps of the run; more than a finished run's extend it when run again")
    p.add_argument("--seq-len", type=positive_int, help="tokens per packed row (default min(512, max positions))")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per optimizer step")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup (default: 5%% of the steps; a resumed run keeps "
                   "its own)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on norms)")
    p.add_argument("--recompute-frozen", action="store_true",
                   help="keep only each frozen block's input and recompute it in backward (less memory, slower)")
    # not float16: AdamW cannot train float16 weights (its second moment underflows; kt.adamw refuses them)
    p.add_argument("--dtype", choices=sorted(set(DTYPES) - {"float16"}), default="float32",
                   help="dtype of the weights while training (bf16 autocast runs on a GPU anyway)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    add_device_argument(p, DEVICE_HELP + " (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every that many steps (default: only at the "
                   "end and on Ctrl-C or SIGTERM)")
    p.add_argument("--keep-last", type=positive_int, default=2, help="checkpoints to keep")
    p.add_argument("--no-save-frozen", dest="save_frozen", action="store_false",
                   help="checkpoints hold the trained blocks and the optimizer state alone, not the frozen weights "
                        "(a resume checks those against their digests); OUT/final is whole either way")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.set_defaults(run=cmd_train_expanded)


def cmd_expand(args) -> None:
    from ..checkpoint import parse_size
    from ..tokenizer import TOKENIZER_FILES
    from .checkpoint import expand_checkpoint

    refuse_processes("expand", "it uses no process group")
    check_output_dir(args.dst, "DST")
    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise in_flag_terms(err, SHARD_SIZE_FLAG) from None
    result = expand_checkpoint(args.src, args.dst, args.blocks, args.position, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite)
    total = result.original_blocks + len(result.new_blocks)
    print(f"expanded {args.src}: {result.original_blocks} -> {total} blocks ({args.position}); new blocks "
          f"{', '.join(map(str, result.new_blocks))} (o_proj and down_proj zero: same logits as the source)")
    if result.earlier_new_blocks:
        print(f"the source's own new blocks, untrained per its kpro_expansion.json, are now blocks "
              f"{', '.join(map(str, result.earlier_new_blocks))}: train-expanded trains them with the new ones")
    # train-expanded tokenizes its corpus with the checkpoint's own tokenizer (the files copied may hold none: a
    # generation_config.json or README alone)
    tokenizer = any((Path(result.directory) / name).is_file() for name in TOKENIZER_FILES)
    print(f"wrote {result.directory}/: {', '.join(result.weight_files)}, config.json, kpro_expansion.json"
          + (f"; copied {', '.join(result.copied_files)}" if result.copied_files else "")
          + ("" if tokenizer else "; no tokenizer found to copy"))
    if result.skipped:
        print(f"left behind: {', '.join(result.skipped)} (weights in other formats, training state, subdirectories)")
    if tokenizer:
        print(f"next: python -m kpro train-expanded {shlex.quote(str(result.directory))} --data corpus.txt")
    else:
        print(f"next: copy the source model's tokenizer into {result.directory} (kpro.load_tokenizer(BASE)"
              f".save({str(result.directory)!r})), which train-expanded tokenizes its corpus with")


def check_optimizer_flags(args) -> None:
    """Named by their flags before the model loads and the corpus is tokenized: Schedule, adamw, fit and
    pack_documents refuse them only then, naming their Python parameters."""
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ValueError(f"--lr must be a positive finite number, got {args.lr:g}")
    if not 0 <= args.weight_decay < math.inf:  # NaN fails it too
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay:g}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be an integer >= 0 (0: no warmup), got {args.warmup_steps}")
    if args.warmup_steps is not None and args.warmup_steps >= args.steps:
        raise ValueError(f"--warmup-steps {args.warmup_steps} must be fewer than --steps {args.steps}: the cosine "
                         "decay runs from the end of the warmup to the last step; lower --warmup-steps or raise "
                         "--steps")
    if args.seq_len is not None and args.seq_len < 2:  # pack_documents' rule, refused only after the model loads
        raise ValueError(f"--seq-len must be an integer >= 2 (a row trains each token on the next), got "
                         f"{args.seq_len}")
    check_batch_split(args.batch_size, args.grad_accum)
    check_seed(args.seed)  # Batches refused -1 only after the corpus was tokenized, naming no flag


def check_model_flags(args) -> None:
    """--seq-len and --train-blocks against DIR's config.json, named by their flags before the model loads:
    train_expanded refuses them only once it has, as seq_len and as block indices."""
    import warnings

    from .._safetensors import check_checkpoint_directory
    from ..config import ConfigWarning, LlamaConfig

    check_checkpoint_directory(Path(args.dir))
    with warnings.catch_warnings():  # unknown config fields: load_pretrained warns of them, once
        warnings.simplefilter("ignore", ConfigWarning)
        config = LlamaConfig.from_hf(args.dir)
    positions, blocks = config.max_position_embeddings, config.num_hidden_layers
    if args.seq_len is not None and args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings ({positions}): pass "
                         f"--seq-len {positions} or less")
    outside = [i for i in args.train_blocks or () if not 0 <= i < blocks]
    if outside:
        raise ValueError(f"--train-blocks {','.join(map(str, args.train_blocks))}: block index {outside[0]} is out of "
                         f"range: the model has {blocks} blocks (0 ... {blocks - 1})")


def cmd_train_expanded(args) -> None:
    from ..distributed import current_env
    from ..errors import EndsInWarmup, OtherParameters, OtherSettings
    from ..train.data import OtherExamples, OtherSetting
    from ..train.loop import PastSteps
    from .posttrain import check_out_dir, train_expanded

    check_optimizer_flags(args)
    source = Path(args.dir).resolve()
    out = Path(args.out) if args.out is not None else source.parent / f"{source.name}-post"  # `.`: "-post"
    check_out_dir(Path(args.dir), out, "--out")
    check_output_dir(out)  # a file there: named now, not after the model loads and the corpus is tokenized
    check_model_flags(args)
    try:
        with claimed_run_directory(out, "train-expanded"):
            final = train_expanded(args.dir, args.data, out, blocks=args.train_blocks, steps=args.steps,
                                   seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                   lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                                   recompute_frozen=args.recompute_frozen, dtype=DTYPES[args.dtype],
                                   device=None if args.device == "auto" else resolve_device(args.device),
                                   precision=args.precision, save_every=args.save_every, keep_last=args.keep_last,
                                   seed=args.seed, save_frozen=args.save_frozen)
    # Resumes refused in the library's terms (Python arguments, param groups, Python-only advice), said in the flags
    except OtherExamples as err:
        raise _other_rows(err, args, out) from None
    except OtherSettings as err:
        raise _other_settings(err, out) from None
    except OtherParameters as err:
        raise _other_blocks(err, args, out) from None
    except PastSteps as err:
        raise past_steps_refusal(out, err.step, f"--steps {err.steps}") from None
    except EndsInWarmup as err:
        raise ends_in_warmup_refusal(out, err, "the warmup it started with: its --warmup-steps, by default 5% of "
                                               "its --steps") from None
    except OtherSetting as err:
        refusal = _other_setting(err, args, out)
        if refusal is None:  # a setting no flag of this command sets otherwise
            raise
        raise refusal from None
    if current_env().is_main:  # under torchrun every process returns here; rank 0 saved it
        print(f"saved the post-trained model to {final}/ (a normal LLaMA checkpoint, with the tokenizer)")


def _other_rows(err, args, out: Path) -> ValueError:
    """A resume refused by Batches for other rows (`err`, an OtherExamples), named by the flags that chose them:
    the text of --data packed into rows of --seq-len tokens."""
    seq_len = (f"--seq-len {args.seq_len}" if args.seq_len is not None
               else "the default --seq-len (min(512, the model's max_position_embeddings))")
    source = f"{' '.join(f'--data {path}' for path in args.data)} at {seq_len}"
    what = (f"{err.had:,} rows, and {source} packs {err.now:,}" if err.had != err.now
            else f"other rows than the {err.now:,} that {source} packs (as many)")
    return ValueError(f"--out {out} holds a run trained on {what}: resume with the run's --data and --seq-len, or "
                      "pass another --out for a new run")


# The settings fit records of a run (OtherSettings.differences) that this command's flags set
SETTING_FLAGS = {"schedule warmup_steps": "--warmup-steps", "param_dtypes": "--dtype", "precision": "--precision"}


def _other_settings(err, out: Path) -> ValueError:
    """A resume refused by fit for other settings (`err`, an OtherSettings), in this command's flags: fit names its
    param groups ("optimizer param group 0 peak_lr", one line a group), and its advice (a checkpoint's weights load
    with kpro.load_pretrained) is Python's."""
    lines = {}
    for name, (saved, now) in err.differences.items():
        if name == "precision":
            lines["--precision"] = f"{saved} in the run, {now} now (auto: bf16 on a GPU, fp32 on the CPU)"
        elif re.fullmatch(r"optimizer param groups|optimizer param group \d+ parameter count", name):
            lines["--train-blocks"] = "other blocks than the run trained"
        else:
            lines[fit_setting_flag(name, SETTING_FLAGS)] = f"{saved} in the run, {now} now"
    return other_settings_refusal(out, "trained", lines)


def _blocks(names) -> list:
    """The blocks that parameters (state-dict names, layers.N.*) belong to, in order; a parameter of none by name."""
    blocks = {int(m.group(1)) if (m := re.match(r"layers\.(\d+)\.", name)) else name for name in names}
    return sorted(b for b in blocks if isinstance(b, int)) + sorted(b for b in blocks if isinstance(b, str))


def _other_blocks(err, args, out: Path) -> ValueError:
    """A resume refused because this run trains other parameters than the run in --out (`err`, an
    OtherParameters): the optimizer's message says how to rebuild an optimizer before fit, Python's advice."""
    now = (f"--train-blocks {','.join(map(str, args.train_blocks))}" if args.train_blocks is not None
           else f"{Path(args.dir) / 'kpro_expansion.json'} (no --train-blocks)")
    run = _blocks(err.trained)
    fix = f" (--train-blocks {','.join(map(str, run))})" if all(isinstance(b, int) for b in run) else ""
    return ValueError(f"--out {out} holds a run that trained blocks {', '.join(map(str, run))}, and {now} trains "
                      f"blocks {', '.join(map(str, _blocks(err.now)))}: resume with the run's blocks{fix}, or pass "
                      "another --out for a new run")


def _other_setting(err, args, out: Path) -> ValueError | None:
    """A resume refused by Batches or TokenShards (`err`, an OtherSetting) for another batch size, seed, seq_len,
    corpus or kind of data, in this command's flags; None for a setting no flag sets (shuffle, drop_last)."""
    data = " ".join(f"--data {path}" for path in args.data)
    fix = "resume with the run's --data, or pass another --out for a new run"
    if err.setting == "source":  # train_expanded makes Batches of text files and TokenShards of a shard directory
        shards = err.now == "TokenShards"
        return ValueError(f"--out {out} holds a run trained on {'text files' if shards else 'a token shard directory'}"
                          f", and {data} {'is a token shard directory' if shards else 'is text files'}: {fix}")
    if err.setting == "corpus":
        return ValueError(f"--out {out} holds a run trained on other token shards than {data} (another corpus, "
                          f"tokenizer, or shards cut otherwise): {fix}")
    flag = {"batch_size": "--batch-size", "seed": "--seed", "seq_len": "--seq-len"}.get(err.setting)
    if flag is None:
        return None
    return other_setting_refusal(out, "trained", f"{flag} {err.had}", f"{flag} {err.now}")
