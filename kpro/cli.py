"""`python -m kpro <command>`: info, generate, convert-gguf, tokenize, expand, train-expanded, internalize, bitune,
demo, reproduce.

Start-up: `python -m kpro --help` and `info` import no torch. COMMANDS lists every subcommand with its help
line, and a command line builds the parser of its own command only (`build_parser(only=...)`): the method
packages that define the others import torch. tests/test_cli.py checks the table against the parsers.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

from ._safetensors import WEIGHTS_NAME, check_checkpoint_directory, read_header, sharded_weight_map
from ._signals import raise_if_stopping, sigterm_as_ctrl_c
from ._torchrun import is_main_process
from .cli_args import (DTYPES, HelpFormatter, add_device_argument, directory_path, in_flag_terms, input_path,
                       resolve_device)
from .errors import CheckpointError, DirectoryInUse, StoppedAndSaid, listed

# name -> (the package whose command.py defines it; None: this file), help line.
COMMANDS = {
    "info": (None, "describe an HF-layout checkpoint directory (reads headers only)"),
    "generate": (None, "continue prompts with a checkpoint and its tokenizer"),
    "convert-gguf": ("convert", "convert a GGUF file (llama.cpp) into an HF-layout checkpoint directory"),
    "tokenize": ("train", "tokenize text files into memory-mappable token shards (resumable)"),
    "expand": ("expansion", "LLaMA Pro block expansion of a checkpoint, streamed tensor by tensor"),
    "train-expanded": ("expansion", "post-pretrain the new blocks of an expanded checkpoint on a text corpus"),
    "internalize": ("internalize", "stepwise internalization of chain-of-thought (ICoT-SI), and its two baselines"),
    "bitune": ("bitune", "instruction-tune with Bitune (or --baseline lora) and score multiple choice"),
    "demo": (None, "the main job on tiny embedded defaults (7.1 to 22.5 minutes on 2 CPU cores, by machine)"),
    "reproduce": ("demo", "reproduce a paper's experiment at CPU scale (longer than the demo)"),
}
# What `info` lists; the same names as kpro.tokenizer.TOKENIZER_FILES (kept here for a light `info`; a test compares).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "kpro_char_tokenizer.json", "kpro_symbol_tokenizer.json")


def cmd_info(args) -> None:
    from .config import LlamaConfig

    directory = Path(args.dir)
    check_checkpoint_directory(directory)
    cfg = LlamaConfig.from_hf(directory)
    count, dtypes, layers = 0, {}, set()
    files = _weight_files(directory)
    for file in files:
        for name, entry in read_header(file).items():
            layer = re.match(r"(?:model\.)?layers\.(\d+)\.", name)  # load_pretrained takes both
            if layer:
                layers.add(int(layer.group(1)))
            numel = 1
            for size in entry.shape:
                numel *= size
            count += numel
            dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + numel
    print(f"checkpoint   {args.dir}  ({len(files)} weight file{'s' * (len(files) > 1)})")
    print(f"parameters   {count:,} ({count / 1e9:.3f} B)")
    print("dtype        " + ", ".join(f"{d} ({n / max(count, 1):.0%})" for d, n in dtypes.items()))
    print(f"layers       {cfg.num_hidden_layers} x hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}")
    print(f"attention    {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} key/value heads, head_dim {cfg.head_dim}")
    print(f"rope         theta {cfg.rope_theta:g}, scaling {json.dumps(cfg.rope_scaling)}, max positions {cfg.max_position_embeddings}")
    print(f"vocab        {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}, bos {cfg.bos_token_id}, eos {cfg.eos_token_id}")
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            print(f"tokenizer    {name}")
    # described all the same, then refused: load_pretrained would not load it
    expected = set(range(cfg.num_hidden_layers))
    missing, beyond = sorted(expected - layers), sorted(layers - expected)
    if missing or beyond:
        problems = ([f"no tensors of layer{'s' * (len(missing) > 1)} {_few(missing)}"] if missing else []) + \
            ([f"tensors of layer{'s' * (len(beyond) > 1)} {_few(beyond)} beyond it"] if beyond else [])
        raise CheckpointError(f"{directory / 'config.json'} has num_hidden_layers {cfg.num_hidden_layers}, but the "
                              f"weights hold {' and '.join(problems)}: the config or the weight files are not this "
                              "model's")


def _few(numbers: list[int]) -> str:
    return listed(numbers, 8, ", ... ({total} in all)")


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, as load_pretrained finds them: the index's shards, or
    model.safetensors."""
    weight_map = sharded_weight_map(directory)
    if weight_map is None:
        return [directory / WEIGHTS_NAME]
    return [directory / name for name in sorted(set(weight_map.values()))]


