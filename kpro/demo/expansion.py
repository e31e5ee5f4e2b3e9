"""Demo act `expansion`: LLaMA Pro block expansion against plain fine-tuning, on a tiny model.

A LLaMA is pretrained on a "general" task: reverse a string of letters (`hfbd>` -> `dbfh`). Then it learns a
"domain" task, new to it, that works the other way round: read a string of digits *forwards* and spell each
digit as a letter, 0 = a ... 9 = j (`3917=` -> `djbh`). Two ways, on the same domain corpus for the same steps
and learning rate: (a) expanded by interleaved new blocks and only those trained (`kpro.expand`,
`kpro.train_only`), and (b) as a control, every weight of the unexpanded model fine-tuned. The domain corpus
holds a small share of general examples, as a code corpus holds some English. Writing letters in reading
order is what the general task must not do, so fine-tuning the shared weights for it overwrites the
reversal; the new blocks break it too at first, since they read the general prompts as well, but with the
original blocks frozen the expanded model re-learns it from the few general examples far sooner. A table
shows held-out accuracy on both tasks before and after for both ways, for each seed run (`seeds`, from
`seed` on); the two ways train side by side (`kpro.demo.parallel`), one thread each, where two workers run (one
after the other with one).
"""
from __future__ import annotations

import io
import math
import random
from functools import partial
from pathlib import Path

import torch

from ..checkpoint import load_pretrained, save_pretrained
from ..expansion import expand, train_only
from ..model import Llama
from ..tokenizer import CharTokenizer
from ..train import Batches, Callback, Schedule, adamw, collate_prompt_answer, fit, read_metrics
from .act_settings import check_positive, records_settings
from .basics import LETTERS, accuracy, drawn_outside, reversal_task, tiny_config
from .claims import at_threshold, claim_line, figure, not_finite
from .parallel import default_workers
from .progress import run_jobs_reporting

DIGITS = "0123456789"
ARMS = {"expanded": "(a) expanded, new blocks trained", "control": "(b) control, all weights trained"}
CLAIM = ("training only the new blocks keeps the general task where fine-tuning every weight loses much of it, "
         "both learning the domain")
DOMAIN_LEARNED = 0.9  # both ways must reach this domain accuracy
KEPT = 0.8  # general accuracy the expanded model keeps, on every seed of the run
MARGIN = 0.2  # general accuracy kept: expanded minus control, on every seed of the run
# The defaults (2 new blocks, 1,200 steps at peak lr 2e-3, 3% general examples; chosen on seeds 0 and 4, where
# every earlier default failed on some VM) show the claim on seeds 0-9 on the Xeon VM they were measured on: kept
# 0.84-0.98 against 0.00-0.23, margins 0.735-0.98, domain 0.99-1.00 both ways. At lr 1e-3 and 800 steps full
# fine-tuning re-learned part of the general task as the rate decayed (seed 4 kept 0.76 against 0.73 there);
# at 2e-3 it forgets it for good (benchmarks/RESULTS.md, "Expansion, the expansion act over seeds 0-9").
PRETRAIN_LR, PRETRAIN_STEPS = 1e-3, 400
NEW_BLOCKS, DOMAIN_STEPS, GENERAL_SHARE, DOMAIN_LR = 2, 1200, 0.03, 2e-3


def domain_task(rng: random.Random, min_len: int = 3, max_len: int = 8) -> tuple[str, str]:
    """A prompt like '3917=' and its answer 'djbh': the digits in reading order, each spelled 0=a ... 9=j."""
    digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len)))
    return digits + "=", "".join(LETTERS[int(d)] for d in digits)


def encode(pairs, tok: CharTokenizer) -> list[tuple[list[int], list[int]]]:
    """(`<bos> prompt`, `answer <eos>`) token pairs: the loss falls on the answer only."""
    return [(tok.encode(prompt, bos=True), tok.encode(answer, bos=False, eos=True)) for prompt, answer in pairs]


