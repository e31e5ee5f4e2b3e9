"""The ICoT line format: every published line reproduced, the reader, and the training-set generator."""
import numpy as np
import pytest

from kpro.internalize import (PUBLISHED_SPLITS, PUBLISHED_TASKS, CoTExample, DataFormatError, multiplication_example,
                              multiplication_lines, multiplication_operands, multiplication_pairs,
                              multiplication_training_set, parse_line, published_file,
                              published_multiplication_pairs, read_examples, read_published,
                              write_multiplication_training_set)

MULTIPLICATION_TASKS = ["4x4", "5x5", "7x7", "9x9"]


@pytest.mark.parametrize("split", PUBLISHED_SPLITS)
@pytest.mark.parametrize("task", MULTIPLICATION_TASKS)
def test_every_published_multiplication_line_is_regenerated_exactly(task, split):
    lines = published_file(task, split).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000
    n = int(task[0])
    operands = [multiplication_operands(line) for line in lines]
    assert {digits for _, _, digits in operands} == {n}
    pairs = [(a, b) for a, b, _ in operands]
    assert [multiplication_example(a, b, n) for a, b in pairs] == lines
    assert multiplication_lines(pairs, n) == lines  # the vectorized formatter too


def test_hand_worked_lines():
    # 3719 x 3349 from SPEC.md; 12 x 34, 123 x 456 and 7 x 8 worked out by hand.
    assert multiplication_example(3719, 3349, 4) == (
        "9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) + "
        "0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")
    assert multiplication_example(12, 34, 2) == "2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0"
    assert multiplication_example(123, 456, 3) == (
        "3 2 1 * 6 5 4||8 3 7 0 + 0 5 1 6 0 ( 8 8 8 6 0 ) + 0 0 2 9 4 0 #### 8 8 0 6 5 0")
    assert multiplication_example(7, 8, 1) == "7 * 8||6 5 #### 6 5"
    assert multiplication_operands("9 1 7 3 * 9 4 3 3||1 7 4 3 3 #### 1") == (3719, 3349, 4)
    # read as the tokenizer reads it: a tab around the "*" was no multiplication, so its pair was not held out
    assert multiplication_operands("9 1 7 3\t*\t9 4 3 3") == multiplication_operands(" 9 1 7 3  *  9 4 3 3 ") == \
        (3719, 3349, 4)


def test_vectorized_lines_equal_the_reference_for_every_size():
    for n in (1, 2, 3, 6, 8, 9, 10, 12):  # 10 and 12 exceed int64 and take the per-line path
        pairs = multiplication_pairs(n, 100, seed=n)
        assert multiplication_lines(pairs, n) == [multiplication_example(a, b, n) for a, b in pairs]


@pytest.mark.parametrize("a, b, n, message", [
    (999, 1234, 4, "a=999 is not a 4-digit number"), (1234, 10000, 4, "b=10000 is not a 4-digit number"),
    (1234.0, 1234, 4, "a=1234.0"), (True, 5, 1, "a=True"), (12, 12, 0, "positive integer"),
])
def test_operands_of_the_wrong_size_are_refused(a, b, n, message):
    with pytest.raises(ValueError, match=message):
        multiplication_example(a, b, n)
    with pytest.raises(ValueError, match=message):
        multiplication_lines([(a, b)], n)


@pytest.mark.parametrize("source", ["1 2 3 4", "1 2 * 3", "1 2 * 3 x", "12 * 34", " * ", "1 * 2 * 3"])
def test_operands_are_parsed_only_from_multiplication_inputs(source):
    with pytest.raises(ValueError, match="not the input of a multiplication line"):
        multiplication_operands(source)


def test_full_size_training_set_is_distinct_and_leaves_out_the_published_pairs(tmp_path):
    path = write_multiplication_training_set(tmp_path / "train.txt", 4, 808_000, seed=0)
    lines = path.read_text().splitlines()
    assert len(lines) == 808_000 and len(set(lines)) == 808_000
    published = {line.split("||")[0] for split in PUBLISHED_SPLITS
                 for line in published_file("4x4", split).read_text().splitlines()}
    assert not published & {line.split("||")[0] for line in lines}
    for line in lines[::4000]:
        assert multiplication_example(*multiplication_operands(line)) == line
    # Without the exclusion the same draw holds published pairs, so the check above is not vacuous.
    unfiltered = multiplication_pairs(4, 808_000, seed=0, exclude_published=False)
    assert set(unfiltered) & published_multiplication_pairs(4)


