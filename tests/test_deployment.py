"""A converted model works wherever the reference works: TorchScript, ONNX (both exporters, run in
onnxruntime), torch.compile(fullgraph=True), torch.export, other dtypes, several threads at once,
upstream's NestedTensor class; and bad input is a clear error.

The oracle is always the unconverted upstream stand-in (tests/upstream_reference.py).
"""
import collections
import copy
import io
import threading
import warnings

import pytest
import torch
from torch import nn

import detr_fast
from tests.upstream_reference import (
    DEFORMABLE_LAYERS,
    DETR_DETECTION_LAYERS,
    UpstreamMiniDETR,
    UpstreamNestedTensor,
    upstream_joiner,
    upstream_pad,
)


def _images(seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 64, 96, generator=gen).to(dtype), torch.randn(3, 50, 80, generator=gen).to(dtype)]


def _pair(layers=DEFORMABLE_LAYERS, name="resnet18", seed=1):
    """(reference, converted): the upstream Joiner and a converted copy with the same weights."""
    reference = upstream_joiner(name, layers, seed=seed).eval()
    converted = detr_fast.convert(copy.deepcopy(reference))
    return reference, converted


def _assert_matches(got, want, feature_tol=1e-4, pos_tol=1e-5):
    (out, pos), (want_out, want_pos) = got, want
    assert len(out) == len(want_out) and len(pos) == len(want_pos)
    for o, w in zip(out, want_out):
        assert o.tensors.dtype == w.tensors.dtype and o.tensors.stride() == w.tensors.stride()
        err = (o.tensors.double() - w.tensors.double()).abs().max() / w.tensors.double().abs().max()
        assert err <= feature_tol and torch.equal(o.mask, w.mask)
    for p, w in zip(pos, want_pos):
        assert p.dtype == w.dtype and (p.double() - w.double()).abs().max() <= pos_tol


def test_torchscript_of_a_converted_joiner_runs_the_reference_computation():
    reference, converted = _pair()
    scripted = torch.jit.script(converted)
    images = _images()
    with torch.no_grad():
        _assert_matches(scripted(detr_fast.nested_tensor_from_tensor_list(images)), reference(upstream_pad(images)))
    # Scripting leaves the eager model folded.
    assert detr_fast.fold.count_folded(converted) == 20


class _Exportable(nn.Module):
    """Tensors in, tensors out: (features..., masks..., pos...) of a Joiner."""

    def __init__(self, joiner: nn.Module):
        super().__init__()
        self.joiner = joiner

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        out, pos = self.joiner(UpstreamNestedTensor(images, mask))
        return tuple(o.tensors for o in out) + tuple(o.mask for o in out) + tuple(pos)