def domain_corpus(rng: random.Random, count: int, general_share: float, held_out=()) -> list[tuple[str, str]]:
    return drawn_outside(lambda: (reversal_task if rng.random() < general_share else domain_task)(rng), count, held_out)


def tokenizer() -> CharTokenizer:
    return CharTokenizer(LETTERS + DIGITS + ">=")


def corpora(seed: int, general_share: float, eval_examples: int):
    """(the general corpus, the domain corpus) of a seed, as token pairs: the same in every job; neither holds a
    question of the held-out sets (`held_out(eval_examples)`)."""
    rng, tok = random.Random(seed), tokenizer()
    questions = [pair for examples in held_out(eval_examples).values() for pair in examples]
    general = encode(drawn_outside(lambda: reversal_task(rng), 20_000, questions), tok)
    return general, encode(domain_corpus(rng, 16_000, general_share, questions), tok)


def held_out(eval_examples: int) -> dict:
    return {"domain": [domain_task(random.Random(20_000 + i)) for i in range(eval_examples)],
            "general": [reversal_task(random.Random(10_000 + i)) for i in range(eval_examples)]}


def scores(model: Llama, eval_examples: int) -> dict:
    return {task: accuracy(model, tokenizer(), examples) for task, examples in held_out(eval_examples).items()}


class HeldOutScores(Callback):
    """Every `every` steps, held-out domain and general accuracy into the step's metrics (metrics.jsonl)."""

    def __init__(self, every: int, eval_examples: int):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        self.every, self.eval_examples = every, eval_examples

    def on_step_end(self, run, metrics: dict) -> None:
        if run.step % self.every == 0:
            run.model.eval()
            metrics.update({f"{task}_accuracy": value for task, value in scores(run.model, self.eval_examples).items()})
            run.model.train()


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, domain accuracy, general accuracy) of each step HeldOutScores scored, read from metrics.jsonl."""
    return [(row["step"], row["domain_accuracy"], row["general_accuracy"])
            for row in read_metrics(run_dir / "metrics.jsonl") if "general_accuracy" in row]


def train(model: Llama, data, tok: CharTokenizer, run_dir: Path, steps: int, lr: float, batch_size: int,
          seed: int, callbacks=()) -> None:
    batches = Batches(data, batch_size, partial(collate_prompt_answer, pad_id=tok.pad_id), seed=seed)
    fit(model, batches, run_dir, steps=steps, optimizer=lambda m: adamw(m, lr, betas=(0.9, 0.98)),
        schedule=Schedule("cosine", warmup_steps=steps // 10, total_steps=steps), clip_grad_norm=1.0, keep_last=1,
        callbacks=callbacks, stream=io.StringIO())  # running the demo again resumes (or reuses) each run


def verdict(runs: list[dict]) -> tuple[bool, float]:
    """(shown, the smallest margin): on every seed both ways learn the domain (>= DOMAIN_LEARNED), the
    expanded model keeps the general task (>= KEPT) and at least MARGIN more of it than the fine-tuned
    control."""
    margins = [at_threshold(run["expanded"]["general"] - run["control"]["general"]) for run in runs]
    learned = all(run[arm]["domain"] >= DOMAIN_LEARNED for run in runs for arm in ARMS)
    kept = all(run["expanded"]["general"] >= KEPT for run in runs)
    smallest = math.nan if any(map(math.isnan, margins)) else min(margins)  # min() skips a NaN after the first
    return not not_finite(verdict_inputs(runs)) and learned and kept and smallest >= MARGIN, smallest


def verdict_inputs(runs: list[dict]) -> dict[str, float]:
    """The accuracies the verdict compares, by name (the claim line names those that are not finite)."""
    return {f"{arm} {task} accuracy on seed {run.get('seed', i)}": run[arm][task]
            for i, run in enumerate(runs) for arm in ARMS for task in ("domain", "general")}


def check_arguments(pretrain_steps, domain_steps, new_blocks, general_share, lr, eval_examples, seed, seeds,
                    **_) -> None:
    """act_expansion's arguments, refused before the base is pretrained rather than after."""
    check_positive("act_expansion", pretrain_steps=pretrain_steps, domain_steps=domain_steps, new_blocks=new_blocks,
                   eval_examples=eval_examples, seeds=seeds, lr=lr, seed=seed)
    if isinstance(general_share, bool) or not isinstance(general_share, (int, float)) or not 0 <= general_share < 1:
        raise ValueError(f"act_expansion: general_share must be a number from 0 to below 1, got {general_share!r}")


