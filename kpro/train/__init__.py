"""kpro.train: small pieces for training loops, and `fit`, the ready loop made of them.

    data.py           pack_documents, collate_packed, collate_prompt_answer, Batches (resumable sampler), read_jsonl
    shards.py         token shard directories: TokenShards (read from disk, rank-split, resumable batches),
                      write_token_shards
    tokenize.py       text files -> token shards on several processes, resumable (tokenize_corpus)
    loss.py           causal_lm_loss (fp32, float64 for float64 logits; -100 ignored), causal_lm_loss_from_hidden
                      (no logits), lm_loss (fit's default: no logits on a kpro.Llama), LossSum
    optim.py          adamw (no decay on norms/biases, trainable parameters only), Schedule, set_lr
    checkpointing.py  save_checkpoint / load_checkpoint / latest_checkpoint: atomic, resumable, keep last k
    progress.py       StatusLine, ProgressLine, CountProgress (terminal), MetricsLog (JSONL), read_metrics,
                      last_logged_step
    callbacks.py      Callback: hooks, batch transforms, optimizer resets, state saved in checkpoints
    distributed.py    torchrun: init_distributed and leave_process_group, DDP, FSDP2 (one unit per block),
                      full-state checkpoints (on kpro.distributed, the helpers checkpoints share)
    loop.py           fit, Run
    command.py        `python -m kpro tokenize`
"""
from .callbacks import Callback
from .checkpointing import checkpoint_step, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .data import Batches, collate_packed, collate_prompt_answer, pack_documents, read_jsonl
from .distributed import DistEnv, init_distributed, leave_process_group, shard_blocks
from .loop import Run, fit
from .loss import IGNORE_INDEX, LossSum, causal_lm_loss, causal_lm_loss_from_hidden, count_loss_tokens, lm_loss
from .optim import Schedule, adamw, param_groups, set_lr
from .progress import MetricsLog, ProgressLine, read_metrics
from .shards import TokenShards, write_token_shards
from .tokenize import tokenize_corpus

__all__ = [
    "Batches", "Callback", "DistEnv", "IGNORE_INDEX", "LossSum", "MetricsLog", "ProgressLine", "Run", "Schedule",
    "TokenShards", "adamw", "causal_lm_loss", "causal_lm_loss_from_hidden", "collate_packed", "collate_prompt_answer",
    "checkpoint_step", "count_loss_tokens", "fit", "init_distributed", "latest_checkpoint", "leave_process_group",
    "list_checkpoints", "lm_loss", "load_checkpoint", "pack_documents", "param_groups", "read_jsonl", "read_metrics",
    "save_checkpoint", "set_lr", "shard_blocks", "tokenize_corpus", "write_token_shards",
]
