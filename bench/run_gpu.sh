#!/usr/bin/env bash
# Run the CUDA tests, the benchmarks and the profile on a GPU machine; write everything to OUTDIR.
#
#   bench/run_gpu.sh OUTDIR [extra pytest-benchmark options...]
#
# Installs nothing from the network: torch, torchvision, triton, pytest, pytest-benchmark (and
# matplotlib for the plot) must already be there; the package itself is installed editable without
# dependencies. Writes into OUTDIR:
#   metadata.json   device, capability, driver, torch/triton/CUDA/cuDNN versions, commit, exit codes
#   tests.log       pytest tests/ (the correctness suite, CUDA tests included)
#   bench.json      pytest bench/ --benchmark-only --benchmark-json (full DETR sizes, batch 2 and 8,
#                   float32 and bfloat16, reference / detr_fast / compile)
#   bench.log       the benchmark tables as printed
#   speedup.png, speedup.md   bench/plot.py of bench.json (same-dtype reference)
#   speedup_vs_fp32.md        bench/plot.py --baseline-dtype float32 (reduced precision vs fp32 reference)
#   profile.json, profile.txt, trace.json   python -m detr_fast profile --json --trace
# A failing step is recorded in metadata.json and the script goes on; it exits non-zero at the end.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bench/run_gpu.sh OUTDIR [extra pytest-benchmark options]" >&2
    exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "run_gpu.sh: torch sees no CUDA device; this script records GPU results only" >&2
    exit 1
}

python -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
install_rc=$?

pytest tests/ -q -rs >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/tests.log"

pytest bench/ --benchmark-only --benchmark-json="$OUT/bench.json" "$@" >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -n 3 "$OUT/bench.log"

python -m detr_fast profile --json "$OUT/profile.json" --trace "$OUT/trace.json" >"$OUT/profile.txt" 2>"$OUT/profile.log"
profile_rc=$?
cat "$OUT/profile.txt"

plot_rc=1
if [ -s "$OUT/bench.json" ]; then
    python bench/plot.py "$OUT/bench.json" -o "$OUT/speedup.png" --markdown "$OUT/speedup.md" \
        && python bench/plot.py "$OUT/bench.json" --baseline-dtype float32 --markdown "$OUT/speedup_vs_fp32.md"
    plot_rc=$?
fi

INSTALL_RC=$install_rc TESTS_RC=$tests_rc BENCH_RC=$bench_rc PROFILE_RC=$profile_rc PLOT_RC=$plot_rc \
python - "$OUT/metadata.json" <<'EOF'
import datetime, json, os, platform, subprocess, sys

import torch


def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


try:
    import triton
    triton_version = triton.__version__
except Exception:
    triton_version = None
major, minor = torch.cuda.get_device_capability(0)
meta = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device_name": torch.cuda.get_device_name(0),
    "device_count": torch.cuda.device_count(),
    "capability": f"{major}.{minor}",
    "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
    "driver": run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
    "torch": torch.__version__,
    "triton": triton_version,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version(),
    "python": platform.python_version(),
    "commit": run("git", "rev-parse", "HEAD"),
    "uncommitted_changes": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
    "exit_codes": {step: int(os.environ[var]) for step, var in
                   (("install", "INSTALL_RC"), ("tests", "TESTS_RC"), ("bench", "BENCH_RC"),
                    ("profile", "PROFILE_RC"), ("plot", "PLOT_RC"))},
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=2)
print(json.dumps(meta, indent=2))
EOF

for rc in $install_rc $tests_rc $bench_rc $profile_rc $plot_rc; do
    [ "$rc" -eq 0 ] || exit 1
done
exit 0