def check_positions(prompts: list[list[int]], max_new_tokens: int, limit: int) -> None:
    """kpro.generate's refusal of more positions than the model has, in the flags' terms and naming the prompt."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    length = len(prompts[longest])
    if length + max_new_tokens <= limit:
        return
    fix = f"pass --max-new-tokens {limit - length} or less, or shorten the prompt" if length < limit else \
        f"shorten the prompt to at most {limit - max_new_tokens} tokens" if max_new_tokens < limit else \
        f"shorten the prompt and lower --max-new-tokens: together they fit in {limit} positions"
    raise ValueError(f"--prompt {longest + 1} ({length} tokens) + --max-new-tokens {max_new_tokens} exceed the "
                     f"model's max_position_embeddings ({limit}): {fix}")


def cmd_generate(args) -> None:
    import secrets

    import torch

    from .checkpoint import load_pretrained
    from .config import generation_eos_ids
    from .generation import check_sampling, generate
    from .tokenizer import load_tokenizer

    # Before the model loads and a seed is printed for a sample that would never be drawn.
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as err:
        raise in_flag_terms(err, {name: "--" + name.replace("_", "-") for name in
                                  ("max_new_tokens", "temperature", "top_k", "top_p")}) from None
    if args.seed is not None and args.temperature == 0:  # greedy draws nothing: ignored, as --top-k would be
        raise ValueError("--seed seeds sampling, but temperature 0 decodes greedily: give a --temperature above 0 to "
                         "sample, or leave --seed out")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:  # -1 would draw what 2**64 - 1 draws; more overflow
        raise ValueError(f"--seed must be an integer from 0 to 2**63 - 1, got {args.seed}")
    empty = [i for i, prompt in enumerate(args.prompt) if not prompt]
    if empty:  # a tokenizer that adds no bos gives it no token to continue from
        raise ValueError(f"--prompt {empty[0] + 1} is empty; give each prompt some text")
    device = resolve_device(args.device)
    check_checkpoint_directory(Path(args.dir))
    tok = load_tokenizer(args.dir)  # a checkpoint without one is refused before its weights load
    if args.chat:  # rendered before the weights load too: a checkpoint without a chat template is refused first
        try:  # the template writes its own bos and turn markers, and the assistant's turn to answer in
            chat_prompts = [tok.apply_chat_template([{"role": "user", "content": text}]) for text in args.prompt]
        except ValueError as err:
            raise ValueError(f"--chat: {err}") from None
    model = load_pretrained(args.dir, dtype=DTYPES[args.dtype], device=device)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer of {args.dir} has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    seed = args.seed
    if seed is None and args.temperature > 0:  # say the seed, so that this sample can be drawn again
        seed = secrets.randbits(31)
        print(f"sampling with --seed {seed}", file=sys.stderr)
    # a plain prompt goes on: no end of text after it
    prompts = chat_prompts if args.chat else tok.encode_batch(args.prompt, eos=False)
    check_positions(prompts, args.max_new_tokens, model.config.max_position_embeddings)
    ids, mask = tok.pad_left(prompts, device=device)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)  # greedy takes none
    # Stop where transformers' generate would: generation_config.json's eos ids, else config.json's.
    stop_ids = generation_eos_ids(args.dir, model.config.vocab_size)
    out = generate(model, ids, args.max_new_tokens, attention_mask=mask, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=generator, eos_token_id=stop_ids)
    eos = set(stop_ids if stop_ids is not None else model.config.eos_token_ids)  # what generate stopped at
    unknown = []
    for number, (prompt, row) in enumerate(zip(prompts, out.tolist()), 1):
        new = row[ids.shape[1]:]
        stops = [i for i, token in enumerate(new) if token in eos]
        new = new[:stops[0]] if stops else new
        # A model with more embeddings than its tokenizer has tokens can generate an id it cannot decode
        lacking = next((i for i, token in enumerate(new) if not 0 <= token < tok.vocab_size), None)
        if lacking is not None:
            unknown.append(f"prompt {number} generated id {new[lacking]} after {lacking} tokens")
            new = new[:lacking]
        if len(prompts) > 1:  # each text headed, as `head` heads files: a text may hold newlines of its own
            print(("\n" if number > 1 else "") + f"==> prompt {number} <==")
        # Decoded whole: SentencePiece drops the leading space of a piece decoded on its own. A chat answer alone:
        # the rendered template around the question is markup.
        print(tok.decode(new) if args.chat else tok.decode(prompt + new))
    if unknown:
        raise ValueError(f"{'; '.join(unknown)}, which the tokenizer of {args.dir} lacks (it has {tok.vocab_size} "
                         f"tokens, the model {model.config.vocab_size} embeddings): the text above stops before it")


def cmd_demo(args) -> None:
    from . import demo

    acts = args.acts or list(demo.ACTS)
    unknown = [act for act in acts if act not in demo.ACTS]
    if unknown:
        raise ValueError(f"unknown demo act(s) {', '.join(unknown)}; choose from {', '.join(demo.ACTS)}")
    twice = [act for i, act in enumerate(acts) if act in acts[:i]]
    if twice:  # it ran twice into one directory, and the summary counted it twice
        raise ValueError(f"demo act {twice[0]} is named twice")
    demo.run(acts, Path(args.out), seed=args.seed)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"][1])
    p.add_argument("dir", type=input_path, help="checkpoint directory (config.json + safetensors)")
    p.set_defaults(run=cmd_info)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help=COMMANDS["generate"][1])
    p.add_argument("dir", type=input_path, help="checkpoint directory with its tokenizer (tokenizer.model, tokenizer.json, or a kpro "
                               "character or symbol tokenizer file)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch (each text then "
                   "printed under a line '==> prompt N <==')")
    p.add_argument("--chat", action="store_true", help="ask each --prompt as a user message through the checkpoint's "
                   "chat template (an instruct model's), and print the answers only")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; above 0, sampling")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens holding this much of "
                   "the probability (default: all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one, printed, so that the "
                   "sample can be repeated)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the weights")
    add_device_argument(p)
    p.set_defaults(run=cmd_generate)


def _add_demo(sub) -> None:
    from .demo import ACTS

    p = sub.add_parser("demo", help=COMMANDS["demo"][1])
    p.add_argument("acts", nargs="*", metavar="act", help=f"acts to run, default all: {', '.join(ACTS)}")
    p.add_argument("--out", default="kpro-demo", type=directory_path, help="directory for the demo's checkpoints (default ./kpro-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data and sampling")
    p.set_defaults(run=cmd_demo)


def _add_package_parsers(sub, package: str) -> None:
    """Import the command.py of `package` (and so the package: torch) and add its subcommands."""
    if package == "convert":
        from .convert import command
    elif package == "train":
        from .train import command
    elif package == "expansion":
        from .expansion import command
    elif package == "internalize":
        from .internalize import command
    elif package == "bitune":
        from .bitune import command
    elif package == "demo":
        from .demo import command
    else:
        raise ValueError(f"no command.py for package {package!r}")
    command.add_parsers(sub)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or with `only` a command's name, of that command (and the others its
    package defines) only, the rest listed by name and help line; `only=""` lists them all that way
    (`python -m kpro --help`). Every subcommand shows its options' defaults (cli_args.HelpFormatter)."""
    parser = argparse.ArgumentParser(prog="python -m kpro", formatter_class=HelpFormatter,
                                     description="kpro: kernels and training methods for LLaMA post-pretraining")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    home = {name: package or name for name, (package, _) in COMMANDS.items()}
    wanted = set(COMMANDS) if only is None else {name for name in COMMANDS if only in COMMANDS and home[name] == home[only]}
    local = {"info": _add_info, "generate": _add_generate, "demo": _add_demo}
    for name, (package, help) in COMMANDS.items():
        if name in sub.choices:
            continue  # added with another command of its package
        if name not in wanted:
            sub.add_parser(name, help=help, add_help=False)  # listed only: main parses with its own command's parser
        elif name in local:
            local[name](sub)
        else:
            _add_package_parsers(sub, package)
    for subparser in sub.choices.values():
        subparser.formatter_class = HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; its exit status. Without `argv`, as the program (`python -m kpro`: sys.argv): a command
    stopped by a notice leaves further notices ignored, since the process exits next."""
    process_ends = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    joined_before = _in_process_group()
    try:
        return _main(argv, process_ends)
    finally:
        if not joined_before and _in_process_group():  # under torchrun: the group the command joined
            from .train.distributed import leave_process_group
            leave_process_group()


def _in_process_group() -> bool:
    """Whether this process is in a torch.distributed process group (without importing torch where no command
    did). A command under torchrun leaves the group it joined before the process exits (leave_process_group)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _main(argv: list[str], process_ends: bool = False) -> int:
    try:
        # A scheduler's notice or a closed terminal stops a command as Ctrl-C does: one line, no partial files.
        # Taken from the start: parsing imports the command's modules and torch (seconds, where a notice ended
        # the process with no word).
        with sigterm_as_ctrl_c(ignore_after_stop=process_ends):
            args = build_parser(argv[0] if argv and argv[0] in COMMANDS else "").parse_args(argv)
            if args.command != "info" and os.environ.get("KPRO_BACKEND"):  # info runs no op (imports no torch)
                from .ops.backend import check_environment_backends

                check_environment_backends()  # a bad value refused now, not at the first op, after the model loaded
            raise_if_stopping()  # a notice during torch's import, which swallows errors raised inside it
            args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except KeyboardInterrupt as stop:
        if is_main_process() and not isinstance(stop, StoppedAndSaid):  # under torchrun every process was
            with contextlib.suppress(OSError):                           # interrupted; a said stop has its line;
                print("interrupted", file=sys.stderr)                    # a hung-up terminal takes none
        return 130
    except BrokenPipeError:  # the reader went away (`python -m kpro info DIR | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141  # as a program that SIGPIPE ends
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
            CheckpointError, DirectoryInUse, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)  # bad input, or a run that diverged: one line, no traceback
        return 1
    except RuntimeError as err:
        if _is_backend_error(err):
            print(f"error: {err}", file=sys.stderr)  # KPRO_BACKEND asks for a backend that cannot run the call
            return 1
        if _is_broken_pool(err):  # a demo's worker process died: kpro.demo.parallel's message says what to do
            print(f"error: {err}", file=sys.stderr)
            return 1
        if _peer_gone(err):  # under torchrun, another process failed (its own error says why) and left the group
            print("error: another process of this torchrun run ended, so this one cannot go on: its own error says "
                  f"why ({str(err).strip().splitlines()[0]})", file=sys.stderr)
            return 1
        raise
    except OSError as err:  # a full disk, a read-only file system: what the writing saw, in one line
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: cannot write or read{where}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def _peer_gone(err: RuntimeError) -> bool:
    """gloo's error in a collective whose peer process has exited: in a process group, the peer's own error (data
    missing on its node, say) is the one to read, and this one's traceback only buried it."""
    return _in_process_group() and any(words in str(err) for words in ("Connection closed by peer",
                                                                       "Connection reset by peer"))


def _is_broken_pool(err: BaseException) -> bool:
    """concurrent.futures' BrokenProcessPool, without importing multiprocessing where no command did."""
    process = sys.modules.get("concurrent.futures.process")
    return process is not None and isinstance(err, process.BrokenProcessPool)


def _is_backend_error(err: BaseException) -> bool:
    """kpro.ops.BackendError, without importing kpro.ops (torch) where no command did."""
    errors = sys.modules.get("kpro.ops.errors")
    return errors is not None and isinstance(err, errors.BackendError)
