"""Hostile input, fuzzed: over a thousand generated cases through the data loaders, the config
parser, the grader and vote aggregation. Each either works or fails with the project's own
one-line error naming the file, key or row; nothing else escapes, nothing hangs, and the C++
and Python vote paths agree on every answer."""
import json
import random
import time

import torch

from tempo import vote
from tempo.config import load_config
from tempo.data import load_problems
from tempo.errors import ConfigError, DataError
from tempo.grading import grade_many

SEED = 20261201
VALID_ROWS = [{"id": f"p{i}", "prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(6)]

# Pieces of answers and responses that have broken graders before.
PIECES = ["\\boxed{", "}", "{", "\\frac", "\\dfrac{1}{2}", "1", "23", "-", ".", ",", "x", "^", "\\pi", "°",
          "\\text{", "\\mbox{cm}", "$", " ", "\n", "\\left(", "\\right)", "\\!", "=", "\\sqrt{", "\\circ",
          "The answer is ", "Final Answer: ", "é", "\x00", "\\infty", "1,000", "0.50", "\\\\", "\\boxed 7",
          "∞", "\ufeff", "\\begin{pmatrix}", "&", "\\end{pmatrix}", "\\in", "(", ")", "[", "]"]


def hostile_answers(rng: random.Random, count: int) -> list[str]:
    """Generated answers: random mixes of PIECES plus the named extremes."""
    extremes = ["", " ", "\\boxed{", "\\boxed{" * 200, "{" * 10_000 + "}" * 10_000, "\\boxed{" + "{" * 10_000,
                "9" * 100_000, "-" + "1" * 100_000, "1" * 5_000 + "/" + "3" * 5_000,
                "0." + "0" * 50_000 + "1", "1,000," * 1_000, "a" * (1 << 20),
                "\\frac{" * 300 + "1" + "}{2}" * 300, "x^{" * 400 + "2" + "}" * 400,
                "2^{2^{2^{2^{2^{2^{2}}}}}}", "10^{10^{10^{10}}}", "\\sqrt{" * 500 + "2" + "}" * 500]
    out = list(extremes)
    while len(out) < count:
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))))
    return out


# -- data files --------------------------------------------------------------------------

def data_cases(rng: random.Random, count: int):
    """(file name, bytes) pairs: valid files broken in one way each."""
    good = json.dumps(VALID_ROWS).encode()
    wrong_values = [None, 1, 1.5, True, [], {}, [1, 2], {"role": "user"}, "", "  ", "x" * (1 << 20),
                    [{"role": "user", "content": 3}], [{"role": "user", "content": "hi"}]]
    for i in range(count):
        kind = i % 8
        if kind == 0:  # truncated anywhere
            yield "trunc.json", good[: rng.randrange(len(good))]
        elif kind == 1:  # one byte flipped (some flips are not UTF-8)
            b = bytearray(good)
            b[rng.randrange(len(b))] = rng.randrange(256)
            yield "flip.json", bytes(b)
        elif kind == 2:  # a field of one row given a hostile value
            rows = json.loads(good)
            rows[rng.randrange(len(rows))][rng.choice(["prompt", "answer", "id"])] = rng.choice(wrong_values)
            yield "field.json", json.dumps(rows).encode()
        elif kind == 3:  # a field missing, or the row not an object
            rows = json.loads(good)
            j = rng.randrange(len(rows))
            if rng.random() < 0.5:
                rows[j].pop(rng.choice(["prompt", "answer", "id"]))
            else:
                rows[j] = rng.choice([None, 1, "row", [1]])
            yield "row.json", json.dumps(rows).encode()
        elif kind == 4:  # the top level is not a list
            yield "top.json", json.dumps(rng.choice([{}, "x", 1, None, {"rows": VALID_ROWS}])).encode()
        elif kind == 5:  # JSON lines with a bad or hostile line
            lines = [json.dumps(r) for r in VALID_ROWS]
            lines.insert(rng.randrange(len(lines)), rng.choice(["{", "[]", "null", "\xff\xfe", "", "{\"prompt\": 1}"]))
            yield "lines.jsonl", "\n".join(lines).encode("utf-8", "surrogateescape")
        elif kind == 6:  # duplicate ids, non-UTF-8 bytes in a prompt, a 1 MB prompt
            rows = json.loads(good)
            choice = rng.randrange(3)
            if choice == 0:
                rows[1]["id"] = rows[0]["id"]
                yield "dup.json", json.dumps(rows).encode()
            elif choice == 1:
                yield "latin1.json", json.dumps(rows).replace("What", "Wh\u00e4t").encode("latin-1")
            else:
                rows[0]["prompt"] = "7" * (1 << 20)
                yield "big.json", json.dumps(rows).encode()
        else:  # parquet: garbage, truncated, or a column of the wrong type
            yield "data.parquet", _parquet_case(rng)


