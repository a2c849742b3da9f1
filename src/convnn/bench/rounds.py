"""Interleaved rounds and the ratios they give (no torch: tests drive it with fake timers).

A ratio taken between two medians measured minutes apart compares two machine states as much
as two implementations: on a shared machine a burst of other work during one case's repeats
makes a nonsense ratio. So every comparison here runs its implementations round by round: in
round r each one takes one timed step, in an order rotated by r (none is always first after a
pause), and the ratio is the median over rounds of the per-round ratios, with its range.

A ratio is *noisy* when it rests on fewer than :data:`MIN_ROUNDS` rounds or when its
per-round ratios spread by more than :data:`NOISY_SPREAD` (max / min): then the machine
changed under the measurement more than the implementations differ, and the ratio is printed
as its range ("noisy: 0.40-3.10") and never judged against a target.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "MIN_ROUNDS",
    "NOISY_SPREAD",
    "format_ratio",
    "interleave",
    "ratio_stats",
]

MIN_ROUNDS = 3
NOISY_SPREAD = 2.0


def interleave(
    runners: Mapping[str, Callable[[], object]],
    rounds: int,
    on_error: Callable[[str, BaseException], None] | None = None,
) -> dict[str, list]:
    """Call every runner once per round, rounds one after another, the order rotated by one
    each round; returns ``{name: [result of round 0, round 1, ...]}``.

    A runner that raises is reported to ``on_error`` (or re-raised without it) and left out
    of the later rounds; its missing rounds are ``None``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(runners)
    out: dict[str, list] = {name: [None] * rounds for name in names}
    failed: set[str] = set()
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                out[name][r] = runners[name]()
            except Exception as exc:
                if on_error is None:
                    raise
                failed.add(name)
                on_error(name, exc)
    return out


def ratio_stats(ours: Sequence[float | None], base: Sequence[float | None]) -> dict | None:
    """Per-round ratios ``ours[r] / base[r]`` (rounds where both were measured): their median,
    min, max, count and whether they are too few or too spread to mean anything.

    None when no round has both.
    """
    per_round = [a / b for a, b in zip(ours, base) if a is not None and b is not None and b > 0]
    if not per_round:
        return None
    low, high = min(per_round), max(per_round)
    noisy = len(per_round) < MIN_ROUNDS or (low <= 0 or high / low > NOISY_SPREAD)
    return dict(
        median=statistics.median(per_round),
        min=low,
        max=high,
        rounds=len(per_round),
        noisy=noisy,
    )


def format_ratio(stats: dict | None, digits: int = 2) -> str:
    """'1.23 (1.10-1.40)', or 'noisy: 0.40-3.10 (n rounds)' when it means nothing, '-' when
    unmeasured."""
    if stats is None:
        return "-"
    lo, hi = f"{stats['min']:.{digits}f}", f"{stats['max']:.{digits}f}"
    if stats["noisy"]:
        return f"noisy: {lo}-{hi} ({stats['rounds']} rounds)"
    return f"{stats['median']:.{digits}f} ({lo}-{hi})"
