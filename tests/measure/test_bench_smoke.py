"""Every benchmark's function run once at a tiny size on CPU: right output, no timing.

The suites in bench/ time exactly these runners (detr_fast.measure.stages, also what
`python -m detr_fast profile` runs), so a benchmark that breaks, or that would time something
computing the wrong thing, fails here in CI. The plot script's helpers are tested at the end.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detr_fast import dispatch, measure
from tests.helpers import REPO_ROOT  # noqa: E402

SCALE = 0.05  # DETR's pair becomes 40x53 and 38x67
CPU = torch.device("cpu")
# Largest error allowed per stage in float32 (see measure.Runner.error for what each one measures):
# pad and masks are copies and must be exact; pos is the float32 embedding; features, logits and
# boxes are relative.
TOLERANCE = {"pad": 0.0, "masks": 0.0, "pos": 2e-5, "masks_pos": 2e-5, "backbone": 1e-4, "joiner": 1e-4,
             "model": 1e-4}


def _all_cases():
    for stage in measure.STAGES:
        for case in measure.cases(stage, SCALE, [2], ["float32"]):
            for impl in ("reference", "detr_fast"):
                yield pytest.param(case, impl, id=f"{stage}-{case.id}-{impl}")
    # An odd batch (the pair repeated and cut) and reduced precision, once per stage kind.
    yield pytest.param(measure.Case("pad", "images", "float32", 3, SCALE), "detr_fast", id="pad-b3")
    yield pytest.param(measure.Case("masks_pos", "s8", "bfloat16", 3, SCALE), "detr_fast", id="masks_pos-bf16")
    yield pytest.param(measure.Case("pos", "s16", "bfloat16", 2, SCALE), "detr_fast", id="pos-bf16")
    # A level stage over all levels of a variant (what the profile runs).
    yield pytest.param(measure.Case("masks_pos", "layers2-4", "float32", 2, SCALE), "detr_fast", id="masks_pos-all")
    # The ONNX Runtime peer (skipped with the reason where onnxruntime is not installed).
    yield pytest.param(measure.Case("backbone", "layers2-4", "float32", 2, SCALE), "onnxruntime", id="backbone-ort")


def _model_case(model: str, dtype: str = "float32") -> measure.Case:
    # The model stage's CPU case of `model`, tiny (small head and backbone) at a tenth of the size:
    # two 40x60 images with their pixel_mask for DETR, one 64x64 image for RT-DETR.
    return measure.model_case(model, dtype, CPU, scale=0.1, tiny=True)


# Marked `transformers`: CI runs them again under the declared floor of transformers.
MODEL_CASES = [pytest.param(_model_case(model), impl, id=f"model-{model}-{impl}", marks=pytest.mark.transformers)
               for model in measure.BENCH_MODELS for impl in ("reference", "detr_fast")]


@pytest.mark.parametrize("case,impl", list(_all_cases()) + MODEL_CASES)
def test_runner_output_matches_reference(case, impl):
    try:
        runner = measure.build(case, impl, CPU)
    except measure.Unavailable as why:
        pytest.skip(str(why))
    with torch.no_grad():
        out = runner.fn()
        error = runner.error(out)
    tolerance = TOLERANCE[case.stage] if case.dtype == "float32" else 1e-2  # one bf16 step of values <= 1
    assert 0 <= error <= tolerance, f"{case} {impl}: error {error}"


def test_error_functions_detect_a_wrong_output():
    # The checks above can fail: a perturbed output is reported.
    with torch.no_grad():
        runner = measure.build(measure.Case("pos", "s16", "float32", 2, SCALE), "reference", CPU)
        pos = runner.fn()
        assert runner.error(pos) == 0
        assert runner.error([p + 1e-3 for p in pos]) == pytest.approx(1e-3, rel=1e-2)
        with pytest.raises(AssertionError, match="dtype"):
            runner.error([p.double() for p in pos])

        runner = measure.build(measure.Case("masks", "s8", "float32", 2, SCALE), "reference", CPU)
        mask = runner.fn()[0].clone()
        mask[0, -1, -1] = ~mask[0, -1, -1]
        assert runner.error([mask]) == 1

        runner = measure.build(measure.Case("joiner", "layers2-4", "float32", 2, SCALE), "reference", CPU)
        levels, pos = runner.fn()
        levels[0].tensors.mul_(1.01)
        assert runner.error((levels, pos)) == pytest.approx(0.01, rel=1e-2)
        with pytest.raises(AssertionError, match="shapes"):
            runner.error((levels[:1], pos[:1]))


@pytest.mark.transformers
def test_model_stage_cases_and_errors():
    # The model stage's cases: DETR on two 400x600 images on CPU (issue 10), DETR's pair on CUDA,
    # RT-DETR on one 640x640 image; ids and groups name the detector and the padded input.
    cpu = measure.model_cases(measure.BENCH_MODELS, 1.0, ["float32"], CPU)
    assert [(c.level, c.batch, c.shape) for c in cpu] == [("detr", 2, "2x3x400x600"), ("rtdetr", 1, "1x3x640x640")]
    assert cpu[0].id == "detr-float32-b2-2x3x400x600" and cpu[0].group == "model detr float32 2x3x400x600"
    cuda = measure.model_cases(["detr"], 1.0, ["bfloat16"], torch.device("cuda"))
    assert cuda[0].image_sizes == [(800, 1066), (750, 1333)] and cuda[0].shape == "2x3x800x1333"
    assert _model_case("detr").id.endswith("-tiny")
    with pytest.raises(ValueError, match="level"):
        measure.Case("model", "layer4", "float32", 2, 1.0)
    with pytest.raises(ValueError, match="tiny"):
        measure.Case("backbone", "layer4", "float32", 2, 1.0, tiny=True)
    with pytest.raises(ValueError, match="sizes"):
        measure.Case("model", "detr", "float32", 2, 1.0, sizes=())
    pytest.importorskip("transformers", reason="the model stage needs the 'hf' extra")
    # The onnxruntime peer has no model stage; the compile runner is made (not run: compiling a
    # whole detector takes minutes here) where torch.compile can run.
    with pytest.raises(measure.Unavailable, match="backbone stage only"):
        measure.build(_model_case("detr"), "onnxruntime", CPU)
    if measure.compile_unavailable_reason(CPU) is None:
        assert isinstance(measure.detector_implementation("compile", "detr", CPU, tiny=True), measure.Compiled)
    # A wrong output is reported: perturbed boxes, a missing query.
    with torch.no_grad():
        runner = measure.build(_model_case("detr"), "reference", CPU)
        out = runner.fn()
        assert runner.error(out) == 0
        out.pred_boxes.mul_(1.01)
        assert runner.error(out) == pytest.approx(0.01, rel=1e-2)
        out.logits = out.logits[:, 1:]
        with pytest.raises(AssertionError, match="shapes"):
            runner.error(out)


def test_model_stage_without_transformers_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    case = measure.model_case("rtdetr", "float32", CPU, scale=0.1, tiny=True)
    measure.detectors.cache_clear()
    with pytest.raises(measure.Unavailable, match="transformers"):
        measure.build(case, "reference", CPU)


def test_case_shapes_are_the_real_ones():
    # The shapes named in benchmark ids and groups are those the ResNet and the padding produce.
    with torch.no_grad():
        for variant in measure.VARIANTS:
            case = measure.Case("backbone", variant, "float32", 3, SCALE)
            feats = measure.build(case, "reference", CPU).fn()
            strides = [32] if variant == "layer4" else [8, 16, 32]
            assert list(case.strides) == strides
            for feature, stride in zip(feats.values(), strides):
                level = measure.Case("masks", f"s{stride}", "float32", 3, SCALE)
                assert tuple(feature.shape[-2:]) == level.level_size
            # A level stage over a variant means all its levels (what the profile runs); the level
            # stages time DETR's embedding, so DINO's variant is refused there (its rows time it).
            if variant == "dino-4scale":
                with pytest.raises(ValueError, match="level of a pos case"):
                    measure.Case("pos", variant, "float32", 3, SCALE)
                continue
            assert measure.Case("pos", variant, "float32", 3, SCALE).level_sizes == \
                [tuple(f.shape[-2:]) for f in feats.values()]
        case = measure.Case("pad", "images", "float32", 3, SCALE)
        nt_shape = "x".join(str(d) for d in measure.build(case, "detr_fast", CPU).fn().tensors.shape)
        assert case.shape == nt_shape == "3x3x40x67"
    assert measure.Case("pos", "s32", "float32", 2, SCALE).shape == f"2x{measure.POS_CHANNELS}x2x3"
    assert measure.Case("masks", "s8", "float32", 8, 1.0).shape == "8x100x167"
    assert measure.Case("masks", "layers2-4", "float32", 2, 1.0).shape == "2x100x167+50x84+25x42"


def test_cases_and_bad_arguments():
    assert [c.level for c in measure.cases("pos", 1.0, [2], ["float32"])] == ["s8", "s16", "s32"]
    # masks are bool whatever the dtype: one dtype only.
    assert len(measure.cases("masks", 1.0, [2, 8], ["float32", "bfloat16"])) == 6
    assert len(measure.cases("backbone", 1.0, [2, 8], ["float32", "bfloat16"])) == 12  # 3 variants
    with pytest.raises(ValueError, match="stage"):
        measure.cases("nope", 1.0, [2], ["float32"])
    with pytest.raises(ValueError, match="dtype"):
        measure.Case("pad", "images", "float64", 2, 1.0)
    with pytest.raises(ValueError, match="batch"):
        measure.Case("pad", "images", "float32", 0, 1.0)
    with pytest.raises(ValueError, match="level"):
        measure.Case("backbone", "s8", "float32", 2, 1.0)
    with pytest.raises(ValueError, match="impl"):
        measure.build(measure.Case("pad", "images", "float32", 2, SCALE), "fast", CPU)


def test_onnxruntime_peer_says_why_it_does_not_run(monkeypatch):
    # Backbone only, float32 only, CPU only; and an optional extra.
    assert measure.onnxruntime_unavailable_reason(torch.device("cuda")) is not None
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)  # as if not installed
        assert "not installed" in measure.onnxruntime_unavailable_reason(CPU)
    if measure.onnxruntime_unavailable_reason(CPU) is not None:
        with pytest.raises(measure.Unavailable, match="onnxruntime"):
            measure.build(measure.Case("backbone", "layer4", "float32", 2, SCALE), "onnxruntime", CPU)
        return
    # Not a missing package: the bench says "not measured for this stage" (bench/conftest.py).
    with pytest.raises(measure.NotMeasured, match="backbone stage only"):
        measure.build(measure.Case("pos", "s32", "float32", 2, SCALE), "onnxruntime", CPU)
    with pytest.raises(measure.Unavailable, match="float32"):
        measure.build(measure.Case("backbone", "layer4", "bfloat16", 2, SCALE), "onnxruntime", CPU)


def test_detr_fast_masks_row_runs_what_detr_fast_runs(monkeypatch):
    # On CPU, detr_fast's masks come from the image sizes, not from the reference's F.interpolate;
    # on the kernels' path (CUDA with Triton) the masks alone are the reference's function.
    monkeypatch.delenv("DETR_FAST_BACKEND", raising=False)
    runs = measure.implementation("detr_fast", None, CPU)
    assert not runs.same_as_reference("masks", CPU)
    assert runs.same_as_reference("masks", torch.device("cuda")) == dispatch.triton_available()


@pytest.mark.skipif(measure.compile_unavailable_reason(CPU) is not None,
                    reason=str(measure.compile_unavailable_reason(CPU)))
def test_compile_runner_once():
    # torch.compile of the reference, on the cheapest stage (compiling ResNet-50 takes minutes here),
    # with inductor's freezing on while it compiles and restored afterwards.
    from torch._inductor import config

    before = config.freezing
    case = measure.Case("masks", "s32", "float32", 2, SCALE)
    runner = measure.build(case, "compile", CPU)
    seen = []
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        compile_fx = __import__("torch._inductor.compile_fx", fromlist=["compile_fx"])
        original = compile_fx.compile_fx

        def spy(*args, **kwargs):
            seen.append(config.freezing)
            return original(*args, **kwargs)
        mp.setattr(compile_fx, "compile_fx", spy)
        out = runner.fn()
    assert runner.error(out) == 0
    assert out[0].dtype == torch.bool and out[0].shape == (2,) + case.level_size
    assert config.freezing == before
    if seen:  # where inductor's entry point is reached through this attribute
        assert all(seen)


def _fake_benchmark(impl, dtype, seconds, stage="pos", level="s32", shape="2x256x25x42", spread=0.0):
    info = {"stage": stage, "impl": impl, "device": "cpu", "dtype": dtype, "batch": 2, "shape": shape,
            "level": level, "max_error": 0.0}
    stats = {"median": seconds, "min": seconds, "mean": seconds,
             "q1": seconds * (1 - spread), "q3": seconds * (1 + spread)}
    return {"extra_info": info, "stats": stats}


def test_plot_speedups_table_and_png(tmp_path):
    from bench import plot

    data = {"benchmarks": [_fake_benchmark("reference", "float32", 4e-3),
                           _fake_benchmark("detr_fast", "float32", 1e-3),
                           _fake_benchmark("compile", "float32", 2e-3),
                           _fake_benchmark("reference", "bfloat16", 3e-3),
                           _fake_benchmark("detr_fast", "bfloat16", 5e-4),
                           _fake_benchmark("detr_fast", "float32", 1e-3, shape="8x256x25x42"),  # no reference
                           {"extra_info": {}, "stats": {"median": 1.0}}],                       # not ours
            "machine_info": {"detr_fast_bench": {"device": "cuda:0", "device_name": "Test GPU", "torch": "x",
                                                 "triton": "y", "cuda": "13.0"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}}
    rows = plot.speedups(data)
    # Rows sorted by stage, level, dtype, batch, impl (detr_fast first); only those with a reference.
    assert [(r["impl"], r["dtype"], r["speedup"]) for r in rows] == [
        ("detr_fast", "bfloat16", 6.0), ("detr_fast", "float32", 4.0), ("compile", "float32", 2.0)]
    # Against the float32 reference, the bfloat16 detr_fast row is 8x.
    bf16 = [r for r in plot.speedups(data, baseline_dtype="float32") if r["dtype"] == "bfloat16"]
    assert [r["speedup"] for r in bf16] == [8.0]
    table = plot.markdown(rows, "title", "median")
    assert "| pos | s32 | float32 | 2 | 2x256x25x42 | detr_fast | 4.000 | 1.000 | 4.00x | 4.00x-4.00x |" in table
    assert "Test GPU (cuda:0)" in plot.describe(data) and "0123456789" in plot.describe(data)
    assert "CUDA 13.0" in plot.describe(data)

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    pytest.importorskip("matplotlib")
    assert plot.main([str(path), "-o", str(tmp_path / "s.png"), "--markdown", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.md").read_text() == table.replace("title", "detr_fast speed-up vs the reference on "
                                                             + plot.describe(data))
    with pytest.raises(ValueError, match="pytest-benchmark"):
        (tmp_path / "bad.json").write_text("{}")
        plot.main([str(tmp_path / "bad.json"), "--markdown", "-"])


def test_plot_title_names_the_device_it_ran_on():
    from bench import plot

    # A CPU run of a CUDA build of torch: the title names the CPU, not "CUDA 13.0".
    cpu = {"benchmarks": [_fake_benchmark("reference", "float32", 1.0)],
           "machine_info": {"detr_fast_bench": {"device": "cpu", "device_name": "Some Xeon", "torch": "x",
                                                "triton": "y", "cuda": "13.0", "threads": 2}}}
    title = plot.describe(cpu)
    assert title.startswith("Some Xeon (cpu), 2 threads") and "CUDA" not in title
    # Without machine_info (an older JSON), the rows say where they ran.
    assert plot.describe({"benchmarks": [_fake_benchmark("reference", "float32", 1.0)]}).startswith("cpu")


def test_plot_orders_levels_by_stride_and_formats_speedups():
    from bench import plot

    data = {"benchmarks": [_fake_benchmark(impl, "float32", t, level=level, shape=level)
                           for level in ("s32", "s16", "s8", "layers2-4", "layer4")
                           for impl, t in (("reference", 2.0), ("detr_fast", 1.0))]}
    assert [r["level"] for r in plot.speedups(data)] == ["s8", "s16", "s32", "layer4", "layers2-4"]
    assert [plot.format_speedup(x) for x in (0.731, 2.614, 26.14, 261.6, 9.999, 99.97)] == \
        ["0.73x", "2.61x", "26.1x", "262x", "10.0x", "100x"]
    # The spread of a ratio from the two rows' quartiles; none without quartiles.
    assert plot.ratio_spread({"q1": 3.0, "q3": 5.0}, {"q1": 1.0, "q3": 2.0}) == (1.5, 5.0)
    assert plot.ratio_spread({"median": 1.0}, {"median": 1.0}) == (None, None)
    row = plot.speedups({"benchmarks": [_fake_benchmark("reference", "float32", 4.0, spread=0.1),
                                        _fake_benchmark("detr_fast", "float32", 1.0, spread=0.1)]})[0]
    assert plot.format_spread(row) == "3.27x-4.89x"


def test_plot_two_runs_each_use_their_own_reference(tmp_path):
    from bench import plot

    first = {"benchmarks": [_fake_benchmark("reference", "float32", 4e-3),
                            _fake_benchmark("detr_fast", "float32", 1e-3)]}
    # A second run (e.g. the compile benchmarks, split off to fit a time limit) measured its own,
    # slower reference: its ratio must come from that one, not from the first run's.
    second = {"benchmarks": [_fake_benchmark("reference", "float32", 6e-3),
                             _fake_benchmark("compile", "float32", 2e-3)]}
    paths = []
    for name, data in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    assert plot.main(paths + ["--markdown", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "(2 runs, each ratio within one run)" in table
    assert "| compile | 6.000 | 2.000 | 3.00x |" in table
    assert "| detr_fast | 4.000 | 1.000 | 4.00x |" in table
    # A JSON without reference rows is refused rather than silently dropped.
    only_compile = {"benchmarks": [_fake_benchmark("compile", "float32", 1e-3)]}
    (tmp_path / "c.json").write_text(json.dumps(only_compile))
    with pytest.raises(SystemExit, match="c.json"):
        plot.main(paths + [str(tmp_path / "c.json"), "--markdown", "-"])


def test_ab_alternates_the_order_and_summarises_the_per_pair_ratios():
    from bench import ab
    order = []
    times = ab.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, pairs=3)
    assert order == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # warm-up, then a b, b a, a b
    assert [len(t) for t in times.values()] == [3, 3]
    # Ratios 2, 3, 4 (slow / fast), hand-computed: median 3, p25 2, p75 3.
    assert ab.speedup([2.0, 6.0, 12.0], [1.0, 2.0, 3.0]) == "speed-up median 3.00x (p25 2.00, p75 3.00), pairs 3"
    # Medians 6 s and 2 s, in ms, then the same ratios.
    assert ab.summary({"ref": [2.0, 6.0, 12.0], "fast": [1.0, 2.0, 3.0]}) == \
        "ref 6000 ms, fast 2000 ms, speed-up median 3.00x (p25 2.00, p75 3.00), pairs 3"


@pytest.mark.transformers
def test_compare_pieces_runs_both_sides_and_restores_the_threshold(capsys, monkeypatch):
    pytest.importorskip("transformers", reason="the D-FINE A/B needs the 'hf' extra")
    import detr_fast
    from bench import compare_pieces
    from detr_fast.fold import fused_conv, onednn
    from tests.hf_models import build_realtime
    model = detr_fast.convert(build_realtime("dfine"))
    monkeypatch.setattr(fused_conv, "FRESH_PAGES_BYTES", 0)  # the piecewise side, at a tiny size
    calls = []
    piecewise = onednn.conv_pieces
    monkeypatch.setattr(onednn, "conv_pieces", lambda *args: calls.append(1) or piecewise(*args))
    compare_pieces.main(pairs=2, batches=(1,), model=model, size=64)
    # Warm-up and two pairs: each side 4 times; the piecewise side convolves the stem and 5 layers.
    assert len(calls) == 4 * 6 and fused_conv.FRESH_PAGES_BYTES == 0
    assert "batch 1: concatenated" in capsys.readouterr().out


@pytest.mark.transformers
def test_op_breakdown_runs_on_a_tiny_model(capsys, monkeypatch):
    pytest.importorskip("transformers", reason="the op breakdown needs the 'hf' extra")
    from bench import op_breakdown
    from detr_fast.measure import model_zoo
    build = model_zoo.build
    monkeypatch.setattr(model_zoo, "build", lambda name: build(name, tiny=True))
    op_breakdown.main("dfine", size=64, reps=1)
    out = capsys.readouterr().out
    assert "mkldnn::_convolution_pointwise" in out and "% of the backbone stage" in out


RUN_GPU = Path(REPO_ROOT) / "bench" / "run_gpu.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bench/run_gpu.sh is a bash script")
@pytest.mark.parametrize("args, message", [([], "usage"), (["out", "--steps"], "usage"),
                                           (["out", "--steps", ","], "usage"),
                                           (["out", "--steps", "tests,nope"], "unknown step 'nope'")])
def test_run_gpu_bad_arguments_are_usage_errors(args, message, tmp_path):
    # Checked before anything runs or is written (and before it looks for a GPU).
    result = subprocess.run(["bash", str(RUN_GPU), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())
