"""kpro.internalize: stepwise internalization of chain-of-thought (ICoT-SI; Deng, Choi, Shieber 2024).

A model is trained on `input <eos> cot <eos> #### answer <eos>` while the CoT is cut from the left, a few
tokens more every epoch, until it answers with no CoT at all.

    data.py            the `input||cot #### answer` format, its reader, the published valid/test sets (data/)
    multiplication.py  the n×n multiplication lines (identical to the published ones) and training sets
    tokenization.py    examples as token ids with their CoT span; the symbol tokenizer for arithmetic
    schedule.py        RemovalSchedule: tokens removed at each step, and the smoothing offsets
    batching.py        removal applied to a batch, re-packed for the model and the loss
    evaluation.py      batched greedy decoding, exact-match accuracy, examples/s
    loop.py            fit_internalization on kpro.train.fit: each step's removal, optimizer re-creation, resume
    command.py         `python -m kpro internalize`
"""
from ..tokenizer import SymbolTokenizer
from .batching import CoTBatch, TrainingBatch, collate, next_token_loss, remove_cot, training_batch
from .data import (ANSWER_MARK, PUBLISHED_SPLITS, PUBLISHED_TASKS, CoTExample, DataFormatError, parse_line,
                   published_file, read_examples, read_published)
from .evaluation import Evaluation, Prediction, answers_match, evaluate, read_prediction
from .loop import (NO_REMOVAL, REMOVE_EVERYTHING, CoTRemoval, SaveTokenizer, ValidationAccuracy, fit_internalization,
                   lr_schedule, mean_cot_tokens)
from .multiplication import (multiplication_example, multiplication_lines, multiplication_operands,
                             multiplication_pairs, multiplication_training_set, published_multiplication_pairs,
                             write_multiplication_training_set)
from .schedule import MAX_OFFSET, REMOVE_ALL, RemovalSchedule, step_generator
from .tokenization import (IGNORE_INDEX, MULTIPLICATION_SYMBOLS, TokenizedExample, multiplication_tokenizer,
                           symbol_tokenizer_for, tokenize_example, tokenize_examples)

__all__ = [
    "ANSWER_MARK", "IGNORE_INDEX", "MAX_OFFSET", "MULTIPLICATION_SYMBOLS", "NO_REMOVAL", "PUBLISHED_SPLITS",
    "PUBLISHED_TASKS", "REMOVE_ALL", "REMOVE_EVERYTHING", "CoTBatch", "CoTExample", "CoTRemoval", "DataFormatError",
    "Evaluation", "Prediction", "RemovalSchedule", "SaveTokenizer", "SymbolTokenizer", "TokenizedExample",
    "TrainingBatch", "ValidationAccuracy", "answers_match", "collate", "evaluate", "fit_internalization",
    "lr_schedule", "mean_cot_tokens",
    "multiplication_example", "multiplication_lines", "multiplication_operands", "multiplication_pairs",
    "multiplication_tokenizer", "multiplication_training_set", "next_token_loss", "parse_line", "published_file",
    "published_multiplication_pairs", "read_examples", "read_prediction", "read_published", "remove_cot",
    "step_generator", "symbol_tokenizer_for", "tokenize_example", "tokenize_examples", "training_batch",
    "write_multiplication_training_set",
]