def _onnx(module: nn.Module, args, dynamo: bool):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' extra")
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
        return torch.onnx.export(module, args, dynamo=True, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, opset_version=17, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo"])
def test_onnx_export_runs_in_onnxruntime_with_the_reference_outputs(dynamo):
    ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra")
    reference, converted = _pair()
    nt = upstream_pad(_images(seed=2))
    with torch.no_grad():
        want = _Exportable(reference)(nt.tensors, nt.mask)
    counts = {}
    for name, joiner in (("reference", reference), ("detr_fast", converted)):
        proto = _onnx(_Exportable(joiner), (nt.tensors, nt.mask), dynamo)
        counts[name] = collections.Counter(node.op_type for node in proto.graph.node)
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {session.get_inputs()[0].name: nt.tensors.numpy(), session.get_inputs()[1].name: nt.mask.numpy()}
        got = [torch.from_numpy(o) for o in session.run(None, feeds)]
        n = len(want) // 3
        for i, (g, w) in enumerate(zip(got, want)):
            if w.dtype == torch.bool:
                assert torch.equal(g, w)
            elif i < n:
                assert (g - w).abs().max() / w.abs().max() <= 1e-4
            else:
                # Deformable-DETR's padding positions are (-0.5 / 1e-6) * 2 pi ~ -3e6: there a one-ulp
                # difference in the argument moves the sine by ~0.1 (onnxruntime's graph rewrites
                # give the reference's own export the same difference), so pos is compared where valid.
                valid = ~want[i - n][:, None].expand_as(w)
                assert (g - w)[valid].abs().max() <= 1e-4
    print(f"{'dynamo' if dynamo else 'torchscript'} exporter node counts: {dict(counts)}")
    assert counts["detr_fast"]["Conv"] == counts["reference"]["Conv"] == 20
    if not dynamo:
        # The exported graph holds the folded weights: no Mul/Add per frozen BN (20 of each).
        assert counts["reference"]["Mul"] - counts["detr_fast"]["Mul"] >= 20
        assert counts["reference"]["Add"] - counts["detr_fast"]["Add"] >= 14


@pytest.mark.slow
def test_torch_compile_fullgraph_and_export():
    reference, converted = _pair(layers=DETR_DETECTION_LAYERS)
    images = _images(seed=3)
    nt = detr_fast.nested_tensor_from_tensor_list(images)
    with torch.no_grad():
        want = reference(upstream_pad(images))
        _assert_matches(torch.compile(converted, fullgraph=True, backend="aot_eager")(nt), want)
        program = torch.export.export(_Exportable(converted), (nt.tensors, nt.mask), strict=False)
        flat = program.module()(nt.tensors, nt.mask)
    levels = [detr_fast.NestedTensor(f, m) for f, m in zip(flat[:1], flat[1:2])]
    _assert_matches((levels, list(flat[2:])), want)


@pytest.mark.slow
def test_torch_compile_fullgraph_of_a_full_detr_model():
    model = UpstreamMiniDETR(upstream_joiner("resnet18", DETR_DETECTION_LAYERS, seed=4)).eval()
    reference = copy.deepcopy(model)
    detr_fast.convert(model)
    images = _images(seed=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want, got = reference(upstream_pad(images)), compiled(detr_fast.nested_tensor_from_tensor_list(images))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_dtypes_behave_as_the_reference():
    reference, converted = _pair()
    double_images = _images(dtype=torch.float64)
    # float64 images into a float32 model: the reference raises, so does the converted model.
    with pytest.raises(RuntimeError) as want_error:
        reference(upstream_pad(double_images))
    with pytest.raises(RuntimeError) as got_error:
        converted(detr_fast.nested_tensor_from_tensor_list(double_images))
    assert str(got_error.value) == str(want_error.value)
    # A converted model moved to another dtype runs in that dtype, as the reference does.
    for dtype, feature_tol, pos_tol in ((torch.float64, 1e-10, 1e-12), (torch.bfloat16, 5e-2, 1e-2),
                                        (torch.float16, 1e-2, 1e-3)):
        images = _images(dtype=dtype)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. no fused float16 convolution on this CPU
            want = copy.deepcopy(reference).to(dtype)(upstream_pad(images))
            got = copy.deepcopy(converted).to(dtype)(detr_fast.nested_tensor_from_tensor_list(images))
        _assert_matches(got, want, feature_tol, pos_tol)


def test_threads_share_one_converted_model():
    reference, converted = _pair()
    batches = {k: _images(seed=10 + k) for k in range(4)}
    results = {}

    def run(k):
        with torch.no_grad():
            for _ in range(3):
                results[k] = converted(detr_fast.nested_tensor_from_tensor_list(batches[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, images in batches.items():
        with torch.no_grad():
            _assert_matches(results[k], reference(upstream_pad(images)))


def test_upstream_nested_tensor_class_comes_back():
    reference, converted = _pair()
    with torch.no_grad():
        out, _ = converted(upstream_pad(_images()))
        backbone_out = converted[0](upstream_pad(_images()))
    assert all(type(o) is UpstreamNestedTensor for o in out)
    assert all(type(o) is UpstreamNestedTensor for o in backbone_out.values())


def test_convert_gives_back_the_model_and_a_second_convert_changes_nothing():
    reference, converted = _pair()
    assert detr_fast.conversion_report(converted).folded == 20
    classes = [type(m) for m in converted.modules()]
    assert detr_fast.convert(converted) is converted
    report = detr_fast.conversion_report(converted)
    assert not report and report.folded == 0 and "already converted" in str(report)
    assert [type(m) for m in converted.modules()] == classes
    with pytest.raises(ValueError, match="conversion_report"):
        detr_fast.conversion_report(nn.Linear(2, 2))


@pytest.mark.parametrize("bad", [_images(), torch.zeros(2, 3, 8, 8)], ids=["list of images", "tensor"])
def test_a_nested_tensor_is_asked_for_by_name(bad):
    _, converted = _pair()
    for module in (converted, converted[0], converted[1]):
        with pytest.raises(TypeError, match="tensor_list must be a NestedTensor"):
            module(bad)


def test_a_failure_inside_convert_leaves_the_model_as_it_was(monkeypatch):
    model = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=5)
    classes = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(detr_fast.conversion.upstream, "_find_offset", broken)
    with pytest.raises(RuntimeError, match="boom"):
        detr_fast.convert(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
