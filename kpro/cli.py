"""`python -m kpro <command>`: info, generate, convert-gguf, expand, train-expanded, internalize, bitune, demo,
reproduce."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .bitune import command as bitune_command
from .cli_args import DTYPES, check_device
from .convert import command as convert_command
from .demo import command as demo_command
from .errors import CheckpointError
from .expansion import command as expansion_command
from .internalize import command as internalize_command


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

    # Each subcommand beyond these lives in the command.py of the package that owns it.
    for package in (convert_command, expansion_command, internalize_command, bitune_command):
        package.add_parsers(sub)

    from .demo import ACTS

    p = sub.add_parser("demo", help="the main job on a tiny embedded default (a few CPU minutes)")
    p.add_argument("acts", nargs="*", metavar="act", help=f"acts to run, default all: {', '.join(ACTS)}")
    p.add_argument("--out", default="kpro-demo", help="directory for the demo's checkpoints (default ./kpro-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    demo_command.add_parsers(sub)
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
