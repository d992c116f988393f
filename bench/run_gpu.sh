#!/usr/bin/env bash
# Run the CUDA tests, the benchmarks and the profile on a GPU machine; write everything to OUTDIR.
#
#   bench/run_gpu.sh OUTDIR [--steps[=]tests,bench,compile,profile] [extra pytest-benchmark options...]
#
# Installs nothing from the network: torch, torchvision, triton, pytest, pytest-benchmark (and
# matplotlib for the plot) must already be there; the package itself is installed editable without
# dependencies; everything runs under $PYTHON (default python3). Steps (default: all four), run in
# this order whatever order --steps names them in, the quick ones first:
#   tests     pytest tests/ (the correctness suite, CUDA tests included)         -> tests.log
#   profile   python -m detr_fast profile --json --trace -> profile.json, profile.txt, trace.json; then
#             --train, --train --autocast bfloat16, --autocast bfloat16 -> profile_{train,train_bf16,bf16}.*
#   bench     pytest bench/ --benchmark-only --bench-impls reference,detr_fast  -> bench.json, bench.log
#             (the stages the issues' GPU targets name first: pos, masks_pos, backbone, joiner, train, then
#             masks, pad, model)
#   compile   the same with --bench-impls reference,compile (torch.compile of the reference; compiling
#             ResNet-50 per shape takes minutes, so it is its own step and its own run, with its own
#             reference rows: every ratio is measured side by side in one run) -> bench_compile.json/.log
# Full DETR sizes, batch 2 and 8, float32 and bfloat16 (the CUDA defaults of bench/conftest.py).
# (The onnxruntime peer of the benchmarks runs on CPU only: it is not part of these GPU steps. The
# model stage, whole transformers detectors, needs transformers and timm: without them its rows are
# skipped with the reason, and the profile step profiles the Joiner as before.)
# After the steps, bench/plot.py draws whichever bench JSONs OUTDIR holds:
#   speedup.png, speedup.md     speed-up over the reference of the same dtype
#   speedup_vs_fp32.md          the same against the float32 reference (what bfloat16 buys end to end)
# metadata.json: device, capability, driver, torch/triton/CUDA/cuDNN versions, commit, and the exit
# code of every step run so far (a later call with other --steps on the same OUTDIR adds its own).
# A failing step is recorded and the script goes on; it exits non-zero at the end.
# Stopped by SIGTERM or SIGINT (e.g. `timeout 480 bench/run_gpu.sh ...`, which signals the whole
# process group), the running step ends early (a benchmark step still writes the rows it measured:
# bench/conftest.py), the later steps are skipped, and the plot and metadata.json ("stopped_by_signal":
# true) are still written, so an archive made afterwards holds everything measured.
#
# With a per-command time limit (10 minutes on the device tool of this project's workplace), run
# it as two calls on one OUTDIR, or two OUTDIRs merged afterwards: --steps tests,bench,profile,
# then --steps compile.
set -uo pipefail

usage="usage: bench/run_gpu.sh OUTDIR [--steps tests,bench,compile,profile] [extra pytest-benchmark options]"
if [ $# -lt 1 ]; then
    echo "$usage" >&2
    exit 2
fi
OUT=$1
shift
STEPS=tests,bench,compile,profile
case ${1:-} in
    --steps=*) STEPS=${1#--steps=}; shift ;;
    --steps)
        if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
        STEPS=$2; shift 2 ;;
esac
STEPS=${STEPS// /}  # "tests, bench" means tests,bench
if [ -z "${STEPS//,/}" ]; then echo "$usage" >&2; exit 2; fi
for step in ${STEPS//,/ }; do
    case $step in
        tests|bench|compile|profile) ;;
        *) echo "run_gpu.sh: unknown step '$step' (expected tests, bench, compile, profile)" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$STEPS," == *",$1,"* ]]; }
# The interpreter that holds torch: $PYTHON, else python3 (some GPU images have no plain `python`).
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "run_gpu.sh: torch sees no CUDA device; this script records GPU results only" >&2
    exit 1
}

"$PY" -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
install_rc=$?
# The kernels are importable only through the install (setup.py maps kernels/ to detr_fast.kernels):
# without it every step would fail for a reason its log hides.
UNUSABLE=
if ! "$PY" -c "import detr_fast.kernels.sine_embedding" >>"$OUT/install.log" 2>&1; then
    echo "run_gpu.sh: 'import detr_fast.kernels.sine_embedding' fails after the install, so no step runs; $OUT/install.log:" >&2
    tail -n 20 "$OUT/install.log" >&2
    [ "$install_rc" -eq 0 ] && install_rc=1
    UNUSABLE=1
