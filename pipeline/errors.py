"""One error type for bad input, printed as one line per problem (see docs/guide.md, "Errors").

Every problem names where it is (a config key, a file:row, or a task), what is wrong, and how to fix
it. Jobs catch `PipelineError`, print every problem at once and exit with status 2.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Problem:
    where: str  # config key, file:row, or task name
    what: str  # what is wrong
    fix: str  # how to fix it

    def __str__(self) -> str:
        return f"{self.where}: {self.what} — {self.fix}"


class PipelineError(Exception):
    """Bad input or an unusable environment; carries every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def one(cls, where: str, what: str, fix: str) -> "PipelineError":
        return cls(Problem(where, what, fix))


def exits_on_bad_input(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a job's `main`: a PipelineError prints its problems (one per line) and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except PipelineError as err:
            for problem in err.problems:
                print(problem, file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper
