"""The profile's report: its notes and its table."""
from typing import Dict, List, Optional

from . import model_zoo
from .timing import MIN_TRUSTED_RATIOS, TRUST_SPREAD

# ---------------------------------------------------------------- the report

# Environment variables that change how the CPU allocator reuses memory (see docs/cpu-performance.md).
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "MALLOC_CONF", "LD_PRELOAD")


def notes(report: Dict) -> List[str]:
    """What a reader must know to trust (or not) the table: flagged ratios, rows that are
    the same function on both sides, times that do not add up."""
    rows = report["stages"]
    lines = []
    noisy = [f"{name} ({100 * row['spread']:.0f}%)" for name, row in rows.items()
             if not row["trusted"] and row["ratios"] >= MIN_TRUSTED_RATIOS]
    if noisy:
        lines.append(f"! NOISY, do not trust these speed-ups: {', '.join(noisy)}: the ratios spread (interquartile "
                     f"range) over more than {100 * TRUST_SPREAD:.0f}% of their median: the machine's speed, or "
                     "the stage's own time, varied from run to run. Rerun on an idle machine or with more --reps.")
    few = [name for name, row in rows.items() if not row["trusted"] and row["ratios"] < MIN_TRUSTED_RATIOS]
    if few:
        lines.append(f"! NOISY: {', '.join(few)}: fewer than {2 * MIN_TRUSTED_RATIOS} pairs, no spread to judge "
                     "the ratio by; use a larger --reps.")
    load = report.get("load_average")
    cpus = report.get("cpus")
    if load is not None and cpus and load > 0.5 * cpus:
        lines.append(f"! the machine was busy: 1-minute load average {load:.1f} on {cpus} CPUs before the run; "
                     f"other processes compete with torch's {report.get('threads')} threads (a run that just "
                     "ended, e.g. a previous profile run back to back, counts in this average too).")
    if report["device"] == "cpu":
        settings = report.get("allocator_settings") or {}
        if settings:
            lines.append("allocator: " + " ".join(f"{k}={v}" for k, v in settings.items()))
        else:
            lines.append("allocator: glibc's defaults: large tensors get fresh pages at every allocation, and those "
                         "page faults are part of both sides' times (more of the reference's, which allocates more). "
                         "How many there are depends on the process's heap history, so the speed-up can move "
                         "between runs of this command by more than its p25-p75 shows (10-15% on the project's "
                         "2-core VM; more for code that allocates more): compare several runs. With "
                         "memory-keeping settings both run faster, and the speed-up is smaller and stable "
                         "(docs/cpu-performance.md).")
    if report.get("model", model_zoo.JOINER) not in model_zoo.JOINER_VARIANTS:
        return lines + _model_notes(report)
    masks = rows.get("masks")
    if masks is not None and masks["same_function"]:
        lines.append("masks: the same function on both sides (~1.0x by construction): here detr_fast computes the "
                     "masks fused with pos, see masks_pos.")
    elif masks is not None:
        lines.append("masks: detr_fast computes each level's mask from the image sizes (nested_tensor_from_tensor_"
                     "list records them; the full-size mask is not read); in the Joiner they are fused with pos "
                     "(masks_pos).")
    if "total" in rows and "backbone" in rows:
        for side in ("reference", "detr_fast"):
            key = f"{side}_ms"
            total, backbone = rows["total"][key], rows["backbone"][key]
            parts = sum(rows[r][key] for r in ("pad", "backbone", "masks_pos") if r in rows)
            if total < backbone:
                lines.append(f"! {side}: total {total:.1f} ms < backbone {backbone:.1f} ms although the total runs "
                             "the backbone: the machine was faster while the total was timed (stages are timed one "
                             "after the other); compare the ratios, each measured in interleaved pairs, not "
                             "absolute times across rows.")
            elif abs(total - parts) > 0.10 * parts:
                lines.append(f"! {side}: total {total:.1f} ms vs pad + backbone + masks_pos = {parts:.1f} ms "
                             f"({100 * (total - parts) / parts:+.0f}%): the machine's speed changed between stages; "
                             "compare the ratios, not absolute times across rows.")
    if report.get("detr_fast_backend", "auto") != "auto":
        lines.append(f"DETR_FAST_BACKEND={report['detr_fast_backend']} is set: it replaces detr_fast's "
                     "backend='auto'.")
    return lines


