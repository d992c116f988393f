"""Turn a pytest-benchmark JSON into a speed-up plot (PNG) and a Markdown table.

    pytest bench/ --benchmark-only --benchmark-json=bench.json
    python bench/plot.py bench.json [more.json ...] -o speedup.png [--markdown table.md]
                         [--stat median] [--baseline-dtype float32]

Speed-up = the reference's time / the implementation's time, for rows doing the same work (same
stage, level, batch and shape; and same dtype unless --baseline-dtype names the reference's dtype,
e.g. to compare a bfloat16 detr_fast with the float32 reference). Several JSONs (e.g. a run split
in two to fit a time limit) are each compared with their own reference rows, so every ratio is
measured side by side in one run; their rows are then shown together. The plot has one panel per stage,
one group of bars per case and one bar per implementation, on a log scale with 1x marked.
Needs matplotlib for the PNG (pip install -e ".[plot]"); the table alone does not.
"""
import argparse
import json
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

STAGE_ORDER = ("pad", "masks", "pos", "masks_pos", "backbone", "joiner")
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
    reference: Dict[tuple, float] = {}
    others = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if not {"stage", "impl", "dtype", "batch", "shape"} <= set(info):
            continue  # not one of ours
        seconds = float(bench["stats"][stat])
        if info["impl"] == "reference":
            reference[_case_key(info, None)] = seconds
        else:
            others.append((info, seconds))
    rows = []
    for info, seconds in others:
        base = reference.get(_case_key(info, baseline_dtype))
        if base is None:
            continue
        rows.append({"stage": info["stage"], "level": info.get("level", ""), "dtype": info["dtype"],
                     "batch": info["batch"], "shape": info["shape"], "impl": info["impl"],
                     "reference_ms": base * 1e3, "ms": seconds * 1e3, "speedup": base / seconds,
                     "max_error": info.get("max_error"),
                     "peak_memory_bytes": info.get("peak_memory_bytes")})
    return sort_rows(rows)


def sort_rows(rows: List[Dict]) -> List[Dict]:
    """Rows in pipeline order: stage, then level, dtype, batch and implementation."""
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return sorted(rows, key=lambda r: (order.get(r["stage"], len(order)), r["stage"], r["level"], r["dtype"],
                                       r["batch"], r["impl"]))


def describe(data: Dict) -> str:
    """Device and versions, from what bench/conftest.py recorded in machine_info."""
    info = (data.get("machine_info") or {}).get("detr_fast_bench") or {}
    parts = [info.get("device_name") or (data.get("machine_info") or {}).get("cpu", {}).get("brand_raw", "?"),
             f"torch {info.get('torch', '?')}", f"triton {info.get('triton', '?')}"]
    if info.get("cuda"):
        parts.append(f"CUDA {info['cuda']}")
    commit = (data.get("commit_info") or {}).get("id")
    if commit:
        dirty = " (uncommitted changes)" if (data.get("commit_info") or {}).get("dirty") else ""
        parts.append(f"commit {commit[:10]}{dirty}")
    if info.get("scale") is not None:
        light = info.get("light_scale")
        parts.append(f"scale {info['scale']}" + (f" (pad/masks/pos: {light})" if light is not None else ""))
    return ", ".join(parts)


def markdown(rows: Sequence[Dict], title: str, stat: str) -> str:
    lines = [f"{title} ({stat} times)", "",
             "| stage | level | dtype | batch | shape | impl | reference ms | ms | speed-up | max error |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        err = "" if r["max_error"] is None else f"{r['max_error']:.1e}"
        lines.append(f"| {r['stage']} | {r['level']} | {r['dtype']} | {r['batch']} | {r['shape']} | {r['impl']} "
                     f"| {r['reference_ms']:.3f} | {r['ms']:.3f} | {r['speedup']:.2f}x | {err} |")
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
    fig, axes = plt.subplots(len(stages), 1, figsize=(11, 2.6 * len(stages) + 0.6), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, stage in zip(axes[:, 0], stages):
        stage_rows = [r for r in rows if r["stage"] == stage]
        cases = list(OrderedDict.fromkeys((r["level"], r["dtype"], r["batch"], r["shape"]) for r in stage_rows))
        for k, impl in enumerate(impls):
            values = {(r["level"], r["dtype"], r["batch"], r["shape"]): r["speedup"]
                      for r in stage_rows if r["impl"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i, c in enumerate(cases) if c in values]
            ys = [values[c] for c in cases if c in values]
            bars = ax.bar(xs, ys, width, label=impl)
            for bar, y in zip(bars, ys):
                ax.annotate(f"{y:.2g}x", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up vs reference")
        ax.set_title(stage, loc="left", fontsize=10)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{lvl} {dt} b{b}\n{shape}" for lvl, dt, b, shape in cases], fontsize=7)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    title = "detr_fast speed-up vs the reference — " + describe(runs[0])
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
