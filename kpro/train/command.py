"""`python -m kpro tokenize`: text files -> a token shard directory that `train-expanded --data` and
`kpro.train.TokenShards` read."""
from __future__ import annotations

from ..cli_args import directory_path, input_path, positive_int
from .shards import DEFAULT_SHARD_TOKENS


def add_parsers(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenize text files into memory-mappable token shards (resumable)",
                       description="Stream plain-text and .jsonl files, tokenize them on several processes and write "
                                   "fixed-size shards of uint16 (uint32 for vocabularies over 65,536) with an index.json. "
                                   "Each shard appears atomically; running the same command again after an "
                                   "interruption resumes where the last shard ended.")
    p.add_argument("--tokenizer", required=True, type=input_path, help="directory holding tokenizer.model or tokenizer.json "
                   "(a checkpoint directory)")
    p.add_argument("--data", nargs="+", action="extend", required=True, type=input_path,
                   help="corpus files or directories (their *.txt and *.jsonl; repeatable): plain text with documents "
                        "separated by blank lines, or .jsonl with a \"text\" field")
    p.add_argument("--out", required=True, type=directory_path,
                   help="directory for the shards (new, or an interrupted run's to resume)")
    p.add_argument("--shard-tokens", type=positive_int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=positive_int,
                   help="tokenizing processes (default: one per CPU core this process may run on)")
    p.set_defaults(run=cmd_tokenize)


def cmd_tokenize(args) -> None:
    import shlex

    from .._torchrun import refuse_processes
    from ..cli_args import check_output_dir, in_flag_terms
    from .tokenize import tokenize_corpus

    refuse_processes("tokenize", "it uses no process group; --workers sets its tokenizing processes")
    check_output_dir(args.out)
    try:
        tokenize_corpus(args.tokenizer, args.data, args.out, shard_tokens=args.shard_tokens, workers=args.workers)
    except ValueError as err:  # "shard_tokens 10,000,000,000,000 needs ..." as the flag typed
        raise in_flag_terms(err, {"shard_tokens": "--shard-tokens"}) from None
    print(f"next: python -m kpro train-expanded EXPANDED_DIR --data {shlex.quote(str(args.out))}")
