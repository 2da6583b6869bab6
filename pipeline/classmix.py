"""How class-mixed a split's shards are, from the manifest's per-shard class counts.

Mixup/CutMix partners come from the same shard and a worker reads a few shards at a time, so a
class-sorted split (an ImageFolder written in source order, or shards written by another tool)
gives same-class pairs and few-class batches. :func:`class_mix` compares the shards with the
same samples in uniformly random order; :func:`class_mix_warning` is what ``make_shards`` and
the caching job print when shards look sorted.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from pipeline.manifest import Manifest


@dataclass(frozen=True)
class ClassMix:
    """How class-mixed a split's shards are, against the same shards in random order.

    ``distinct``/``distinct_random``: mean distinct classes per shard, observed and expected
    for a uniformly random order; ``same_pair``/``same_pair_random``: chance that two samples
    of one shard (a Mixup/CutMix pair) share a class; ``worst``: names of the least mixed shards.
    """

    distinct: float
    distinct_random: float
    same_pair: float
    same_pair_random: float
    worst: tuple[str, ...]

    @property
    def ratio(self) -> float:
        return self.distinct / self.distinct_random if self.distinct_random else 1.0


def expected_distinct(class_totals: Sequence[int], draws: int) -> float:
    """Mean number of distinct classes in ``draws`` samples taken uniformly without replacement
    from a population with ``class_totals`` samples per class: sum_c 1 - C(n - n_c, d) / C(n, d)."""
    n = sum(class_totals)
    base = math.lgamma(n + 1) - math.lgamma(n - draws + 1)
    return sum(1.0 if n - nc < draws else
               1.0 - math.exp(math.lgamma(n - nc + 1) - math.lgamma(n - nc - draws + 1) - base)
               for nc in class_totals)


def class_mix(m: Manifest) -> ClassMix | None:
    """:class:`ClassMix` from the manifest's per-shard class counts (None if it has none)."""
    if any(s.class_counts is None for s in m.shards):
        return None
    totals: Counter = Counter()
    for s in m.shards:
        for label, c in s.class_counts:
            totals[label] += c
    if sum(totals.values()) < 2:
        return None
    n = sum(totals.values())   # labelled samples (samples listed as bad have no class)
    labelled = [sum(c for _, c in s.class_counts) for s in m.shards]
    sizes = {c: expected_distinct(list(totals.values()), c) for c in set(labelled)}
    distinct = [len(s.class_counts) for s in m.shards]
    expected = [sizes[c] for c in labelled]
    pairs = [(sum(c * (c - 1) for _, c in s.class_counts), c * (c - 1)) for s, c in zip(m.shards, labelled)]
    random_pair = sum(c * (c - 1) for c in totals.values()) / (n * (n - 1))
    worst = sorted(range(len(m.shards)), key=lambda i: distinct[i] / expected[i] if expected[i] else 1.0)[:3]
    return ClassMix(distinct=sum(distinct) / len(distinct), distinct_random=sum(expected) / len(expected),
                    same_pair=sum(p for p, _ in pairs) / max(1, sum(q for _, q in pairs)),
                    same_pair_random=random_pair, worst=tuple(m.shards[i].name for i in worst))


def class_mix_warning(m: Manifest, threshold: float = 0.5) -> str | None:
    """A warning when shards hold far fewer classes than a random order would (e.g. class-sorted)."""
    mix = class_mix(m)
    if mix is None or mix.ratio >= threshold:
        return None
    return (f"warning: shards of {m.path} look class-sorted: {mix.distinct:.1f} distinct classes per shard "
            f"on average, a random order would give {mix.distinct_random:.1f} (least mixed: {', '.join(mix.worst)}); "
            f"Mixup/CutMix partners come from the same shard, so {100 * mix.same_pair:.0f}% of pairs share a class "
            f"(random order: {100 * mix.same_pair_random:.1f}%). Re-shard with `python -m pipeline.make_shards` "
            f"(it shuffles by default).")
