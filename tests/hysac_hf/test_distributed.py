"""Two CPU processes with per-process batch B reproduce one process with batch 2B (loss and gradients)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hysac_hf.distributed import gather_with_grad, world_info
from hysac_hf.testing import run_on_cpu_processes

SCRIPT = Path(__file__).with_name("ddp_equivalence_script.py")


def launch(tmp_path) -> dict:
    report = tmp_path / "report.json"
    result = run_on_cpu_processes([SCRIPT, report], num_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """The reports of one 2-process launch of the script (softmax and sigmoid, global and local negatives)."""
    return launch(tmp_path_factory.mktemp("ddp"))


def test_outside_a_process_group_gather_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x


@pytest.mark.slow
@pytest.mark.main_line
def test_two_processes_match_one_process_with_the_global_batch(reports):
    report = reports["global"]
    assert report["world"] == 2
    assert report["loss"] == pytest.approx(report["reference_loss"], abs=1e-5)
    # Each rank's own loss differs from the global one: the equality above is not trivial.
    assert abs(report["local_loss"] - report["reference_loss"]) > 1e-4
    assert report["max_grad"] > 1e-3 and report["zero_grads"] == []
    assert report["max_grad_diff"] < 1e-5
    # --local_negatives: the authors' per-process loss, i.e. the mean of the per-half single-process losses.
    local = reports["local"]
    assert local["loss"] == pytest.approx(local["reference_loss"], abs=1e-5)
    assert local["max_grad_diff"] < 1e-5
    assert abs(local["loss"] - report["loss"]) > 1e-4


@pytest.mark.slow
@pytest.mark.main_line
def test_two_processes_match_one_process_with_the_sigmoid_loss(reports):
    """SigLIP's sigmoid loss, each process scoring its images against every gathered text chunk by chunk: loss and
    gradients (the logit bias's included) of 2 x B equal 1 x 2B."""
    report = reports["sigmoid"]
    assert report["loss"] == pytest.approx(report["reference_loss"], abs=1e-5)
    assert abs(report["local_loss"] - report["reference_loss"]) > 1e-4
    assert report["max_grad"] > 1e-3 and report["zero_grads"] == []
    assert any(name.endswith("logit_bias") for name in report["trained"])
    assert report["max_grad_diff"] < 1e-5
    local = reports["sigmoid_local"]
    assert local["loss"] == pytest.approx(local["reference_loss"], abs=1e-5)
    assert local["max_grad_diff"] < 1e-5
    assert abs(local["loss"] - report["loss"]) > 1e-4
