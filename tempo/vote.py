"""Majority-vote statistics over extracted final answers (TTRL rewards, maj@k, pass@k, diversity).

Answers are canonicalised, hashed to int64 (0 = no answer) and aggregated per group of
rollouts (groups given by offsets; ragged and empty groups allowed). The work is done by the
C++/OpenMP extension `tempo._vote_ext` (CUDA aggregation too when built with CUDA) when it
imports, else by the pure-Python code below, which gives IDENTICAL results. The choice is
logged once on the "tempo" logger; `backend()` returns "cpp" or "python".
TEMPO_VOTE_BACKEND=python forces the fallback, =cpp requires the extension, =auto (default).

Canonicalisation rules (same table as csrc/vote_core.cpp). One pass applies R1..R8 in order;
passes repeat until the string stops changing, at most 8. An empty result is "no answer".
Rules match ASCII only (and the degree sign °); tokens are `\\` + letters (control word), `\\` + one other character,
or one character. A removal never glues a control word to a following letter: one space
separates them (`\\alpha\\!b` -> `\\alpha b`); that is the only space ever kept.

    R1   trim ASCII whitespace                              " 42\\n"          -> "42"
    R2   strip surrounding `$` pairs, repeatedly            "$$ x^2 $$"      -> "x^2"
    R3a  drop \\left, \\right (and the `.` of \\left. \\right.)  "\\left(1,2\\right)" -> "(1,2)"
    R3b  drop \\! \\, \\; \\: \\<whitespace> \\quad \\qquad \\$    "1\\,000"         -> "1000"
    R3c  \\dfrac, \\tfrac -> \\frac                            "\\dfrac{1}{2}"   -> "\\frac{1}{2}"
    R3d  \\text{X} \\mathrm{X} \\textbf{X} \\mbox{X} -> X (matched braces) "\\text{cm}" -> "cm"
    R4   drop whitespace runs                               "\\frac 1 2"      -> "\\frac12"
    R5   drop degree marks ^\\circ, ^{\\circ}, \\degree, °        "30^{\\circ}"     -> "30"
    R6   drop trailing `.` (not one after `\\`)              "5."             -> "5"
    R7   drop a leading single-letter assignment `L=` (no   "x=5"            -> "5"
         other `=` after it: an equation stays)
    R8   normalise plain decimals: drop `+`, leading zeros, trailing fraction zeros, a bare `.`,
         thousands separators (groups of 3); "-0" -> "0"  "007" -> "7", "12.00" -> "12", "1,000" -> "1000"

Not handled here: `\\boxed`, tuple order. Symbolic equivalence (`0.5` vs
`\\frac12`) is the second level, `merge_equivalent`, with a grader's callable.

Hash: FNV-1a 64 of the canonical UTF-8 bytes as int64; 0 only for no answer.

Aggregation per group (hash 0 never votes): majority = most frequent answer, ties to the one
whose first occurrence is earliest (0 with count 0 when nothing parsed); agreement = 1.0 where
the sample's hash is the majority; distinct = number of distinct parsed answers; entropy =
sum (c/m) log(m/c) over parsed answers (natural log, 0 when none); with truth hashes: correct =
number of samples equal to the truth (pass@k), majority_correct (maj@k).
"""
from __future__ import annotations

import logging
import math
import os
import re
import string
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = [
    "VoteStats",
    "aggregate",
    "backend",
    "canonicalize",
    "clear_equivalence_cache",
    "hash_answers",
    "merge_equivalent",
]

_log = logging.getLogger("tempo")

try:
    from tempo import _vote_ext as _ext

    _EXT_ERROR: BaseException | None = None
except ImportError as exc:  # not built, or built against another torch
    _ext = None
    _EXT_ERROR = exc

_reported: set[str] = set()


def backend() -> str:
    """"cpp" when the extension is used, "python" for the fallback (see TEMPO_VOTE_BACKEND)."""
    forced = os.environ.get("TEMPO_VOTE_BACKEND", "auto").strip().lower() or "auto"
    if forced not in ("auto", "cpp", "python"):
        raise ValueError(f"TEMPO_VOTE_BACKEND must be auto, cpp or python, got {forced!r}")
    if forced == "cpp" and _ext is None:
        raise RuntimeError(f"TEMPO_VOTE_BACKEND=cpp but tempo._vote_ext does not import: {_EXT_ERROR}")
    name = "cpp" if forced != "python" and _ext is not None else "python"
    if name not in _reported:
        _reported.add(name)
        if name == "cpp":
            _log.info("tempo.vote: C++ extension tempo._vote_ext (CUDA aggregate: %s)", _ext.with_cuda)
        elif forced == "python":
            _log.info("tempo.vote: pure-Python fallback (TEMPO_VOTE_BACKEND=python)")
        else:
            _log.info("tempo.vote: pure-Python fallback (tempo._vote_ext unavailable: %s)", _EXT_ERROR)
    return name


