"""`python -m kpro <command>`: info, generate, expand, train-expanded, internalize, bitune, demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .expansion.layout import POSITIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def cmd_info(args) -> None:
    from safetensors import safe_open

    from .checkpoint import tensor_locations
    from .config import LlamaConfig
    from .tokenizer import TOKENIZER_FILES

    cfg = LlamaConfig.from_hf(args.dir)
    locations = tensor_locations(Path(args.dir))
    count, dtypes = 0, {}
    for file in sorted(set(locations.values())):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                count += numel
                dtypes[piece.get_dtype()] = dtypes.get(piece.get_dtype(), 0) + numel
    files = sorted({p.name for p in locations.values()})
    print(f"checkpoint   {args.dir}  ({len(files)} weight file{'s' * (len(files) > 1)})")
    print(f"parameters   {count:,} ({count / 1e9:.3f} B)")
    print("dtype        " + ", ".join(f"{d} ({n / count:.0%})" for d, n in dtypes.items()))
    print(f"layers       {cfg.num_hidden_layers} x hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}")
    print(f"attention    {cfg.num_attention_heads} heads, {cfg.num_key_value_heads} key/value heads, head_dim {cfg.head_dim}")
    print(f"rope         theta {cfg.rope_theta:g}, scaling {json.dumps(cfg.rope_scaling)}, max positions {cfg.max_position_embeddings}")
    print(f"vocab        {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}, bos {cfg.bos_token_id}, eos {cfg.eos_token_id}")
    for name in TOKENIZER_FILES:
        if (Path(args.dir) / name).is_file():
            print(f"tokenizer    {name}")


def cmd_generate(args) -> None:
    from .checkpoint import load_pretrained
    from .generation import generate
    from .tokenizer import load_tokenizer

    check_device(args.device)
    model = load_pretrained(args.dir, dtype=DTYPES[args.dtype], device=args.device)
    tok = load_tokenizer(args.dir)
    prompts = tok.encode_batch(args.prompt)
    ids, mask = tok.pad_left(prompts, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, ids, args.max_new_tokens, attention_mask=mask, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=generator)
    eos = set(model.config.eos_token_ids) | {tok.eos_id}
    for prompt, row in zip(prompts, out.tolist()):
        new = row[ids.shape[1]:]
        stops = [i for i, token in enumerate(new) if token in eos]
        new = new[:stops[0]] if stops else new
        # Decoded whole: SentencePiece drops the leading space of a piece decoded on its own.
        print(tok.decode(prompt + new))


def check_device(device: str) -> None:
    """A one-line error for a device this machine does not have (torch would fail deep inside)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (CUDA is not available to torch)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def cmd_expand(args) -> None:
    from .expansion.checkpoint import expand_checkpoint

    result = expand_checkpoint(args.src, args.dst, args.blocks, args.position, max_shard_size=args.max_shard_size,
                               overwrite=args.overwrite)
    total = result.original_blocks + len(result.new_blocks)
    print(f"expanded {args.src}: {result.original_blocks} -> {total} blocks ({args.position}); new blocks "
          f"{', '.join(map(str, result.new_blocks))} (o_proj and down_proj zero: same logits as the source)")
    print(f"wrote {result.directory}/: {', '.join(result.weight_files)}, config.json, kpro_expansion.json"
          + (f"; copied {', '.join(result.copied_files)}" if result.copied_files else "; no tokenizer found to copy"))
    if result.skipped:
        print(f"left behind: {', '.join(result.skipped)} (weights in other formats, subdirectories)")
    print(f"next: python -m kpro train-expanded {result.directory} --data corpus.txt")


def cmd_train_expanded(args) -> None:
    from .expansion.posttrain import train_expanded

    out = args.out or f"{Path(args.dir).name}-post"
    final = train_expanded(args.dir, args.data, out, blocks=args.train_blocks, steps=args.steps, seq_len=args.seq_len,
                           batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                           recompute_frozen=args.recompute_frozen, dtype=DTYPES[args.dtype], device=args.device,
                           precision=args.precision, save_every=args.save_every, keep_last=args.keep_last,
                           seed=args.seed)
    print(f"saved the post-trained model to {final}/ (a normal LLaMA checkpoint, with the tokenizer)")


