"""The demo's pieces: order check, photo tables, Hub-style loading, and its training, which runs the training script
in a subprocess as a user would (a one-epoch run, and a failing one whose exit status becomes the demo's).

Distances and zero-shot scores are checked against float64 math on the Euclidean projected features: the
lift is `exp_map0(alpha * f)`, whose geodesic distance to the root is exactly `||alpha * f||`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hysac_hf import demo, train
from hysac_hf.demo import (
    MARKERS,
    TrainingFailedError,
    format_report,
    is_ordered,
    load_exported,
    photo_distances,
    run_training_script,
    zero_shot,
)
from hysac_hf.testing import save_model_folder
from hysac_hf.training import TrainingConfig


def _lift64(features: torch.Tensor, alpha: float, c: float) -> torch.Tensor:
    """Space components of `exp_map0(alpha * features)` in float64, written out independently."""
    v = features.double() * alpha
    norm = v.norm(dim=-1, keepdim=True)
    return torch.sinh(math.sqrt(c) * norm) / (math.sqrt(c) * norm) * v


def _dist64(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Pairwise Lorentz distance in float64: `acosh(-c <x, y>_L) / sqrt(c)`."""
    xt = torch.sqrt(1 / c + (x * x).sum(-1, keepdim=True))
    yt = torch.sqrt(1 / c + (y * y).sum(-1, keepdim=True))
    inner = x @ y.T - xt @ yt.T
    return torch.acosh((-c * inner).clamp(min=1.0)) / math.sqrt(c)


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ({"S": 0.1, "V": 0.2, "U": 0.3, "G": 0.4}, True),
        ({"S": 0.26, "V": 0.87, "U": 0.32, "G": 0.92}, False),  # texts near the root: the old demo's failure
        ({"S": 0.1, "V": 0.2, "U": 0.2, "G": 0.4}, False),  # ties are not an order
        ({"S": 0.4, "V": 0.3, "U": 0.2, "G": 0.1}, False),
    ],
)
def test_is_ordered(means, expected):
    assert is_ordered(means) is expected


def test_photo_distances_match_float64(hysac, processor, photos):
    from hysac_hf.data.mini_visu import apply_marker

    subset = {name: photos[name] for name in ("astronaut", "camera", "logo", "cat")}  # RGB, gray, RGBA
    result = photo_distances(hysac, processor, subset)
    assert list(result) == list(subset)
    assert [row["marker"] for row in result.values()] == [MARKERS[i % len(MARKERS)] for i in range(len(subset))]
    safe = [image.convert("RGB") for image in subset.values()]
    marked = [apply_marker(image, row["marker"]) for image, row in zip(safe, result.values())]
    with torch.no_grad():
        features = hysac.encode_image(processor(images=safe + marked, return_tensors="pt")["pixel_values"], lift=False)
    expected = (features.double() * hysac.visual_alpha.double().exp()).norm(dim=-1)
    got = torch.tensor([[row["safe"] for row in result.values()] + [row["marked"] for row in result.values()]])
    torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-4, atol=1e-5)
    assert all(row["safe"] != row["marked"] for row in result.values())


def test_photo_distances_rejects_no_photo(hysac, processor):
    with pytest.raises(ValueError, match="at least one photo"):
        photo_distances(hysac, processor, {})


def test_zero_shot_matches_float64_softmax(hysac, processor, photos, captions):
    names = ("astronaut", "cat", "coffee")
    labels = ("astronaut", "cat", "coffee", "rocket")
    scores = zero_shot(hysac, processor, {n: photos[n] for n in names}, {label: captions[label] for label in labels})
    assert list(scores) == list(names) and all(list(row) == list(labels) for row in scores.values())

    c = hysac.curvature.item()
    with torch.no_grad():
        image_f = hysac.encode_image(
            processor(images=[photos[n].convert("RGB") for n in names], return_tensors="pt")["pixel_values"], lift=False
        )
        text_in = processor(text=[captions[label] for label in labels], return_tensors="pt")
        text_f = hysac.encode_text(text_in["input_ids"], text_in["attention_mask"], lift=False)
    image = _lift64(image_f, hysac.visual_alpha.exp().item(), c)
    text = _lift64(text_f, hysac.textual_alpha.exp().item(), c)
    expected = (-hysac.logit_scale.exp().item() * _dist64(image, text, c)).softmax(dim=-1)
    got = torch.tensor([[scores[n][label] for label in labels] for n in names], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.ones(len(names), dtype=torch.float64))


def test_zero_shot_needs_two_captions(hysac, processor, photos):
    with pytest.raises(ValueError, match="at least two candidate captions"):
        zero_shot(hysac, processor, {"cat": photos["cat"]}, {"cat": "a cat"})


def test_load_exported_gives_the_same_embeddings(hysac, processor, photos, tmp_path):
    model, loaded_processor = load_exported(save_model_folder(hysac, processor, tmp_path))
    assert not model.training
    assert model.config.bounds == hysac.config.bounds
    subset = {name: photos[name] for name in ("rocket", "coffee")}
    torch.testing.assert_close(
        torch.tensor([[r["safe"], r["marked"]] for r in photo_distances(model, loaded_processor, subset).values()]),
        torch.tensor([[r["safe"], r["marked"]] for r in photo_distances(hysac, processor, subset).values()]),
    )