# ---------------------------------------------------------------------------------------------
# Pure-Python canonicalisation and hashing (mirror of csrc/vote_core.cpp).

_MAX_PASSES = 8
_WS = " \t\n\r\v\f"
_DEL_WS = str.maketrans("", "", _WS)
_ALPHA = frozenset(string.ascii_letters)
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|.", re.S)
_SPACING = frozenset(["\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\$"])
_UNWRAP = frozenset(["\\text", "\\mathrm", "\\textbf", "\\mbox"])
_NUMBER = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?")
_THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
_ZERO_REMAP = 0x9E3779B97F4A7C15


def _is_cw(tok: str) -> bool:
    return len(tok) >= 2 and tok[0] == "\\" and tok[1] in _ALPHA


def _join_tokens(toks: list[str]) -> str:
    """Concatenate the kept tokens; one space where a control word would glue to a letter."""
    out: list[str] = []
    cw = False
    for t in toks:
        if cw and t[0] in _ALPHA:
            out.append(" ")
        out.append(t)
        cw = _is_cw(t)
    return "".join(out)


def _rewrite_commands(s: str) -> str:  # R3
    if "\\" not in s:
        return s
    toks = _TOKEN.findall(s)
    n = len(toks)
    matched, opened = set(), []
    for k, t in enumerate(toks):
        if t == "{":
            opened.append(k)
        elif t == "}" and opened:
            matched.add(opened.pop())
    out: list[str] = []
    drop: list[bool] = []
    k = 0
    while k < n:
        t = toks[k]
        if len(t) >= 2 and t[0] == "\\":
            if t == "\\left" or t == "\\right":
                k += 2 if k + 1 < n and toks[k + 1] == "." else 1
                continue
            if t[1] in _WS or t in _SPACING:
                k += 1
                continue
            if t == "\\dfrac" or t == "\\tfrac":
                t = "\\frac"
            elif t in _UNWRAP and k + 1 < n and toks[k + 1] == "{" and k + 1 in matched:
                drop.append(True)
                k += 2
                continue
        elif t == "{":
            drop.append(False)
        elif t == "}" and drop:
            if drop.pop():
                k += 1
                continue
        out.append(t)
        k += 1
    return _join_tokens(out)


def _squeeze_whitespace(s: str) -> str:  # R4
    if "\\" not in s:
        return s.translate(_DEL_WS)
    return _join_tokens([t for t in _TOKEN.findall(s) if t not in _WS])


def _strip_degrees(s: str) -> str:  # R5
    if "\\circ" not in s and "\\degree" not in s and "°" not in s:
        return s
    toks = _TOKEN.findall(s)
    n = len(toks)
    out: list[str] = []
    k = 0
    while k < n:
        t = toks[k]
        if t == "°" or t == "\\degree":
            k += 1
            continue
        if t == "^" and k + 1 < n:
            if toks[k + 1] == "\\circ":
                k += 2
                continue
            if toks[k + 1] == "{" and k + 3 < n and toks[k + 2] == "\\circ" and toks[k + 3] == "}":
                k += 4
                continue
        out.append(t)
        k += 1
    return _join_tokens(out)


def _one_pass(s: str) -> str:
    s = s.strip(_WS)  # R1
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":  # R2
        s = s[1:-1].strip(_WS)
    s = _strip_degrees(_squeeze_whitespace(_rewrite_commands(s)))  # R3, R4, R5
    while s.endswith(".") and not (len(s) >= 2 and s[-2] == "\\"):  # R6
        s = s[:-1]
    if len(s) >= 3 and s[0] in _ALPHA and s[1] == "=" and "=" not in s[2:]:  # R7
        s = s[2:]
    if _THOUSANDS.fullmatch(s):  # R8
        s = s.replace(",", "")
    m = _NUMBER.fullmatch(s)
    if m is not None and (m.group(2) or m.group(3)):
        whole, frac = m.group(2).lstrip("0"), (m.group(3) or "").rstrip("0")
        sign = "-" if m.group(1) == "-" and (whole or frac) else ""
        s = sign + (whole or "0") + ("." + frac if frac else "")
    return s


def _py_canonicalize(answer: str | None) -> str | None:
    if answer is None:
        return None
    if not isinstance(answer, str):
        raise TypeError(f"canonicalize: answer must be str or None, got {type(answer).__name__}")
    s = answer
    for _ in range(_MAX_PASSES):
        t = _one_pass(s)
        if t == s:
            break
        s = t
    return s or None


