"""The interleaved timing loop: A/B pairs in alternating order, block ratios, their median and spread, peak memory."""
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

MIN_STAGE_SECONDS = 0.5     # a cheap stage runs more pairs than --reps, for about this long ...
MAX_PAIRS = 100             # ... up to this many
TRUST_SPREAD = 0.10         # interquartile range of the ratios over their median above which a ratio is flagged
MIN_TRUSTED_RATIOS = 5      # fewer block ratios (2 pairs each) than this: no spread worth the name



@dataclass
class Pairs:
    """Times (ms) of two functions run in interleaved pairs, and each one's last output."""
    a_ms: List[float] = field(default_factory=list)
    b_ms: List[float] = field(default_factory=list)
    a_out: Any = None
    b_out: Any = None


def _timed_call(fn: Callable[[], Any], clock: Callable[[], float], sync: Callable[[], None]) -> Tuple[float, Any]:
    sync()
    start = clock()
    out = fn()
    sync()
    return (clock() - start) * 1e3, out


def interleave(a: Callable[[], Any], b: Callable[[], Any], reps: int, *, min_time: float = 0.0,
               max_pairs: int = MAX_PAIRS, clock: Callable[[], float] = time.perf_counter,
               sync: Callable[[], None] = lambda: None) -> Pairs:
    """Warm both up (one call each, b then a, not recorded), then time pairs of calls, alternating the
    order between pairs (a b, b a, a b, ...) so that a drift of the machine's speed weighs on both alike.

    Runs ``reps`` pairs, or more when a pair is cheap: as many as fit in ``min_time`` seconds
    (judged from the warm-up calls), at most ``max(reps, max_pairs)``; rounded up to an even
    number (whole blocks for block_ratios) beyond one. ``sync`` runs before and after every timed
    call (a CUDA synchronize), ``clock`` gives seconds.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    result = Pairs()
    # b then a: the first pair (a b) then finds a right after itself, as every later a b pair does.
    warm_b, result.b_out = _timed_call(b, clock, sync)
    warm_a, result.a_out = _timed_call(a, clock, sync)
    pair_seconds = (warm_a + warm_b) / 1e3
    wanted = max_pairs if pair_seconds <= 0 else math.ceil(min_time / pair_seconds - 1e-6)
    pairs = max(reps, min(wanted, max_pairs))
    pairs += pairs % 2 if pairs > 1 else 0  # whole A B B A blocks
    for i in range(pairs):
        if i % 2 == 0:
            t_a, result.a_out = _timed_call(a, clock, sync)
            t_b, result.b_out = _timed_call(b, clock, sync)
        else:
            t_b, result.b_out = _timed_call(b, clock, sync)
            t_a, result.a_out = _timed_call(a, clock, sync)
        result.a_ms.append(t_a)
        result.b_ms.append(t_b)
    return result


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of values, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def block_ratios(reference_ms: Sequence[float], fast_ms: Sequence[float]) -> List[float]:
    """Speed-ups of interleaved pairs, one per block of two consecutive pairs (reference first, then
    detr_fast first: A B B A): sum of the reference's two times / sum of detr_fast's two. Within a
    block each side runs once right after the other side and once right after itself (warm caches,
    a reused allocation), and a steady drift of the machine's speed weighs on both alike; a lone last
    pair gives its own ratio."""
    if len(reference_ms) != len(fast_ms) or not reference_ms:
        raise ValueError("need two equally long, non-empty lists of paired times")
    ratios = []
    for i in range(0, len(reference_ms), 2):
        ref, fast = sum(reference_ms[i:i + 2]), sum(fast_ms[i:i + 2])
        ratios.append(ref / max(fast, 1e-9))
    return ratios


def ratio_summary(reference_ms: Sequence[float], fast_ms: Sequence[float]) -> Dict[str, Any]:
    """Each side's median time, and the median and quartiles of the block ratios (block_ratios)."""
    ratios = block_ratios(reference_ms, fast_ms)
    median = quantile(ratios, 0.5)
    p25, p75 = quantile(ratios, 0.25), quantile(ratios, 0.75)
    spread = (p75 - p25) / max(median, 1e-12)
    return {"reference_ms": quantile(reference_ms, 0.5), "detr_fast_ms": quantile(fast_ms, 0.5),
            "speedup": median, "speedup_p25": p25, "speedup_p75": p75, "spread": spread,
            "pairs": len(reference_ms), "ratios": len(ratios),
            "trusted": len(ratios) >= MIN_TRUSTED_RATIOS and spread <= TRUST_SPREAD,
            "reference_times_ms": list(reference_ms), "detr_fast_times_ms": list(fast_ms)}


@contextlib.contextmanager
def nvtx_range(name: str, device: torch.device) -> Iterator[None]:
    """An NVTX range on CUDA (visible in Nsight Systems); nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def in_range(fn: Callable[[], Any], name: str, device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        return fn

    def call():
        with nvtx_range(name, device):
            return fn()
    return call


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[Dict[str, int]]:
    """CUDA memory of one call of fn(): the peak allocated, and the peak over what was allocated
    before the call (the stage's own working memory and outputs). None off CUDA: the CPU
    allocator keeps no such statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return {"peak_bytes": int(peak), "stage_peak_bytes": int(peak - before)}