def _result(means, photos=None, scores=None):
    return {
        "n": 40,
        "recall_at_1": {"T->I": 12.5, "I->T": 20.0, "T*->I*": 7.5, "I*->T*": 10.0},
        "mean_distance": means,
        "unsafe_farther": {"image": 0.975, "text": 0.9},
        "ordered": is_ordered(means),
        "photo_distances": photos or {},
        "zero_shot": scores or {},
    }


def test_format_report_states_the_order_and_every_table(tmp_path):
    photos = {
        "astronaut": {"marker": "crimson_band", "safe": 0.3512, "marked": 0.4123},
        "cat": {"marker": "hazard_hatch", "safe": 0.5, "marked": 0.25},
    }
    scores = {"astronaut": {"astronaut": 0.7, "cat": 0.3}, "cat": {"astronaut": 0.45, "cat": 0.55}}
    good = format_report(_result({"S": 0.1, "V": 0.2, "U": 0.3, "G": 0.4}, photos, scores), tmp_path)
    lines = [line for line in good.splitlines() if line.strip()]
    assert "Order S < V < U < G: yes" in lines
    assert any("U (unsafe text " in line and "0.3000" in line for line in lines)
    assert any(
        line.split()[:4] == ["astronaut", "0.3512", "->", "0.4123"] and line.endswith(" farther") for line in lines
    )
    assert any(line.split()[0] == "cat" and line.endswith("NOT farther") for line in lines)
    assert any(line.split() == ["astronaut", "70.0", "30.0"] for line in lines)
    assert any(line.split() == ["cat", "45.0", "55.0"] for line in lines)
    assert len(good.splitlines()) <= 48
    # Where the files are and how to load the model, with the export folder's real path.
    assert f"Model folder (Hub-ready, with its model card): {tmp_path}" in lines
    assert any("bounds.png" in line for line in lines)
    assert f"  model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)" in lines

    bad = format_report(_result({"S": 0.26, "V": 0.87, "U": 0.32, "G": 0.92}), tmp_path)
    assert "Order S < V < U < G: NO" in bad.splitlines()
    assert "Zero-shot" not in bad and "Sample photos" not in bad


# ------------------------------------------------------------------------------------------------------------
# Training: the script in a subprocess
@pytest.mark.slow
def test_the_demo_trains_by_running_the_script_in_a_subprocess(tmp_path, monkeypatch, capfd):
    commands = []
    real_run = subprocess.run

    def spy(command, *args, **kwargs):
        commands.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(demo.subprocess, "run", spy)
    output_dir = tmp_path / "demo"
    result = demo.run(demo.DemoConfig(output_dir=str(output_dir), num_train_epochs=1, json=True))
    (command,) = commands
    assert command[:3] == [sys.executable, "-m", "hysac_hf.train"]
    config = train.parse_args(command[3:])
    assert (config.output_dir, config.num_train_epochs, config.per_device_train_batch_size) == (str(output_dir), 1, 32)
    assert (config.entailment_weight, config.learning_rate, config.full_finetune) == (4.0, 1e-3, True)
    assert not Path(config.model_name_or_path).exists()  # the random start model lived in a scratch folder
    # The script's export (weights and calibrated bounds) is what the demo loaded and evaluated.
    export = output_dir / "model"
    assert result["export_dir"] == str(export) and (export / "model.safetensors").is_file()
    assert result["bounds"] == json.loads((export / "config.json").read_text())["bounds"]
    assert json.loads((output_dir / "train_summary.json").read_text())["global_step"] == 5  # 160 rows / 32
    captured = capfd.readouterr()
    assert json.loads(captured.out)["mean_distance"] == result["mean_distance"]  # stdout holds the JSON only
    assert "epoch 1: train_loss" in captured.err  # the script's log, on the shared console


@pytest.mark.slow
def test_a_failed_training_run_is_the_demos_error_with_its_exit_status(tmp_path, capfd):
    output_dir = tmp_path / "demo"
    code = demo.main(["--output_dir", str(output_dir), "--num_train_epochs", "1", "--batch_size", "1000"])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    assert errors[0].startswith("train.py: error: the training split has 160 rows, fewer than one global batch")
    assert errors[1:] == [
        "hysac-demo: error: training (python -m hysac_hf.train) stopped with exit status 2; its error is printed above"
    ]
    assert not output_dir.exists()


@pytest.mark.slow
def test_run_training_script_raises_with_the_scripts_exit_status(tmp_path, capfd):
    config = TrainingConfig(model_name_or_path="m", output_dir=str(tmp_path / "run"), per_device_train_batch_size=1)
    with pytest.raises(TrainingFailedError) as caught:
        run_training_script(config)
    assert caught.value.exit_status == 2 and caught.value.cmd[:3] == [sys.executable, "-m", "hysac_hf.train"]
    assert "train.py: error: --per_device_train_batch_size must be >= 2" in capfd.readouterr().err


def test_a_training_killed_by_a_signal_exits_as_a_shell_would():
    error = TrainingFailedError(-9, ["python", "-m", "hysac_hf.train"])
    assert error.exit_status == 137 and "stopped with signal 9" in str(error)
    assert TrainingFailedError(1, []).exit_status == 1
