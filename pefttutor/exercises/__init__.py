"""Exercises for the notebooks: `check()`, `hint()` and `solution()`.

    ex = Exercise("rank of BA", checker=lambda a: a == 8, hint="...", solution="...")
    ex.check(answer)   # prints ✅ / ❌ / "not attempted yet"; never raises

An unattempted exercise (answer `None` or `...`) says so and does not fail, so notebooks run top
to bottom before the reader has done anything. A checker returns True/False, or (ok, message),
or raises AssertionError with a helpful message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

NOT_ATTEMPTED = (None, Ellipsis)


class Exercise:
    def __init__(self, title: str, checker: Callable[[Any], Any], hint: str, solution: str):
        self.title, self.checker, self._hint, self._solution = title, checker, hint, solution

    def check(self, answer: Any) -> bool | None:
        """Print whether `answer` is right; returns True/False, or None if not attempted."""
        if any(answer is sentinel for sentinel in NOT_ATTEMPTED):
            print(f"⏳ {self.title}: not attempted yet — replace the `...` with your answer.")
            return None
        try:
            verdict = self.checker(answer)
        except AssertionError as err:
            verdict = (False, str(err))
        except Exception as err:  # a reader's broken code should explain itself, not crash
            verdict = (False, f"your answer raised {type(err).__name__}: {err}")
        ok, message = verdict if isinstance(verdict, tuple) else (bool(verdict), "")
        if ok:
            print(f"✅ {self.title}: correct!" + (f" {message}" if message else ""))
        else:
            print(f"❌ {self.title}: not quite." + (f" {message}" if message else "") + " Try hint().")
        return bool(ok)

    def hint(self) -> None:
        print(f"💡 {self.title}: {self._hint}")

    def solution(self) -> None:
        print(f"📖 {self.title}:\n{self._solution}")


def close_to(expected: float, rel: float = 1e-3, abs_: float = 1e-6) -> Callable[[Any], Any]:
    """A checker accepting a number within `rel` relative (or `abs_` absolute) of `expected`."""

    def checker(answer: Any):
        value = float(answer)
        ok = abs(value - expected) <= max(abs_, rel * abs(expected))
        return ok, "" if ok else f"got {value:g}"

    return checker


def exact_count(expected: int) -> Callable[[Any], Any]:
    """A checker accepting exactly `expected` (a count), telling the reader what they have otherwise."""
    return lambda answer: (answer == expected, "" if answer == expected else f"you have {answer:,}")
