"""examples/export_onnx.py: ONNX encoders with a dynamic batch whose onnxruntime outputs match torch within 1e-4."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "export_onnx.py"


def load_script():
    spec = importlib.util.spec_from_file_location("export_onnx", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def onnxruntime_embeds(path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})[0]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_exported_encoders_match_torch_on_real_photos_and_captions(
    hysac, processor, photos, captions, model_dir, tmp_path, exporter, capsys
):
    out = tmp_path / "onnx"
    status = load_script().main(
        ["--model", str(model_dir), "--output", str(out), "--exporter", exporter, "--opset", "17"]
    )
    assert status == 0
    stdout = capsys.readouterr().out
    assert f"{out / 'image_encoder.onnx'}: max |onnxruntime - torch|" in stdout and "(ok)" in stdout

    # Independently of the script's own check: other batch sizes than the export's, real photos and captions.
    names = list(photos)  # 6 photos: RGB, grayscale, RGBA
    images = processor(images=[photos[n] for n in names])["pixel_values"]
    texts = processor(text=[captions[n] for n in names[:5]], padding="longest")
    with torch.no_grad():
        expected_images = hysac.encode_image(images).numpy()
        expected_texts = hysac.encode_text(texts["input_ids"], texts["attention_mask"]).numpy()
    got_images = onnxruntime_embeds(out / "image_encoder.onnx", {"pixel_values": images})
    got_texts = onnxruntime_embeds(
        out / "text_encoder.onnx", {"input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"]}
    )
    assert got_images.shape == (6, 32) and got_texts.shape == (5, 32)
    assert np.abs(got_images - expected_images).max() <= 1e-4
    assert np.abs(got_texts - expected_texts).max() <= 1e-4
    # The same ranking by Lorentz distance from the ONNX embeddings, with the curvature written beside them.
    meta = json.loads((out / "hysac_onnx.json").read_text())
    assert meta["curvature"] == pytest.approx(hysac.curvature.item(), rel=1e-7)
    c = meta["curvature"]

    def dist(x, y):
        xt = np.sqrt(1 / c + (x.astype(np.float64) ** 2).sum(-1))
        yt = np.sqrt(1 / c + (y.astype(np.float64) ** 2).sum(-1))
        return np.arccosh(
            np.maximum(c * (np.outer(xt, yt) - x.astype(np.float64) @ y.T.astype(np.float64)), 1)
        ) / np.sqrt(c)

    assert (dist(got_images, got_texts).argsort(1) == dist(expected_images, expected_texts).argsort(1)).all()


def test_command_line_errors_exit_2_with_one_line(model_dir, tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False
        )

    result = run("--model", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot load a HySAC model and processor from")
    assert "Traceback" not in result.stderr
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = run("--model", str(model_dir), "--output", str(a_file))
    assert result.returncode == 2 and "is a file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["siglip", "siglip2", "metaclip_2"])
def test_every_base_family_exports_and_matches_torch(family, tiny_family_model_dir, photos, captions, tmp_path, capsys):
    import transformers

    from hysac_hf.loading import load_model

    folder, out = tiny_family_model_dir(family), tmp_path / "onnx"
    status = load_script().main(["--model", str(folder), "--output", str(out), "--opset", "17"])
    if family == "siglip2" and int(transformers.__version__.split(".")[0]) < 5:
        assert status == 2 and "transformers >= 5" in capsys.readouterr().err  # refused, with the fix
        return
    assert status == 0
    meta = json.loads((out / "hysac_onnx.json").read_text())
    assert meta["base_model_type"] == family
    model, processor = load_model(folder)
    names = list(photos)  # 6 photos: RGB, grayscale, RGBA
    image_inputs = {k: v for k, v in processor(images=[photos[n] for n in names]).items()}
    text_inputs = dict(processor(text=[captions[n] for n in names[:5]]))
    assert list(image_inputs) == meta["image_inputs"] and list(text_inputs) == meta["text_inputs"]
    with torch.no_grad():
        expected_images = model.encode_image(**image_inputs).numpy()
        expected_texts = model.encode_text(**text_inputs).numpy()
    got_images = onnxruntime_embeds(out / "image_encoder.onnx", image_inputs)
    got_texts = onnxruntime_embeds(out / "text_encoder.onnx", text_inputs)
    assert got_images.shape == (6, 32) and got_texts.shape == (5, 32)
    assert np.abs(got_images - expected_images).max() <= 1e-4
    assert np.abs(got_texts - expected_texts).max() <= 1e-4
    if family == "siglip2":  # the photos' patch grids differ: the export follows each image's own
        assert len({tuple(s) for s in image_inputs["spatial_shapes"].tolist()}) > 1
