"""Hooks into `fit`. Subclass `Callback` and override what you need; `fit` calls each hook on every
process, in list order, so callbacks must decide the same thing on every rank.

    on_fit_start(run)               after resuming, before the first step (the random generators are put
                                    back as they were after it: what it draws moves no run, resumed or new)
    on_batch(run, batch) -> batch   each step's global batch, before it is split; return it, changed or not
    on_step_end(run, metrics)       after the optimizer step; add entries to `metrics` to have them logged
    on_save(run, directory)         a checkpoint is being written: add files to `directory` (rank 0 only; the
                                    random generators are put back as they were after it)
    on_fit_end(run)                 after the last step (not when interrupted)
    state_dict() / load_state_dict  what the callback must remember across a resume (tensors, numbers,
                                    strings, and lists/tuples/dicts of them)

`run` (a `kpro.train.Run`) gives `step` (optimizer steps completed; during a step, the index of the step
in progress), `model`, `optimizer`, `total_steps`, and takes requests: `reset_optimizer()`,
`save_checkpoint()`, `stop()`.
"""
from __future__ import annotations

from ..errors import CheckpointError
from .checkpointing import check_loadable, type_name


class Callback:
    def on_fit_start(self, run) -> None:
        pass

    def on_batch(self, run, batch):
        return batch

    def on_step_end(self, run, metrics: dict) -> None:
        pass

    def on_save(self, run, directory) -> None:
        pass

    def on_fit_end(self, run) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def callback_keys(callbacks) -> list[str]:
    """Stable names for the callbacks' saved states: the class name, numbered when it repeats."""
    keys, counts = [], {}
    for cb in callbacks:
        name = type(cb).__qualname__
        counts[name] = counts.get(name, 0) + 1
        keys.append(name if counts[name] == 1 else f"{name}#{counts[name]}")
    return keys


def callback_states(callbacks) -> dict:
    """The callbacks' states, by `callback_keys`; one a checkpoint could not load back is refused, naming it."""
    states = {key: cb.state_dict() for key, cb in zip(callback_keys(callbacks), callbacks) if hasattr(cb, "state_dict")}
    for key, state in states.items():
        check_loadable(state, f"callback {key}'s state_dict()")
    return states


def check_metrics(metrics: dict, what: str) -> None:
    """A step's metrics go to metrics.jsonl and, the last ones, into checkpoints: Python numbers, strings,
    None, and lists and dicts of them only (a tensor is no JSON, a NumPy float no checkpoint can load back)."""
    def check(value, where):
        if type(value) in (list, dict):
            for key, item in (value.items() if type(value) is dict else enumerate(value)):
                if type(value) is dict and type(key) is not str:
                    raise TypeError(f"{what}: {where} has the key {key!r}, not a string (metrics.jsonl is JSON)")
                check(item, f"{where}[{key!r}]")
        elif type(value) not in (type(None), bool, int, float, str):
            raise TypeError(f"{what}: {where} is a {type_name(value)}; log Python numbers, strings, and lists and dicts of them "
                            "(float(x), x.item() for a tensor, x.tolist())")
    for key, value in metrics.items():
        check(value, f"metrics[{key!r}]")


def load_callback_states(callbacks, states: dict) -> None:
    """Give each callback its saved state; a saved state with no callback to take it is an error."""
    keys = callback_keys(callbacks)
    orphans = [key for key, state in states.items() if state and key not in keys]
    if orphans:
        raise ValueError(f"the checkpoint holds state for callback(s) {', '.join(orphans)} that this run does not have; "
                         f"pass the same callbacks to resume (this run has: {', '.join(keys) or 'none'})")
    for key, cb in zip(keys, callbacks):
        if key in states and hasattr(cb, "load_state_dict"):
            try:
                cb.load_state_dict(states[key])
            # A state of another layout (the callback changed since the run saved it); a ValueError is a
            # callback's own refusal, which names its cause.
            except (KeyError, IndexError, TypeError, AttributeError) as err:
                saved = states[key]
                held = f"keys {sorted(map(str, saved))}" if isinstance(saved, dict) else type(saved).__name__
                raise CheckpointError(f"callback {key} could not load the state the checkpoint holds for it ({held}): "
                                      f"{type(err).__name__}: {err}; resume with the callback the run was saved "
                                      "with") from err
