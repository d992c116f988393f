"""Turn a pytest-benchmark JSON into a speed-up plot (PNG) and a Markdown table.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/plot.py bench.json [more.json ...] -o speedup.png [--markdown table.md]
                         [--stat median] [--baseline-dtype float32]

Speed-up = the reference's time / the implementation's time, for rows doing the same work (same
stage, level, batch and shape; and same dtype unless --baseline-dtype names the reference's dtype,
e.g. to compare a bfloat16 detr_fast with the float32 reference). Several JSONs (e.g. a run split
in two to fit a time limit) are each compared with their own reference rows, so every ratio is
measured side by side in one run; their rows are then shown together. The plot has one panel per stage,
one group of bars per case (levels in stride order) and one bar per implementation, on a log scale
with 1x marked; each bar is labelled with its speed-up and carries the spread of the ratio: from
(reference q1 / implementation q3) to (reference q3 / implementation q1), the interquartile ranges
of the two rows' own times (pytest-benchmark times the two rows one after the other, not
interleaved). The title names the device the benchmarks ran on.
Needs matplotlib for the PNG (pip install -e ".[plot]"); the table alone does not.
"""
import argparse
import json
import sys
import textwrap
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

STAGE_ORDER = ("pad", "masks", "pos", "masks_pos", "backbone", "joiner", "model")
LEVEL_ORDER = ("images", "s4", "s8", "s16", "s32", "s64", "layer4", "layers2-4", "layers1-4")
IMPL_ORDER = ("detr_fast", "compile", "onnxruntime")
STATS = ("median", "min", "mean")


def load(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks'); "
                         "write one with pytest bench/ --benchmark-only --benchmark-json=PATH")
    return data


def _case_key(info: Dict, dtype: Optional[str]) -> tuple:
    return (info["stage"], info.get("level", ""), info["batch"], info["shape"], dtype or info["dtype"])


