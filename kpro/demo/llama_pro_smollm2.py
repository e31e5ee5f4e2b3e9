"""Reproduction `llama-pro-smollm2`: LLaMA Pro's experiment (Wu et al., 2024) at CPU scale on a real model.

SmolLM2-135M-Instruct learns a domain, Python code (the standard library's own source), two ways for the
same steps on the same batches: (a) expanded 30 -> 36 blocks and only the new blocks trained (kpro.expand,
kpro.train_only), as LLaMA Pro does; (b) the unexpanded model with all its weights fine-tuned, the usual way.
Then, against the original model:
- domain: perplexity on held-out standard-library files (never trained on);
- general retention, two ways: perplexity on general English text, the glosses of WordNet 3.0 (definitions
  and example sentences of English words; Princeton's WordNet 3.0 license, permissive; Debian package
  `wordnet-base`), and how many greedy answers to a fixed set of general questions stay exactly the same.
LLaMA Pro's claim: expansion learns the domain while keeping what the model knew; full fine-tuning forgets.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .._files import write_atomic
from ..checkpoint import load_pretrained
from ..expansion import expand, train_only
from ..tokenizer import load_tokenizer
from .act_settings import check_positive
from .smollm2 import (GGUF_NAME, MODEL_DIR, ask, converted_model, mean_loss, missing_requirement, packed_rows, split_files,
                      stdlib_files, train_steps)

WORDNET = Path("/usr/share/wordnet")
WORDNET_INSTALL = "apt-get install wordnet-base"
QUESTIONS = ("What is the capital of France?", "What is the capital of Japan?", "What is 2 + 2?",
             "How many legs does a cat have?", "What is the chemical symbol for water?",
             "How many days are there in a week?", "What is the opposite of hot?",
             "What is the boiling point of water in Celsius?", "Who painted the Mona Lisa?",
             "What language is spoken in Brazil?")


def wordnet_glosses(root: Path = WORDNET) -> list[str]:
    """Every gloss of WordNet 3.0 (the text after ' | ' on each synset line of data.noun/verb/adj/adv)."""
    glosses = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.startswith("  ") and " | " in line:  # lines starting with spaces are the license header
                glosses.append(line.split(" | ", 1)[1].strip())
    return glosses


def _measure(model, tok, domain_rows, general_rows, reference_answers=None) -> dict:
    answers = ask(model, tok, QUESTIONS, max_new_tokens=32)
    out = {"domain_ppl": math.exp(mean_loss(model, domain_rows)), "general_ppl": math.exp(mean_loss(model, general_rows)),
           "answers": answers}
    if reference_answers is not None:
        out["answers_unchanged"] = sum(a == b for a, b in zip(answers, reference_answers))
    return out


def reproduce_llama_pro_smollm2(out_dir: Path, seed: int = 0, steps: int = 40, batch_size: int = 4, seq_len: int = 256,
                                lr: float = 1e-4, new_blocks: int = 6, eval_rows: int = 16) -> dict:
    # refused before the model is converted and measured rather than after (steps=0 divided by zero there)
    check_positive("reproduce_llama_pro_smollm2", seed=seed, steps=steps, batch_size=batch_size, seq_len=seq_len,
                   lr=lr, new_blocks=new_blocks, eval_rows=eval_rows)
    print("== llama-pro-smollm2: LLaMA Pro at CPU scale. SmolLM2-135M-Instruct learns Python code (the standard "
          f"library's source) for {steps} steps of {batch_size} x {seq_len} tokens, (a) expanded by {new_blocks} blocks "
          "with only those trained, (b) all weights fine-tuned; domain and general perplexity, general answers")
    missing = missing_requirement() or (None if (WORDNET / "data.noun").is_file() else
                                        f"the general-English text (WordNet 3.0 glosses) is not installed: {WORDNET_INSTALL}")
    if missing:
        print(f"skipped: {missing}")
        return {"skipped": missing}
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    directory, seconds = converted_model(out_dir.parent / MODEL_DIR)  # shared by the reproductions
    print(f"{GGUF_NAME} -> {directory}/" + (f" (converted in {seconds:.0f} s)" if seconds is not None else " (reused)"))
    tok = load_tokenizer(directory)
    train_files, held_files = split_files(stdlib_files())
    train_rows = packed_rows(tok, train_files, seq_len, steps * batch_size, seed)
    domain_rows = packed_rows(tok, held_files, seq_len, eval_rows, seed)
    general_rows = packed_rows(tok, wordnet_glosses(), seq_len, eval_rows, seed)
    print(f"domain: {len(train_files)} standard-library files to train on ({len(train_rows)} rows), {len(held_files)} "
          f"held out ({eval_rows} rows); general: WordNet 3.0 glosses ({eval_rows} rows); {len(QUESTIONS)} questions")

    torch.manual_seed(seed)
    base = load_pretrained(directory).eval()
    results = {"original": {**_measure(base, tok, domain_rows, general_rows), "trainable": 0, "step_s": None}}
    reference = results["original"]["answers"]
    del base

    for arm in ("expanded", "full"):
        torch.manual_seed(seed)
        model = load_pretrained(directory)
        if arm == "expanded":
            train_only(model, expand(model, new_blocks))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"({'a' if arm == 'expanded' else 'b'}) {arm}: training {trainable / 1e6:.1f}M parameters ...", flush=True)
        began = time.perf_counter()
        losses = train_steps(model, train_rows, steps, batch_size, lr, seed)
        step_s = (time.perf_counter() - began) / steps
        first, last = losses[:5], losses[-5:]  # fewer than 5 where steps < 5
        print(f"    {step_s:.1f} s/step; training loss {sum(first) / len(first):.3f} (first {len(first)} steps) -> "
              f"{sum(last) / len(last):.3f} (last {len(last)})", flush=True)
        results[arm] = {**_measure(model, tok, domain_rows, general_rows, reference), "trainable": trainable,
                        "step_s": step_s, "train_losses": losses}
        del model

    print(f"\n{'model':<34}{'domain ppl':>11}{'general ppl':>12}{'answers kept':>14}")
    names = {"original": "original (30 blocks)", "expanded": "(a) expanded 36, new blocks trained",
             "full": "(b) 30 blocks, all weights trained"}
    for arm, name in names.items():
        r = results[arm]
        kept = f"{r['answers_unchanged']}/{len(QUESTIONS)}" if "answers_unchanged" in r else "-"
        print(f"{name:<34}{r['domain_ppl']:>11.3f}{r['general_ppl']:>12.3f}{kept:>14}")
    for arm in ("expanded", "full"):
        changed = [(q, a) for q, a, b in zip(QUESTIONS, results[arm]["answers"], reference) if a != b]
        for question, answer in changed:
            print(f"  {arm}: {question!r} now -> {answer!r}")
    results["seconds"] = time.perf_counter() - start
    results["settings"] = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "new_blocks": new_blocks,
                           "eval_rows": eval_rows, "seed": seed, "threads": torch.get_num_threads()}
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    print(f"took {results['seconds'] / 60:.1f} min; results in {out_dir / 'results.json'}\n")
    return results
