"""tempo.vote: canonicalisation table, C++ extension == pure-Python fallback, aggregation against a
collections.Counter reference, merge_equivalent, and an nvcc compile check of csrc/*.cu."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from tempo import vote
from tempo.grading import normalize_answer

ROOT = Path(__file__).resolve().parents[1]


def test_the_extension_is_built():
    """Users get the announced Python fallback; the test suite insists on the extension, so that
    its C++ cases below run rather than disappear."""
    assert vote._ext is not None, f"tempo._vote_ext does not import: {vote._EXT_ERROR}"

# Canonicalisation table: (raw answer, canonical form or None for "no answer").
CANON = [
    ("42", "42"),
    ("  42 \n", "42"),
    ("$42$", "42"),
    ("$$ 42 $$", "42"),
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{3}{4}", "\\frac{3}{4}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\left\\{1,2\\right\\}", "\\{1,2\\}"),
    ("\\left.x\\right.", "x"),
    ("1\\,000", "1000"),
    ("1\\!000", "1000"),
    ("a\\;b", "ab"),
    ("\\alpha\\!b", "\\alpha b"),
    ("\\text{cm}", "cm"),
    ("5\\text{ cm}", "5cm"),
    ("\\mathrm{(B)}", "(B)"),
    ("\\textbf{Yes}", "Yes"),
    ("\\text{\\textbf{7}}", "7"),
    ("\\text{5", "\\text{5"),
    ("\\textit{5}", "\\textit{5}"),
    ("\\text {7}", "7"),
    ("3.0", "3"),
    ("3.00", "3"),
    ("12.50", "12.5"),
    (".5", "0.5"),
    ("007", "7"),
    ("-0", "0"),
    ("-0.0", "0"),
    ("+12", "12"),
    ("-12.0", "-12"),
    ("0", "0"),
    ("1e5", "1e5"),
    ("x=5", "5"),
    ("x = 5", "5"),
    ("y=2x+1", "2x+1"),
    ("x=", "x="),
    ("xy=5", "xy=5"),
    ("5.", "5"),
    ("5...", "5"),
    ("\\.", "\\."),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("30 ^ { \\circ }", "30"),
    ("\\angle A = 30^\\circ.", "\\angle A=30"),
    ("30^\\circle", "30^\\circle"),
    ("\\frac 1 2", "\\frac12"),
    ("\\pi r^2", "\\pi r^2"),
    ("2 \\pi", "2\\pi"),
    ("$x = \\dfrac{1}{2}$.", "\\frac{1}{2}"),
    ("\\text{x}=05", "5"),
    ("(1, 2)", "(1,2)"),
    ("\\sqrt{2}", "\\sqrt{2}"),
    ("½", "½"),
    ("5 °", "5"),
    ("30\\degree", "30"),
    ("\\degreex", "\\degreex"),
    ("\\mbox{cm}", "cm"),
    ("\\$5", "5"),
    ("1,000", "1000"),
    ("-12,345.50", "-12345.5"),
    ("1,00", "1,00"),
    ("1234,567", "1234,567"),
    ("(1,000)", "(1,000)"),
    ("x=y=2", "x=y=2"),
    ("5x-7y+11z+4=0", "5x-7y+11z+4=0"),
    (None, None),
    ("", None),
    ("   ", None),
    ("$$", None),
    ("$ $", None),
    (".", None),
    ("\\left.\\right.", None),
    ("\\text{}", None),
]

BACKENDS = ["python", "cpp"]


def canon_fn(which):
    return vote._py_canonicalize if which == "python" else vote._ext.canonicalize


def hash_fn(which):
    return vote._py_hash_answers if which == "python" else vote._ext.hash_answers


def aggregate_fn(which):
    return vote._py_aggregate if which == "python" else torch.ops.tempo_vote.aggregate


def grading_canon(raw):
    """Grading's normaliser in the table's terms ("" is no answer there)."""
    return None if raw is None else normalize_answer(raw) or None


@pytest.mark.parametrize("which", BACKENDS + ["grading"])
@pytest.mark.parametrize("raw,expected", CANON, ids=[repr(r) for r, _ in CANON])
def test_canonicalize_table(which, raw, expected):
    """One corpus for the three normalisers: C++ vote, Python vote and grading."""
    canon = grading_canon if which == "grading" else canon_fn(which)
    assert canon(raw) == expected
    if expected is not None:
        assert canon(expected) == expected  # idempotent


@pytest.mark.parametrize("which", BACKENDS)
def test_hash_basics(which):
    h = hash_fn(which)(["5", " $5.0$ ", "x=5", None, "", " . ", "6", "\\dfrac12", "\\frac12"]).tolist()
    assert h[0] == h[1] == h[2] != 0
    assert h[3] == h[4] == h[5] == 0
    assert h[6] not in (0, h[0])
    assert h[7] == h[8] != 0
    with pytest.raises(TypeError):
        hash_fn(which)(["5", 5])


def _fuzz_strings(count, seed):
    rng = random.Random(seed)
    pieces = ["$", " ", "  ", "\t", "\n", "\\left", "\\right", "(", ")", ".", "\\!", "\\,", "\\;", "\\:",
              "\\ ", "\\quad", "\\dfrac", "\\tfrac", "\\frac", "\\text", "\\mathrm", "\\textbf", "{", "}",
              "\\{", "\\}", "^", "\\circ", "x", "y", "=", "0", "00", "1", "5", ".5", "-", "+", "\\alpha", "b",
              "\\", "é", "½", "°", "\ud800", "\\\\", "ab", "12.0"]
    return [None if rng.random() < 0.05 else "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 13)))
            for _ in range(count)]


def test_cpp_equals_python_canonicalize_and_hash():
    answers = _fuzz_strings(4000, seed=0)
    for a in answers:
        assert vote._ext.canonicalize(a) == vote._py_canonicalize(a), repr(a)
    assert torch.equal(vote._ext.hash_answers(answers), vote._py_hash_answers(answers))


class _Str(str):
    pass


def test_cpp_hash_large_batch_and_odd_strings():
    """Above the OpenMP threshold, with non-ASCII strings and str subclasses (serial path)."""
    rng = random.Random(1)
    answers = _fuzz_strings(2000, seed=1) * 20
    for i in rng.sample(range(len(answers)), 300):
        answers[i] = _Str(answers[i] or "x=3")
    assert len(answers) > 2**15
    assert torch.equal(vote._ext.hash_answers(answers), vote._py_hash_answers(answers))
    assert torch.equal(vote._ext.hash_answers(tuple(answers[:100])), vote._py_hash_answers(answers[:100]))


def _random_groups(rng, groups):
    """Ragged groups drawing from a few answers, with empty groups, unparsed groups and ties."""
    hashes, offsets, truth = [], [0], []
    for g in range(groups):
        kind = rng.random()
        pool = [rng.choice([rng.randrange(-2**63, 2**63), rng.randrange(1, 6)]) for _ in range(rng.randrange(1, 6))]
        pool = [p or 7 for p in pool]
        size = rng.choice([0, 1, 2, 3, 8, 64, rng.randrange(0, 100)])
        if kind < 0.1:
            group = [0] * size  # nothing parsed
        elif kind < 0.25 and len(pool) >= 2:
            a, b = pool[0], pool[1] if pool[1] != pool[0] else pool[0] + 1
            group = [b, a, a, b, 0] * max(1, size // 5)  # a tie: b occurs first and wins
        else:
            group = [0 if rng.random() < 0.2 else rng.choice(pool) for _ in range(size)]
        hashes += group
        offsets.append(len(hashes))
        truth.append(rng.choice(pool + [0]))
    long = torch.long
    return torch.tensor(hashes, dtype=long), torch.tensor(offsets, dtype=long), torch.tensor(truth, dtype=long)


def _reference(hashes, offsets, truth):
    h, off, tr = hashes.tolist(), offsets.tolist(), truth.tolist()
    rows = []
    for g in range(len(off) - 1):
        group = h[off[g]:off[g + 1]]
        counts = Counter(x for x in group if x != 0)
        maj, cnt = counts.most_common(1)[0] if counts else (0, 0)  # ties: first encountered
        m = sum(counts.values())
        ent = -sum(c / m * math.log(c / m) for c in counts.values()) if m else 0.0
        rows.append(dict(majority=maj, majority_count=cnt, distinct=len(counts), entropy=ent,
                         agreement=[float(maj != 0 and x == maj) for x in group],
                         correct=counts[tr[g]] if tr[g] else 0, majority_correct=maj != 0 and maj == tr[g]))
    return rows


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aggregate_matches_counter_reference(which, seed):
    rng = random.Random(seed)
    hashes, offsets, truth = _random_groups(rng, rng.randrange(1, 60))
    out = aggregate_fn(which)(hashes, offsets, truth)
    majority, majority_count, agreement, distinct, entropy, correct, majority_correct = out
    assert agreement.dtype == entropy.dtype == torch.float32 and majority_correct.dtype == torch.bool
    for g, row in enumerate(_reference(hashes, offsets, truth)):
        b, e = int(offsets[g]), int(offsets[g + 1])
        assert int(majority[g]) == row["majority"] and int(majority_count[g]) == row["majority_count"]
        assert int(distinct[g]) == row["distinct"]
        assert float(entropy[g]) == pytest.approx(row["entropy"], rel=1e-6, abs=1e-7)
        assert agreement[b:e].tolist() == row["agreement"]
        assert int(correct[g]) == row["correct"] and bool(majority_correct[g]) == row["majority_correct"]


def test_tie_break_and_edge_groups():
    a, b = 11, 22
    hashes = torch.tensor([0, b, a, a, b, 0, 0, a], dtype=torch.long)
    offsets = torch.tensor([0, 0, 5, 7, 8, 8])  # empty, tie (b first), nothing parsed, single, empty
    stats = vote.aggregate(hashes, offsets, truth=torch.tensor([a, a, 0, a, 5]))
    assert stats.majority.tolist() == [0, b, 0, a, 0]
    assert stats.majority_count.tolist() == [0, 2, 0, 1, 0]
    assert stats.agreement.tolist() == [0, 1, 0, 0, 1, 0, 0, 1]
    assert stats.distinct.tolist() == [0, 2, 0, 1, 0]
    assert stats.entropy.tolist() == pytest.approx([0, math.log(2), 0, 0, 0])
    assert stats.correct.tolist() == [0, 2, 0, 1, 0]
    assert stats.majority_correct.tolist() == [False, False, False, True, False]
    plain = vote.aggregate(hashes, offsets)
    assert plain.correct is None and plain.majority_correct is None


@pytest.mark.parametrize("seed", [3, 4])
def test_cpp_equals_python_aggregate(seed):
    rng = random.Random(seed)
    hashes, offsets, truth = _random_groups(rng, 200)
    for t in (truth, None):
        cpp = torch.ops.tempo_vote.aggregate(hashes, offsets, t)
        py = vote._py_aggregate(hashes, offsets, t)
        for x, y in zip(cpp, py):
            assert x.dtype == y.dtype and torch.equal(x, y)  # bit-identical, entropy included


def test_cpp_equals_python_aggregate_large():
    """Above the OpenMP threshold (2**18 samples), one group larger than the rest."""
    g = torch.Generator().manual_seed(0)
    hashes = torch.randint(-3, 4, (64 * 4500 + 5000,), generator=g) * 1_000_003
    offsets = torch.cat([torch.arange(0, 64 * 4501, 64), torch.tensor([hashes.numel()])])
    truth = torch.randint(-3, 4, (offsets.numel() - 1,), generator=g) * 1_000_003
    for x, y in zip(torch.ops.tempo_vote.aggregate(hashes, offsets, truth), vote._py_aggregate(hashes, offsets, truth)):
        assert torch.equal(x, y)


def test_backend_env_and_report(monkeypatch, caplog):
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", "python")
    monkeypatch.setattr(vote, "_reported", set())
    with caplog.at_level(logging.INFO, logger="tempo"):
        assert vote.backend() == "python"
        vote.hash_answers(["1"])
        assert vote.backend() == "python"
    assert sum("pure-Python fallback" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", "auto")
    assert vote.backend() == "cpp"
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", "fast")
    with pytest.raises(ValueError):
        vote.backend()


def test_fallback_when_extension_missing():
    """Without tempo._vote_ext the module falls back to Python on its own and says so once."""
    code = (
        "import sys, logging; sys.modules['tempo._vote_ext'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from tempo import vote\n"
        "assert vote.backend() == 'python' and vote.backend() == 'python'\n"
        "print(vote.aggregate(vote.hash_answers(['1', '1.0', '2']), [0, 3]).majority_count.tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TEMPO_VOTE_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[2]"
    assert res.stderr.count("pure-Python fallback (tempo._vote_ext unavailable") == 1


@pytest.mark.parametrize("which", BACKENDS)
def test_public_api_end_to_end(which, monkeypatch):
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", which)
    answers = ["$5$", "5.0", "x=6", None, "6", "6.", "\\text{7}"]
    hashes = vote.hash_answers(answers)
    truth = vote.hash_answers(["6", "7"])
    stats = vote.aggregate(hashes, [0, 6, 7], truth)
    assert stats.majority.tolist() == [int(truth[0]), int(truth[1])]
    assert stats.majority_count.tolist() == [3, 1]
    assert stats.agreement.tolist() == [0, 0, 1, 0, 1, 1, 1]
    assert stats.correct.tolist() == [3, 1] and stats.majority_correct.tolist() == [True, True]
    with pytest.raises(ValueError):
        vote.aggregate(hashes, [0, 5, 4, 7])
    with pytest.raises(ValueError):
        vote.aggregate(hashes, [0, 6])


def _fraction(s):
    return Fraction(1, 2) if s in ("\\frac12", "\\frac{1}{2}") else Fraction(s)


@pytest.mark.parametrize("which", BACKENDS)
def test_merge_equivalent_calls_only_distinct_classes(which, monkeypatch):
    monkeypatch.setenv("TEMPO_VOTE_BACKEND", which)
    calls = []

    def equivalent(pred, truth):
        calls.append((pred, truth))
        assert pred != truth
        return _fraction(pred) == _fraction(truth)

    answers = ["0.5", "1", "\\frac12", "0.50", "\\dfrac{1}{2}", None, "2", "1.0",  # group 0
               "3", "3.0", "$3$",  # group 1: one class only
               ]
    hashes = vote.hash_answers(answers)
    offsets = [0, 8, 11, 11]
    merged = vote.merge_equivalent(answers, hashes, offsets, equivalent, cache={})
    # classes in group 0: 0.5 | 1 | \frac12 (-> 0.5) | \frac{1}{2} (-> 0.5) | 2
    h = hashes.tolist()
    assert merged.tolist() == [h[0], h[1], h[0], h[0], h[0], 0, h[6], h[1]] + h[8:]
    assert len(calls) == len(set(calls))
    assert ("\\frac12", "0.5") in calls and ("1", "0.5") in calls
    assert all(p != t for p, t in calls)
    stats = vote.aggregate(merged, offsets)
    assert stats.majority.tolist()[:2] == [h[0], h[8]] and stats.majority_count.tolist()[:2] == [4, 3]

    # Cached across calls: the default cache is per callable.
    vote.clear_equivalence_cache()
    calls.clear()
    vote.merge_equivalent(answers, hashes, offsets, equivalent)
    first = len(calls)
    vote.merge_equivalent(answers, hashes, offsets, equivalent)
    assert first > 0 and len(calls) == first
    vote.clear_equivalence_cache()


def test_merge_equivalent_with_grader():
    grading = pytest.importorskip("tempo.grading")
    if not hasattr(grading, "is_equivalent"):
        pytest.skip("tempo.grading.is_equivalent is not available")
    answers = ["0.5", "\\frac{1}{2}", "3", "\\dfrac12", "3.0"]
    hashes = vote.hash_answers(answers)
    merged = vote.merge_equivalent(answers, hashes, [0, 5], grading.is_equivalent, cache={}).tolist()
    assert merged[0] == merged[1] == merged[3] and merged[2] == merged[4] != merged[0]


def test_fake_tensor_registration():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.tempo_vote.aggregate(torch.empty(10, dtype=torch.long), torch.empty(4, dtype=torch.long),
                                             torch.empty(3, dtype=torch.long))
    assert [tuple(t.shape) for t in out] == [(3,), (3,), (10,), (3,), (3,), (3,), (3,)]


@pytest.mark.skipif(not (torch.cuda.is_available() and vote._ext is not None and vote._ext.with_cuda),
                    reason="needs a CUDA build of tempo._vote_ext and a GPU")
def test_cuda_matches_cpu():
    rng = random.Random(5)
    hashes, offsets, truth = _random_groups(rng, 300)
    cpu = torch.ops.tempo_vote.aggregate(hashes, offsets, truth)
    gpu = torch.ops.tempo_vote.aggregate(hashes.cuda(), offsets.cuda(), truth.cuda())
    for i, (x, y) in enumerate(zip(cpu, gpu)):
        if i == 4:  # entropy: summed in another order
            torch.testing.assert_close(y.cpu(), x, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(y.cpu(), x)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Compile-check csrc/*.cu for sm_90. The torch wrapper needs c10's generated
    cuda_cmake_macros.h, which a CPU-only torch does not ship: a one-line stand-in is given."""
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path / 'shim'}"]
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert {s.name for s in sources} >= {"vote_kernels.cu", "vote_cuda.cu"}
    procs = [subprocess.Popen(["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O2", "-DTEMPO_WITH_CUDA",
                               "-diag-suppress=3306", *includes, str(src), "-o", str(tmp_path / f"{src.stem}.o")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for src in sources]
    for src, p in zip(sources, procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"nvcc failed on {src.name}:\n{out[-4000:]}"
        assert (tmp_path / f"{src.stem}.o").stat().st_size > 0
