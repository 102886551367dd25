"""Exercises for the notebooks: `check()`, `hint()` and `solution()`.

    ex = Exercise("rank of BA", checker=exact_count(8), hint="...", solution="...")
    ex.check(answer)   # prints ✅ / ❌ / "not attempted yet"; never raises

An unattempted exercise (answer `None` or `...`) says so and does not fail, so notebooks run top
to bottom before the reader has done anything. A checker returns True/False, or (ok, message),
or raises AssertionError with a helpful message. Every checker states the kind of answer it takes
(`@expects(INT)`; `exact_count` and `close_to` do it themselves), so an answer of another type gets
"expected an int, got str" rather than an error from the checker's own code.

In the student release (`make student`) `PEFTTUTOR_STUDENT=1` is set (its notebooks' first code cell
does it) and `solution()` tells the reader to ask the instructor; `check()` and `hint()` work as usual.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from pefttutor.config import env_flag

NOT_ATTEMPTED = (None, Ellipsis)
STUDENT_ENV = "PEFTTUTOR_STUDENT"  # set to 1 (or true, yes) in the student release


def student_mode() -> bool:
    """Whether solutions are withheld: read at each call, so setting the variable after the import works."""
    return env_flag(STUDENT_ENV)


Checker = Callable[[Any], Any]


class Answer(NamedTuple):
    """A kind of answer: its name in messages, and the types that are it (numbers.Integral: np.int64 too)."""

    name: str
    types: type | tuple[type, ...]


INT = Answer("an int", numbers.Integral)
NUMBER = Answer("a number", numbers.Real)
STR = Answer("a str", str)
FUNCTION = Answer("a function", Callable)


def expects(kind: Answer) -> Callable[[Checker], Checker]:
    """Decorate a checker so that it only sees answers of `kind`; any other type gets "expected an int,
    got str", never an error from the checker (`f"{answer:,}"` raises on a str). bool is an int in
    Python, but True is no count, number, name or function: refused everywhere."""

    def decorate(checker: Checker) -> Checker:
        @functools.wraps(checker)
        def checked(answer: Any):
            if isinstance(answer, bool) or not isinstance(answer, kind.types):
                return False, f"expected {kind.name}, got {type(answer).__name__}"
            return checker(answer)

        return checked

    return decorate


class Exercise:
    def __init__(self, title: str, checker: Checker, hint: str, solution: str):
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
        if student_mode():
            print(f"📖 {self.title}: the solutions are not part of the student release; ask your instructor "
                  "(hint() gives a hint, check() grades your answer).")
            return
        print(f"📖 {self.title}:\n{self._solution}")


def close_to(expected: float, rel: float = 1e-3, abs_: float = 1e-6) -> Checker:
    """A checker accepting a number within `rel` relative (or `abs_` absolute) of `expected`."""

    @expects(NUMBER)
    def checker(answer: Any):
        value = float(answer)
        ok = abs(value - expected) <= max(abs_, rel * abs(expected))
        return ok, "" if ok else f"got {value:g}"

    return checker


def exact_count(expected: int) -> Checker:
    """A checker accepting exactly `expected` (a count), telling the reader what they have otherwise."""
    return expects(INT)(lambda answer: (answer == expected, "" if answer == expected else f"you have {answer:,}"))
