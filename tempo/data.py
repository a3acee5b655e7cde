"""Problems: loading (.json, .jsonl, .parquet), labeled/unlabeled split, prompt templates.

Answers of unlabeled problems are kept: training never reads them (it checks `is_labeled`),
evaluation uses them to score.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tempo.errors import ConfigError, DataError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("raw", "plain", "chat")


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str | list[dict]  # plain text, or chat messages [{"role": ..., "content": ...}]
    answer: str | None
    is_labeled: bool
    source: str


def _read_rows(path: Path) -> list[tuple[str, Any]]:
    """(location for error messages, row) pairs of a data file."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            reason = f"{error.reason} at byte {error.start}"
            raise DataError(f"{path}: not UTF-8 text ({reason})") from None
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    if suffix == ".jsonl":
        located = []
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                located.append((f"line {line_number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {line_number}: invalid JSON: {error.msg}") from None
        return located
    if suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types
            message = " ".join(str(error).split())
            raise DataError(f"{path}: cannot read parquet: {message}") from None
        return [(f"row {i}", row) for i, row in enumerate(rows)]
    raise DataError(f"{path}: unknown data format '{path.suffix}' (use .json, .jsonl or .parquet)")


def _prompt(row: dict, key: str, where: str) -> str | list[dict]:
    prompt = row.get(key)
    if prompt is None or prompt == [] or (isinstance(prompt, str) and not prompt.strip()):
        raise DataError(f"{where}: missing '{key}'")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DataError(
        f"{where}: '{key}' must be text or a list of {{role, content}} messages, "
        f"got {type(prompt).__name__}"
    )


def _answer(row: dict, key: str, where: str) -> str | None:
    """The answer as text, or None; verl rows keep it under reward_model.ground_truth."""
    answer = row.get(key)
    reward_model = row.get("reward_model")
    if answer is None and isinstance(reward_model, dict):
        answer, key = reward_model.get("ground_truth"), "reward_model.ground_truth"
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: '{key}' must be text or a number, got {type(answer).__name__}")
    return str(answer)  # 144.0 stays "144.0": equivalence is the grader's job


def load_problems(
    path: str | Path,
    *,
    source: str | None = None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    id_key: str = "id",
) -> list[Problem]:
    """Problems of a .json (list of objects), .jsonl or .parquet file.

    A problem is labeled when it has an answer (`split_labeled` and `mark_labeled` choose
    otherwise). `source` overrides the rows' "source" or verl's "data_source" (default: the
    file name without suffix); a row without an id gets f"{source}-{row index}".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    problems = []
    seen_ids = set()
    for index, (location, row) in enumerate(_read_rows(path)):
        where = f"{path} {location}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        prompt = _prompt(row, prompt_key, where)
        answer = _answer(row, answer_key, where)
        row_source = source or str(row.get("source") or row.get("data_source") or path.stem)
        problem_id = str(row[id_key]) if row.get(id_key) is not None else f"{row_source}-{index}"
        if problem_id in seen_ids:
            raise DataError(f"{where}: duplicate {id_key} '{problem_id}'")
        seen_ids.add(problem_id)
        problems.append(Problem(problem_id, prompt, answer, answer is not None, row_source))
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def mark_labeled(problems: list[Problem], labeled: bool) -> list[Problem]:
    """All problems labeled (each must have an answer) or all unlabeled (answers kept)."""
    if labeled:
        missing = [p.id for p in problems if p.answer is None]
        if missing:
            raise DataError(
                f"{len(missing)} problems have no answer and cannot be labeled, e.g. '{missing[0]}'"
            )
    return [replace(p, is_labeled=labeled) for p in problems]


def split_labeled(
    problems: list[Problem], labeled_fraction: float, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Label round(fraction * n) problems drawn (seeded) from those with answers.

    Both parts keep the input order; the unlabeled part keeps its answers for scoring.
    """
    if not 0.0 <= labeled_fraction <= 1.0:
        raise ConfigError(f"labeled_fraction must be in [0, 1], got {labeled_fraction}")
    n_labeled = round(labeled_fraction * len(problems))
    with_answer = [i for i, p in enumerate(problems) if p.answer is not None]
    if n_labeled > len(with_answer):
        raise ConfigError(
            f"labeled_fraction {labeled_fraction} asks for {n_labeled} labeled problems "
            f"but only {len(with_answer)} of {len(problems)} have answers"
        )
    chosen = set(random.Random(seed).sample(with_answer, n_labeled))
    labeled = [replace(p, is_labeled=True) for i, p in enumerate(problems) if i in chosen]
    unlabeled = [replace(p, is_labeled=False) for i, p in enumerate(problems) if i not in chosen]
    return labeled, unlabeled


def _question(problem: Problem) -> str:
    """The question as compared across splits: its text (a chat's contents), whitespace-collapsed."""
    text = problem.prompt if isinstance(problem.prompt, str) else "\n".join(m["content"] for m in problem.prompt)
    return " ".join(text.split())


def refuse_overlap(unlabeled: list[Problem], others: dict[str, list[Problem]]) -> None:
    """No question of D_U may also be labeled, held out or in stage 1's data: its answer would
    then reach training or the choice of settings. Raises DataError naming both rows."""
    asked = {_question(p): p for p in unlabeled}
    for name, problems in others.items():
        for p in problems:
            if (u := asked.get(_question(p))) is not None:
                raise DataError(f"{name}: '{p.id}' ({p.source}) asks the same question as D_U's '{u.id}' ({u.source}); "
                                f"D_U's answers must not reach training")


def format_prompt(problem: Problem, template: str, tokenizer: Any = None) -> str:
    """The text given to the model.

    raw: the prompt as is; plain: the prompt and INSTRUCTION; chat: the tokenizer's chat
    template, where a text prompt becomes one user message with INSTRUCTION appended and a
    message prompt (verl-style, instruction already inside) is used unchanged.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown prompt template '{template}' (valid: {', '.join(TEMPLATES)})")
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("prompt template 'chat' needs a tokenizer with a chat template")
        messages = problem.prompt
        if isinstance(messages, str):
            messages = [{"role": "user", "content": f"{messages}\n{INSTRUCTION}"}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(problem.prompt, str):
        raise ConfigError(
            f"problem '{problem.id}' has chat messages as prompt: use prompt template 'chat'"
        )
    return problem.prompt if template == "raw" else f"{problem.prompt}\n{INSTRUCTION}\n"