def speedups(data: Dict, stat: str = "median", baseline_dtype: Optional[str] = None) -> List[Dict]:
    """One row per non-reference benchmark that has a reference to compare with."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    reference: Dict[tuple, Dict] = {}
    others = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if not {"stage", "impl", "dtype", "batch", "shape"} <= set(info):
            continue  # not one of ours
        if info["impl"] == "reference":
            reference[_case_key(info, None)] = bench["stats"]
        else:
            others.append((info, bench["stats"]))
    rows = []
    for info, stats in others:
        base = reference.get(_case_key(info, baseline_dtype))
        if base is None:
            continue
        seconds, base_seconds = float(stats[stat]), float(base[stat])
        low, high = ratio_spread(base, stats)
        rows.append({"stage": info["stage"], "level": info.get("level", ""), "dtype": info["dtype"],
                     "batch": info["batch"], "shape": info["shape"], "impl": info["impl"],
                     "reference_ms": base_seconds * 1e3, "ms": seconds * 1e3, "speedup": base_seconds / seconds,
                     "speedup_low": low, "speedup_high": high,
                     "max_error": info.get("max_error"),
                     "peak_memory_bytes": info.get("peak_memory_bytes")})
    return sort_rows(rows)


def ratio_spread(reference_stats: Dict, stats: Dict) -> Tuple[Optional[float], Optional[float]]:
    """The spread of a speed-up from both rows' quartiles: (reference q1 / q3, reference q3 / q1);
    (None, None) when the JSON has no quartiles."""
    try:
        ref_q1, ref_q3 = float(reference_stats["q1"]), float(reference_stats["q3"])
        q1, q3 = float(stats["q1"]), float(stats["q3"])
    except (KeyError, TypeError, ValueError):
        return None, None
    if q1 <= 0 or q3 <= 0:
        return None, None
    return ref_q1 / q3, ref_q3 / q1


def level_key(level: str) -> tuple:
    """Levels in stride order (s8 < s16 < s32, not text order), then the backbone variants."""
    if level in LEVEL_ORDER:
        return (0, LEVEL_ORDER.index(level), "")
    if level[:1] == "s" and level[1:].isdigit():
        return (0, len(LEVEL_ORDER) + int(level[1:]), "")
    return (1, 0, level)


def sort_rows(rows: List[Dict]) -> List[Dict]:
    """Rows in pipeline order: stage, then level (by stride), dtype, batch and implementation."""
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    impls = {s: i for i, s in enumerate(IMPL_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["stage"], len(order)), r["stage"], level_key(r["level"]),
                                       r["dtype"], r["batch"], impls.get(r["impl"], len(impls)), r["impl"]))


def format_speedup(value: float) -> str:
    """A speed-up as people write it: 0.73x, 2.61x, 26.1x, 262x (never 2.6e+02x)."""
    if value >= 99.95:
        return f"{value:.0f}x"
    if value >= 9.995:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


def format_spread(row: Dict) -> str:
    if row.get("speedup_low") is None or row.get("speedup_high") is None:
        return ""
    return f"{format_speedup(row['speedup_low'])}-{format_speedup(row['speedup_high'])}"


def run_device(data: Dict) -> Tuple[str, str]:
    """(device, device name) the benchmarks ran on: from machine_info, else from the rows."""
    info = (data.get("machine_info") or {}).get("detr_fast_bench") or {}
    device, name = info.get("device"), info.get("device_name")
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        device = device or extra.get("device")
        name = name or extra.get("device_name")
    if not name and (device or "cpu").startswith("cpu"):
        name = (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw")
    device = device or "?"
    return device, name or device


def describe(data: Dict) -> str:
    """The device the benchmarks ran on, and the versions, from what bench/conftest.py recorded."""
    info = (data.get("machine_info") or {}).get("detr_fast_bench") or {}
    device, name = run_device(data)
    on_cuda = device.startswith("cuda")
    parts = [f"{name} ({device})" if name != device else device]
    if info.get("threads") and not on_cuda:
        parts.append(f"{info['threads']} threads")
    parts += [f"torch {info.get('torch', '?')}", f"triton {info.get('triton', '?')}"]
    if on_cuda and info.get("cuda"):
        parts.append(f"CUDA {info['cuda']}")
    commit = (data.get("commit_info") or {}).get("id")
    if commit:
        dirty = " (uncommitted changes)" if (data.get("commit_info") or {}).get("dirty") else ""
        parts.append(f"commit {commit[:10]}{dirty}")
    if info.get("scale") is not None:
        light = info.get("light_scale")
        parts.append(f"scale {info['scale']}" + (f" (pad/masks/pos: {light})" if light is not None else ""))
    stages = {(b.get("extra_info") or {}).get("stage") for b in data.get("benchmarks", [])}
    if "model" in stages:
        parts.append(f"model stage: scale {info.get('model_scale', 1.0)}, transformers {info.get('transformers', '?')}")
    return ", ".join(parts)


def markdown(rows: Sequence[Dict], title: str, stat: str) -> str:
    lines = [f"{title} ({stat} times; spread: reference q1/q3 to q3/q1 of the two rows)", "",
             "| stage | level | dtype | batch | shape | impl | reference ms | ms | speed-up | spread | max error |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        err = "" if r["max_error"] is None else f"{r['max_error']:.1e}"
        lines.append(f"| {r['stage']} | {r['level']} | {r['dtype']} | {r['batch']} | {r['shape']} | {r['impl']} "
                     f"| {r['reference_ms']:.3f} | {r['ms']:.3f} | {format_speedup(r['speedup'])} "
                     f"| {format_spread(r)} | {err} |")
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("bench/plot.py needs matplotlib to draw the PNG: pip install -e \".[plot]\" "
                         "(or pass --markdown only)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot(rows: Sequence[Dict], title: str, path: str) -> None:
    plt = _pyplot()
    stages = list(OrderedDict.fromkeys(r["stage"] for r in rows))
    impls = list(OrderedDict.fromkeys(r["impl"] for r in rows))
    if not stages:
        raise ValueError("nothing to plot: no benchmark has both a reference and another implementation")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = sort_rows(list(rows))
    fig, axes = plt.subplots(len(stages), 1, figsize=(12, 2.8 * len(stages) + 0.8), squeeze=False)
    colors = {impl: f"C{k}" for k, impl in enumerate(impls)}  # one colour per implementation throughout
    for ax, stage in zip(axes[:, 0], stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        cases = list(OrderedDict.fromkeys((r["level"], r["dtype"], r["batch"], r["shape"]) for r in stage_rows))
        stage_impls = [impl for impl in impls if any(r["impl"] == impl for r in stage_rows)]
        width = 0.8 / max(1, len(stage_impls))
        top, bottom = 1.0, 1.0
        for k, impl in enumerate(stage_impls):
            by_case = {(r["level"], r["dtype"], r["batch"], r["shape"]): r for r in stage_rows if r["impl"] == impl}
            shown = [(i, by_case[c]) for i, c in enumerate(cases) if c in by_case]
            if not shown:
                continue
            xs = [i + (k - (len(stage_impls) - 1) / 2) * width for i, _ in shown]
            ys = [r["speedup"] for _, r in shown]
            lows = [r["speedup_low"] if r.get("speedup_low") is not None else r["speedup"] for _, r in shown]
            highs = [r["speedup_high"] if r.get("speedup_high") is not None else r["speedup"] for _, r in shown]
            yerr = [[max(0.0, y - lo) for y, lo in zip(ys, lows)], [max(0.0, hi - y) for y, hi in zip(ys, highs)]]
            ax.bar(xs, ys, width, label=impl, color=colors[impl], yerr=yerr, capsize=2,
                   error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
            for x, y, hi in zip(xs, ys, highs):
                ax.annotate(format_speedup(y), (x, max(y, hi)), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7,
                            rotation=90 if len(cases) * len(stage_impls) > 24 else 0)
            top, bottom = max([top] + highs), min([bottom] + lows)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        # Room above the tallest bar for its label, and below the smallest one.
        ax.set_ylim(bottom / 1.6, top * 3.0)
        # Ticks at 1, 2, 5 per decade, labelled as speed-ups (not 3x10^0).
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("speed-up vs reference")
        ax.set_title(stage, loc="left", fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{lvl} {dt} b{b}\n{shape}" for lvl, dt, b, shape in cases], fontsize=7)
        # Outside the plotting area: no label hides under it.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    fig.suptitle(textwrap.fill(title, 140), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+",
                        help="pytest-benchmark JSONs written by pytest bench/ --benchmark-json; each needs "
                             "its own reference rows")
    parser.add_argument("-o", "--output", default=None, help="the PNG to write")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown here ('-': stdout)")
    parser.add_argument("--stat", choices=STATS, default="median", help="which time to compare (default median)")
    parser.add_argument("--baseline-dtype", default=None,
                        help="compare with the reference in this dtype (default: the same dtype)")
    args = parser.parse_args(argv)
    if args.output is None and args.markdown is None:
        parser.error("nothing to do: pass -o PNG and/or --markdown PATH")
    runs = [load(path) for path in args.json]
    rows = []
    for path, data in zip(args.json, runs):
        run_rows = speedups(data, args.stat, args.baseline_dtype)
        if not run_rows:
            raise SystemExit(f"{path}: no benchmark pairs an implementation with a reference "
                             "(run with --bench-impls including reference)")
        rows.extend(run_rows)
    rows = sort_rows(rows)
    title = "detr_fast speed-up vs the reference on " + describe(runs[0])
    if len(runs) > 1:
        title += f" ({len(runs)} runs, each ratio within one run)"
    if args.markdown == "-":
        sys.stdout.write(markdown(rows, title, args.stat))
    elif args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, title, args.stat))
    if args.output:
        plot(rows, title, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