fi
tests_rc=; bench_rc=; compile_rc=; profile_rc=
STOPPED=
trap 'STOPPED=1' TERM INT  # bash runs it once the running step has ended
# Whether a step should start: it was asked for, the package imports, and no signal has stopped the run.
starts() { wants "$1" && [ -z "$UNUSABLE" ] && [ -z "$STOPPED" ]; }

# The benchmark files, those behind the issues' GPU targets first (a run cut short keeps them),
# then any others.
BENCH_FILES=()
for stage in pos masks_pos backbone joiner train masks pad model; do
    [ -f "bench/test_bench_$stage.py" ] && BENCH_FILES+=("bench/test_bench_$stage.py")
done
for f in bench/test_bench_*.py; do
    [[ " ${BENCH_FILES[*]} " == *" $f "* ]] || BENCH_FILES+=("$f")
done

if starts tests; then
    "$PY" -m pytest tests/ -q -rs >"$OUT/tests.log" 2>&1
    tests_rc=$?
    tail -n 3 "$OUT/tests.log"
fi

if starts profile; then
    "$PY" -m detr_fast profile --json "$OUT/profile.json" --trace "$OUT/trace.json" >"$OUT/profile.txt" \
        2>"$OUT/profile.log"
    profile_rc=$?
    cat "$OUT/profile.txt"
    # Issue 21: the training step (fp32, bf16 autocast) and bf16 autocast inference; issue 20: DINO-4scale's
    # Joiner. Each its own report.
    for variant in "train:--train" "train_bf16:--train --autocast bfloat16" "bf16:--autocast bfloat16" \
                   "dino:--model dino-4scale"; do
        name=${variant%%:*}
        # shellcheck disable=SC2086
        "$PY" -m detr_fast profile ${variant#*:} --json "$OUT/profile_$name.json" >"$OUT/profile_$name.txt" \
            2>"$OUT/profile_$name.log" || profile_rc=1
        cat "$OUT/profile_$name.txt"
    done
fi

if starts bench; then
    "$PY" -m pytest "${BENCH_FILES[@]}" --benchmark-only --bench-impls reference,detr_fast --benchmark-json="$OUT/bench.json" "$@" \
        >"$OUT/bench.log" 2>&1
    bench_rc=$?
    tail -n 3 "$OUT/bench.log"
fi

if starts compile; then
    "$PY" -m pytest "${BENCH_FILES[@]}" --benchmark-only --bench-impls reference,compile --benchmark-json="$OUT/bench_compile.json" "$@" \
        >"$OUT/bench_compile.log" 2>&1
    compile_rc=$?
    tail -n 3 "$OUT/bench_compile.log"
fi

plot_rc=
runs=()
for f in "$OUT/bench.json" "$OUT/bench_compile.json"; do
    [ -s "$f" ] && runs+=("$f")
done
if [ ${#runs[@]} -gt 0 ]; then
    # The tables first: they need no matplotlib, the PNG does.
    "$PY" bench/plot.py "${runs[@]}" --baseline-dtype float32 --markdown "$OUT/speedup_vs_fp32.md"
    plot_rc=$?
    "$PY" bench/plot.py "${runs[@]}" --markdown "$OUT/speedup.md" -o "$OUT/speedup.png" || plot_rc=$?
fi

INSTALL_RC=$install_rc TESTS_RC=$tests_rc BENCH_RC=$bench_rc COMPILE_RC=$compile_rc PROFILE_RC=$profile_rc \
PLOT_RC=$plot_rc STOPPED=$STOPPED "$PY" - "$OUT/metadata.json" "$STEPS" "$@" <<'EOF'
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
    # A copy of the tree without .git (as some GPU machines get) names its commit in RUN_GPU_COMMIT.
    "commit": run("git", "rev-parse", "HEAD") or os.environ.get("RUN_GPU_COMMIT"),
    "uncommitted_changes": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
}
# Exit codes of the steps this call ran, and the pytest options the benchmark steps got (a run
# narrowed with -k or --bench-* to fit a time limit says so), over what an earlier call on this
# OUTDIR recorded.
earlier = {}
if os.path.exists(sys.argv[1]):
    with open(sys.argv[1]) as f:
        earlier = json.load(f)
exit_codes = earlier.get("exit_codes", {})
for step in ("install", "tests", "bench", "compile", "profile", "plot"):
    value = os.environ[step.upper() + "_RC"]
    if value:
        exit_codes[step] = int(value)
meta["exit_codes"] = exit_codes
meta["stopped_by_signal"] = earlier.get("stopped_by_signal", False) or bool(os.environ["STOPPED"])
meta["calls"] = earlier.get("calls", []) + [{"steps": sys.argv[2].split(","), "bench_options": sys.argv[3:]}]
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=2)
print(json.dumps(meta, indent=2))
EOF

for rc in $install_rc $tests_rc $bench_rc $compile_rc $profile_rc $plot_rc; do  # unset ones vanish
    [ "$rc" -eq 0 ] || exit 1
done
exit 0
