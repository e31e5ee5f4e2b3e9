"""`python -m kpro convert-gguf FILE OUT`: a llama.cpp GGUF file as an HF-layout checkpoint directory."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..cli_args import DTYPES, SHARD_SIZE_FLAG, check_output_dir, directory_path, in_flag_terms, input_path

PROGRESS_SECONDS = 10  # a line of progress after this long without one (a 7B file takes minutes)
_DTYPES = {name: DTYPES[name] for name in ("float32", "bfloat16", "float16")}


def add_parsers(sub) -> None:
    p = sub.add_parser("convert-gguf", help="convert a GGUF file (llama.cpp) into an HF-layout checkpoint directory",
                       description="Dequantise a LLaMA GGUF file (F32, F16, BF16, F64, Q8_0, Q4_0, Q4_1, and the types the "
                                   "gguf package reads) into config.json, safetensors and tokenizer files with the chat "
                                   "template, tensor by tensor; the directory appears atomically. Needs "
                                   "pip install 'kpro[gguf]'.")
    p.add_argument("file", type=input_path, help="the .gguf file")
    p.add_argument("out", type=directory_path,
                   help="new directory for the checkpoint (an earlier conversion there is replaced)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="weights' dtype (default: float32 for quantised files, "
                   "which holds the dequantised values exactly, and for F64 files, rounded; the file's own dtype for F16/BF16 "
                   "files)")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file (default 5GB)")
    p.set_defaults(run=cmd_convert_gguf)


def cmd_convert_gguf(args) -> None:
    from .gguf_file import GGUFFile
    from .gguf_llama import convert_gguf, gguf_config

    start = time.perf_counter()
    try:
        _convert(args, GGUFFile, convert_gguf, gguf_config, start)
    except ImportError as err:  # the optional packages (gguf, tokenizers): one line, like any other bad input
        raise ValueError(str(err)) from None


def _convert(args, GGUFFile, convert_gguf, gguf_config, start) -> None:
    from ..checkpoint import parse_size

    check_output_dir(args.out, "OUT")  # these before the file is read
    try:
        parse_size(args.max_shard_size)
    except ValueError as err:
        raise in_flag_terms(err, SHARD_SIZE_FLAG) from None
    file = GGUFFile(args.file)
    cfg = gguf_config(file)
    types = sorted(file.type_names())
    print(f"{file.path.name}: {file.get('general.name') or 'unnamed'}, {cfg.num_hidden_layers} blocks x {cfg.hidden_size}, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size}; tensor types {', '.join(types)}",
          file=sys.stderr, flush=True)  # status, shown while it converts: stdout has the result
    said = time.perf_counter()

    def progress(done, total):
        nonlocal said
        if time.perf_counter() - said >= PROGRESS_SECONDS and done < total:
            said = time.perf_counter()
            print(f"  {done:,}/{total:,} tensors written in {said - start:.0f} s ...", file=sys.stderr, flush=True)

    out = convert_gguf(file.path, args.out, dtype=_DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                       progress=progress)
    files = sorted(p for p in Path(out).iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {out}/ ({', '.join(p.name for p in files)}; {size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
    print(f"try: python -m kpro generate {shlex.quote(str(out))} --prompt 'The capital of France is'")
