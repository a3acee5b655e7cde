"""Final-answer grading: extract the answer of a response and decide if it equals the truth.

The trainer grades thousands of answers per step, so `is_equivalent` tries cheap checks
first (normalised string equality, exact numeric comparison) and calls math-verify only for
the rest. math-verify's own timeout uses `signal.alarm`, which fails outside the main
thread, so symbolic checks run in worker processes that are killed when they overrun.
Verdicts are cached per normalised pair, so a repeated answer costs nothing.
"""
from __future__ import annotations

import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from tempo import vote

SYMBOLIC_TIMEOUT_S = 5.0
# Longer answers that differ as strings are judged different without parsing: parsing a 1 MB
# or 100k-digit "answer" costs time and proves nothing (Python's int() refuses > 4300 digits).
MAX_SYMBOLIC_CHARS = 1000
# Enough to import sympy and math-verify on a loaded machine; not charged to a check.
_WORKER_START_TIMEOUT_S = 120.0
_WORKERS = min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class Grade:
    extracted: str | None
    correct: bool


# ---------------------------------------------------------------------------------------
# Extraction

_BOX = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_PHRASE = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+is\s*:?|\bfinal\s+answer\s*:", re.IGNORECASE
)
_PHRASE_TRIM = re.compile(r"^[\s$]+|[\s$.]+$")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start], or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _box_content(text: str, end: int) -> str | None:
    """What follows a \\boxed / \\fbox ending at `end`: a brace group or `\\boxed 5`."""
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced(text, len(text) - len(stripped))
    if rest[:1].isspace():
        match = re.match(r"[^\s$]+", stripped)
        return match.group(0) if match else None
    return None  # e.g. "\\boxedx": not a box


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last box, else "the answer is X" / "final answer: X".

    A malformed last box (a response cut off inside it) yields None rather than an earlier
    box: a truncated response has not given a final answer.
    """
    if not isinstance(text, str):
        return None
    if boxes := list(_BOX.finditer(text)):
        answer = _box_content(text, boxes[-1].end()) or ""
    elif phrases := list(_ANSWER_PHRASE.finditer(text)):
        # The rest of the first sentence ("The answer is 12. Check: ..." -> "12"), without $.
        line = text[phrases[-1].end() :].split("\n")[0]
        answer = _PHRASE_TRIM.sub("", re.split(r"\.\s", line)[0])
    else:
        answer = ""
    return answer.strip() or None


# ---------------------------------------------------------------------------------------
# Normalisation and the fast paths

@lru_cache(maxsize=65536)
def normalize_answer(s: str) -> str:
    """An answer's canonical form ("" for none): the one rule table of `tempo.vote` (and its
    C++ mirror), so that grading and voting never disagree about what is the same answer."""
    return vote.canonicalize(s) or ""


_NUMBER = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^-?\.\d+$")
_FRACTION = re.compile(r"^(-?\d+)/(\d+)$|^(-?)\\frac(?:\{(-?\d+)\}\{(\d+)\}|(\d)(\d))$")


def _as_number(s: str) -> Fraction | None:
    """The exact value of an integer, decimal or simple fraction (a/b, \\frac{a}{b})."""
    if _NUMBER.match(s):
        return Fraction(s.replace(",", ""))
    match = _FRACTION.match(s)
    if not match:
        return None
    a, b, sign, fa, fb, da, db = match.groups()
    numerator, denominator = (a, b) if a is not None else (fa or da, fb or db)
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return -value if sign else value


# ---------------------------------------------------------------------------------------
# Symbolic check in worker processes

_stats_lock = threading.Lock()
_stats = {"fast_string": 0, "fast_numeric": 0, "too_long": 0, "symbolic": 0, "timeouts": 0, "errors": 0}


def _count(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def grading_stats() -> dict[str, int]:
    """How many distinct answer pairs each path decided (cache hits are not counted):
    fast_string, fast_numeric, too_long (over MAX_SYMBOLIC_CHARS, False), symbolic (math-verify),
    and timeouts and errors (both False)."""
    with _stats_lock:
        return dict(_stats)


def _serve() -> None:
    """Worker process: answer JSON lines [pred, truth] on stdin with ["ok"|"error", verdict]."""
    import logging

    from math_verify import parse, verify

    # It warns that timeouts are off; the parent enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    replies, sys.stdout = sys.stdout, sys.stderr  # stray prints must not corrupt the replies
    print("ready", file=replies, flush=True)
    for line in sys.stdin:  # ends when the parent closes the pipe or exits
        pred, truth = json.loads(line)
        try:
            gold = parse(f"${truth}$", parsing_timeout=None)
            verdict = verify(gold, parse(f"${pred}$", parsing_timeout=None), timeout_seconds=None)
            reply = ["ok", bool(verdict)]
        except Exception:  # noqa: BLE001 - counted as an error by the parent
            reply = ["error", False]
        print(json.dumps(reply), file=replies, flush=True)


class _Worker:
    """One math-verify process, killed (never reused) when a check overruns.

    A fresh interpreter (not multiprocessing's fork/spawn): fork would copy the trainer's
    threads and CUDA state, and spawn re-runs an unguarded __main__ script in the child.
    """

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from tempo.grading import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._read_line(_WORKER_START_TIMEOUT_S) != "ready\n":
            self.kill()
            raise RuntimeError("math-verify worker did not start")

    def _read_line(self, timeout: float) -> str | None:
        """The worker's next line, or None if it does not come within `timeout` seconds."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)  # POSIX pipes
        return self.process.stdout.readline() if ready else None

    def check(self, pred: str, truth: str, timeout: float) -> tuple[str, bool]:
        """("ok", verdict), ("error", False) or ("timeout", False); raises if the worker broke."""
        self.process.stdin.write(json.dumps([pred, truth]) + "\n")
        self.process.stdin.flush()
        line = self._read_line(timeout)
        if line is None:
            return "timeout", False
        status, verdict = json.loads(line)  # a dead worker gives "": JSONDecodeError
        return status, verdict

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


# One slot per worker; None is a slot whose process starts on first use. LIFO: a warm
# worker is reused before another one is started.
_idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
for _ in range(_WORKERS):
    _idle.put(None)


def _symbolic(pred: str, truth: str, timeout: float) -> bool:
    worker = _idle.get()  # blocks while all workers are busy, so `timeout` is check time
    try:
        worker = worker or _Worker()
        status, verdict = worker.check(pred, truth, timeout)
    except Exception:  # noqa: BLE001 - a worker that could not start, died or garbled
        status, verdict = "broken", False
    if worker is not None and status in ("timeout", "broken"):
        worker.kill()  # still busy with the overrun check, or unusable: start afresh next time
        worker = None
    _idle.put(worker)
    _count({"ok": "symbolic", "timeout": "timeouts"}.get(status, "errors"))
    return verdict


@lru_cache(maxsize=65536)
def _equivalent(pred: str, truth: str, timeout: float) -> bool:
    """Equivalence of normalised answers; cached, so a timed-out pair is not retried."""
    if pred == truth:
        _count("fast_string")
        return True
    if max(len(pred), len(truth)) > MAX_SYMBOLIC_CHARS:  # no answer of a math problem is this long
        _count("too_long")
        return False
    pred_value, truth_value = _as_number(pred), _as_number(truth)
    if pred_value is not None and truth_value is not None:
        _count("fast_numeric")
        return pred_value == truth_value
    return _symbolic(pred, truth, timeout)


def is_equivalent(pred: str | None, truth: str, timeout: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """Whether answer `pred` equals `truth`; False on no answer, timeout or error. Thread-safe."""
    if pred is None:
        return False
    return _equivalent(normalize_answer(pred), normalize_answer(truth), timeout)


def grade(response_text: str, truth: str, timeout: float = SYMBOLIC_TIMEOUT_S) -> Grade:
    extracted = extract_answer(response_text)
    return Grade(extracted, is_equivalent(extracted, truth, timeout))


def grade_many(
    responses: list[str], truths: list[str], timeout: float = SYMBOLIC_TIMEOUT_S
) -> list[Grade]:
    """Grade responses against their truths; distinct pairs are checked concurrently."""
    if len(responses) != len(truths):
        raise ValueError(f"grade_many: {len(responses)} responses but {len(truths)} truths")
    extracted = [extract_answer(text) for text in responses]
    keys = [
        None if pred is None else (normalize_answer(pred), normalize_answer(truth))
        for pred, truth in zip(extracted, truths)
    ]
    distinct = {key for key in keys if key is not None}
    # One thread per worker process: each thread waits on one symbolic check at a time.
    with ThreadPoolExecutor(max_workers=_WORKERS) as threads:
        verdicts = threads.map(lambda key: _equivalent(*key, timeout), distinct)
        verdict_of = dict(zip(distinct, verdicts))
    return [Grade(pred, key is not None and verdict_of[key]) for pred, key in zip(extracted, keys)]