def test_generator_is_deterministic_per_seed():
    first = multiplication_training_set(5, 2000, seed=3)
    assert first == multiplication_training_set(5, 2000, seed=3)
    assert first != multiplication_training_set(5, 2000, seed=4)
    assert len(set(first)) == 2000
    assert all(10_000 <= a < 100_000 and 10_000 <= b < 100_000 for a, b in multiplication_pairs(5, 2000, seed=3))


def test_exclusions_sparse_and_dense():
    every_pair = {(a, b) for a in range(10, 100) for b in range(10, 100)}  # 8,100 pairs of 2-digit numbers
    excluded = set(sorted(every_pair)[::8])                                  # 1,013 of them
    sparse = multiplication_pairs(2, 2000, seed=1, exclude=excluded, exclude_published=False)
    assert len(set(sparse)) == 2000 and not set(sparse) & excluded and set(sparse) <= every_pair
    dense = multiplication_pairs(2, len(every_pair) - len(excluded), seed=1, exclude=excluded)
    assert sorted(dense) == sorted(every_pair - excluded)
    with pytest.raises(ValueError, match="only 7,087 remain after the 1,013 excluded"):
        multiplication_pairs(2, 7088, seed=1, exclude=excluded)
    assert sorted(multiplication_pairs(1, 100, seed=0)) == [(a, b) for a in range(10) for b in range(10)]
    # a pair not of n-digit numbers (another n's) excludes nothing, not the n-digit pair its index would fall on
    assert sorted(multiplication_pairs(1, 100, seed=0, exclude=[(5, 12), (5, -1), (12, 5)])) == sorted(
        multiplication_pairs(1, 100, seed=0))


def test_published_pairs_are_those_of_both_splits():
    pairs = published_multiplication_pairs(7)
    assert len(pairs) == 2000
    assert multiplication_operands(read_published("7x7", "test")[-1].input)[:2] in pairs
    assert published_multiplication_pairs(3) == set()


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=4, size=-1, seed=0), "size must be"), (dict(n=4, size=10, seed=1.5), "seed must be an integer"),
    (dict(n=0, size=10, seed=0), "number of digits"),
])
def test_generator_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        multiplication_pairs(**kwargs)


def test_generator_seed_may_be_a_numpy_integer_and_a_refused_one_names_its_type():
    """A NumPy seed was refused as "seed must be an integer, got 3" (numpy 1's repr): integer or not, it read
    the same. kpro's arguments take NumPy integers (kpro._numbers)."""
    assert multiplication_pairs(4, 10, np.int64(3)) == multiplication_pairs(4, 10, 3)
    with pytest.raises(ValueError, match=r"seed must be an integer, got .* \(float64\)$"):
        multiplication_pairs(4, 10, np.float64(3))


def test_reader_parses_multiplication_and_gsm8k_lines():
    mult = read_published("4x4", "test")[0]
    assert mult == CoTExample("7 6 9 2 * 1 6 3 6", mult.cot, "7 8 0 3 7 8 8 1")
    assert mult.cot.startswith("7 6 9 2 0 + 0 2 0 8 7 1 (") and mult.cot.endswith("+ 0 0 0 2 0 8 7 1")
    gsm8k = read_published("gsm8k", "test")
    assert len(gsm8k) == 1319 and len(read_published("gsm8k", "valid")) == 500
    assert gsm8k[0].cot == "<<16-3-4=9>> <<9*2=18>>" and gsm8k[0].answer == "18"
    assert gsm8k[0].input.startswith("Janet’s ducks lay 16 eggs") and gsm8k[0].input.endswith("farmers' market?")
    empty = [example for example in gsm8k if not example.cot]
    assert len(empty) == 18 and empty[0].answer == "26"
    assert parse_line("How many?|| #### 1,450,000\n") == CoTExample("How many?", "", "1,450,000")


