"""The demo's acts run end to end (shortened); the full-length run is `python -m kpro demo`."""
import random

import kpro
from kpro.demo import basics as demo
from kpro.demo import internalization


def test_reversal_task_format():
    prompt, answer = demo.reversal_task(random.Random(0))
    assert prompt.endswith(">") and answer == prompt[:-1][::-1] and 3 <= len(answer) <= 8


def test_basics_act_trains_saves_and_reloads(tmp_path, capsys):
    result = demo.act_basics(tmp_path / "basics", steps=30)
    out = capsys.readouterr().out
    assert "step    30/30  loss" in out and "reloaded" in out
    assert 0.0 <= result["accuracy"] <= 1.0
    assert isinstance(kpro.load_tokenizer(tmp_path / "basics"), kpro.CharTokenizer)
    assert kpro.load_pretrained(tmp_path / "basics").config.num_hidden_layers == 4


def test_bitune_act_compares_lora_and_bitune(tmp_path, capsys):
    from kpro.demo import bitune
    results = bitune.act_bitune(tmp_path / "bitune", pretrain_steps=4, tune_steps=2, held_out=20)
    out = capsys.readouterr().out
    assert set(results) == {"lora", "bitune"} and all(0 <= r["accuracy"] <= 1 for r in results.values())
    assert "held-out accuracy" in out
    prompt, answer = bitune.question(random.Random(0))
    digits = [int(d) for d in prompt.split()[:6]]
    assert answer == str(bitune.OPERATIONS[prompt.split()[-1]](digits))


def test_expansion_tasks_format():
    from kpro.demo import expansion
    prompt, answer = expansion.domain_task(random.Random(0))
    digits = prompt[:-1]
    assert prompt.endswith("=") and digits.isdigit() and answer == "".join("abcdefghij"[int(d)] for d in digits)
    general_prompt, general_answer = expansion.reversal_task(random.Random(0))
    assert general_answer == general_prompt[:-1][::-1]  # the general task reverses; the domain task keeps the order


def test_expansion_act_runs_and_prints_the_table(tmp_path, capsys):
    from kpro.demo import expansion
    result = expansion.act_expansion(tmp_path / "expansion", pretrain_steps=8, domain_steps=4, eval_examples=8)
    out = capsys.readouterr().out
    assert "(a) expanded, new blocks trained" in out and "(b) control, all weights trained" in out
    assert result["new_blocks"] == [1, 3, 5, 7]
    for arm in ("before", "expanded", "control"):
        assert set(result[arm]) == {"domain", "general"}
def test_internalization_act_trains_the_three_models_and_reports_them(tmp_path, capsys):
    results = internalization.act_internalization(tmp_path, explicit_steps=6, internalize_steps=8, steps_per_token=2,
                                                  test_size=8)
    out = capsys.readouterr().out
    assert set(results) == {"explicit CoT", "no CoT", "internalized"}
    for name in results:
        assert f"  {name}" in out and 0.0 <= results[name]["accuracy"] <= 1.0
        assert results[name]["examples_per_second"] > 0
    assert "examples/s" in out and "step 7: removing 3 CoT tokens" in out
