"""The main example's built-in task: write a date given in words in ISO 8601 form.

"the 5th of March, 2021" -> "2021-03-05". Dates are drawn uniformly from 1950-2049 and written
in one of eight everyday styles (month names, abbreviations, ordinals, weekdays); the answer is
exact or wrong. A small instruction-tuned model gets the idea but not the exact form before
fine-tuning (it keeps the input's style, adds a time, or guesses the year), which makes the
effect of fine-tuning easy to see in one number: exact-match accuracy on held-out prompts.

Everything is generated here from a seed: no download, and train and held-out sets share no
date.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterator

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
SYSTEM = "Be concise."
INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD), nothing else: {}"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


STYLES = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.strftime('%A')}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day}-{MONTHS[d.month - 1][:3]}-{d.year}",
    lambda d: f"{d.year}, {MONTHS[d.month - 1]} {_ordinal(d.day)}",
    lambda d: f"{MONTHS[d.month - 1]} {_ordinal(d.day)} {d.year}",
)


def _dates(seed: int) -> Iterator[datetime.date]:
    rng = random.Random(seed)
    first, days = (
        datetime.date(1950, 1, 1),
        (datetime.date(2050, 1, 1) - datetime.date(1950, 1, 1)).days,
    )
    while True:
        yield first + datetime.timedelta(days=rng.randrange(days))


def examples(n: int, seed: int, *, avoid: set[str] = frozenset()) -> list[tuple[str, str]]:
    """`n` (question, answer) pairs: a date in words and its ISO form, no answer in `avoid`."""
    rng, out, seen = random.Random(seed + 1), [], set(avoid)
    for day in _dates(seed):
        iso = day.isoformat()
        if iso in seen:
            continue
        seen.add(iso)
        out.append((rng.choice(STYLES)(day), iso))
        if len(out) == n:
            return out
    raise AssertionError("unreachable: the generator is endless")


def split(n_train: int, n_held: int, seed: int = 0) -> tuple[list, list]:
    """Train and held-out pairs with no date in common."""
    held = examples(n_held, seed + 1000)
    return examples(n_train, seed, avoid={a for _, a in held}), held


def messages(question: str) -> list[dict[str, str]]:
    """The chat messages that ask one question."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTION.format(question)},
    ]


def correct(answer: str, expected: str) -> bool:
    """Exact match, after stripping surrounding whitespace."""
    return answer.strip() == expected
