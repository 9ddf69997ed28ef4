"""The README's downstream snippets run as written (marked `<!-- readme-test: NAME -->`), in README order, in a folder
that holds what `bash scripts/demo.sh` leaves behind (`hysac-demo/model`, here a tiny model with calibrated bounds
and thresholds) and a folder of photos: the docs cannot rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hysac_hf.testing import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.main_line]

SNIPPET = re.compile(r"<!-- readme-test: (?P<name>[\w-]+) -->\n```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


def snippets() -> list[tuple[str, str, str]]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return [(m["name"], m["lang"], m["code"]) for m in SNIPPET.finditer(text)]


def test_the_readme_marks_its_downstream_snippets():
    names = [name for name, _, _ in snippets()]
    assert names == ["detection", "retrieval", "index", "index-python"], names


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_clip_dir):
    from hysac_hf import HySACModel, HySACProcessor
    from hysac_hf.testing import TINY_BOUNDS, sample_images

    root = tmp_path_factory.mktemp("readme")
    model = HySACModel.from_clip(tiny_clip_dir, bounds=TINY_BOUNDS, unsafe_thresholds={"image": 1.5, "text": 1.0})
    model.save_pretrained(root / "hysac-demo" / "model")
    HySACProcessor.from_pretrained(tiny_clip_dir).save_pretrained(root / "hysac-demo" / "model")
    (root / "photos" / "more").mkdir(parents=True)
    for i, (name, image) in enumerate(sample_images().items()):
        image.convert("RGB").save(root / "photos" / ("more" if i % 2 else ".") / f"{name}.png")
    return root


@pytest.mark.parametrize("name", ["detection", "retrieval", "index", "index-python"])
def test_snippet_runs_as_written(workdir, name):
    (lang, code) = next((lang, code) for n, lang, code in snippets() if n == name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-e", "-o", "pipefail", "-c", code]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name}:\n{result.stderr[-3000:]}"
    out = result.stdout
    if name == "detection":
        assert out.count("'label'") == 4 and "'modality': 'image'" in out and "'threshold': 0.5" in out
    elif name == "retrieval":
        assert "'results'" in out and out.splitlines()[0].split()[0] in ("True", "False")
    elif name == "index":
        assert '"results"' in out and '"path"' in out  # search results carry each photo's path
        assert json.loads((workdir / "photos-index" / "index.json").read_text())["count"] == 6
    else:
        assert out.count("'results'") == 2