def _parquet_case(rng: random.Random) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    choice = rng.randrange(3)
    if choice == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    table = pa.table({"prompt": [r["prompt"] for r in VALID_ROWS] if choice == 1 else list(range(6)),
                      "answer": [r["answer"] for r in VALID_ROWS]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    return data[: rng.randrange(len(data))] if choice == 1 else data


def test_data_files_load_or_fail_with_the_file_and_row(tmp_path):
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "rejected": 0}
    for i, (name, content) in enumerate(data_cases(rng, 320)):
        path = tmp_path / f"{i}-{name}"
        path.write_bytes(content)
        try:
            problems = load_problems(path)
        except DataError as err:
            message = str(err)
            assert str(path) in message and "\n" not in message, message
            outcomes["rejected"] += 1
            continue
        assert problems and all(isinstance(p.prompt, (str, list)) for p in problems)
        assert all(p.answer is None or isinstance(p.answer, str) for p in problems)
        outcomes["loaded"] += 1
    assert outcomes["rejected"] > 150 and outcomes["loaded"] > 20, outcomes


# -- config files and overrides ----------------------------------------------------------

GOOD_CONFIG = """task:
  modulus: 7
  num_labeled: 64
rollout:
  n: 8
  temperature: 1.0
train:
  steps: 40
  policy_lr: 0.00005
  betas: [0.9, 0.999]
  critic_lr: null
algorithm:
  method: tempo
run:
  resume: never
"""
HOSTILE_SCALARS = ["abc", "-1", "0", "1e999", ".nan", "-.inf", "[1, 2", "{a: 1}", "[]", "{}", "null", "~", "yes",
                   "99999999999999999999999", "'\\x00'", "!!python/object:os.system ls", "&a [*a]", "1.5", '"7"']


def config_cases(rng: random.Random, count: int):
    lines = GOOD_CONFIG.splitlines()
    for i in range(count):
        kind = i % 5
        mutated = list(lines)
        if kind == 0:  # a value replaced
            j = rng.choice([k for k, line in enumerate(mutated) if line.startswith("  ")])
            key = mutated[j].split(":")[0]
            mutated[j] = f"{key}: {rng.choice(HOSTILE_SCALARS)}"
        elif kind == 1:  # a line dropped, duplicated or re-indented
            j = rng.randrange(len(mutated))
            op = rng.randrange(3)
            if op == 0:
                del mutated[j]
            elif op == 1:
                mutated.insert(j, mutated[j])
            else:
                mutated[j] = rng.choice(["", " ", "\t", "    "]) + mutated[j].strip()
        elif kind == 2:  # an unknown key or section, a non-string key
            mutated.insert(rng.randrange(len(mutated) + 1),
                           rng.choice(["  stepz: 3", "trian:", "  1: 2", "? [a]\n  : 1", "task: 5", "- x"]))
        elif kind == 3:  # not a mapping at all, or not UTF-8
            yield rng.choice([b"- 1\n- 2\n", b"just text", b"\xff\xfe\x00", b"", b"task: [\n", b"{{{{"])
            continue
        else:  # truncated
            text = "\n".join(mutated)
            yield text[: rng.randrange(len(text))].encode()
            continue
        yield "\n".join(mutated).encode()


def test_config_files_and_overrides_parse_or_name_the_key(tmp_path):
    rng = random.Random(SEED)
    outcomes = {"parsed": 0, "rejected": 0}
    path = tmp_path / "run.yaml"
    for content in config_cases(rng, 250):
        path.write_bytes(content)
        try:
            load_config(path)
            outcomes["parsed"] += 1
        except ConfigError as err:
            assert str(path) in str(err) or "." in str(err).split(":")[0], str(err)
            outcomes["rejected"] += 1
    for _ in range(150):
        override = rng.choice(["train.steps", "train.betas", "run.resume", "train", ".steps", "x.y", "train.stepz",
                               "task.modulus", ""]) + rng.choice(["=", "", "=="]) + rng.choice(HOSTILE_SCALARS)
        try:
            load_config(None, [override])
            outcomes["parsed"] += 1
        except ConfigError as err:
            assert "\n" not in str(err), str(err)
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 200 and outcomes["parsed"] > 20, outcomes


# -- grading and voting ------------------------------------------------------------------

def test_grading_hostile_responses_is_bounded_in_time():
    rng = random.Random(SEED)
    answers = hostile_answers(rng, 300)
    responses = [f"Work... \\boxed{{{a}}}" if i % 2 else a for i, a in enumerate(answers)]
    truths = [rng.choice(["5", "\\frac{1}{2}", "1000", "x^2", a[:20] or "0"]) for a in answers]
    timeout = 1.0
    start = time.perf_counter()
    grades = grade_many(responses, truths, timeout=timeout)
    elapsed = time.perf_counter() - start
    assert len(grades) == len(responses)
    assert all(isinstance(g.correct, bool) for g in grades)
    # Every check is bounded by the timeout; concurrency only helps.
    assert elapsed < 45, f"{elapsed:.1f} s for {len(responses)} hostile responses"


def test_cpp_and_python_votes_agree_on_hostile_answers(monkeypatch):
    rng = random.Random(SEED)
    answers = hostile_answers(rng, 400) + [None]
    cpp_canon = [vote.canonicalize(a) for a in answers]
    cpp_hash = vote.hash_answers(answers)
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", "python")
    py_canon = [vote.canonicalize(a) for a in answers]
    py_hash = vote.hash_answers(answers)
    mismatched = [a[:40] for a, c, p in zip(answers, cpp_canon, py_canon) if c != p]
    assert not mismatched, mismatched[:5]
    assert torch.equal(cpp_hash, py_hash)
    offsets = torch.tensor([0] + sorted(rng.sample(range(1, len(answers)), 40)) + [len(answers)])
    py = vote.aggregate(py_hash, offsets)
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", "cpp")
    cpp = vote.aggregate(cpp_hash, offsets)
    for name in ("majority", "majority_count", "agreement", "distinct"):
        assert torch.equal(getattr(py, name), getattr(cpp, name)), name
    assert torch.allclose(py.entropy, cpp.entropy)
