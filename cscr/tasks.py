"""A task set the project generates itself: prompts whose reference answers are computed.

``builtin_tasks(n, seed)`` draws ``n`` prompts, cycling over task families (arithmetic,
comparisons, sequences, remainders, unit conversion, letter counting, word order, parity, prime
checks, weekday arithmetic, and multiple choice built from the same computed facts), each with
the grader that checks it (cscr.grading). Deterministic for a seed, no download: labelling,
fingerprinting, training and evaluating a live pool all run offline with it.
``write_jsonl`` / ``read_jsonl`` use the format ``cscr label --prompts`` reads:
``{"id", "prompt", "answer", "grader", "category"}`` per line (``split`` optional).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cscr.atomic import atomic_write_text
from cscr.errors import InputError
from cscr.grading import GRADERS
from cscr.jsonl import iter_jsonl


@dataclass(frozen=True)
class Task:
    id: str  # unique prompt id
    prompt: str  # the text sent to the expert
    answer: str  # the computed reference answer
    grader: str  # name in cscr.grading.GRADERS
    category: str  # task family
    split: str | None = None  # train | val | probe | test, or None: assigned when labelling


WORDS = ["apple", "river", "garden", "window", "silver", "planet", "market", "yellow", "bridge", "doctor", "orange", "candle", "forest", "winter", "summer", "pencil", "rocket", "guitar", "island", "mirror", "basket", "dragon", "honey", "jacket", "kitten", "ladder", "marble", "needle", "ocean", "pepper", "quartz", "rabbit", "saddle", "tomato", "umbrella", "violin", "walnut", "zebra", "anchor", "butter", "castle", "desert", "engine", "falcon", "glacier", "harbor", "insect", "jungle", "kettle", "lemon", "meadow", "napkin", "oyster", "parrot", "quilt", "ribbon", "shadow", "thunder", "velvet", "whistle", "yogurt", "cactus", "dolphin", "feather", "giraffe", "hammer", "igloo", "lantern", "mango", "nectar", "orchid", "pillow", "puzzle", "shovel", "spider", "stream", "tunnel"]  # noqa: SIM905
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
UNITS = {"hours to minutes": 60, "minutes to seconds": 60, "kilometres to metres": 1000,
         "metres to centimetres": 100, "days to hours": 24, "kilograms to grams": 1000}
LETTERS = "ABCD"

_Gen = Callable[[np.random.Generator], tuple[str, str, str]]


def _num_q(q: str) -> str:
    return f"{q} Answer with the number only."


def _arith(r: np.random.Generator) -> tuple[str, str, str]:
    op = r.choice(["+", "-", "*"])
    a, b = (int(r.integers(2, 99)), int(r.integers(2, 99))) if op != "*" else (int(r.integers(2, 30)), int(r.integers(2, 13)))
    val = {"+": a + b, "-": a - b, "*": a * b}[op]
    return _num_q(f"What is {a} {op} {b}?"), str(val), "numeric"


def _compare(r: np.random.Generator) -> tuple[str, str, str]:
    a, b = (int(x) for x in r.choice(np.arange(1, 1000), 2, replace=False))
    which = r.choice(["larger", "smaller"])
    val = max(a, b) if which == "larger" else min(a, b)
    return _num_q(f"Which number is {which}, {a} or {b}?"), str(val), "numeric"


def _sequence(r: np.random.Generator) -> tuple[str, str, str]:
    start, step = int(r.integers(1, 30)), int(r.integers(2, 12))
    seq = [start + i * step for i in range(4)]
    return _num_q(f"What is the next number in the sequence {', '.join(map(str, seq))}?"), str(start + 4 * step), "numeric"


def _modulo(r: np.random.Generator) -> tuple[str, str, str]:
    a, b = int(r.integers(10, 200)), int(r.integers(2, 10))
    return _num_q(f"What is the remainder when {a} is divided by {b}?"), str(a % b), "numeric"


def _units(r: np.random.Generator) -> tuple[str, str, str]:
    name = str(r.choice(list(UNITS)))
    x = int(r.integers(2, 20))
    src, dst = name.split(" to ")
    return _num_q(f"How many {dst} are in {x} {src}?"), str(x * UNITS[name]), "numeric"


def _letters(r: np.random.Generator) -> tuple[str, str, str]:
    w = str(r.choice(WORDS))
    return _num_q(f"How many letters are in the word \"{w}\"?"), str(len(w)), "numeric"


def _alpha(r: np.random.Generator) -> tuple[str, str, str]:
    a, b = (str(x) for x in r.choice(WORDS, 2, replace=False))
    return (f"Which word comes first in alphabetical order, \"{a}\" or \"{b}\"? Answer with the word only.",
            min(a, b), "exact")


def _parity(r: np.random.Generator) -> tuple[str, str, str]:
    n = int(r.integers(1, 500))
    return f"Is {n} an even number? Answer yes or no.", "yes" if n % 2 == 0 else "no", "exact"


def _prime(r: np.random.Generator) -> tuple[str, str, str]:
    n = int(r.integers(2, 100))
    is_p = all(n % d for d in range(2, int(n ** 0.5) + 1))
    return f"Is {n} a prime number? Answer yes or no.", "yes" if is_p else "no", "exact"


def _weekday(r: np.random.Generator) -> tuple[str, str, str]:
    d, k = int(r.integers(0, 7)), int(r.integers(1, 10))
    return (f"What day of the week is {k} days after {DAYS[d]}? Answer with the day only.",
            DAYS[(d + k) % 7], "exact")


def _mc(r: np.random.Generator) -> tuple[str, str, str]:
    """Multiple choice over a computed fact: the right value among three distractors."""
    kind = r.choice(["product", "sum", "longest"])
    if kind == "longest":
        for _ in range(1000):  # four words of four different lengths: one right answer
            words = [str(w) for w in r.choice(WORDS, 4, replace=False)]
            if len(set(map(len, words))) == 4:
                break
        best = max(words, key=len)
        q = "Which word has the most letters?"
        options, correct = words, words.index(best)
    else:
        a, b = int(r.integers(3, 25)), int(r.integers(3, 25))
        val = a * b if kind == "product" else a + b
        q = f"What is {a} {'times' if kind == 'product' else 'plus'} {b}?"
        wrong: set[int] = set()
        while len(wrong) < 3:
            cand = val + int(r.choice([-1, 1])) * int(r.integers(1, 12))
            if cand != val and cand > 0:
                wrong.add(cand)
        options = [str(x) for x in [val, *sorted(wrong)]]
        perm = r.permutation(4)
        options = [options[i] for i in perm]
        correct = int(np.flatnonzero(perm == 0)[0])
    body = " ".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    return f"{q} {body}. Answer with the letter only.", LETTERS[correct], "mc"


FAMILIES: dict[str, _Gen] = {
    "arithmetic": _arith, "comparison": _compare, "sequence": _sequence, "remainder": _modulo,
    "units": _units, "letters": _letters, "alphabetical": _alpha, "parity": _parity,
    "prime": _prime, "weekday": _weekday, "multiple-choice": _mc,
}


def builtin_tasks(n: int = 300, seed: int = 0) -> list[Task]:
    """``n`` generated tasks, families in turn, unique prompts, deterministic for ``seed``."""
    if n < 1:
        raise InputError(f"number of tasks must be >= 1, got {n}")
    r = np.random.default_rng(seed)
    names = list(FAMILIES)
    tasks: list[Task] = []
    seen: set[str] = set()
    i = 0
    while len(tasks) < n:
        fam = names[i % len(names)]
        i += 1
        prompt, answer, grader = FAMILIES[fam](r)
        if prompt in seen:
            if i > 50 * n:
                raise InputError(f"could not draw {n} distinct tasks")
            continue
        seen.add(prompt)
        tasks.append(Task(f"builtin-{seed}-{len(tasks):05d}", prompt, answer, grader, fam))
    return tasks


def write_jsonl(tasks: list[Task], path: str | os.PathLike[str]) -> Path:
    text = "".join(json.dumps({k: v for k, v in asdict(t).items() if v is not None}) + "\n" for t in tasks)
    return atomic_write_text(path, text)


def read_jsonl(path: str | os.PathLike[str]) -> list[Task]:
    """Prompts with reference answers, one JSON object a line (clear error per bad line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    tasks: list[Task] = []
    ids: set[str] = set()
    for ln, d in iter_jsonl(path, InputError):
        missing = [k for k in ("prompt", "answer") if k not in d]
        if missing:
            raise InputError(f"{path}:{ln}: missing field(s) {missing}")
        unknown = sorted(set(d) - {"id", "prompt", "answer", "grader", "category", "split"})
        if unknown:
            raise InputError(f"{path}:{ln}: unknown field(s) {unknown}")
        grader = d.get("grader", "exact")
        if grader not in GRADERS:
            raise InputError(f"{path}:{ln}: unknown grader {grader!r}; known: {sorted(GRADERS)}")
        tid = str(d.get("id", f"line-{ln}"))
        if tid in ids:
            raise InputError(f"{path}:{ln}: duplicate id {tid!r}")
        ids.add(tid)
        split = d.get("split")
        if split is not None and split not in ("train", "val", "probe", "test"):
            raise InputError(f"{path}:{ln}: unknown split {split!r}")
        tasks.append(Task(tid, str(d["prompt"]), str(d["answer"]), grader, str(d.get("category", "")), split))
    if not tasks:
        raise InputError(f"{path}: no prompts")
    return tasks
