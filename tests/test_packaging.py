"""The installed wheel is complete: the training script and the converter are reachable outside the repository, and
building it prints no setuptools deprecation warnings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hysac_hf.testing import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.main_line]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies) into a folder outside the repository."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(root / "dist"), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("hysac_hf-*.whl")
    target = root / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return {"build_log": build.stdout + build.stderr, "site": target, "cwd": root}


def run_module(installed, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed["site"])
    code = "import sys, runpy; sys.path = [p for p in sys.path if p not in ('', %r)]; " % str(REPO_ROOT)
    code += "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=installed["cwd"], env=env, timeout=300
    )


def test_building_prints_no_deprecation_warning(installed):
    log = installed["build_log"]
    assert "adding license file 'LICENSE'" in log  # the verbose build log was captured
    assert "SetuptoolsDeprecationWarning" not in log and "is deprecated" not in log


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("hysac_hf.train", "--model_name_or_path"),
        ("hysac_hf.convert", "--checkpoint_path"),
        ("hysac_hf.calibration", "--overwrite"),
        ("hysac_hf.evaluation.cli", "embed"),
        ("hysac_hf.index.cli", "build"),
        ("hysac_hf.demo", "--output_dir"),
        ("hysac_hf.serve.cli", "--allow_remote_images"),
    ],
)
def test_every_command_runs_from_the_installed_wheel(installed, module, expected):
    result = run_module(installed, module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed["site"])
    code = "import sys; sys.path = [p for p in sys.path if p not in ('', %r)]; import hysac_hf.train as t; print(t.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", code % str(REPO_ROOT)], capture_output=True, text=True, cwd=installed["cwd"], env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(installed["site"]))
    # train.py is a file in the wheel, not a link back into a checkout.
    assert not (installed["site"] / "hysac_hf" / "train.py").is_symlink()
    assert (installed["site"] / "hysac_hf" / "model_cards" / "hysac.md.j2").is_file()


def test_python_m_training_points_to_the_script(installed):
    result = run_module(installed, "hysac_hf.training")
    assert result.returncode == 2 and "hysac-train" in result.stderr