@pytest.mark.parametrize("task", list(PUBLISHED_TASKS))
def test_every_published_line_survives_a_round_trip(task):
    for split in PUBLISHED_SPLITS:
        lines = published_file(task, split).read_text(encoding="utf-8").splitlines()
        assert [parse_line(line).line() for line in lines] == lines


@pytest.mark.parametrize("bad, reason", [
    ("1 2 * 3 4 5 6 #### 7", "expected one '\\|\\|' after the input, found 0"),
    ("a||b||c #### 1", "expected one '\\|\\|' after the input, found 2"),
    ("question||<<1+1=2>> 2", "expected one '####' before the answer, found 0"),
    ("question||a #### 1 #### 2", "expected one '####' before the answer, found 2"),
    ("question||<<1+1=2>> #### ", "the answer after '####' is empty"),
    ("  ||<<1+1=2>> #### 2", "the input is empty"),
    # split silently before: a '|' in the CoT, a '#' in the answer, the '####' in the input
    ("a|||b #### 1", "expected one '\\|\\|' after the input, found '\\|\\|\\|'"),
    ("a||b ##### 1", "expected one '####' before the answer, found '#####'"),
    ("a #### x||b #### 1", "'####' inside the input, before '\\|\\|'"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, bad, reason):
    path = tmp_path / "data.txt"
    path.write_text("2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0\n\nq|| #### 3\n" + bad + "\nq|| #### 4\n")
    with pytest.raises(DataFormatError, match=f"^{path}:4: {reason}"):
        read_examples(path)
    assert len(read_examples(path, limit=2)) == 2  # stops before the bad line


def test_published_file_names_the_choices():
    with pytest.raises(ValueError, match="the published ones are 4x4, 5x5, 7x7, 9x9, gsm8k"):
        published_file("3x3", "test")
    with pytest.raises(ValueError, match="training sets are generated"):
        published_file("4x4", "train")


def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes("1 2 * 3 4||5 6 #### 7 8\n".encode() * 3 + b"\xff\xfe bad\n")
    with pytest.raises(DataFormatError, match=rf"{path}:4: not UTF-8 text \(byte 1 of the line, .*save the file "
                                              "as UTF-8"):
        read_examples(path)


def test_a_byte_order_mark_is_not_part_of_the_first_symbol(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\ufeff1 2 * 3 4||5 6 #### 7 8\n9 9 * 1 1||2 #### 3\n", encoding="utf-8")
    assert read_examples(path)[0] == CoTExample("1 2 * 3 4", "5 6", "7 8")
    # One further on (two such files joined with cat) was kept in the line: '\ufeff9' became a symbol of its own.
    path.write_text("\ufeff1 2 * 3 4||5 6 #### 7 8\n\ufeff9 9 * 1 1||2 #### 3\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=rf"{path}:2: a byte-order mark \(U\+FEFF\) inside the text"):
        read_examples(path)


def test_limit_takes_the_first_examples_and_refuses_nonsense(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1 2||3 #### 4\n\n5 6||7 #### 8\n9 9||1 #### 2\n")
    assert [e.input for e in read_examples(path, limit=2)] == ["1 2", "5 6"] and read_examples(path, limit=0) == []
    for bad in (-1, 1.5, "3", True):  # -1 meant "all" in the official code; here it gave no examples
        with pytest.raises(ValueError, match="limit must be an integer >= 0, or None for every example"):
            read_examples(path, limit=bad)


def test_a_training_set_that_fails_midway_leaves_the_old_one_and_no_temporary(tmp_path, monkeypatch):
    """It was written to `train.txt.partial` (no fsync, never removed after a failure) and renamed: the command
    reuses the file where it exists, so a truncated one must never be renamed into place."""
    from kpro.internalize import multiplication

    path = write_multiplication_training_set(tmp_path / "train.txt", 2, 300, seed=0)
    before = path.read_bytes()
    calls = []

    def failing(pairs, n):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return encode(pairs, n)
    encode = multiplication._encoded_lines
    monkeypatch.setattr(multiplication, "_CHUNK", 100)  # 400 pairs: four chunks
    monkeypatch.setattr(multiplication, "_encoded_lines", failing)
    with pytest.raises(OSError, match=r"cannot write .*train.txt: no space left on device"):
        write_multiplication_training_set(path, 2, 400, seed=1)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["train.txt"]