@records_settings(check_arguments)
def act_expansion(out_dir: Path, pretrain_steps: int = PRETRAIN_STEPS, domain_steps: int = DOMAIN_STEPS,
                  new_blocks: int = NEW_BLOCKS, general_share: float = GENERAL_SHARE, lr: float = DOMAIN_LR,
                  eval_examples: int = 200, seed: int = 0, seeds: int = 1, workers: int | None = None) -> dict:
    print("== expansion: a tiny LLaMA learns a new domain task by block expansion (only new blocks train) or by "
          "fine-tuning every weight; which one keeps its general task?")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small gain nothing from a second thread, and the numbers stay the same
    try:
        return _run(out_dir, pretrain_steps, domain_steps, new_blocks, general_share, lr, eval_examples,
                    list(range(seed, seed + seeds)), workers)
    finally:
        torch.set_num_threads(threads)


def _run(out_dir, pretrain_steps, domain_steps, new_blocks, general_share, lr, eval_examples, seeds, workers) -> dict:
    directory = (lambda s: out_dir) if len(seeds) == 1 else (lambda s: out_dir / f"seed-{s}")
    base = Llama(tiny_config(tokenizer().vocab_size))
    print(f"pretraining {base.num_parameters() / 1e6:.2f}M parameters on the general task (reverse letters, "
          f"'hfbd>' -> 'dbfh'), {pretrain_steps} steps of 64; seed{'s' * (len(seeds) > 1)} "
          f"{', '.join(map(str, seeds))}")
    before = run_jobs_reporting(pretrain_jobs(directory, seeds, pretrain_steps, eval_examples), workers,
                                progress_groups(directory, seeds, {"pretraining": "pretrain"}, pretrain_steps))
    print(f"domain task: digits in reading order, spelled 0=a ... 9=j ('3917=' -> 'djbh'); the domain corpus holds "
          f"{general_share:.0%} general examples; {domain_steps} steps of 32 examples, peak lr {lr:g}, both ways, "
          + ("side by side" if (workers or default_workers()) > 1 else "one after the other"))
    arms = run_jobs_reporting(arm_jobs(directory, seeds, domain_steps, new_blocks, general_share, lr, eval_examples),
                              workers, progress_groups(directory, seeds, {arm: arm for arm in ARMS}, domain_steps))
    expanded = arms[0]
    print(f"(a) expanded {base.config.num_hidden_layers} -> {expanded['layers']} blocks; {expanded['plan']}; "
          f"{expanded['trainable'] / 1e6:.2f}M trainable parameters")
    print(f"(b) control: all {base.num_parameters() / 1e6:.2f}M weights of the unexpanded model fine-tuned")

    runs = []
    print(f"\n{'held-out accuracy (greedy, exact)':<36}{'seed':>5}{'domain':>8}{'general':>9}")
    for i, s in enumerate(seeds):
        run = {"seed": s, "before": before[i], "expanded": arms[2 * i]["scores"], "control": arms[2 * i + 1]["scores"],
               "new_blocks": expanded["new_blocks"]}
        runs.append(run)
        for name, result in [("pretrained model", run["before"]), (ARMS["expanded"], run["expanded"]),
                             (ARMS["control"], run["control"])]:
            print(f"{name:<36}{s:>5}{result['domain']:>8.2f}{result['general']:>9.2f}")
    shown, margin = verdict(runs)
    kept = ", ".join(f"{figure(run['expanded']['general'], KEPT, run['expanded']['general'] >= KEPT)} vs "
                     f"{run['control']['general']:.2f}" for run in runs)
    learned = all(r[a]["domain"] >= DOMAIN_LEARNED for r in runs for a in ARMS)
    # the lowest domain accuracy, as the verdict compares it: a 0.895 is not a "0.90" beside "no"; a NaN is the
    # lowest (min() would skip one not in first place and print another figure)
    domains = [r[a]["domain"] for r in runs for a in ARMS]
    lowest = math.nan if any(math.isnan(d) for d in domains) else min(domains)
    print(claim_line("expansion", CLAIM, shown, f"general task kept with expansion vs full fine-tuning: {kept} "
                     f"(needs >= {KEPT} kept and a margin >= {MARGIN}; smallest margin "
                     f"{figure(margin, MARGIN, margin >= MARGIN, sign=True)}); domain learned by both (>= "
                     f"{DOMAIN_LEARNED}): {'yes' if learned else 'no'}, lowest "
                     f"{figure(lowest, DOMAIN_LEARNED, learned)}", verdict_inputs(runs)) + "\n")
    first = runs[0]
    return {"before": first["before"], "expanded": first["expanded"], "control": first["control"],
            "new_blocks": first["new_blocks"], "runs": runs, "claim_shown": shown, "margin": margin}


