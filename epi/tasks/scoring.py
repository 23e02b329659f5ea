"""Scorers: ``score(name, prediction, record)`` returns a float in [0, 1] for every task name.

| task                               | score                                                             |
|------------------------------------|-------------------------------------------------------------------|
| ``math``                             | 1 if the number after the first ``####`` equals ``answer``          |
| ``gsm8k``                            | same, falling back to the last number when there is no ``####``     |
| ``code``                             | pass rate of the predicted function on ``record["tests"]`` (sandbox)|
| ``logic``, ``logiqa``                  | 1 if the chosen option letter equals ``answer``                     |
| ``instruction``                      | 1 if the whitespace-trimmed prediction equals ``answer``            |
| ``chat``                             | 1 if the last word of the prediction equals ``answer`` (any case)   |
| ``codealpaca``, ``alpaca``, ``ultrachat`` | token F1 against ``answer`` (SQuAD normalisation)                 |

The paper judged free-form answers (CodeAlpaca, Alpaca, UltraChat) with an LLM judge, which cannot run
offline; token F1 is a transparent, deterministic stand-in that gives partial credit for overlap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from . import sandbox

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_LETTER = re.compile(r"answer\s*(?:is\s*)?[:\-]?\s*\(?([A-Da-d])\b", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\b([A-D])\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(text: str, fallback_last: bool = False) -> str | None:
    """Return the first number after ``####`` in ``text`` (commas removed), else None.

    With ``fallback_last`` a text without ``####`` yields its last number instead.
    """
    if "####" in text:
        match = _NUMBER.search(text.split("####", 1)[1])
    else:
        found = list(_NUMBER.finditer(text)) if fallback_last else []
        match = found[-1] if found else None
    return match.group(0).replace(",", "").rstrip(".") if match else None


def choice_letter(text: str) -> str | None:
    """Return the option letter A-D a prediction chose ("Answer: b" -> "B", "C) ..." -> "C"), else None."""
    match = _ANSWER_LETTER.search(text) or _LONE_LETTER.search(text)
    return match.group(1).upper() if match else None


def normalize_answer(text: str) -> str:
    """Return ``text`` lower-cased without punctuation, articles and extra whitespace (SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Return the token F1 of two texts after ``normalize_answer``: 2PR/(P+R) over the token multisets.

    Convention: two empty texts score 1.0; exactly one empty text scores 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _same_number(found: str | None, answer: str) -> float:
    got, want = (None if found is None else _number(found)), _number(answer)
    return float(got is not None and want is not None and abs(got - want) < 1e-9)


def _math(prediction: str, record: dict) -> float:
    return _same_number(final_number(prediction), record["answer"])


def _gsm8k(prediction: str, record: dict) -> float:
    return _same_number(final_number(prediction, fallback_last=True), record["answer"])


def _code(prediction: str, record: dict) -> float:
    if "tests" not in record:
        raise ValueError(f"code record {record.get('id')!r} has no hidden 'tests' to score against")
    try:                    # a malformed test is the record's fault: an error, never a silent 0
        tests = sandbox.check_tests(record["tests"])
    except ValueError as err:
        raise ValueError(f"code record {record.get('id')!r} has malformed hidden tests: {err}") from None
    return sandbox.pass_rate(prediction.strip(), tests)


def _choice(prediction: str, record: dict) -> float:
    return float(choice_letter(prediction) == record["answer"].strip().upper())


def _exact(prediction: str, record: dict) -> float:
    return float(prediction.strip() == record["answer"].strip())


def _last_word(prediction: str, record: dict) -> float:
    words = re.findall(r"[A-Za-z0-9]+", prediction)
    return float(bool(words) and words[-1].casefold() == record["answer"].strip().casefold())


def _f1(prediction: str, record: dict) -> float:
    return token_f1(prediction, record["answer"])


SCORERS: dict[str, Callable[[str, dict], float]] = {
    "math": _math, "code": _code, "logic": _choice, "instruction": _exact, "chat": _last_word,
    "gsm8k": _gsm8k, "codealpaca": _f1, "logiqa": _choice, "alpaca": _f1, "ultrachat": _f1,
}


def score(name: str, prediction: str, record: dict) -> float:
    """Return the score in [0, 1] of ``prediction`` for ``record`` under task ``name`` (table above)."""
    if name not in SCORERS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(SCORERS)}")
    if "answer" not in record:
        raise ValueError(f"{name} record {record.get('id')!r} has no 'answer' to score against")
    return SCORERS[name](prediction, record)
