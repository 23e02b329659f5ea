"""EPI-Mini: five seeded synthetic abilities that mirror the paper's SFT mix, sized for a tiny model.

| ability     | mirrors    | the model must                                        | scored by              |
|-------------|------------|-------------------------------------------------------|------------------------|
| math        | GSM8K      | write 2-4 explicit arithmetic steps, end "#### n"     | exact final number     |
| code        | CodeAlpaca | turn a spec into a one-line Python function           | sandboxed pass rate    |
| logic       | LogiQA     | pick one of four options from comparison premises     | option letter accuracy |
| instruction | Alpaca     | reverse / sort / dedupe / count / upper-case a string | exact match            |
| chat        | UltraChat  | recall a fact the user stated in an earlier turn      | exact final word       |

Every text is plain printable ASCII (the tiny tokenizer is character level). ``difficulty`` (1..3)
adds steps, length or facts; difficulty 1 is the default and is sized so that a 4-layer, h128 model
learns every ability well above chance in about a thousand steps (see ``data/README.md``).

Splits are a function of the prompt: ``split_of(canonical_prompt(record))`` hashes the prompt with
SHA-256, so one prompt can only ever land in one split and train/validation/test never share a prompt.
Generators draw from ``random.Random`` seeded by ``(ability, split, seed, difficulty)`` and keep the
draws whose prompt hashes into the requested split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

ABILITIES = ("math", "code", "logic", "instruction", "chat")
SPLITS = ("train", "validation", "test")
DIFFICULTIES = (1, 2, 3)
DEFAULT_DIFFICULTY = 1
DEFAULT_SIZES = {"train": 200, "validation": 50, "test": 50}
# cumulative split shares of the hash space (out of 100): 80 % train, 10 % validation, 10 % test
_SPLIT_CUTS = (("train", 80), ("validation", 90), ("test", 100))

_NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Gus", "Ivy", "Jo", "Kim", "Lou", "Max", "Ned", "Pam",
          "Sam", "Tia", "Zoe")


# ------------------------------------------------------------------------------------------ splits
def canonical_prompt(record: dict) -> str:
    """Return the text that decides a record's split: its prompt, or its turns as ``role: content`` lines."""
    if "prompt" in record:
        return record["prompt"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"])


def split_of(prompt: str) -> str:
    """Return the split ("train", "validation" or "test") that owns ``prompt``, from its SHA-256."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return next(name for name, cut in _SPLIT_CUTS if bucket < cut)


# -------------------------------------------------------------------------------------------- math
_ITEMS = ("pens", "eggs", "cards", "coins", "books", "cups", "toys", "nuts")
_ADD = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUB = ("gives {n} away", "loses {n}", "sells {n}")
_MUL = {2: "doubles them", 3: "triples them"}


def _math(rng: random.Random, difficulty: int) -> dict:
    steps = difficulty + 1                       # 2, 3 or 4 worked steps
    hi = 9 if difficulty < 3 else 19
    start = value = rng.randint(2, hi)
    phrases, lines = [], []
    for _ in range(steps):
        ops = ["+"] + (["-"] if value > 1 else []) + (["*"] if difficulty > 1 and value <= 9 else [])
        op = rng.choice(ops)
        if op == "*":
            n = rng.choice((2, 3))
            phrases.append(_MUL[n])
            new = value * n
        elif op == "-":
            n = rng.randint(1, min(value - 1, hi))   # never below 1: counts of things stay positive
            phrases.append(rng.choice(_SUB).format(n=n))
            new = value - n
        else:
            n = rng.randint(1, hi)
            phrases.append(rng.choice(_ADD).format(n=n))
            new = value + n
        lines.append(f"{value}{op}{n}={new}")
        value = new
    item = rng.choice(_ITEMS)
    story = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    prompt = f"{rng.choice(_NAMES)} has {start} {item}, {story}. How many now?"
    return {"prompt": prompt, "response": "\n".join(lines) + f"\n#### {value}", "answer": str(value)}


# -------------------------------------------------------------------------------------------- code
# (argument kind, spec, body); {a} is the argument, {n}/{m} small ints, {c} a letter.
_CODE = {
    1: (("int", "{a} plus {n}", "{a}+{n}"),
        ("int", "{a} minus {n}", "{a}-{n}"),
        ("int", "{a} times {n}", "{a}*{n}"),
        ("int", "{a} squared", "{a}*{a}"),
        ("int", "the remainder of {a} divided by {n}", "{a}%{n}"),
        ("int", "whether {a} is even", "{a}%2==0"),
        ("str", "{a} reversed", "{a}[::-1]"),
        ("str", "{a} in upper case", "{a}.upper()"),
        ("str", "the first {n} letters of {a}", "{a}[:{n}]"),
        ("str", "the last {n} letters of {a}", "{a}[-{n}:]"),
        ("str", "{a} repeated {n} times", "{a}*{n}"),
        ("str", "the length of {a}", "len({a})"),
        ("str", "how often '{c}' is in {a}", "{a}.count('{c}')"),
        ("list", "the sum of {a}", "sum({a})"),
        ("list", "the largest item of {a}", "max({a})"),
        ("list", "the smallest item of {a}", "min({a})"),
        ("list", "{a} sorted", "sorted({a})"),
        ("list", "the first item of {a}", "{a}[0]"),
        ("list", "the last item of {a}", "{a}[-1]")),
    2: (("int", "{a} times {n} plus {m}", "{a}*{n}+{m}"),
        ("int", "{a} plus {n}, times {m}", "({a}+{n})*{m}"),
        ("int", "{a} squared minus {n}", "{a}*{a}-{n}"),
        ("str", "{a} reversed in upper case", "{a}[::-1].upper()"),
        ("str", "the first {n} letters of {a} reversed", "{a}[:{n}][::-1]"),
        ("str", "the first {n} letters of {a} in upper case", "{a}[:{n}].upper()"),
        ("list", "the sum of {a} times {n}", "sum({a})*{n}"),
        ("list", "{a} sorted in reverse", "sorted({a})[::-1]"),
        ("list", "the largest item of {a} plus {n}", "max({a})+{n}"),
        ("list", "the largest minus the smallest item of {a}", "max({a})-min({a})")),
    3: (("list", "the items of {a} above {n}", "[v for v in {a} if v>{n}]"),
        ("list", "{a} with each item times {n}", "[v*{n} for v in {a}]"),
        ("list", "how many items of {a} are above {n}", "len([v for v in {a} if v>{n}])"),
        ("list", "the even items of {a}", "[v for v in {a} if v%2==0]"),
        ("int", "{n} if {a} is even, else {a} plus {m}", "{n} if {a}%2==0 else {a}+{m}"),
        ("str", "{a} without the letter '{c}'", "{a}.replace('{c}', '')")),
}
_ARGS = {"int": ("x", "n", "k"), "str": ("s", "w", "t"), "list": ("xs", "ys", "nums")}
_FUNCS = ("f", "g", "h", "fn", "calc", "func", "solve", "run")
_TESTS_PER_RECORD = 4


def _code_input(rng: random.Random, kind: str, letter: str) -> object:
    if kind == "int":
        return rng.randint(-9, 30)
    if kind == "str":
        word = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 7))]
        if rng.random() < 0.5:               # make letter-counting tests non-trivial
            word[rng.randrange(len(word))] = letter
        return "".join(word)
    return [rng.randint(0, 20) for _ in range(rng.randint(3, 6))]


def _code(rng: random.Random, difficulty: int) -> dict:
    kind, spec, body = rng.choice(_CODE[difficulty])
    arg, func = rng.choice(_ARGS[kind]), rng.choice(_FUNCS)
    params = {"a": arg, "n": rng.randint(2, 12), "m": rng.randint(1, 9), "c": rng.choice("abcdefgh")}
    response = f"def {func}({arg}): return {body.format(**params)}"
    reference = eval(f"lambda {arg}: {body.format(**params)}")  # noqa: S307 - our own template text
    tests = []
    for _ in range(_TESTS_PER_RECORD):
        value = _code_input(rng, kind, params["c"])
        tests.append([[value], reference(value)])
    prompt = f"Write {func}({arg}) that returns {spec.format(**params)}."
    return {"prompt": prompt, "response": response, "answer": response, "tests": tests}


# ------------------------------------------------------------------------------------------- logic
# The four options are always the four people in slot order A-D, and each name starts with its
# option's letter: a deliberate shortcut so a tiny model needs no induction step to map name -> letter.
_SLOTS = (("Amy", "Abe", "Ann"), ("Ben", "Bea", "Bo"), ("Cal", "Cy", "Cam"), ("Dan", "Dee", "Dot"))
_RELATIONS = (("taller", "shorter", "tallest", "shortest"), ("older", "younger", "oldest", "youngest"),
              ("faster", "slower", "fastest", "slowest"), ("richer", "poorer", "richest", "poorest"),
              ("heavier", "lighter", "heaviest", "lightest"))


def _logic(rng: random.Random, difficulty: int) -> dict:
    people = [rng.choice(slot) for slot in _SLOTS]
    more, less, most, least = rng.choice(_RELATIONS)
    order = rng.sample(range(4), difficulty + 1)          # order[0] is the most "more"
    premises = []
    for hi, lo in zip(order, order[1:]):
        # difficulty 1 always states the premise with the "more" word, so the answer is a lexical
        # lookup of the question word; from 2 on, premises mix both directions
        if difficulty == 1 or rng.random() < 0.5:
            premises.append(f"{people[hi]} is {more} than {people[lo]}.")
        else:
            premises.append(f"{people[lo]} is {less} than {people[hi]}.")
    rng.shuffle(premises)
    ask_more = rng.random() < 0.5
    if difficulty == 1:
        question = f"Who is {more if ask_more else less}?"
    else:
        question = f"Who is the {most if ask_more else least}?"
    letter = "ABCD"[order[0] if ask_more else order[-1]]
    options = " ".join(f"{'ABCD'[i]}) {name}" for i, name in enumerate(people))
    prompt = f"{' '.join(premises)} {question}\n{options}"
    return {"prompt": prompt, "response": f"Answer: {letter}", "answer": letter}


# ------------------------------------------------------------------------------------- instruction
def _word(rng: random.Random, length: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def _dedupe(word: str) -> str:
    return "".join(dict.fromkeys(word))


def _instruction(rng: random.Random, difficulty: int) -> dict:
    length = {1: 4, 2: 6, 3: 8}[difficulty]   # fixed per level: copy offsets stay constant
    op = rng.choice(("reverse", "sort", "dedupe", "count", "upper", "sortnum", "max"))
    if op in ("sortnum", "max"):
        top = 9 if difficulty == 1 else 99
        nums = [rng.randint(0, top) for _ in range(length)]
        listed = ", ".join(map(str, nums))
        if op == "sortnum":
            return _inst(f"Sort the numbers: {listed}", ", ".join(map(str, sorted(nums))))
        return _inst(f"Find the largest number: {listed}", str(max(nums)))
    if op == "dedupe":                       # a small alphabet so that letters repeat
        word = _word(rng, length, rng.sample(string.ascii_lowercase, max(2, length - 2)))
        return _inst(f"Remove repeated letters: {word}", _dedupe(word))
    word = _word(rng, length)
    if op == "reverse":
        return _inst(f"Reverse the letters: {word}", word[::-1])
    if op == "sort":
        return _inst(f"Sort the letters: {word}", "".join(sorted(word)))
    if op == "count":
        return _inst(f"Count the letters: {word}", str(len(word)))
    return _inst(f"Write in upper case: {word}", word.upper())


def _inst(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "response": answer, "answer": answer}


# -------------------------------------------------------------------------------------------- chat
# kind -> (statement, question, reply, values). Values never repeat across kinds and, within a kind,
# start with distinct letters: recalling a fact then means finding its first character, and the rest
# of the word is memorised (a full copy circuit is too slow to learn at this scale, docs/CPU_FINDINGS.md Q1).
_FACTS = {
    "city": ("I live in {v}.", "Where do I live?", "You live in {v}.",
             ("Oslo", "Rome", "Lima", "Kyiv", "Bern", "Cairo", "Paris", "Tokyo", "Delhi", "Minsk")),
    "pet": ("I have a {v}.", "What pet do I have?", "You have a {v}.",
            ("cat", "dog", "fish", "bird", "goat", "hen", "pony", "mouse", "rat", "lamb")),
    "color": ("My favorite color is {v}.", "What is my favorite color?", "It is {v}.",
              ("red", "blue", "green", "pink", "tan", "white", "yellow", "orange", "violet", "cyan")),
    "name": ("My name is {v}.", "What is my name?", "Your name is {v}.", _NAMES),
    "number": ("My lucky number is {v}.", "What is my lucky number?", "It is {v}.",
               tuple("123456789")),
    "food": ("I like {v}.", "What food do I like?", "You like {v}.",
             ("rice", "soup", "cake", "figs", "pie", "beans", "nuts", "eggs", "honey", "melon")),
}
_ACKS = ("Got it.", "Nice!", "Okay.", "Good to know.")


def _chat(rng: random.Random, difficulty: int) -> dict:
    kinds = rng.sample(sorted(_FACTS), difficulty + 1)    # 2, 3 or 4 facts, one per kind
    facts = {kind: rng.choice(_FACTS[kind][3]) for kind in kinds}
    statements = [_FACTS[kind][0].format(v=facts[kind]) for kind in kinds]
    # two facts in the first turn, then one fact per turn
    turns = [" ".join(statements[:2])] + statements[2:]
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": rng.choice(_ACKS)}]
    asked = rng.choice(kinds)
    messages.append({"role": "user", "content": _FACTS[asked][1]})
    return {"messages": messages, "response": _FACTS[asked][2].format(v=facts[asked]),
            "answer": facts[asked]}


# ----------------------------------------------------------------------------------------- drivers
_GENERATORS: dict[str, Callable[[random.Random, int], dict]] = {
    "math": _math, "code": _code, "logic": _logic, "instruction": _instruction, "chat": _chat}


def _check(ability: str, split: str, difficulty: int) -> None:
    if ability not in _GENERATORS:
        raise ValueError(f"unknown ability {ability!r}; known: {', '.join(ABILITIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")


def generate(ability: str, n: int, seed: int = 0, split: str = "train",
             difficulty: int = DEFAULT_DIFFICULTY, unique: bool = False) -> list[dict]:
    """Return ``n`` records of ``ability`` whose prompts all belong to ``split``.

    Deterministic in ``(ability, n, seed, split, difficulty, unique)``; a longer list extends a shorter
    one. ``unique=True`` drops repeated prompts (for evaluation sets); training streams may repeat.
    Records follow docs/CONTRACTS.md: ``task``, ``id``, ``prompt`` or ``messages``, ``response``,
    ``answer`` (+ hidden ``tests`` for code).
    """
    _check(ability, split, difficulty)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"epi-mini/{ability}/{split}/{seed}/{difficulty}")
    records: list[dict] = []
    seen: set[str] = set()
    budget = 200 * n + 10_000                  # ~10 draws per kept test record; the rest is headroom
    for _ in range(budget):
        if len(records) == n:
            return records
        body = _GENERATORS[ability](rng, difficulty)
        key = canonical_prompt(body)
        if split_of(key) != split or (unique and key in seen):
            continue
        seen.add(key)
        record = {"task": ability, "id": f"{ability}-d{difficulty}-s{seed}-{split}-{len(records):05d}"}
        record.update(body)
        records.append(record)
    if len(records) == n:
        return records
    raise ValueError(f"could only draw {len(records)} distinct {ability} prompts for split {split!r} at "
                     f"difficulty {difficulty}; ask for fewer records or pass unique=False")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_dataset(out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None, *,
                  difficulty: int = DEFAULT_DIFFICULTY) -> dict:
    """Return the manifest of the EPI-Mini sample written to ``out``: ``<out>/<ability>/<split>.jsonl``.

    Each split file holds distinct prompts (``unique=True``); ``sizes`` maps split -> records per
    ability (default ``DEFAULT_SIZES``). ``<out>/MANIFEST.json`` records the command, seed, difficulty,
    sizes and the sha256 of every file, so the output is byte-identical for the same arguments.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"sizes may only name the splits {SPLITS}, got {sorted(unknown)}")
    out = Path(out)
    command = f"python -m epi data --out {out.as_posix()} --seed {seed}"
    if difficulty != DEFAULT_DIFFICULTY:
        command += f" --difficulty {difficulty}"
    files = {}
    for ability in ABILITIES:
        (out / ability).mkdir(parents=True, exist_ok=True)
        for split, n in sizes.items():
            path = out / ability / f"{split}.jsonl"
            records = generate(ability, n, seed=seed, split=split, difficulty=difficulty, unique=True)
            with path.open("w", encoding="ascii", newline="\n") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
            files[f"{ability}/{split}.jsonl"] = _sha256(path)
    manifest = {"command": command, "generator": "epi.tasks.synthetic.write_dataset", "seed": seed,
                "difficulty": difficulty, "sizes": sizes, "files": files}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="ascii")
    logger.info("wrote %d EPI-Mini files to %s", len(files), out)
    return manifest
