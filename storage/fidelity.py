"""The fidelity records a cache's done markers carry, read back: their means over all rows.

The caching job measures each record (teacher/fidelity.py: ``fidelity_sums`` of the stored rebuild
vs the full teacher) and hands it to ``CacheWriter.write_item``; storage keeps it as given. A
record holds sums, so records of any items add up: ``{"rows": n, "ks": [...], "taus": [...],
"tv": [[sum per τ] per k], "kl": [...]}``.
"""
from __future__ import annotations

from typing import Iterable


def summarize(records: Iterable[dict]) -> dict | None:
    """Means over all rows of several fidelity records (same ks/taus), or None if there are none.

    Returns:
        ``{"rows": n, "ks": [...], "taus": [...], "tv": [[mean per τ] per k], "kl": [...]}``.
    """
    total = None
    for rec in records:
        if total is None:
            total = {key: rec[key] for key in ("ks", "taus")} | {"rows": 0, "tv": None, "kl": None}
        if rec["ks"] != total["ks"] or rec["taus"] != total["taus"]:
            raise ValueError(f"fidelity records differ: ks {rec['ks']} taus {rec['taus']} vs {total['ks']} {total['taus']}")
        total["rows"] += rec["rows"]
        for key in ("tv", "kl"):
            total[key] = rec[key] if total[key] is None else [[a + b for a, b in zip(x, y)]
                                                               for x, y in zip(total[key], rec[key])]
    if not total or not total["rows"]:
        return None
    n = total["rows"]
    return {**total, "tv": [[v / n for v in row] for row in total["tv"]], "kl": [[v / n for v in row] for row in total["kl"]]}