def _py_hash_one(answer: str | None) -> int:
    canon = _py_canonicalize(answer)
    if canon is None:
        return 0
    h = _FNV_OFFSET
    for byte in canon.encode("utf-8", "surrogatepass"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    h = h or _ZERO_REMAP
    return h - (1 << 64) if h >> 63 else h


def _py_hash_answers(answers: Sequence[str | None]) -> torch.Tensor:
    out = []
    for i, a in enumerate(answers):
        if a is not None and not isinstance(a, str):
            raise TypeError(f"hash_answers: answers must be str or None, got {type(a).__name__} at index {i}")
        out.append(_py_hash_one(a))
    return torch.tensor(out, dtype=torch.long)


def _py_aggregate(hashes: torch.Tensor, offsets: torch.Tensor, truth: torch.Tensor | None) -> tuple:
    h, off = hashes.tolist(), offsets.tolist()
    tr = truth.tolist() if truth is not None else None
    groups = len(off) - 1
    majority, majority_count, distinct = [0] * groups, [0] * groups, [0] * groups
    entropy, correct, majority_correct = [0.0] * groups, [0] * groups, [False] * groups
    agreement = [0.0] * len(h)
    for g in range(groups):
        b, e = off[g], off[g + 1]
        counts: dict[int, int] = {}  # insertion order = first occurrence
        for x in h[b:e]:
            if x:
                counts[x] = counts.get(x, 0) + 1
        if not counts:
            continue
        m = sum(counts.values())
        best, best_count, ent = 0, 0, 0.0
        for x, c in counts.items():
            if c > best_count:
                best, best_count = x, c
            ent += (c / m) * math.log(m / c)
        majority[g], majority_count[g], distinct[g], entropy[g] = best, best_count, len(counts), ent
        for i in range(b, e):
            if h[i] == best:
                agreement[i] = 1.0
        if tr is not None and tr[g]:
            correct[g] = counts.get(tr[g], 0)
            majority_correct[g] = best == tr[g]
    long, t = torch.long, truth is not None
    return (
        torch.tensor(majority, dtype=long),
        torch.tensor(majority_count, dtype=long),
        torch.tensor(agreement, dtype=torch.float32),
        torch.tensor(distinct, dtype=long),
        torch.tensor(entropy, dtype=torch.float32),
        torch.tensor(correct if t else [], dtype=long),
        torch.tensor(majority_correct if t else [], dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------
# Public API.


@dataclass(frozen=True)
class VoteStats:
    """Per-group vote statistics (G groups, N samples); tensors on the device of the hashes."""

    majority: torch.Tensor  # [G] int64, 0 when nothing parsed
    majority_count: torch.Tensor  # [G] int64
    agreement: torch.Tensor  # [N] float32, 1.0 where the sample's answer is its group's majority
    distinct: torch.Tensor  # [G] int64, distinct parsed answers
    entropy: torch.Tensor  # [G] float32, natural log over parsed answers
    correct: torch.Tensor | None = None  # [G] int64, samples equal to the truth (pass@k)
    majority_correct: torch.Tensor | None = None  # [G] bool, majority == truth (maj@k)


def canonicalize(answer: str | None) -> str | None:
    """Canonical form of one extracted answer (module docstring rules); None for no answer."""
    return _ext.canonicalize(answer) if backend() == "cpp" else _py_canonicalize(answer)


def hash_answers(answers: Sequence[str | None]) -> torch.Tensor:
    """int64 hash [N] of each answer's canonical form; 0 for None or an empty canonical form."""
    return _ext.hash_answers(answers) if backend() == "cpp" else _py_hash_answers(answers)


def _check(hashes: torch.Tensor, offsets: torch.Tensor, truth: torch.Tensor | None) -> None:
    if hashes.dim() != 1 or hashes.dtype != torch.long:
        raise ValueError(f"aggregate: hashes must be a 1-D int64 tensor, got {hashes.dtype} {tuple(hashes.shape)}")
    if offsets.dim() != 1 or offsets.dtype != torch.long or offsets.numel() < 1:
        raise ValueError(f"aggregate: offsets must be a 1-D int64 tensor of G+1 >= 1 entries, got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if truth is not None and (truth.dim() != 1 or truth.dtype != torch.long or truth.numel() != offsets.numel() - 1):
        raise ValueError(f"aggregate: truth must be a 1-D int64 tensor of {offsets.numel() - 1} entries, got "
                         f"{truth.dtype} {tuple(truth.shape)}")
    if offsets.device.type == "cpu":  # values (skipped on accelerators: it would synchronise)
        if int(offsets[0]) != 0 or int(offsets[-1]) != hashes.numel():
            raise ValueError(f"aggregate: offsets must start at 0 and end at N = {hashes.numel()}, got "
                             f"{int(offsets[0])} and {int(offsets[-1])}")
        if bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("aggregate: offsets must be non-decreasing")


def aggregate(hashes: torch.Tensor, offsets: torch.Tensor | Sequence[int],
              truth: torch.Tensor | None = None) -> VoteStats:
    """Vote statistics of groups hashes[offsets[g]:offsets[g+1]]; truth: [G] answer hashes or None."""
    offsets = torch.as_tensor(offsets, dtype=torch.long, device=hashes.device)
    if truth is not None:
        truth = torch.as_tensor(truth, dtype=torch.long, device=hashes.device)
    _check(hashes, offsets, truth)
    device = hashes.device
    if backend() == "cpp" and (device.type == "cpu" or torch._C._dispatch_has_kernel_for_dispatch_key(
            "tempo_vote::aggregate", device.type.upper())):
        out = torch.ops.tempo_vote.aggregate(hashes, offsets, truth)
    else:  # fallback, or an accelerator without a kernel: compute on CPU, return on the device
        cpu = (hashes.cpu(), offsets.cpu(), None if truth is None else truth.cpu())
        if backend() == "cpp":
            out = torch.ops.tempo_vote.aggregate(*cpu)
        else:
            out = _py_aggregate(*cpu)
        out = tuple(t.to(device) for t in out)
    has_truth = truth is not None
    return VoteStats(*out[:5], correct=out[5] if has_truth else None,
                     majority_correct=out[6] if has_truth else None)


_EQUIV_CACHE: dict[Callable, dict[tuple[str, str], bool]] = {}
_EQUIV_CACHE_MAX = 1 << 20  # pairs per callable; the cache is emptied when full


def clear_equivalence_cache() -> None:
    """Forget the results of `equivalent` cached by merge_equivalent."""
    _EQUIV_CACHE.clear()


def merge_equivalent(answers: Sequence[str | None], hashes: torch.Tensor, offsets: torch.Tensor | Sequence[int],
                     equivalent: Callable[[str, str], bool],
                     cache: dict[tuple[str, str], bool] | None = None) -> torch.Tensor:
    """Within each group, map answer classes that `equivalent` judges equal to one hash.

    Classes (distinct non-zero hashes) are visited in order of first occurrence; each is
    compared with the representatives of the clusters found so far, `equivalent(its canonical
    form, representative's canonical form)`, and joins the first that matches, else starts a
    cluster. A cluster's hash is that of its earliest class. `equivalent` is only called between
    distinct canonical forms, and its results are cached across calls (by default per callable,
    keyed by the two canonical strings; pass `cache` to own the cache). Returns int64 [N] on the
    device of `hashes`; 0 (no answer) stays 0.
    """
    h = hashes.tolist()
    off = torch.as_tensor(offsets, dtype=torch.long).tolist()
    if len(answers) != len(h):
        raise ValueError(f"merge_equivalent: {len(answers)} answers but {len(h)} hashes")
    if cache is None:
        cache = _EQUIV_CACHE.setdefault(equivalent, {})
    if len(cache) > _EQUIV_CACHE_MAX:
        cache.clear()
    out = list(h)
    for g in range(len(off) - 1):
        reps: list[tuple[int, str]] = []  # (hash, canonical form) of each cluster's earliest class
        target: dict[int, int] = {}
        for i in range(off[g], off[g + 1]):
            x = h[i]
            if x == 0:
                continue
            if x not in target:
                target[x] = x
                canon = canonicalize(answers[i])
                if canon is not None:
                    for rep_hash, rep in reps:
                        key = (canon, rep)
                        same = cache.get(key)
                        if same is None:
                            same = cache[key] = bool(equivalent(canon, rep))
                        if same:
                            target[x] = rep_hash
                            break
                    else:
                        reps.append((x, canon))
            out[i] = target[x]
    return torch.tensor(out, dtype=torch.long, device=hashes.device)


if _ext is not None:

    @torch.library.register_fake("tempo_vote::aggregate")
    def _aggregate_fake(hashes, offsets, truth=None):
        groups = offsets.shape[0] - 1
        g_truth = groups if truth is not None else 0
        return (hashes.new_empty(groups), hashes.new_empty(groups),
                hashes.new_empty(hashes.shape[0], dtype=torch.float32), hashes.new_empty(groups),
                hashes.new_empty(groups, dtype=torch.float32), hashes.new_empty(g_truth),
                hashes.new_empty(g_truth, dtype=torch.bool))