def _model_notes(report: Dict) -> List[str]:
    rows, lines = report["stages"], []
    for side in ("reference", "detr_fast"):
        total, backbone = rows["total"][f"{side}_ms"], rows["backbone"][f"{side}_ms"]
        if total < backbone:
            lines.append(f"! {side}: total {total:.1f} ms < backbone {backbone:.1f} ms although the forward runs the "
                         "backbone: the machine was faster while the total was timed (stages are timed one after the "
                         "other); compare the ratios, each measured in interleaved pairs, not absolute times across "
                         "rows (the backbone's share below is measured inside the same forwards).")
    inside = report.get("backbone_in_forward")
    if inside:
        sides = [f"{side} {100 * s['share']:.0f}% ({s['backbone_ms']:.1f} ms; the rest {s['rest_ms']:.1f} ms)"
                 for side, s in inside.items()]
        lines.append("backbone share of the forward (the conv encoder's time inside each timed forward, by forward "
                     "hooks; medians): " + ", ".join(sides) + ". These times are measured inside the full forwards, "
                     "so they differ from the backbone row, which times the encoder called on its own (other "
                     "caches, allocator state and warm-up around it)")
    errors = rows["total"].get("errors")
    if errors:
        lines.append("total errors (relative: max abs difference / max magnitude of the reference's): "
                     + ", ".join(f"{key} {value:.2e}" for key, value in errors.items()))
    return lines


def _mib(mem: Optional[Dict[str, int]]) -> str:
    return "-" if mem is None else f"{mem['stage_peak_bytes'] / 2 ** 20:.1f}"


def format_table(report: Dict) -> str:
    model = report.get("model", model_zoo.JOINER)
    lines = [f"device: {report['device']} ({report['device_name']})  threads: {report['threads']}  "
             f"dtype: {report['dtype']}  batch: {report['batch']}  images: {report['image_sizes']}  "
             f"torch {report['torch']}"]
    cpu = report.get("cpu") or {}
    lines.append(f"cpu: {cpu.get('model_name')} (vendor {cpu.get('vendor')}, family {cpu.get('family')}, model "
                 f"{cpu.get('model')}; bf16 hardware: {', '.join(cpu.get('bf16_flags') or []) or 'none'})  "
                 f"autocast: {report.get('autocast') or 'off'}")
    if report.get("train"):
        lines.append("training step (DETR's lr_backbone > 0: layers 2-4 trainable, frozen BN): forward and backward "
                     "are the parts of each timed step; step = the whole step; max error = norm-wise worst relative "
                     "gradient error vs the reference; MiB = peak memory of one step (CPU: profiler memory events)")
    if model not in model_zoo.JOINER_VARIANTS:
        padding = "padded, with a pixel_mask" if report.get("padded") else "unpadded, no pixel_mask"
        lines.append(f"model: {model} = {report.get('model_description', '')}; images {padding}")
    lines += ["reference and detr_fast run in interleaved pairs, order alternating; ms: each side's median; "
              "speed-up: median of the ratios of blocks of 2 pairs (A B B A), not the ratio of the two medians "
              "shown (the two differ when times spread, e.g. on a row of a few ms); p25-p75: their interquartile range",
              f"{'stage':<10}{'reference ms':>14}{'detr_fast ms':>14}{'speed-up':>10}{'p25-p75':>15}{'pairs':>7}"
              f"  {'trust':<6}{'max error':>11}{'ref MiB':>9}{'fast MiB':>10}"]
    for stage, row in report["stages"].items():
        spread = f"{row['speedup_p25']:.2f}-{row['speedup_p75']:.2f}x"
        trust = "ok" if row["trusted"] else "NOISY"
        if row.get("same_function"):
            trust = "same"
        lines.append(f"{stage:<10}{row['reference_ms']:>14.3f}{row['detr_fast_ms']:>14.3f}"
                     f"{row['speedup']:>9.2f}x{spread:>15}{row['pairs']:>7}  {trust:<6}{row['max_error']:>11.2e}"
                     f"{_mib(row['reference_memory']):>9}{_mib(row['detr_fast_memory']):>10}")
    lines += report.get("notes", [])
    lines.append(f"trust: ok = interquartile range of the ratios <= {100 * TRUST_SPREAD:.0f}% of their median over "
                 f">= {2 * MIN_TRUSTED_RATIOS} pairs; NOISY = not; same = the same function on both sides")
    if model in model_zoo.JOINER_VARIANTS:
        lines.append("max error: pad = abs diff + mask mismatches, backbone = max relative error of the features, "
                     "total = that or pos abs (+ mask mismatches), masks = mismatching elements, pos = max abs "
                     "error, masks_pos = pos max abs error + mask mismatches")
    else:
        lines.append("rows: backbone = the conv encoder, model.model.backbone(pixel_values, pixel_mask); pos = the "
                     "sine embedding of the last level (DETR family); total = the full forward, model(**inputs)")
        lines.append("max error: backbone = max relative error of the features (+ mask mismatches), pos = max abs "
                     "error, total = the larger relative error of logits and pred_boxes")
    lines.append("MiB: peak CUDA memory allocated during the stage beyond what was allocated before it "
                 "(its working memory and outputs); '-' off CUDA")
    if report.get("trace"):
        lines.append(f"trace: {report['trace']}")
    return "\n".join(lines)


