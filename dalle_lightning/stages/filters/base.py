"""What every row filter shares: a :class:`Decision` that says why, and reason counting.

A filter looks at one row (a mapping of column name to value, e.g. a row of
the ``downloaded`` dataset) and returns :data:`KEEP` or a rejection with a
short stable reason code (``caption_too_short``) and a human-readable detail
naming the values (``caption has 2 characters after strip, minimum is 5``).
:class:`FilterChain` runs filters in order — the first rejection wins — and
counts decisions by reason, for the stage's statistics (STYLE.md 3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KEPT = "kept"
"""The count key of rows no filter rejected."""

Row = Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    """Keep a row (``reason is None``) or drop it for ``reason``, explained by ``detail``."""

    reason: str | None = None
    """Short stable code (``caption_empty``, ``aspect_ratio``, …); None means keep."""
    detail: str = ""
    """Human-readable explanation with the offending values."""

    @property
    def keep(self) -> bool:
        return self.reason is None


KEEP = Decision()


def reject(reason: str, detail: str) -> Decision:
    """A rejection for ``reason`` (a non-empty code) explained by ``detail``."""
    if not reason:
        raise ValueError(f"a rejection needs a non-empty reason code, got {reason!r}")
    return Decision(reason, detail)


class RowFilter(ABC):
    """One filter: :meth:`decide` keeps or rejects a row; calling the filter also counts the decision."""

    reasons: tuple[str, ...] = ()
    """Every reason code this filter can return (documentation and tests)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @abstractmethod
    def decide(self, row: Row) -> Decision:
        """Keep ``row`` or reject it with a reason."""

    def __call__(self, row: Row) -> Decision:
        decision = self.decide(row)
        if decision.reason is not None and decision.reason not in self.reasons:
            raise AssertionError(f"{type(self).__name__} returned undeclared reason {decision.reason!r}")
        self.counts[decision.reason or KEPT] += 1
        return decision


class FilterChain:
    """Filters applied in order; a row is rejected by the first filter that rejects it."""

    def __init__(self, filters: Sequence[RowFilter]) -> None:
        self.filters = list(filters)
        self.counts: Counter[str] = Counter()

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(reason for f in self.filters for reason in f.reasons)

    def __call__(self, row: Row) -> Decision:
        for row_filter in self.filters:
            decision = row_filter(row)
            if not decision.keep:
                self.counts[decision.reason] += 1
                return decision
        self.counts[KEPT] += 1
        return KEEP

    def apply(self, rows: Iterable[Row]) -> list[Decision]:
        """The decision for each row of ``rows``, in order."""
        return [self(row) for row in rows]
