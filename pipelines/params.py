"""Config fields that carry their check next to their default, as ffcv-imagenet's `Param` does.

    depth: int = choice(50, STAGES)  # comment for the README reference
    log_every: int = at_least(20, 1)  # ...

`check_fields(section, "model")` raises ValueError("model.depth = 51: expected 18, 34, ... or 200")
for the first field whose value fails its check. Checks that relate several fields stay in the
section's `validate`. Here rather than in fastbyol.config because pipelines never imports fastbyol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable


def _or(choices: Iterable[Any]) -> str:
    """'a, b or c'."""
    words = [str(c) for c in choices]
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def param(default: Any, check: Callable[[Any], bool], expected: str) -> Any:
    """A dataclass field with `default` whose values must pass `check` ("expected `expected`")."""
    return dataclasses.field(default=default, metadata={"check": check, "expected": expected})


def choice(default: Any, choices: Iterable[Any], expected: str | None = None) -> Any:
    """A field whose value is one of `choices` (a tuple, or a dict's keys: the choices' one home)."""
    options = tuple(choices)
    return param(default, lambda v: v in options, expected or _or(options))


def at_least(default: float, low: float, expected: str | None = None) -> Any:
    return param(default, lambda v: v >= low, expected or f">= {low}")


def in_range(default: float, low: float, high: float, expected: str | None = None) -> Any:
    """A field in the closed interval [low, high]."""
    return param(default, lambda v: low <= v <= high, expected or f"a value in [{low}, {high}]")


def check_fields(section: Any, prefix: str) -> None:
    """ValueError naming `prefix.field`, its value and what was expected, for the first failing field."""
    for f in dataclasses.fields(section):
        check = f.metadata.get("check")
        value = getattr(section, f.name)
        if check is not None and not check(value):
            raise ValueError(f"{prefix}.{f.name} = {value!r}: expected {f.metadata['expected']}")


__all__ = ["at_least", "check_fields", "choice", "in_range", "param"]
