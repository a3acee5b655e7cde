import json
from pathlib import Path

import pytest

from tempo.data import (
    INSTRUCTION,
    Problem,
    format_prompt,
    load_problems,
    mark_labeled,
    split_labeled,
)
from tempo.errors import ConfigError, DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [
    {"prompt": "What is 12 * 12?", "answer": 144.0, "source": "amc", "id": "a"},
    {"prompt": "What is 5 / 2?", "answer": 2.5, "source": "amc"},  # one type per parquet column
    {"prompt": "Name a prime.", "source": "amc", "id": "c"},
]
VERL_ROW = {
    "data_source": "aime",
    "prompt": [{"role": "user", "content": "Find x."}],
    "reward_model": {"style": "rule", "ground_truth": "33"},
    "extra_info": {"index": 0},
}


def write(path: Path, rows) -> Path:
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        # Columns for the keys of all rows: Table.from_pylist would keep the first row's only.
        keys = list(dict.fromkeys(key for row in rows for key in row))
        columns = {key: [row.get(key) for row in rows] for key in keys}
        pyarrow.parquet.write_table(pyarrow.Table.from_pydict(columns), path)
    elif path.suffix == ".jsonl":
        path.write_text("\n\n".join(json.dumps(row) for row in rows) + "\n\n")  # blank lines
    else:
        path.write_text(json.dumps(rows))
    return path


def one_line_error(error_type, call, *, contains: list[str]) -> str:
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for part in contains:
        assert part in message
    return message


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_load_every_format(tmp_path, suffix):
    problems = load_problems(write(tmp_path / f"set{suffix}", ROWS))
    assert problems == [
        Problem("a", "What is 12 * 12?", "144.0", True, "amc"),  # number kept as written
        Problem("amc-1", "What is 5 / 2?", "2.5", True, "amc"),  # id from source and row
        Problem("c", "Name a prime.", None, False, "amc"),  # no answer: unlabeled
    ]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_load_verl_rows(tmp_path, suffix):
    # In parquet the second row gets answer=None and the first reward_model=None.
    other = {"prompt": [{"role": "user", "content": "Q"}], "answer": "7", "data_source": "amc"}
    problems = load_problems(write(tmp_path / f"verl{suffix}", [VERL_ROW, other]))
    assert problems == [
        Problem("aime-0", VERL_ROW["prompt"], "33", True, "aime"),
        Problem("amc-1", other["prompt"], "7", True, "amc"),
    ]


def test_load_source_argument_and_custom_keys(tmp_path):
    path = write(tmp_path / "set.json", [{"question": "Q?", "solution": 7, "uid": 5}])
    (problem,) = load_problems(
        path, source="mine", prompt_key="question", answer_key="solution", id_key="uid"
    )
    assert problem == Problem("5", "Q?", "7", True, "mine")
    (problem,) = load_problems(write(tmp_path / "nosource.json", [{"prompt": "Q?"}]))
    assert (problem.id, problem.source) == ("nosource-0", "nosource")


@pytest.mark.parametrize("name, count", [("aime2024", 30), ("amc2023", 83), ("math500", 500)])
def test_load_shared_sets(name, count):
    path = SHARED_DATA / f"{name}.json"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    problems = load_problems(path)
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    for p in problems:
        assert isinstance(p.prompt, str) and p.prompt.strip()
        assert p.answer and p.is_labeled


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"prompt": "a"},\n{"prompt": }]')
    one_line_error(DataError, lambda: load_problems(path), contains=[str(path), "line 2"])
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    one_line_error(DataError, lambda: load_problems(path), contains=[str(path), "line 3"])
    path = tmp_path / "dict.json"
    path.write_text('{"prompt": "a"}')
    one_line_error(DataError, lambda: load_problems(path), contains=[str(path), "list"])


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    one_line_error(DataError, lambda: load_problems(path), contains=[str(path), "parquet"])


@pytest.mark.parametrize(
    "row, contains",
    [
        ({"answer": "1"}, "missing 'prompt'"),
        ({"prompt": "  ", "answer": "1"}, "missing 'prompt'"),
        ({"prompt": [], "answer": "1"}, "missing 'prompt'"),
        ({"prompt": 5, "answer": "1"}, "'prompt' must be text"),
        ({"prompt": [{"role": "user"}], "answer": "1"}, "'prompt' must be text"),
        ({"prompt": "Q", "answer": ["1", "2"]}, "'answer' must be text or a number"),
        ({"prompt": "Q", "reward_model": {"ground_truth": {}}}, "'reward_model.ground_truth'"),
        (["not", "an", "object"], "expected an object"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path, row, contains):
    path = write(tmp_path / "rows.json", [{"prompt": "fine", "answer": "1"}, row])
    one_line_error(DataError, lambda: load_problems(path), contains=[str(path), "row 1", contains])


def test_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"prompt": "fine"}, {"answer": "1"}])
    one_line_error(DataError, lambda: load_problems(path), contains=["line 3", "missing 'prompt'"])


