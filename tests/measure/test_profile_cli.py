"""`python -m detr_fast profile`: end to end at a tiny size (the table, the JSON report, the trace),
the interleaved measurement on a fake clock, the report's notes, and bad flags as usage errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from detr_fast import __main__ as cli
from detr_fast.measure import profile, timing
from detr_fast.measure import report as table_report
from detr_fast.measure.profile import STAGES
from tests.helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT


def _run(args, tmp_path):
    env = dict(os.environ)
    env.pop("DETR_FAST_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)  # the profile measures what a user runs, not the interpreter
    return subprocess.run([sys.executable, "-m", "detr_fast", "profile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_profile_writes_table_json_and_trace(tmp_path):
    report_path, trace_path = tmp_path / "report.json", tmp_path / "trace.json"
    proc = _run(["--device", "cpu", "--scale", "0.08", "--reps", "1", "--json", str(report_path),
                 "--trace", str(trace_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The table: a header with the thread count, one row per stage, the notes.
    lines = proc.stdout.splitlines()
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), proc.stdout
    assert f"threads: {torch.get_num_threads()}" in proc.stdout
    assert "p25-p75" in proc.stdout and "ref MiB" in proc.stdout and "trace:" in proc.stdout
    # What detr_fast does in the masks row is said.
    assert any(line.startswith("masks:") for line in lines), proc.stdout

    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["batch"] == 2
    assert report["model"] == "joiner"  # the default --model: the backbone stage alone
    assert report["threads"] == torch.get_num_threads() and report["device_name"]
    # DETR's 800x1066 and 750x1333 at scale 0.08.
    assert report["image_sizes"] == [[64, 85], [60, 107]]
    assert report["trace"] == str(trace_path)
    assert list(report["stages"]) == list(STAGES)
    assert report["stages"]["total"]["stage"] == "joiner"
    for stage, row in report["stages"].items():
        assert row["reference_ms"] > 0 and row["detr_fast_ms"] > 0, stage
        assert row["speedup_p25"] <= row["speedup"] <= row["speedup_p75"], stage
        assert row["pairs"] >= 1 and isinstance(row["trusted"], bool), stage
        assert len(row["reference_times_ms"]) == len(row["detr_fast_times_ms"]) == row["pairs"], stage
        # CPU: no allocator statistics, recorded as null rather than a made-up number.
        assert row["reference_memory"] is None and row["detr_fast_memory"] is None
    assert isinstance(report["notes"], list)
    # The detr_fast stage agrees with the reference: exact pad and masks, float32-close features and pos.
    errors = {stage: row["max_error"] for stage, row in report["stages"].items()}
    assert errors["pad"] == 0 and errors["masks"] == 0 and errors["masks_pos"] < 2e-5
    assert errors["backbone"] < 1e-4 and errors["total"] < 1e-4 and errors["pos"] < 2e-5

    # The Chrome trace holds one named range per implementation and stage.
    trace = json.loads(trace_path.read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    for impl in ("reference", "detr_fast"):
        for stage in STAGES:
            assert f"{impl}/{stage}" in names


def test_profile_of_dino_4scale_joiner(tmp_path):
    """--model dino-4scale: the same stage-by-stage profile of DINO-4scale's Joiner (HW embedding)."""
    report_path = tmp_path / "report.json"
    proc = _run(["--device", "cpu", "--model", "dino-4scale", "--scale", "0.08", "--reps", "1",
                 "--json", str(report_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["model"] == "dino-4scale" and list(report["stages"]) == list(STAGES)
    # Both sides hold detr_fast's DINO classes (the reference on the reference path); convert() folds.
    assert "53 conv+BN pairs folded" in proc.stderr, proc.stderr[-3000:]
    assert report["stages"]["pos"]["max_error"] <= 2e-5 and report["stages"]["backbone"]["max_error"] <= 1e-3


BAD_FLAGS = [
    (["--scale", "0"], "--scale"),
    (["--scale", "nan"], "--scale"),
    (["--batch", "0"], "--batch"),
    (["--reps", "0"], "--reps"),
    (["--reps", "two"], "--reps"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "float64"], "--dtype"),
    (["--model", "yolo"], "--model"),
    (["--model", ""], "--model"),
]
if not torch.cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "CUDA is not available"))
    BAD_FLAGS.append((["--device", "cuda:1"], "CUDA is not available"))


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_usage_errors(flags, message, capsys):
    # As argparse reports any bad flag: exit status 2, the usage line and a one-line error, no traceback.
    with pytest.raises(SystemExit) as info:
        cli.main(["profile", "--device", "cpu", *flags] if flags[0] != "--device" else ["profile", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith("python -m detr_fast profile: error:") and message in lines[-1], err
    assert lines[0].startswith("usage:")


def test_model_without_transformers_is_a_usage_error(monkeypatch, capsys):
    # The whole detectors need the 'hf' extra: without it --model detr says so in one line.
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SystemExit) as info:
        cli.main(["profile", "--device", "cpu", "--model", "detr"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith("python -m detr_fast profile: error: argument --model:") and "transformers" in last, err


class FakeClock:
    """Seconds that advance only when a fake function runs: its cost, scaled by a drift."""

    def __init__(self):
        self.now = 0.0
        self.drift = 1.0

    def __call__(self):
        return self.now


def _fake(clock, name, cost, calls, drift_step=0.0):
    def fn():
        calls.append(name)
        clock.now += cost * clock.drift
        clock.drift += drift_step  # the machine slows down steadily
        return name
    return fn


def test_interleave_alternates_the_order_and_measures_each_side():
    clock, calls = FakeClock(), []
    syncs = []
    pairs = timing.interleave(_fake(clock, "a", 0.004, calls), _fake(clock, "b", 0.001, calls), 4,
                               clock=clock, sync=lambda: syncs.append(1))
    # One warm-up call of each, then pairs in alternating order.
    assert calls == ["b", "a", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(syncs) == 2 * len(calls)  # before and after every call
    assert pairs.a_ms == pytest.approx([4.0] * 4) and pairs.b_ms == pytest.approx([1.0] * 4)
    assert (pairs.a_out, pairs.b_out) == ("a", "b")
    summary = timing.ratio_summary(pairs.a_ms, pairs.b_ms)
    assert summary["speedup"] == pytest.approx(4.0) and summary["spread"] == pytest.approx(0.0)
    assert summary["reference_ms"] == pytest.approx(4.0) and summary["detr_fast_ms"] == pytest.approx(1.0)
    assert summary["pairs"] == 4 and summary["ratios"] == 2
    assert summary["trusted"] is False  # 2 blocks of 2 pairs: too few for a spread
    with pytest.raises(ValueError, match="reps"):
        timing.interleave(lambda: None, lambda: None, 0)


def test_interleave_cancels_a_steady_drift():
    # The machine gets 2% slower at every call: alternating the order (blocks A B B A) keeps the
    # ratio at the true 3x, where running all of one side first would not.
    clock, calls = FakeClock(), []
    pairs = timing.interleave(_fake(clock, "a", 0.003, calls, 0.02), _fake(clock, "b", 0.001, calls, 0.02), 20,
                               clock=clock)
    summary = timing.ratio_summary(pairs.a_ms, pairs.b_ms)
    assert summary["speedup"] == pytest.approx(3.0, rel=1e-6) and summary["spread"] == pytest.approx(0, abs=1e-6)
    assert min(pairs.a_ms) < 4.0 < max(pairs.a_ms)  # while absolute times moved a lot
    assert summary["trusted"] is True


def test_blocks_cancel_the_advantage_of_running_right_after_oneself():
    # A call right after a call of the same function is faster (warm caches, a reused buffer): with
    # the order alternating, each side is "warm" in one pair of a block and "cold" in the other.
    clock, calls = FakeClock(), []

    def fake(name, cost):
        def fn():
            warm = bool(calls) and calls[-1] == name
            calls.append(name)
            clock.now += cost * (0.5 if warm else 1.0)
        return fn
    pairs = timing.interleave(fake("a", 0.003), fake("b", 0.001), 12, clock=clock)
    per_pair = [a / b for a, b in zip(pairs.a_ms, pairs.b_ms)]
    assert min(per_pair) == pytest.approx(1.5) and max(per_pair) == pytest.approx(6.0)  # bimodal pairs
    # Every block, the first included, holds one warm and one cold call of each side.
    assert timing.block_ratios(pairs.a_ms, pairs.b_ms) == pytest.approx([3.0] * 6)


def test_interleave_runs_cheap_stages_longer():
    clock, calls = FakeClock(), []
    # A pair costs 2 ms: min_time 0.1 s asks for 50 pairs, max_pairs caps it at 30; reps is a minimum.
    pairs = timing.interleave(_fake(clock, "a", 0.001, calls), _fake(clock, "b", 0.001, calls), 3,
                               min_time=0.1, max_pairs=30, clock=clock)
    assert len(pairs.a_ms) == 30
    pairs = timing.interleave(_fake(clock, "a", 0.001, calls), _fake(clock, "b", 0.001, calls), 3,
                               min_time=0.01, max_pairs=30, clock=clock)
    assert len(pairs.a_ms) == 6  # 5, rounded up to whole blocks of 2 pairs
    pairs = timing.interleave(_fake(clock, "a", 1.0, calls), _fake(clock, "b", 1.0, calls), 3,
                               min_time=0.5, clock=clock)
    assert len(pairs.a_ms) == 4
    pairs = timing.interleave(_fake(clock, "a", 1.0, calls), _fake(clock, "b", 1.0, calls), 1, clock=clock)
    assert len(pairs.a_ms) == 1


def test_quantiles_and_ratio_spread():
    assert timing.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert timing.quantile([1, 2, 3, 4, 5], 0.25) == 2.0
    # Blocks of two pairs: (2+2)/(1+1), (2+2)/(1+3), (2+2)/(4+4), (6+2)/(1+1), and a lone last pair 3/1.
    assert timing.block_ratios([2, 2, 2, 2, 2, 2, 6, 2, 3], [1, 1, 1, 3, 4, 4, 1, 1, 1]) == [2, 1, 0.5, 4, 3]
    summary = timing.ratio_summary([2, 2, 2, 2, 2, 2, 6, 2, 3], [1, 1, 1, 3, 4, 4, 1, 1, 1])
    assert summary["speedup"] == 2.0 and summary["speedup_p25"] == 1.0 and summary["speedup_p75"] == 3.0
    assert summary["spread"] == pytest.approx(1.0) and summary["trusted"] is False
    assert summary["pairs"] == 9 and summary["ratios"] == 5
    assert summary["reference_ms"] == 2 and summary["detr_fast_ms"] == 1
    with pytest.raises(ValueError):
        timing.ratio_summary([1.0], [])


def _row(stage, ref, fast, p25=None, p75=None, trusted=True, same=False, pairs=12):
    speedup = ref / fast
    return {"stage": stage, "reference_ms": ref, "detr_fast_ms": fast, "speedup": speedup,
            "speedup_p25": p25 or speedup * 0.98, "speedup_p75": p75 or speedup * 1.02,
            "spread": ((p75 or speedup * 1.02) - (p25 or speedup * 0.98)) / speedup, "pairs": pairs,
            "ratios": (pairs + 1) // 2,
            "trusted": trusted, "same_function": same, "max_error": 0.0,
            "reference_memory": None, "detr_fast_memory": None}


def _report(rows):
    report = {"device": "cpu", "device_name": "Fake CPU", "threads": 2, "torch": "x", "dtype": "float32",
              "cpus": 2, "load_average": 0.1,
              "batch": 2, "image_sizes": [[1, 1], [1, 1]], "reps": 9, "trace": None, "detr_fast_backend": "auto",
              "stages": rows}
    report["notes"] = table_report.notes(report)
    return report


def test_table_flags_what_cannot_be_trusted():
    rows = {"pad": _row("pad", 1.5, 0.4, p25=0.97, p75=3.56, trusted=False),
            "backbone": _row("backbone", 489.3, 350.0),
            "masks": _row("masks", 0.8, 0.8, same=True),
            "pos": _row("pos", 5.0, 1.5, pairs=2, trusted=False),
            "masks_pos": _row("masks_pos", 6.0, 1.7),
            # The reference total below its own backbone, the detr_fast total 46 ms above its parts.
            "total": _row("total", 443.7, 398.0)}
    report = _report(rows)
    table = table_report.format_table(report)
    lines = table.splitlines()
    assert "threads: 2" in lines[0] and "Fake CPU" in lines[0]
    pad_line = next(line for line in lines if line.startswith("pad "))
    assert "NOISY" in pad_line and "0.97-3.56x" in pad_line
    assert "same" in next(line for line in lines if line.startswith("masks "))
    assert "not the ratio of the two medians" in table  # the legend says what the speed-up is
    notes = "\n".join(report["notes"])
    assert "! NOISY, do not trust these speed-ups: pad (69%)" in notes
    assert "! NOISY: pos: fewer than 10 pairs" in notes
    assert "~1.0x by construction" in notes
    assert "! reference: total 443.7 ms < backbone 489.3 ms" in notes
    assert "! detr_fast: total 398.0 ms vs pad + backbone + masks_pos" in notes
    # A clean run says nothing alarming.
    clean = {name: _row(row["stage"], row["reference_ms"], row["detr_fast_ms"]) for name, row in rows.items()}
    clean["total"] = _row("total", 497.0, 352.2)
    assert not [n for n in _report(clean)["notes"] if n.startswith("!")]
    busy = _report(clean)
    busy["load_average"] = 3.6
    assert "! the machine was busy: 1-minute load average 3.6 on 2 CPUs" in "\n".join(table_report.notes(busy))
    # On a CPU the table says which allocator settings the times were taken under.
    assert any(n.startswith("allocator: glibc's defaults") for n in table_report.notes(busy))
    busy["allocator_settings"] = {"MALLOC_MMAP_MAX_": "0"}
    assert "allocator: MALLOC_MMAP_MAX_=0" in table_report.notes(busy)


def test_backbone_timer_times_the_submodule_inside_each_call():
    # The model profile's backbone share: forward hooks on the backbone record its time inside each
    # forward while active; the share is taken over the timed forwards (the last ones).
    clock = FakeClock()

    class Slow(torch.nn.Module):
        def __init__(self, cost):
            super().__init__()
            self.cost = cost

        def forward(self, x):
            clock.now += self.cost
            return x

    model = torch.nn.Sequential(Slow(0.003), Slow(0.001))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profile.time, "perf_counter", clock)
        timer = profile.BackboneTimer(model[0], torch.device("cpu"))
        model(torch.zeros(1))  # inactive: not recorded
        timer.active = True
        for _ in range(3):
            model(torch.zeros(1))
        timer.remove()
        model(torch.zeros(1))  # hooks removed
    assert timer.times_ms() == pytest.approx([3.0] * 3)
    share = profile.backbone_share([9.0] + timer.times_ms(), [4.0, 4.0, 4.0])
    assert share == pytest.approx({"share": 0.75, "backbone_ms": 3.0, "rest_ms": 1.0})
    with pytest.raises(ValueError, match="backbone time per forward"):
        profile.backbone_share([1.0], [2.0, 2.0])
