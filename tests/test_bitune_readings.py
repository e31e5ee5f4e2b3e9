"""The bitune-readings control: the prefix-LM forward against a float64 reference, the batches, and the
reproduction's verdict computed from the numbers it prints."""
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from kpro.demo import act_settings, bitune, bitune_readings, seeds
from kpro.model import Llama
from kpro.rope import apply_rope
from kpro.tokenizer import CharTokenizer


def tiny_model(dtype=torch.float64) -> Llama:
    torch.manual_seed(0)
    return Llama(bitune.tiny_config(CharTokenizer(bitune.SYMBOLS).vocab_size)).to(dtype)


def prefix_reference(model, ids, valid, prompt_lens):
    """The prefix LM with an explicit dense mask: key j is seen by query i when it is real and either j <= i
    or both lie in the row's prompt."""
    batch, length = ids.shape
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    prompt = torch.arange(length)[None, :] < prompt_lens[:, None]  # [B, T]
    allowed = ((j <= i) | (prompt[:, :, None] & prompt[:, None, :])) & valid[:, None, :]
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    x = model.embed_tokens(ids)
    cos, sin = model.rope(positions, x.dtype)
    for block in model.layers:
        attn, h = block.self_attn, block.input_layernorm(x)
        q = apply_rope(attn.q_proj(h).view(batch, length, attn.num_heads, attn.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(attn.k_proj(h).view(batch, length, attn.num_kv_heads, attn.head_dim), cos, sin).transpose(1, 2)
        v = attn.v_proj(h).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        groups = attn.num_heads // attn.num_kv_heads
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = (q @ k.transpose(-1, -2)) * attn.head_dim ** -0.5
        out = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v
        x = x + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.norm(x)


def test_prefix_reading_matches_a_float64_reference_with_padding():
    model = tiny_model()
    ids = torch.randint(3, model.config.vocab_size, (3, 11))
    valid = torch.ones(3, 11, dtype=torch.bool)
    valid[1, 7:] = False  # right padding
    valid[2, 9:] = False
    prompt_lens = torch.tensor([5, 4, 9])
    got = bitune_readings.prefix_hidden_states(model, ids, valid, prompt_lens)
    want = prefix_reference(model, ids, valid, prompt_lens)
    assert not got.isnan().any()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-10, atol=1e-10)
    # With one-token prompts the prefix LM is the causal model, the library's own forward.
    torch.testing.assert_close(bitune_readings.prefix_hidden_states(model, ids, valid, torch.ones(3, dtype=torch.long))[valid],
                               model(ids, valid, head=False)[valid], rtol=1e-10, atol=1e-10)


def test_prefix_reading_sees_the_whole_prompt_and_nothing_after_it():
    model = tiny_model()
    ids = torch.randint(3, model.config.vocab_size, (1, 8))
    valid, prompt_lens = torch.ones(1, 8, dtype=torch.bool), torch.tensor([5])
    base = bitune_readings.prefix_hidden_states(model, ids, valid, prompt_lens)
    last_prompt_token, after_prompt = ids.clone(), ids.clone()
    last_prompt_token[0, 4] = 3 if ids[0, 4] != 3 else 4
    after_prompt[0, 5] = 3 if ids[0, 5] != 3 else 4
    moved = bitune_readings.prefix_hidden_states(model, last_prompt_token, valid, prompt_lens)
    assert not torch.allclose(moved[0, 0], base[0, 0])  # the first token sees the prompt's last
    assert torch.equal(model(last_prompt_token, valid, head=False)[0, 0], model(ids, valid, head=False)[0, 0])
    moved = bitune_readings.prefix_hidden_states(model, after_prompt, valid, prompt_lens)
    assert torch.equal(moved[0, :5], base[0, :5]) and not torch.allclose(moved[0, 6], base[0, 6])


def test_batches_target_the_count_after_the_prompt():
    tok = CharTokenizer(bitune.SYMBOLS)
    examples = [bitune.question(random.Random(s), side) for s, side in ((0, "left"), (1, "right"))]
    batch = bitune_readings.collate(examples, tok)
    for row, (q, answer, _) in enumerate(examples):
        length = int(batch["prompt_lens"][row])
        ids = batch["input_ids"][row][batch["attention_mask"][row]].tolist()
        assert tok.decode(ids[:length]) == f"Question: {q}\n\nAnswer:" and tok.decode(ids[length:]) == " "
        assert tok.decode([int(batch["targets"][row])]) == answer
    assert batch["attention_mask"].dtype == torch.bool and not batch["attention_mask"][0].all()  # "left" is shorter


def test_questions_of_other_lengths():
    """`digits` sets the question's length for the control; the act's default stream is unchanged by it."""
    assert bitune.question(random.Random(3)) == bitune.question(random.Random(3), digits=bitune.DIGITS)
    rng = random.Random(3)  # the stream the act drew before `digits` existed: 6 digits, then the side
    drawn, side = rng.sample(range(10), 6), rng.choice(bitune.SIDES)
    assert bitune.question(random.Random(3)) == (" ".join(map(str, drawn)) + " " + side,
                                                 str(bitune.records(drawn, side)), side)
    prompt, answer, side = bitune.question(random.Random(0), "right", digits=9)
    digits = [int(d) for d in prompt.split()[:-1]]
    assert len(digits) == len(set(digits)) == 9 and answer == str(bitune.records(digits, side))
    for bad in (0, 10):  # ten digits could count 10 records, two tokens where the answer is one
        with pytest.raises(ValueError, match=f"digits must be 1 to 9 .* got {bad}"):
            bitune.question(random.Random(0), digits=bad)
    test, train = bitune.question_sets(random.Random(0), 0, 5, 20, digits=3)
    assert {len(q.split()) for q, _, _ in test + train} == {4} and not {q for q, _, _ in test} & {q for q, _, _ in train}
    with pytest.raises(ValueError, match="take all 20 1-digit questions"):  # nothing left to train on
        bitune.question_sets(random.Random(0), 0, 200, 1, digits=1)


def test_the_control_trains_on_questions_of_its_length(tmp_path, monkeypatch):
    lengths = []
    def recording(*args):
        test, train = bitune.question_sets(*args)
        lengths.extend(len(q.split()) - 1 for q, _, _ in test + train)
        return test, train
    monkeypatch.setattr(bitune_readings, "question_sets", recording)
    bitune_readings.train_reading(tmp_path, "causal", 0, 1, 1e-3, 0, 32, 2, digits=4)
    assert set(lengths) == {4}


def test_unknown_reading_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown reading 'backwards'"):
        bitune_readings.train_reading(tmp_path, "backwards", 0, 1, 1e-3, 0, 64, 2)


def test_reproduction_prints_the_verdict_of_its_numbers(tmp_path, capsys):
    result = bitune_readings.reproduce_bitune_readings(tmp_path, seeds=2, workers=1, steps=4, warmup_steps=1,
                                                      train_questions=64, held_out=10)
    out = capsys.readouterr().out
    for s, run in result["runs"].items():
        row = re.search(rf"^{s}\s+(.*)$", out, re.M).group(1).split()
        assert [float(cell) for cell in row] == pytest.approx(
            [round(run[r][side], 3) for r in bitune_readings.READINGS for side in bitune.SIDES]
            + [round(run["prefix"]["right"] - run["causal"]["right"], 3)], abs=1e-9)
        for side in bitune.SIDES:  # accuracies of 10 questions
            assert run["causal"][side] * 10 == pytest.approx(round(run["causal"][side] * 10))
    gains = [run["prefix"]["right"] - run["causal"]["right"] for run in result["runs"].values()]
    mean = {r: sum(run[r]["right"] for run in result["runs"].values()) / 2 for r in bitune_readings.READINGS}
    shown, gain, se, _, _ = seeds.seeds_verdict(gains, mean["prefix"], mean["causal"], 20)
    assert (result["claim_shown"], result["gain"], result["gain_se"]) == (shown, gain, se)
    line = re.search(r"^claim \(bitune-readings\): .* -- (SHOWN|NOT SHOWN) by this run: gain ([-+0-9.]+)", out, re.M)
    assert line.group(1) == ("SHOWN" if shown else "NOT SHOWN") and float(line.group(2)) == pytest.approx(gain, abs=5e-4)


def test_the_reproduction_records_the_settings_in_effect(tmp_path):
    """The settings file held only the keywords passed (**settings): a default that a newer kpro changed went
    unnoticed by a rerun, which resumed the old runs' checkpoints, and a default passed explicitly was refused
    as other settings. It now holds every setting the runs use, as the acts' files do."""
    tiny = dict(seeds=1, workers=1, steps=1, warmup_steps=0, train_questions=32, held_out=2)
    bitune_readings.reproduce_bitune_readings(tmp_path, **tiny)
    recorded = json.loads((tmp_path / act_settings.SETTINGS_FILE).read_text())
    assert recorded == {"act": "reproduce_bitune_readings", "seed": 0, "seeds": 1, "steps": 1, "lr": 1e-3,
                        "warmup_steps": 0, "train_questions": 32, "held_out": 2, "digits": bitune.DIGITS}
    bitune_readings.reproduce_bitune_readings.check(tmp_path, **tiny, lr=1e-3, digits=bitune.DIGITS)  # the same
    with pytest.raises(ValueError, match="steps 1 there, 2 now"):
        bitune_readings.reproduce_bitune_readings.check(tmp_path, **{**tiny, "steps": 2})


def test_the_loss_trains_the_answer_position():
    """One step on one batch lowers that batch's loss under both readings: the gradient reaches the weights."""
    tok = CharTokenizer(bitune.SYMBOLS)
    batch = bitune_readings.collate([bitune.question(random.Random(s)) for s in range(8)], tok)
    for reading in bitune_readings.READINGS:
        model = tiny_model(torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        before = F.cross_entropy(bitune_readings.answer_logits(model, batch, reading), batch["targets"])
        before.backward()
        optimizer.step()
        with torch.no_grad():
            after = F.cross_entropy(bitune_readings.answer_logits(model, batch, reading), batch["targets"])
        assert after < before, reading
