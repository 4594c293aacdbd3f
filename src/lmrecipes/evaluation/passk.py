"""The unbiased pass@k estimator of the Codex paper (Chen et al., 2021, section 2.1).

With ``n`` samples of a problem of which ``c`` pass, pass@k = 1 - C(n - c, k) / C(n, k): the chance that at
least one of k samples drawn without replacement from the n passes. It is averaged over problems, and defined
only for k <= n.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

DEFAULT_KS = (1, 10, 100)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) for one problem, as the product prod_{i = n-c+1}^{n} (1 - k / i), which stays
    accurate where the binomials overflow a float (n = 200, k = 100)."""
    if not 0 <= c <= n:
        raise ValueError(f"c={c} passing samples out of n={n}: need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} with n={n} samples: need 1 <= k <= n")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        all_fail *= 1.0 - k / i
    return 1.0 - all_fail


def pass_at_k_table(
    counts: Mapping[str, tuple[int, int]], ks: Iterable[int] | None = None
) -> dict[str, float]:
    """Mean pass@k over problems, as ``{"pass@1": ..., "pass@10": ...}``.

    Args:
        counts: ``(n, c)`` per task id: samples and passing samples.
        ks: the k to report. Given explicitly, each must be at most every problem's n (else ValueError
            naming k, the task and its n). None: ``DEFAULT_KS``, leaving out those above the smallest n.
    """
    if not counts:
        raise ValueError("no problems to score: counts is empty")
    fewest = min(counts, key=lambda task: counts[task][0])
    if ks is None:
        ks = [k for k in DEFAULT_KS if k <= counts[fewest][0]]
    table = {}
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r}: give positive integers")
        if k > counts[fewest][0]:
            raise ValueError(
                f"pass@{k} needs at least {k} samples per problem; {fewest} has n={counts[fewest][0]} "
                "(generate more samples or ask for a smaller k)"
            )
        table[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return table