def test_missing_answer_is_unlabeled(tmp_path):
    rows = [{"prompt": "Q1"}, {"prompt": "Q2", "answer": None}, {"prompt": "Q3", "answer": " "}]
    problems = load_problems(write(tmp_path / "unlabeled.json", rows))
    assert [(p.answer, p.is_labeled) for p in problems] == [(None, False)] * 3


def test_file_level_errors(tmp_path):
    missing = tmp_path / "nope.json"
    one_line_error(
        DataError, lambda: load_problems(missing), contains=[f"data file not found: {missing}"]
    )
    csv = tmp_path / "set.csv"
    csv.write_text("prompt,answer\n")
    one_line_error(DataError, lambda: load_problems(csv), contains=[str(csv), "'.csv'", ".jsonl"])
    empty = write(tmp_path / "empty.json", [])
    one_line_error(DataError, lambda: load_problems(empty), contains=[str(empty), "no problems"])
    duplicate = write(tmp_path / "dup.json", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}])
    one_line_error(
        DataError, lambda: load_problems(duplicate), contains=["row 1", "duplicate id '1'"]
    )


def make_problems(n: int, n_without_answer: int = 0) -> list[Problem]:
    """p0..p{n-1}; the first `n_without_answer` have no answer."""
    answers = [None if i < n_without_answer else str(i) for i in range(n)]
    return [Problem(f"p{i}", f"Q{i}", a, a is not None, "t") for i, a in enumerate(answers)]


def test_split_labeled_is_deterministic_and_sized():
    problems = make_problems(100)
    labeled, unlabeled = split_labeled(problems, 0.3, seed=1)
    assert (labeled, unlabeled) == split_labeled(problems, 0.3, seed=1)
    assert labeled != split_labeled(problems, 0.3, seed=2)[0]
    assert len(labeled) == 30 and len(unlabeled) == 70
    assert all(p.is_labeled for p in labeled) and not any(p.is_labeled for p in unlabeled)
    assert all(p.answer is not None for p in unlabeled)  # kept for scoring
    assert sorted(p.id for p in labeled + unlabeled) == sorted(p.id for p in problems)
    assert labeled == sorted(labeled, key=lambda p: int(p.id[1:]))  # input order kept
    assert split_labeled(problems, 0.0, seed=0) == ([], mark_labeled(problems, False))
    assert split_labeled(problems, 1.0, seed=0) == (problems, [])


def test_split_labeled_draws_only_problems_with_answers():
    problems = make_problems(10, n_without_answer=4)
    for seed in range(5):
        labeled, unlabeled = split_labeled(problems, 0.6, seed)
        assert len(labeled) == 6 and all(p.answer is not None for p in labeled)
    one_line_error(ConfigError, lambda: split_labeled(problems, 0.7, 0), contains=["only 6 of 10"])
    one_line_error(ConfigError, lambda: split_labeled(problems, 1.5, 0), contains=["[0, 1]"])


def test_mark_labeled():
    problems = make_problems(3)
    assert [p.is_labeled for p in mark_labeled(problems, False)] == [False] * 3
    assert [p.answer for p in mark_labeled(problems, False)] == ["0", "1", "2"]
    one_line_error(DataError, lambda: mark_labeled(make_problems(3, 1), True), contains=["'p0'"])


class ChatTokenizer:
    """Stands in for a Hugging Face tokenizer: records how the template is applied."""

    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        turns = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return f"{turns}<assistant>"


def test_format_prompt_templates():
    text = Problem("1", "What is 1+1?", "2", True, "t")
    assert format_prompt(text, "raw") == "What is 1+1?"
    assert format_prompt(text, "plain") == f"What is 1+1?\n{INSTRUCTION}\n"
    chat = format_prompt(text, "chat", ChatTokenizer())
    assert chat == f"<user>What is 1+1?\n{INSTRUCTION}<assistant>"
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    messages = Problem("2", turns, "2", True, "t")
    assert format_prompt(messages, "chat", ChatTokenizer()) == "<system>S<user>U<assistant>"


def test_format_prompt_errors():
    text = Problem("1", "Q", "2", True, "t")
    messages = Problem("2", [{"role": "user", "content": "U"}], "2", True, "t")
    for call, contains in [
        (lambda: format_prompt(text, "fancy"), ["'fancy'", "raw, plain, chat"]),
        (lambda: format_prompt(text, "chat"), ["tokenizer"]),
        (lambda: format_prompt(messages, "plain"), ["'2'", "'chat'"]),
    ]:
        one_line_error(ConfigError, call, contains=contains)
