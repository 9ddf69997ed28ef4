"""The public methods export (torch.export, ONNX dynamo and legacy) with a dynamic batch and compile with fullgraph.

Value checks (NaN pixels, id range) are skipped while tracing and stay on in eager calls.
"""

from __future__ import annotations

import pytest
import torch
from hysac_hf.modeling.modeling_hysac import FEATURES_ARE_MODEL_OUTPUTS, is_tracing
from torch import nn

pytestmark = pytest.mark.slow


def pooled(output):
    """The `(B, D)` embedding of `get_*_features`: the tensor (transformers 4) or the pooler output (5)."""
    return output.pooler_output if FEATURES_ARE_MODEL_OUTPUTS else output


class Call(nn.Module):
    """A tiny module whose forward calls one public method of the model, as an exporter sees it."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, first: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        if self.method == "encode_image":
            return m.encode_image(first)
        if self.method == "encode_text":
            return m.encode_text(first, second)
        if self.method == "get_image_features":
            return pooled(m.get_image_features(first))
        if self.method == "get_text_features":
            return pooled(m.get_text_features(first, second))
        return m(input_ids=first, pixel_values=second).logits_per_image  # forward


METHODS = ("encode_image", "encode_text", "get_image_features", "get_text_features", "forward")


@pytest.fixture()
def inputs(processor, photos, captions):
    names = list(photos)[:4]
    text = processor(text=[captions[n] for n in names], padding="longest")
    images = processor(images=[photos[n] for n in names])
    return {
        "encode_image": (images["pixel_values"],),
        "get_image_features": (images["pixel_values"],),
        "encode_text": (text["input_ids"], text["attention_mask"]),
        "get_text_features": (text["input_ids"], text["attention_mask"]),
        "forward": (text["input_ids"], images["pixel_values"]),
    }


def dynamic_batch(method: str) -> dict:
    """`dynamic_shapes` for `Call(model, method)`: the batch dimension of every input is free."""
    if method == "forward":  # texts and images: two independent batch sizes
        return {
            "first": {0: torch.export.Dim("texts", min=1, max=256)},
            "second": {0: torch.export.Dim("images", min=1, max=256)},
        }
    batch = torch.export.Dim("batch", min=1, max=256)
    if "image" in method:
        return {"first": {0: batch}}
    return {"first": {0: batch}, "second": {0: batch}}


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_of_public_methods_with_a_dynamic_batch(hysac, inputs, method):
    module = Call(hysac, method).eval()
    args = inputs[method]
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_batch(method))
        exported = program.module()
        for size in (4, 1, 3):
            smaller = tuple(a[:size] for a in args)
            torch.testing.assert_close(exported(*smaller), module(*smaller), rtol=1e-5, atol=1e-5)
    if method in ("encode_image", "get_image_features"):  # no NaN check inside the graph; eager still checks
        bad = args[0][:2].clone()
        bad[0, 0, 0, 0] = float("nan")
        with torch.no_grad():
            assert torch.isnan(exported(bad)[0]).all()
        with pytest.raises(ValueError, match="NaN"):
            module(bad)


@pytest.mark.parametrize("method", METHODS)
def test_compile_fullgraph_equals_eager(hysac, inputs, method):
    torch._dynamo.reset()
    module = Call(hysac, method).eval()
    args = inputs[method]
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)
    if method == "encode_text":  # out-of-range ids: not checked in the compiled graph, checked in eager calls
        bad = args[0].clone()
        bad[0, 1] = -1
        with pytest.raises(ValueError, match="another tokenizer"):
            module(bad, args[1])
    torch._dynamo.reset()


def test_is_tracing_is_false_in_eager_calls_and_true_inside_compile():
    assert is_tracing() is False
    seen = []

    def probe(x):
        seen.append(is_tracing())
        return x + 1

    torch.compile(probe, fullgraph=True)(torch.zeros(2))
    assert seen == [True]


def run_onnx(path, names, args):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: arg.numpy() for name, arg in zip(names, args)})[0]


def assert_onnx_matches(module, path, names, args, sizes) -> None:
    """The exported file, run by onnxruntime on the first `size` rows of `args`, matches `module` within 1e-4."""
    for size in sizes:
        smaller = tuple(a[:size] for a in args)
        expected = module(*smaller).numpy()
        got = run_onnx(path, names, smaller)
        assert got.shape == expected.shape
        assert abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("method", ["get_image_features", "get_text_features", "forward"])
def test_dynamo_onnx_export_of_get_features_and_forward(hysac, inputs, method, tmp_path):
    module = Call(hysac, method).eval()
    args = inputs[method]
    names = ["first", "second"][: len(args)]
    dynamic = dynamic_batch(method)
    path = tmp_path / f"{method}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            module, args, str(path), dynamo=True, dynamic_shapes=dynamic, input_names=names, verbose=False
        )
        assert_onnx_matches(module, path, names, args, sizes=(4, 2))


@pytest.mark.parametrize("method", ["encode_image", "encode_text", "forward"])
def test_legacy_onnx_export_works_through_the_exp_log_formulas(hysac, inputs, method, tmp_path):
    module = Call(hysac, method).eval()
    args = inputs[method]
    names = ["first", "second"][: len(args)]
    path = tmp_path / f"{method}.onnx"
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["out"],
            opset_version=17,
            dynamic_axes={**{name: {0: f"batch_{name}"} for name in names}, "out": {0: "rows"}},
        )
        assert_onnx_matches(module, path, names, args, sizes=(4, 3))
