"""Shared fixtures: a tiny random CLIP with the real CLIP tokenizer, built once per session, and real photos.

Nothing touches the network: the Hub is switched off before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hysac_hf import HySACProcessor
from hysac_hf.testing import (
    SAMPLE_CAPTIONS,
    make_tiny_clip,
    make_tiny_dual_encoder,
    make_tokenizer_portable,
    sample_images,
    save_model_folder,
    tiny_hysac,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """scripts/test.sh runs the suite on two transformers lines; tests marked `main_line` (whose behaviour does not
    depend on the line: multi-process launches, packaging, the browser) run on the first only."""
    if os.environ.get("HYSAC_SECOND_LINE"):
        skip = pytest.mark.skip(reason="main_line test: run on the main transformers line only (scripts/test.sh)")
        for item in items:
            if "main_line" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_logging():
    """Commands configure logging for their console (`hysac_hf.cli.setup_logging`); undo it after each test, so a
    handler bound to one test's captured stderr does not outlive it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("hysac_hf", "__main__", "train", "convert_hysac")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A saved tiny random CLIPModel + CLIPProcessor (real BPE tokenizer, 224-px CLIP preprocessing)."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_clip_dir, tmp_path_factory):
    """`tiny_base_dir(family)`: a saved tiny random dual encoder of `family` ("clip", "siglip", "siglip2",
    "metaclip_2") with its image processor and a small tokenizer, built on first use and shared by the session."""
    built = {"clip": tiny_clip_dir}

    def get(family: str):
        if family not in built:
            built[family] = make_tiny_dual_encoder(tmp_path_factory.mktemp(f"tiny_{family}"), family, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_family_model_dir(tiny_base_dir, tmp_path_factory):
    """`tiny_family_model_dir(family)`: a HySAC folder on a tiny base of `family` (`tiny_hysac`: non-default scalars,
    bounds) with its processor, built on first use and shared by the session: read it, never write into it."""
    from hysac_hf.loading import load_base_processor

    built = {}

    def get(family: str):
        if family not in built:
            model = tiny_hysac(tiny_base_dir(family))
            processor = load_base_processor(str(tiny_base_dir(family)), model)
            folder = save_model_folder(model, processor, tmp_path_factory.mktemp(f"hysac_{family}") / "model")
            if family != "clip":
                make_tokenizer_portable(folder)  # the folder is also loaded on the other transformers line
            built[family] = folder
        return built[family]

    return get


@pytest.fixture(scope="session")
def processor(tiny_clip_dir):
    return HySACProcessor.from_pretrained(tiny_clip_dir)


@pytest.fixture()
def hysac(tiny_clip_dir):
    """A fresh HySAC built from the tiny CLIP, with non-default scalars so that they matter in every check."""
    return tiny_hysac(tiny_clip_dir)


@pytest.fixture()
def model_dir(hysac, processor, tmp_path):
    """The `hysac` fixture saved with its processor in `tmp_path / "model"`, as a user's model folder."""
    return save_model_folder(hysac, processor, tmp_path / "model")


@pytest.fixture()
def fresh_accelerate_state():
    """Accelerate's singletons reset before and after the test, so that it builds its own `Accelerator` (test code
    may reset them; library code never does). Use with `pytest.mark.usefixtures("fresh_accelerate_state")`."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def photos():
    """Real photos from scikit-image: RGB, grayscale (camera) and RGBA (logo), of different sizes."""
    return sample_images()


@pytest.fixture(scope="session")
def captions():
    return dict(SAMPLE_CAPTIONS)
