"""The A/B loop of the bench scripts that compare two ways of running one thing (compare_upstream,
compare_pieces, compare_dino, compare_sine_hw, compare_train): two warm-up rounds, then pairs whose
order alternates (a b, b a, ...), and the per-pair ratios' median and quartiles. (`python -m
detr_fast profile` has its own, with block ratios and a time budget: detr_fast.measure.timing.)"""
import statistics
import time
from typing import Any, Callable, Dict, List


def alternate(sides: Dict[str, Callable[[], Any]], pairs: int) -> Dict[str, List[float]]:
    """Seconds per call of each of the two ``sides`` over ``pairs`` interleaved pairs."""
    first, second = sides
    for run in list(sides.values()) * 2:  # warm-up
        run()
    times: Dict[str, List[float]] = {side: [] for side in sides}
    for r in range(pairs):
        for side in ((first, second) if r % 2 == 0 else (second, first)):
            start = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - start)
    return times


def speedup(slow: List[float], fast: List[float], digits: int = 2) -> str:
    """'speed-up median Mx (p25 Ax, p75 Bx), pairs N' of the per-pair ratios slow / fast."""
    ratios = sorted(s / f for s, f in zip(slow, fast))
    quantile = lambda q: ratios[int(q * (len(ratios) - 1))]  # noqa: E731
    return (f"speed-up median {statistics.median(ratios):.{digits}f}x (p25 {quantile(0.25):.{digits}f}, "
            f"p75 {quantile(0.75):.{digits}f}), pairs {len(ratios)}")


def summary(times: Dict[str, List[float]], digits: int = 0) -> str:
    """'A x ms, B y ms, speed-up ...' for the two sides of ``alternate`` (each side's median, then the
    ratios of the first side's times over the second's)."""
    (slow_name, slow), (fast_name, fast) = times.items()
    return (f"{slow_name} {statistics.median(slow) * 1e3:.{digits}f} ms, {fast_name} "
            f"{statistics.median(fast) * 1e3:.{digits}f} ms, {speedup(slow, fast)}")
