"""Offline building blocks for tests, the demo and benchmarks: a real CLIP tokenizer, tiny random CLIPs, photos.

Nothing here downloads anything. The CLIP BPE vocabulary comes from the ``open-clip-torch`` wheel (install it
with ``pip install --no-deps open-clip-torch``: its own dependencies pull torchvision and CUDA torch), or from
the file named by ``HYSAC_CLIP_BPE``. Photos come from scikit-image, scikit-learn and matplotlib.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The number of merges CLIP uses: vocabulary 49408 = 256 bytes * 2 (with and without </w>) + merges + 2 specials.
N_MERGES = 49152 - 256 - 2


def find_clip_bpe() -> Path:
    """Locate CLIP's BPE vocabulary file without importing open_clip (which needs torchvision).

    Raises:
        FileNotFoundError: with the install command, when neither the env var nor the wheel provides it.
    """
    env = os.environ.get("HYSAC_CLIP_BPE")
    if env:
        path = Path(env)
        if not path.is_file():
            raise FileNotFoundError(f"HYSAC_CLIP_BPE={env} does not exist")
        return path
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                candidate = Path(location) / BPE_FILENAME
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary ({BPE_FILENAME}) was not found. Install it with "
        "'pip install --no-deps open-clip-torch' or point HYSAC_CLIP_BPE at the file."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table (a standard, widely re-implemented mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_clip_vocab(directory: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write CLIP's `vocab.json` and `merges.txt` (49,408 tokens, the ids of `openai/clip-vit-*`) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path or find_clip_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def build_clip_tokenizer(directory: str | Path):
    """The real CLIP tokenizer (exact token ids), built offline into `directory`."""
    from transformers import CLIPTokenizer

    write_clip_vocab(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def clip_image_processor(image_size: int = 224):
    """CLIP's image processor (resize 224 + centre crop + CLIP mean/std) that needs no torchvision."""
    try:  # transformers 5: the default CLIPImageProcessor backend needs torchvision; the PIL one does not
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


TINY_TEXT = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77,
)
TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32
)


# Bounds in the paper's order (S < V < U < G) for tiny test models: arbitrary but plausible values.
TINY_BOUNDS = {
    "S": {"avg": 0.30, "up_95": 0.45, "low_05": 0.15},
    "V": {"avg": 0.55, "up_95": 0.70, "low_05": 0.40},
    "U": {"avg": 0.80, "up_95": 0.95, "low_05": 0.65},
    "G": {"avg": 1.05, "up_95": 1.20, "low_05": 0.90},
}


def tiny_clip_config(projection_dim: int = 32, **overrides):
    """A tiny `CLIPConfig` with CLIP's real vocabulary size and 224-px input."""
    from transformers import CLIPConfig

    text = {**TINY_TEXT, **overrides.pop("text_config", {})}
    vision = {**TINY_VISION, **overrides.pop("vision_config", {})}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim, **overrides)


