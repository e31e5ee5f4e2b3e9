"""Training Bitune or plain LoRA adapters on (prompt, answer) pairs with the reference defaults, and the
adapter files of a finished run.

Loss weighting: the reference trains batch 1 × 10 accumulation steps, so each example's answer tokens are
averaged first and the examples then weigh alike (`weighting="example"`, the default); `"token"` averages
every answer token of the step, so long answers weigh more.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._numbers import is_integer
from .. import adapters, lora
from .._run_lock import holding
from ..distributed import current_env, main_decides, on_main
from ..errors import CheckpointError, OtherSettings
from ..model import Llama
from ..train import (Batches, Callback, LossSum, Schedule, adamw, checkpoint_step, collate_prompt_answer, fit,
                     latest_checkpoint)
from ..train.checkpointing import saved_schedule
from ..train.data import check_special_id
from ..train.loss import head_cross_entropy, next_token_targets, output_head_weight
from .data import check_pairs
from .streams import answer_targets, split_streams
from .wrapper import Bitune

METHODS = ("bitune", "lora")
WEIGHTINGS = ("example", "token")  # the reference's per-example mean, and the mean over every answer token
SETTINGS_FILE = "tune_settings.json"  # in each checkpoint of out_dir/run: the set-up a resume must keep
RECORDED_LATER = ("base_model", "base_dtype")  # settings that the checkpoints of older runs lack
# What a base digest that differs says: another base, or, in a run that recorded no dtype, maybe another dtype
BASE_HINTS = {"base_model": " (another base model)",
              "base_model or dtype": " (another base model, or another dtype of it: the run recorded no dtype)"}


def bitune_loss(module, batch: dict, weighting: str = "token") -> LossSum:
    """fit's loss for a Bitune module: cross-entropy over the answer tokens, through the module's forward
    (so DDP/FSDP wrappers see the call), from the answer stream's hidden states and the head's weight
    (`kpro.ops.linear_cross_entropy`): no logits in memory, and no gradient for the frozen head. A head that
    is more than its weight (a bias, hooks: `kpro.model.head_is_its_weight`) makes the logits instead.
    `weighting`: "token" (every answer token of the step alike) or "example" (each example's mean, then
    the mean over the step's examples, as the reference)."""
    bitune = module.module if isinstance(module, DistributedDataParallel) else module
    fused = output_head_weight(bitune.model) is not None
    out = module(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"], head=not fused)
    targets = answer_targets(split_streams(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"]))
    # The weight is read after the forward: an FSDP model holds it unsharded only from its forward on.
    return weighted_loss(out, output_head_weight(bitune.model) if fused else None, targets, weighting)


def lora_loss(module, batch: dict, weighting: str = "token") -> LossSum:
    """fit's loss for plain LoRA (a causal model) with either weighting: position t predicts token t + 1,
    and only the answer tokens (labels != -100) count. Fused with the head's weight as `bitune_loss`."""
    fused = output_head_weight(module) is not None
    out = module(batch["input_ids"], batch.get("attention_mask"), head=not fused)
    targets = next_token_targets(batch["labels"])
    return weighted_loss(out, output_head_weight(module) if fused else None, targets, weighting)


def weighted_loss(out: torch.Tensor, head_weight: torch.Tensor | None, targets: torch.Tensor,
                  weighting: str) -> LossSum:
    """The cross-entropy of `targets` [B, T] (-100: no loss) as a LossSum that `fit` averages over the step:
    summed over tokens ("token"), or each row's mean summed over the rows that have targets ("example").
    `out`: hidden states with the head's weight, or, with `head_weight` None, logits (`head_cross_entropy`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
    if weighting == "token":
        total = head_cross_entropy(out, head_weight, targets, reduction="sum")
        return LossSum(total, (targets != -100).sum())
    nll = head_cross_entropy(out, head_weight, targets, reduction="none")
    tokens = (targets != -100).sum(1)
    rows = tokens > 0
    return LossSum((nll.sum(1)[rows] / tokens[rows]).sum(), rows.sum())


def tune(model: Llama, pairs: list, method: str, out_dir: str | os.PathLike, *, steps: int = 3000, batch_size: int = 10,
         lr: float = 3e-4, warmup: float | None = None, rank: int = 8, alpha: float = 1.0, mode: str = "bitune",
         weighting: str = "example", seed: int = 0, pad_id: int = 0, save_every: int | None = None, callbacks=(),
         stream=None, log_every=None):
    """Train adapters on (prompt, answer) pairs with the reference defaults (AdamW, no weight decay, linear
    schedule with `warmup` of the steps (default 10%; a resumed run keeps its own warmup, so that more
    steps extend it), clipping 1.0, bf16 on GPU, each example's answer averaged and the
    examples averaged: `weighting="example"`; "token" averages every answer token). Returns the tuned
    module: a Bitune, or for `method="lora"` a `lora.AdaptedModel` with one `causal` adapter; adapters are
    saved to `out_dir/adapters`, the training state (resumable) to `out_dir/run`: every `save_every` steps
    (None: only at the end and on Ctrl-C or SIGTERM), the newest checkpoint kept."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose from {', '.join(WEIGHTINGS)}")
    if not is_integer(steps) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0 (0: save the untuned adapters), got {steps!r}")
    steps = int(steps)
    if method == "lora" and mode != "bitune":
        raise ValueError(f"mode={mode!r} is a Bitune ablation; method='lora' trains one causal adapter")
    check_pairs(pairs, model.config.vocab_size, model.config.max_position_embeddings)
    pad_id = check_special_id(pad_id, "pad_id", vocab_size=model.config.vocab_size)  # else named as input_ids later
    out_dir = Path(out_dir)
    # One run at a time in out_dir until its adapters are saved: fit holds only out_dir/run, and only while it
    # trains. Rank 0 holds it, as fit holds its run directory.
    with contextlib.ExitStack() as hold:
        on_main(lambda: hold.enter_context(holding(out_dir)), current_env(), f"hold {out_dir}")
        last = main_decides(lambda: latest_checkpoint(out_dir / "run"), f"look for checkpoints in {out_dir / 'run'}")
        if steps > 0 and last is not None and checkpoint_step(last) > steps:  # its adapters are not those asked for
            raise FewerSteps(f"{out_dir} holds a run of {checkpoint_step(last)} steps already, more than "
                             f"steps={steps}: pass at least as many steps (more extend it), or tune into another "
                             "out_dir", done=checkpoint_step(last), steps=steps)
        rank, alpha = lora.check_rank_alpha(rank, alpha)  # Python numbers: the settings are saved as JSON
        settings = {"method": method, "rank": rank, "alpha": alpha, **({"mode": mode} if method == "bitune" else {}),
                    "weighting": weighting, "base_model": adapters.base_fingerprint(model),
                    "base_dtype": str(adapters.base_dtype(model)).removeprefix("torch.")}
        if steps > 0:
            main_decides(lambda: _check_resumable(out_dir / "run", settings, model),
                         f"read the settings of {out_dir / 'run'}")
        elif last is not None:  # the untuned adapters would replace the tuned ones
            raise FewerSteps(f"{out_dir} holds a tuned run: steps=0 would save untrained adapters over its adapters; "
                             "load them with load_tuned, or tune into another out_dir", done=checkpoint_step(last),
                             steps=0)
        if steps > 0:  # before any adapter is added: a batch size the examples cannot fill, a bad warmup
            batches = Batches(pairs, batch_size, partial(collate_prompt_answer, pad_id=pad_id), seed=seed)
            schedule = Schedule("linear", warmup_steps=_warmup_steps(warmup, steps, out_dir / "run"), total_steps=steps)
        trained = _StepsTrained()
        # The adapters go into the caller's model: a refusal before the first step (fit's resume checks of the lr,
        # warmup, batch size, seed or data) takes them out again, so that the corrected call can add them; once a
        # step has trained them (Ctrl-C saves it and raises) they stay.
        with lora.adapters_undone_on_error(model, keep=lambda: trained.any):
            if method == "bitune":
                tuned = Bitune(model, rank=rank, alpha=alpha, mode=mode, seed=seed)
                loss_fn = partial(bitune_loss, weighting=weighting)
            else:
                lora.add_adapters(model, ["causal"], rank=rank, alpha=alpha, seed=seed)
                # The token mean is fit's default loss, lm_loss, exactly.
                tuned = lora.AdaptedModel(model, "causal")
                loss_fn = None if weighting == "token" else partial(lora_loss, weighting=weighting)
            tuned.to(model.embed_tokens.weight.device)
            if steps > 0:
                kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
                fit(tuned, batches, out_dir / "run", steps=steps, optimizer=lambda m: adamw(m, lr, weight_decay=0.0),
                    schedule=schedule, clip_grad_norm=1.0, save_every=save_every, keep_last=1,
                    callbacks=[_RecordSettings(settings), trained, *callbacks], stream=stream, log_every=log_every,
                    save_frozen=False, **kwargs)  # the base is checked by its fingerprint (base_model), not saved
            # Rank 0 alone under torchrun: DDP left the same adapters on every process
            on_main(lambda: save_tuned_adapters(tuned, out_dir / "adapters"), current_env(),
                    f"save the adapters to {out_dir / 'adapters'}")
        return tuned


class FewerSteps(ValueError):
    """`tune` refused because `out_dir` holds a run of `done` steps, more than the `steps` asked for (0: the untuned
    adapters, which would replace the tuned ones). A command says it in its own terms (bitune: --steps, --out)."""

    def __init__(self, message: str, done: int, steps: int):
        super().__init__(message)
        self.done, self.steps = done, steps


class _StepsTrained(Callback):
    """Whether fit has trained a step of this call: the adapters then hold it, and stay on an error."""

    def __init__(self):
        self.any = False

    def on_step_end(self, run, metrics) -> None:
        self.any = True


class _RecordSettings(Callback):
    """Writes tune's settings into each checkpoint, for `_check_resumable`."""

    def __init__(self, settings: dict):
        self.settings = settings

    def on_save(self, run, directory) -> None:
        (Path(directory) / SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n")


def _check_resumable(run_dir: Path, settings: dict, model: Llama) -> None:
    """Refuse to resume a run whose adapters or loss were set up otherwise (fit checks the optimizer and the
    schedule), or whose base was another than `model` or in another dtype; checked before any adapter is built,
    so that a changed rank is named, not its tensor shapes."""
    last = latest_checkpoint(run_dir)
    if last is None or not (last / SETTINGS_FILE).is_file():
        return  # a new run, or one saved before the settings were recorded
    saved = json.loads((last / SETTINGS_FILE).read_text(encoding="utf-8"))
    if "base_model" in saved and adapters.fingerprint_method(saved["base_model"]) != "sha256":
        # saved before the fingerprint hashed every value: compared by the method it was taken with
        settings = {**settings, "base_model": adapters.fingerprint_like(model, saved["base_model"])}
    if "base_model" in saved and saved.get("base_dtype", settings["base_dtype"]) != settings["base_dtype"]:
        settings = {**settings, "base_model": _base_in_dtype(model, saved)}
    # base_model: a resume keeps the base given (the checkpoints hold none; older ones, holding it, loaded theirs
    # over it); it and base_dtype are compared where the run recorded them (runs saved before did not)
    differences = {key: (saved.get(key), settings.get(key)) for key in dict.fromkeys([*settings, *saved])
                   if saved.get(key) != settings.get(key) and (key not in RECORDED_LATER or key in saved)}
    if "base_model" in differences and "base_dtype" not in saved:  # the digest of another dtype differs too
        differences = {("base_model or dtype" if key == "base_model" else key): value
                       for key, value in differences.items()}
    if differences:
        lines = [f"{key}: {was!r} in the checkpoint, {now!r} now" + BASE_HINTS.get(key, "")
                 + (_mixed_base_hint(model, settings["base_dtype"]) if key == "base_model" else "")
                 for key, (was, now) in differences.items()]
        raise OtherSettings(f"{last} was tuned with other settings than this call asks for:\n  " + "\n  ".join(lines)
                            + f"\nresume with the same settings, or tune into another out_dir than {run_dir.parent}",
                            differences)


def _mixed_base_hint(model: Llama, base_dtype: str) -> str:
    """Where the base given holds weights of several dtypes (float32 norms beside its matrices, as
    load_pretrained(dtype="auto") now keeps them), how to give a run tuned on it loaded whole its base."""
    if len({t.dtype for t in adapters._base_tensors(model).values()}) < 2:
        return ""
    return (f"; if it is the same checkpoint: load_pretrained(dtype=\"auto\") keeps each tensor's stored dtype, "
            f"where it once cast every tensor to {base_dtype}: load the base with dtype=torch.{base_dtype}")


def _base_in_dtype(model: Llama, saved: dict) -> str:
    """The base fingerprint of `model`, in another dtype than the run's (`saved`: its settings), to compare with
    the run's: taken cast to the run's dtype where `model`'s is wider (cast down, the run's base gives back the
    values it was tuned with, so another base is named besides the dtype); else the run's own, as if equal: a
    narrower or as wide copy cannot give them back, and its base is checked once the dtype is the run's."""
    run_dtype = getattr(torch, str(saved["base_dtype"]), None)
    if isinstance(run_dtype, torch.dtype) and adapters.base_dtype(model).itemsize > run_dtype.itemsize:
        return adapters.base_fingerprint(model, run_dtype)
    return saved["base_model"]


def _warmup_steps(warmup: float | None, steps: int, run_dir: Path) -> int:
    """`warmup` of the steps (default 10%), below `steps` (a linear schedule decays after its warmup: one
    step has none); without an explicit `warmup`, a resumed run keeps the warmup it started with."""
    if warmup is None:
        saved = saved_schedule(run_dir, steps)
        if saved is not None:
            return saved["warmup_steps"]
        warmup = 0.1
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup!r}")
    return min(math.ceil(warmup * steps), steps - 1)


def save_tuned_adapters(tuned, directory) -> Path:
    """The adapters of what `tune` returns (a Bitune, or a `lora.AdaptedModel`, whatever its adapter's name and
    the projections adapted), with the set-up `load_tuned` rebuilds them from."""
    if isinstance(tuned, Bitune):
        return tuned.save_adapters(directory)
    if not isinstance(tuned, lora.AdaptedModel):
        raise TypeError(f"save_tuned_adapters takes a Bitune or a kpro.lora.AdaptedModel, got {type(tuned).__name__}")
    return adapters.save_adapters(directory, adapters.lora_tensors(tuned.model),
                                  {**lora_config(tuned.model), "adapter": tuned.adapter,
                                   **adapters.base_record(tuned.model)})


def load_tuned(model: Llama, directory: str | os.PathLike):
    """The tuned module saved by `tune` (its `out_dir/adapters`): a Bitune, or for plain LoRA an
    `AdaptedModel`, with the adapters added to `model` and loaded; the set-up comes from the saved config.
    A load that fails leaves `model` as it was."""
    saved = adapters.read_config(directory, ("method",))
    if saved.get("method") == "bitune":
        return Bitune.from_adapters(model, directory)
    if saved.get("method") != "lora":
        raise CheckpointError(f"{directory} holds {saved.get('method')!r} adapters; kpro reads 'bitune' and 'lora'")
    saved = adapters.read_config(directory, ("adapters", "rank", "alpha"))
    # Files written before these were recorded hold tune's: every projection, the adapter "causal".
    targets, adapter = saved.get("targets", list(lora.PROJECTIONS)), saved.get("adapter", "causal")
    if not isinstance(targets, list) or not isinstance(saved["adapters"], list) or adapter not in saved["adapters"]:
        raise CheckpointError(f"{Path(directory) / adapters.CONFIG_FILE}: targets {targets!r}, adapters "
                              f"{saved['adapters']!r} and adapter {adapter!r} (one of the adapters) do not fit "
                              "together: it was not written by save_tuned_adapters, or was edited")
    adapters.check_base(directory, model)
    with lora.adapters_undone_on_error(model):
        lora.add_adapters(model, saved["adapters"], rank=saved["rank"], alpha=saved["alpha"], targets=targets)
        model.to(model.embed_tokens.weight.device)
        config = lora_config(model)
        adapters.load_adapters(directory, adapters.lora_tensors(model),
                               {key: value for key, value in config.items() if key != "targets" or key in saved})
    return lora.AdaptedModel(model, adapter)


def lora_config(model: nn.Module) -> dict:
    """The LoRA set-up of `model`: rank, alpha, adapter names, and the projections adapted (`targets`). One set-up
    rebuilds every layer (`add_adapters`), so layers that differ (an adapter added to some alone, say) are refused,
    naming the first that does: saved, their adapters would make a file that load_tuned refuses."""
    layers = [(path, module) for path, module in model.named_modules() if isinstance(module, lora.LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA layers (kpro.lora.add_adapters adds them)")
    setup = lambda layer: {"rank": layer.rank, "alpha": layer.alpha, "adapters": list(layer.adapters)}
    first_path, first = layers[0]
    for path, layer in layers[1:]:
        if setup(layer) != setup(first):
            raise ValueError(f"LoRA layer {path} has {setup(layer)}, layer {first_path} {setup(first)}: one set-up "
                             "rebuilds every layer (add_adapters), so these adapters cannot be saved with it")
    targets = collections.Counter(path.rsplit(".", 1)[-1] for path, _ in layers)
    blocks = len(getattr(model, "layers", ())) or max(targets.values())
    uneven = [name for name, count in targets.items() if count != blocks]
    if uneven:
        raise ValueError(f"{', '.join(uneven)} {'is' if len(uneven) == 1 else 'are'} adapted in some of the {blocks} "
                         "blocks only: one set-up adapts the same projections in every block (add_adapters)")
    return {"method": "lora", **setup(first), "targets": list(targets)}
