"""The built-in `AutoTokenizer` and `AutoImageProcessor` load a saved HySAC folder without asking to run custom code.

Each load runs in a fresh interpreter whose stdin stays open and silent, as in a terminal or notebook: a
"Do you wish to run the custom code? [y/N]" prompt would block there for 15 s (transformers' timeout), so the
tests assert that no prompt was printed and that each load returned within a generous 10 s (a hang detector,
not a timing test). Folders are saved by this transformers line and, when CI names it, by the other one
(`HYSAC_OTHER_PYTHON`), and loaded by both.

What is and is not possible (transformers 5.24 and 4.57):

- `AutoImageProcessor.from_pretrained(folder)` reads `preprocessor_config.json` (`CLIPImageProcessor`): no
  prompt on either line.
- `AutoTokenizer.from_pretrained(folder)`: transformers 4 reads `tokenizer_config.json` (`CLIPTokenizer`) and
  never prompts. Transformers 5 first runs `AutoConfig.from_pretrained(folder)` on `config.json`, whose model type
  "hysac" it only knows through the custom `AutoConfig` in `auto_map`, which `AutoModel` needs; so it asks, for
  every custom-code model, before it reads any tokenizer file. The processor's `auto_map` in `tokenizer_config.json`
  plays no part (it names no `AutoTokenizer`). No file in the folder can avoid that question; `trust_remote_code=False`
  (load only built-in classes) or `True` answers it, and so does importing `hysac_hf`, which registers "hysac".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import lru_cache

import numpy as np
import pytest
import transformers

from hysac_hf import HySACModel
from hysac_hf.testing import TINY_BOUNDS, run_without_hysac_hf, save_model_folder

pytestmark = pytest.mark.slow

OTHER_PYTHON = os.environ.get("HYSAC_OTHER_PYTHON")
PYTHONS = [sys.executable] + [p for p in [OTHER_PYTHON] if p]
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with openai/clip-vit-* tokenizers
PROMPT = "Do you wish to run the custom code"
HANG_SECONDS = 10.0  # transformers' prompt waits 15 s for an answer

# Prepended to every child: fd 0 becomes a pipe that this process keeps open and never writes to.
OPEN_STDIN = textwrap.dedent(
    """
    import os, sys
    _stdin_read, _stdin_write = os.pipe()  # stdin stays open and silent: a prompt would wait for an answer
    os.dup2(_stdin_read, 0)
    """
)

# Loads with the built-in Auto classes and prints one JSON line: the classes, the ids, how long each load took.
LOAD = textwrap.dedent(
    """
    import json, time
    import numpy as np
    import transformers
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    folder, image_path, out_dir, tokenizer_kwargs = sys.argv[1:4] + [json.loads(sys.argv[4])]
    if sys.argv[5:] == ["short-timeout"]:  # a prompt then waits 1 s, not 15
        import transformers.dynamic_module_utils as dynamic_module_utils
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = 1
    result = {"transformers": transformers.__version__}
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder, **tokenizer_kwargs)
    result["tokenizer_seconds"] = time.monotonic() - start
    start = time.monotonic()
    image_processor = AutoImageProcessor.from_pretrained(folder)
    result["image_processor_seconds"] = time.monotonic() - start
    result.update(
        tokenizer=type(tokenizer).__name__,
        image_processor=type(image_processor).__name__,
        cat_ids=tokenizer("a photo of a cat")["input_ids"],
    )
    if "hysac_hf" not in sys.modules:  # the remote-code processor still loads when asked for
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        result["processor"] = f"{type(processor).__module__}.{type(processor).__name__}"
        np.save(f"{out_dir}/pixels.npy", processor(images=Image.open(image_path))["pixel_values"].numpy())
    np.save(f"{out_dir}/auto_pixels.npy", image_processor(Image.open(image_path), return_tensors="np")["pixel_values"])
    print(json.dumps(result))
    """
)

SAVE = textwrap.dedent(
    """
    import json
    from hysac_hf import HySACModel, HySACProcessor

    clip, folder, bounds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    HySACModel.from_clip(clip, bounds=bounds).save_pretrained(folder)
    HySACProcessor.from_pretrained(clip).save_pretrained(folder)
    """
)


@lru_cache
def transformers_major(python: str) -> int:
    if python == sys.executable:
        return int(transformers.__version__.split(".")[0])
    code = "import transformers; print(transformers.__version__)"
    return int(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout.split(".")[0])


@pytest.fixture(scope="module")
def folders(tiny_clip_dir, processor, tmp_path_factory):
    """HySAC folders saved by `HySACModel`/`HySACProcessor.save_pretrained` on this line and on the other one."""
    root = tmp_path_factory.mktemp("saved")
    saved = {"this-line": root / "this-line" / "hysac"}
    save_model_folder(HySACModel.from_clip(str(tiny_clip_dir), bounds=TINY_BOUNDS), processor, saved["this-line"])
    if OTHER_PYTHON:
        saved["other-line"] = root / "other-line" / "hysac"
        args = [str(tiny_clip_dir), str(saved["other-line"]), json.dumps(TINY_BOUNDS)]
        child = subprocess.run(
            [OTHER_PYTHON, "-c", "import sys" + SAVE, *args], check=False, capture_output=True, text=True
        )
        assert child.returncode == 0, child.stderr[-4000:]
    return saved


def load_in_child(folder, out_dir, python, tokenizer_kwargs, photos, *extra, blocked=True):
    image_path = out_dir / "coffee.png"
    photos["coffee"].save(image_path)
    args = [str(folder), str(image_path), str(out_dir), json.dumps(tokenizer_kwargs), *extra]
    if blocked:
        child = run_without_hysac_hf(OPEN_STDIN + LOAD, out_dir, python=python, args=args)
    else:  # hysac_hf importable and imported first
        code = OPEN_STDIN + "import hysac_hf\n" + LOAD
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        child = subprocess.run(
            [python, "-c", code, *args], check=False, cwd=out_dir, capture_output=True, text=True, env=env, timeout=300
        )
    assert child.returncode == 0, child.stderr[-4000:]
    return child, json.loads(child.stdout.strip().splitlines()[-1])


def assert_loaded_without_prompt(child, result, out_dir, processor, photos):
    assert PROMPT not in child.stdout + child.stderr
    assert result["tokenizer_seconds"] < HANG_SECONDS and result["image_processor_seconds"] < HANG_SECONDS
    assert result["tokenizer"].startswith("CLIPTokenizer") and result["cat_ids"] == CAT_IDS
    assert result["image_processor"].startswith("CLIPImageProcessor")
    expected = processor(images=photos["coffee"])["pixel_values"].numpy()
    np.testing.assert_allclose(np.load(out_dir / "auto_pixels.npy"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("saved_by", ["this-line", "other-line"])
@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-python")
def test_built_in_auto_classes_load_without_a_prompt(folders, processor, photos, python, saved_by, tmp_path):
    """Without hysac_hf: no prompt, no delay; transformers 5's `AutoTokenizer` gets `trust_remote_code=False`."""
    if saved_by not in folders:
        pytest.skip("HYSAC_OTHER_PYTHON is not set")
    tokenizer_kwargs = {"trust_remote_code": False} if transformers_major(python) >= 5 else {}
    child, result = load_in_child(folders[saved_by], tmp_path, python, tokenizer_kwargs, photos)
    assert_loaded_without_prompt(child, result, tmp_path, processor, photos)
    # ... and the remote-code processor is still what AutoProcessor(trust_remote_code=True) returns.
    assert result["processor"].startswith("transformers_modules.") and result["processor"].endswith(".HySACProcessor")
    expected = processor(images=photos["coffee"])["pixel_values"].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "pixels.npy"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: "this-python" if p == sys.executable else "other-python")
def test_auto_tokenizer_needs_no_flag_once_hysac_hf_is_imported(folders, processor, photos, python, tmp_path):
    """`import hysac_hf` registers "hysac", so `AutoTokenizer.from_pretrained(folder)` asks nothing on either line."""
    child, result = load_in_child(folders["this-line"], tmp_path, python, {}, photos, blocked=False)
    assert_loaded_without_prompt(child, result, tmp_path, processor, photos)


@pytest.mark.skipif(transformers_major(sys.executable) < 5, reason="transformers 4 never asks (tested above)")
@pytest.mark.xfail(
    strict=True,
    reason="transformers 5's AutoTokenizer resolves config.json's custom AutoConfig with trust_remote_code=None "
    "before reading tokenizer files; no folder content avoids the question (module docstring). If this passes, "
    "transformers changed: drop this mark and the trust_remote_code=False advice.",
)
def test_transformers_5_auto_tokenizer_without_a_flag_or_hysac_hf(folders, processor, photos, tmp_path):
    child, result = load_in_child(folders["this-line"], tmp_path, sys.executable, {}, photos, "short-timeout")
    assert_loaded_without_prompt(child, result, tmp_path, processor, photos)
