"""`python -m detr_fast profile` end to end, at a tiny size: the table, the JSON report, the trace."""
import json
import os
import subprocess
import sys

import pytest

from detr_fast import __main__ as cli
from detr_fast.profile import STAGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    # The table: a header and one row per stage.
    for stage in STAGES:
        assert any(line.startswith(stage) for line in proc.stdout.splitlines()), proc.stdout
    assert "ref MiB" in proc.stdout and "trace:" in proc.stdout

    report = json.loads(report_path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["batch"] == 2
    # DETR's 800x1066 and 750x1333 at scale 0.08.
    assert report["image_sizes"] == [[64, 85], [60, 107]]
    assert report["trace"] == str(trace_path)
    assert list(report["stages"]) == list(STAGES)
    for stage, row in report["stages"].items():
        assert row["reference_ms"] > 0 and row["detr_fast_ms"] > 0, stage
        assert row["speedup"] == pytest.approx(row["reference_ms"] / row["detr_fast_ms"], rel=1e-6)
        # CPU: no allocator statistics, recorded as null rather than a made-up number.
        assert row["reference_memory"] is None and row["detr_fast_memory"] is None
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


def test_profile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--batch"):
        cli.main(["profile", "--device", "cpu", "--batch", "0"])
    with pytest.raises(ValueError, match="--scale"):
        cli.main(["profile", "--device", "cpu", "--scale", "0"])
    with pytest.raises(ValueError, match="--reps"):
        cli.main(["profile", "--device", "cpu", "--reps", "0"])
    with pytest.raises(SystemExit):
        cli.main(["profile", "--dtype", "float64"])