def block_list(text: str) -> list[int]:
    """'4,9,14' -> [4, 9, 14]."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices separated by commas (4,9,14), got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def cmd_demo(args) -> None:
    from . import demo

    acts = args.acts or list(demo.ACTS)
    unknown = [act for act in acts if act not in demo.ACTS]
    if unknown:
        raise ValueError(f"unknown demo act(s) {', '.join(unknown)}; choose from {', '.join(demo.ACTS)}")
    demo.run(acts, Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kpro", description="kpro: kernels and training methods for LLaMA post-pretraining")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("info", help="describe an HF-layout checkpoint directory (reads headers only)")
    p.add_argument("dir", help="checkpoint directory (config.json + safetensors)")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("generate", help="continue prompts with a checkpoint and its tokenizer")
    p.add_argument("dir", help="checkpoint directory with tokenizer.model or kpro_char_tokenizer.json")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_generate)

    from .internalize.command import add_parser as add_internalize_parser

    add_internalize_parser(sub)
    p = sub.add_parser("expand", help="LLaMA Pro block expansion of a checkpoint, streamed tensor by tensor",
                       description="Insert identity-initialised copies of blocks (o_proj and down_proj zero) into an "
                                   "HF-layout checkpoint. Tensors are copied byte for byte through a fixed buffer, "
                                   "never loaded whole; tokenizer files come along; the output appears atomically.")
    p.add_argument("src", help="source checkpoint directory (config.json + safetensors)")
    p.add_argument("dst", help="new directory for the expanded checkpoint")
    p.add_argument("--blocks", type=positive_int, required=True, help="number of new blocks P")
    p.add_argument("--position", choices=POSITIONS, default="interleave",
                   help="interleave: after every N/P blocks (P must divide N); top: after the last; bottom: before the first")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=cmd_expand)

    p = sub.add_parser("train-expanded", help="post-pretrain the new blocks of an expanded checkpoint on a text corpus",
                       description="Train only the new blocks (kpro.train_only: the rest frozen, with gradient skipping) "
                                   "on packed sequences of a corpus. Checkpoints go to OUT/step-*; running the same "
                                   "command again resumes; the final model is saved to OUT/final.")
    p.add_argument("dir", help="expanded checkpoint (from `python -m kpro expand`) with its tokenizer")
    p.add_argument("--data", action="append", required=True,
                   help="corpus file: plain text, documents separated by blank lines, or .jsonl with a \"text\" "
                        "field; repeat for several")
    p.add_argument("--out", help="run directory (default ./<DIR name>-post)")
    p.add_argument("--train-blocks", type=block_list, help="blocks to train, e.g. 4,9,14 (default: the new blocks "
                   "recorded in DIR/kpro_expansion.json)")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--seq-len", type=positive_int, help="tokens per packed row (default min(512, max positions))")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per optimizer step")
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine decay to 10%%)")
    p.add_argument("--warmup-steps", type=int, help="default 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--recompute-frozen", action="store_true",
                   help="keep only each frozen block's input and recompute it in backward (less memory, slower)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the weights while training")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--save-every", type=positive_int, help="checkpoint every that many steps (and at the end)")
    p.add_argument("--keep-last", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_train_expanded)

    from . import cli_bitune

    cli_bitune.add_parser(sub)

    from .demo import ACTS

    p = sub.add_parser("demo", help="the main job on a tiny embedded default (a few CPU minutes)")
    p.add_argument("acts", nargs="*", metavar="act", help=f"acts to run, default all: {', '.join(ACTS)}")
    p.add_argument("--out", default="kpro-demo", help="directory for the demo's checkpoints (default ./kpro-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