def make_tiny_clip(directory: str | Path, seed: int = 0, projection_dim: int = 32):
    """Save a tiny random `CLIPModel` with the real tokenizer and image processor to `directory`.

    Returns:
        the directory, loadable with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained` offline.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(projection_dim=projection_dim)).eval()
    model.save_pretrained(directory)
    tokenizer = build_clip_tokenizer(directory / "_vocab")
    CLIPProcessor(image_processor=clip_image_processor(), tokenizer=tokenizer).save_pretrained(directory)
    return directory


@lru_cache(maxsize=1)
def _sample_arrays() -> dict[str, np.ndarray]:
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "camera": data.camera(),  # grayscale (H, W)
        "logo": data.logo(),  # RGBA
    }


SAMPLE_CAPTIONS = {
    "astronaut": "a photo of an astronaut in a spacesuit",
    "cat": "a photo of a cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "camera": "a black and white photo of a man with a camera",
    "logo": "a logo with a snake",
}


def sample_images(as_pil: bool = True) -> dict[str, object]:
    """Real photos shipped with scikit-image (one grayscale, one RGBA), keyed by name; see `SAMPLE_CAPTIONS`."""
    arrays = _sample_arrays()
    if not as_pil:
        return dict(arrays)
    from PIL import Image

    return {name: Image.fromarray(array) for name, array in arrays.items()}


def run_without_hysac_hf(
    code: str, workdir: str | Path, python: str = sys.executable, args: Sequence[str] = (), timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python whose imports of `hysac_hf` and `modeling` fail, with cwd `workdir`.

    This is what a Hub user has: transformers and torch, and the remote code shipped in the model folder.
    `args` become `sys.argv[1:]`; remote code is cached under `workdir/hf_modules`. Used by the tests that
    prove a saved or converted folder loads with `trust_remote_code` alone.
    """
    workdir = Path(workdir)
    blocker = textwrap.dedent(
        """
        import importlib.abc, sys
        class _BlockLocalPackages(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("hysac_hf", "modeling"):
                    raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
                return None
        sys.meta_path.insert(0, _BlockLocalPackages())
        sys.path[:] = [p for p in sys.path if p not in ("", ".", %r, %r)]
        try:
            import hysac_hf
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("hysac_hf is importable; the test would prove nothing")
        """
        % (str(REPO_ROOT), str(REPO_ROOT / "modeling"))
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "hf_modules"))
    return subprocess.run(
        [python, "-c", blocker + textwrap.dedent(code), *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_hysac(clip_dir: str | Path, bounds: dict | None = None):
    """A HySAC built from a tiny CLIP folder (:func:`make_tiny_clip`) with non-default scalars, so that each of them
    matters in a check: curvature c = 1.7, feature scales 0.3 (images) and 0.25 (texts), logit scale 20.

    Args:
        bounds: the model's `config.bounds` (default :data:`TINY_BOUNDS`).
    Returns:
        the `HySACModel`, in eval mode.
    """
    import math

    import torch

    from .modeling.modeling_hysac import HySACModel

    model = HySACModel.from_clip(clip_dir, bounds=TINY_BOUNDS if bounds is None else bounds)
    with torch.no_grad():
        model.curv.fill_(math.log(1.7))
        model.visual_alpha.fill_(math.log(0.3))
        model.textual_alpha.fill_(math.log(0.25))
        model.logit_scale.fill_(math.log(20.0))
    return model.eval()


def save_model_folder(model, processor, folder: str | Path) -> Path:
    """Save a HySAC model and its processor into one folder, as a user's exported model folder.

    Returns:
        the folder, loadable with `hysac_hf.loading.load_model`, `AutoModel` or `pipeline(...)` offline.
    """
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def stop_process(process, timeout: float = 30) -> int:
    """Stop a server started by a test or benchmark by its process id: SIGTERM, then SIGKILL after `timeout` seconds.

    Returns:
        its exit status.
    """
    import subprocess

    process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of the call (for `accelerate launch --main_process_port`)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_cpu_processes(
    target: Sequence[str],
    num_processes: int = 2,
    *,
    config_file: str | Path | None = None,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run `target` (`["-m", module, *args]` or `[script, *args]`) with this Python on CPU processes.

    One process: `python *target`. More: `accelerate launch --multi_gpu --num_processes N` (gloo on the CPU, no
    mixed precision, no dynamo) on a free port, or `accelerate launch --config_file config_file` when given (the
    file then sets the processes and the distributed type). The environment adds `ACCELERATE_USE_CPU=true`,
    `OMP_NUM_THREADS=1` and `env`; output is captured as text, and a failure is returned, not raised.
    """
    command = [sys.executable]
    if config_file is not None:
        command += ["-m", "accelerate.commands.launch", "--config_file", str(config_file)]
        command += ["--main_process_port", str(free_port())]
    elif num_processes > 1:
        command += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(free_port())]
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*command, *map(str, target)],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
