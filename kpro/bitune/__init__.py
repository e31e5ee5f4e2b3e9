"""kpro.bitune: Bitune instruction tuning (read the prompt twice, mix the two key/value caches, answer
from the mix), and plain LoRA tuning as its baseline.

    streams.py     a batch of `prompt + answer` rows as the prompt and answer streams; answer targets
    passes.py      the modes, and the passes through the model: fused (three streams at once) or separate
    wrapper.py     Bitune(model): adapters and mixing scalars, logits, loss, generate, adapter files
    data.py        instruction and multiple-choice JSONL, prompts and answers as token ids
    training.py    tune (Bitune or LoRA with the reference defaults), bitune_loss, load_tuned
    evaluation.py  zero-shot multiple choice (acc, acc_norm) and generated answers
    command.py     `python -m kpro bitune`

LoRA itself (`kpro.lora`, `kpro.adapters`) is a building block below this package.
"""
from .data import (CHOICES_TEMPLATE, PROMPT_TEMPLATE, Instruction, MultipleChoice, encode_pair, multiple_choice_prompt,
                   read_instructions, read_multiple_choice, tokenize_instructions)
from .evaluation import answer_log_likelihoods, generate_answers, multiple_choice_accuracy
from .passes import MODES, Mode, PromptPass, fused_passes, run_block, separate_passes
from .streams import Streams, answer_targets, right_pad, split_streams
from .training import (METHODS, WEIGHTINGS, bitune_loss, load_tuned, lora_config, lora_loss, save_tuned_adapters, tune,
                       weighted_loss)
from .wrapper import Bitune

__all__ = [
    "CHOICES_TEMPLATE", "METHODS", "MODES", "PROMPT_TEMPLATE", "WEIGHTINGS", "Bitune", "Instruction", "Mode",
    "MultipleChoice", "PromptPass", "Streams", "answer_log_likelihoods", "answer_targets", "bitune_loss",
    "encode_pair", "fused_passes", "generate_answers", "load_tuned", "lora_config", "lora_loss",
    "multiple_choice_accuracy", "multiple_choice_prompt", "read_instructions", "read_multiple_choice", "right_pad",
    "run_block", "save_tuned_adapters", "separate_passes", "split_streams", "tokenize_instructions", "tune",
    "weighted_loss",
]