def progress_groups(directory, seeds, runs: dict[str, str], steps: int) -> dict:
    """The progress line's groups (`RunsProgress`): for each name, the metrics files of its run (`runs[name]`, a
    run directory's name) under every seed's `directory(seed)`, and the steps they train in all."""
    return {name: ([directory(s) / run / "metrics.jsonl" for s in seeds], steps * len(seeds))
            for name, run in runs.items()}


def pretrain_jobs(directory, seeds, steps: int, eval_examples: int) -> list:
    """run_jobs' jobs pretraining each seed's base into directory(seed)."""
    return [(pretrain, dict(out_dir=directory(s), seed=s, steps=steps, eval_examples=eval_examples)) for s in seeds]


def arm_jobs(directory, seeds, steps: int, new_blocks: int, general_share: float, lr: float, eval_examples: int,
             curve_every: int = 0) -> list:
    """run_jobs' jobs training both ways from each seed's base in directory(seed): per seed, expanded then control."""
    return [(train_arm, dict(out_dir=directory(s), seed=s, arm=arm, steps=steps, new_blocks=new_blocks,
                             general_share=general_share, lr=lr, eval_examples=eval_examples, curve_every=curve_every))
            for s in seeds for arm in ARMS]


def pretrain(out_dir: Path, seed: int, steps: int, eval_examples: int) -> dict:
    """The general-task model of a seed, saved to out_dir/base; its held-out scores."""
    torch.manual_seed(seed)
    tok = tokenizer()
    model = Llama(tiny_config(tok.vocab_size))
    general, _ = corpora(seed, 0.0, eval_examples)
    train(model, general, tok, out_dir / "pretrain", steps, PRETRAIN_LR, 64, seed)
    save_pretrained(model, out_dir / "base")
    return scores(model, eval_examples)


def train_arm(out_dir: Path, seed: int, arm: str, steps: int, new_blocks: int, general_share: float, lr: float,
              eval_examples: int, curve_every: int = 0) -> dict:
    """One way of learning the domain from the seed's base: "expanded" (new blocks only) or "control";
    curve_every > 0 also scores both tasks every that many steps ("curve" in the result)."""
    tok = tokenizer()
    model = load_pretrained(out_dir / "base")
    info = {"layers": model.config.num_hidden_layers, "new_blocks": [], "plan": "", "trainable": model.num_parameters()}
    if arm == "expanded":
        new_ids = expand(model, new_blocks)
        plan = train_only(model, new_ids)
        info = {"layers": len(model.layers), "new_blocks": new_ids, "plan": plan.describe(),
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    _, domain = corpora(seed, general_share, eval_examples)
    train(model, domain, tok, out_dir / arm, steps, lr, 32, seed,
          callbacks=[] if curve_every == 0 else [HeldOutScores(curve_every, eval_examples)])
    result = {**info, "scores": scores(model, eval_examples)}
    return result if curve_every == 0 else {**result, "curve": curve(out_dir / arm)}
