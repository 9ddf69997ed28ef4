"""Offline building blocks for tests, the demo and benchmarks: a real CLIP tokenizer, tiny random CLIPs (and tiny
random SigLIP, SigLIP 2 NaFlex and MetaCLIP 2 dual encoders with small tokenizers trained on the spot), photos.

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


# The dual-encoder families HySAC lifts (`configuration_hysac.BASE_FAMILIES`), in a stable order for tests.
BASE_FAMILY_TYPES = ("clip", "siglip", "siglip2", "metaclip_2")
TINY_WORD_VOCAB = 512  # the vocabulary of `build_word_tokenizer` (at most) and of the tiny towers it feeds
TINY_IMAGE_SIZE = 64  # the fixed-resolution towers' input; 16-px patches: a 4 x 4 grid
TINY_PATCH_SIZE = 16
TINY_NAFLEX_PATCHES = 16  # SigLIP 2 NaFlex: at most 16 patches per image
TINY_FAMILY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_FAMILY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# The special tokens of `build_word_tokenizer` (its WordPiece styles), first in its vocabulary: ids 0, 1, 2, 3 (the
# Gemma style's `<pad>`, `<eos>`, `<bos>`, `<unk>` have the same ids).
WORD_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}


def _tokenizer_corpus() -> list[str]:
    """The sentences the tiny tokenizers learn from: the sample captions and every mini-ViSU caption."""
    corpus = list(SAMPLE_CAPTIONS.values())
    path = REPO_ROOT / "hysac_hf" / "data" / "mini_visu" / "mini_visu.jsonl"
    if not path.is_file():  # an installed wheel
        path = Path(__file__).parent / "data" / "mini_visu" / "mini_visu.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        corpus += [row["safe"], row["nsfw"]]
    return corpus


def build_word_tokenizer(directory: str | Path, model_max_length: int, style: str = "wordpiece"):
    """A small tokenizer trained on the spot on mini-ViSU's captions, saved into `directory`.

    Lower-cased, at most `TINY_WORD_VOCAB` tokens, right padding, every text ending with an end-of-sequence token (as
    SigLIP's and XLM-R's tokenizers end it; MetaCLIP 2's tower pools at its first one). It stands in for the families'
    own tokenizers (SigLIP's SentencePiece, Gemma's, XLM-R's), which cannot be downloaded in tests: the HySAC code only
    sees ids, a padding side and a length. Styles:

    - `"wordpiece"` (SigLIP): WordPiece, specials `<pad>` (id 0), `</s>` (1), `<s>` (2), `<unk>` (3), `$A </s>`;
    - `"xlmr"` (MetaCLIP 2): the same, `<s> $A </s>` as XLM-R frames a text;
    - `"gemma"` (SigLIP 2): a BPE over `▁`-joined lower-cased text with Gemma's specials `<pad>` (0), `<eos>` (1),
      `<bos>` (2), `<unk>` (3), `<mask>` (4): what transformers 5's `Siglip2Tokenizer`, which it imposes on every
      `siglip2` checkpoint, rebuilds from the vocabulary and merges the same way.

    Returns:
        the `PreTrainedTokenizerFast`, loadable from `directory` with `AutoTokenizer` on both transformers lines.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in ("wordpiece", "xlmr", "gemma"):
        raise ValueError(f"style must be 'wordpiece', 'xlmr' or 'gemma', got {style!r}")
    if style == "gemma":
        names = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}
        specials = [*names.values(), "<mask>"]
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        trainer = trainers.BpeTrainer(vocab_size=TINY_WORD_VOCAB, special_tokens=specials, show_progress=False)
        single = "$A <eos>"
    else:
        names = dict(WORD_SPECIAL_TOKENS)
        specials = list(names.values())
        tokenizer = Tokenizer(models.WordPiece(unk_token=names["unk_token"]))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=TINY_WORD_VOCAB, special_tokens=specials, show_progress=False)
        single = "<s> $A </s>" if style == "xlmr" else "$A </s>"
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(token, specials.index(token)) for token in specials if token in single]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        **names,
    )
    fast.save_pretrained(str(directory))
    make_tokenizer_portable(directory)
    return fast


def make_tokenizer_portable(folder: str | Path) -> None:
    """Let both transformers lines load the generic fast tokenizer saved in `folder` (by :func:`build_word_tokenizer`).

    transformers 5 saves a generic fast tokenizer as `TokenizersBackend`, and the SigLIP 2 one as `Siglip2Tokenizer`,
    classes transformers 4 lacks; both lines read `PreTrainedTokenizerFast` (5 as an alias), which loads
    `tokenizer.json` exactly as saved. (A real SigLIP 2 HySAC folder saved with transformers 5 names its tokenizer
    `Siglip2Tokenizer` too, and so loads on transformers 5 only; SigLIP's and XLM-R's have names both lines know.)
    """
    path = Path(folder) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") in ("TokenizersBackend", "Siglip2Tokenizer"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def tiny_dual_encoder_config(family: str, projection_dim: int = 32):
    """The config of a tiny random dual encoder of `family` (`BASE_FAMILY_TYPES`): 2 layers, width 32, 64-px
    images in 16-px patches (SigLIP 2 NaFlex: at most 16 patches), the vocabulary of `build_word_tokenizer` (CLIP: the
    real CLIP vocabulary, :func:`tiny_clip_config`)."""
    import transformers

    if family == "clip":
        return tiny_clip_config(projection_dim=projection_dim)
    specials = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    text = {**TINY_FAMILY_TEXT, "vocab_size": TINY_WORD_VOCAB, **specials}
    vision = {**TINY_FAMILY_VISION, "patch_size": TINY_PATCH_SIZE}
    if family in ("siglip", "siglip2"):
        if projection_dim != TINY_FAMILY_VISION["hidden_size"]:
            raise ValueError(f"a SigLIP's features are its vision width ({TINY_FAMILY_VISION['hidden_size']})")
        text.update(max_position_embeddings=64, projection_size=projection_dim)
        if family == "siglip":
            return transformers.SiglipConfig(text_config=text, vision_config={**vision, "image_size": TINY_IMAGE_SIZE})
        naflex = {**vision, "num_patches": TINY_NAFLEX_PATCHES}
        return transformers.Siglip2Config(text_config=text, vision_config=naflex)
    if family == "metaclip_2":
        text.update(max_position_embeddings=77)
        return transformers.MetaClip2Config(
            text_config=text, vision_config={**vision, "image_size": TINY_IMAGE_SIZE}, projection_dim=projection_dim
        )
    raise ValueError(f"unknown family {family!r}; expected one of {BASE_FAMILY_TYPES}")


def tiny_image_processor(family: str):
    """The family's own image processor at the tiny towers' size, without torchvision (the PIL backend on
    transformers 5)."""
    import transformers

    if family in ("clip", "metaclip_2"):
        return clip_image_processor(224 if family == "clip" else TINY_IMAGE_SIZE)
    name = "SiglipImageProcessor" if family == "siglip" else "Siglip2ImageProcessor"
    processor_class = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    if family == "siglip":
        return processor_class(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return processor_class(patch_size=TINY_PATCH_SIZE, max_num_patches=TINY_NAFLEX_PATCHES)


def make_tiny_dual_encoder(directory: str | Path, family: str, seed: int = 0):
    """Save a tiny random dual encoder of `family` with its image processor and a tokenizer to `directory`.

    CLIP is :func:`make_tiny_clip`; SigLIP, SigLIP 2 NaFlex and MetaCLIP 2 get :func:`tiny_dual_encoder_config`,
    the family's image processor and :func:`build_word_tokenizer` (SigLIP: 64 tokens, WordPiece; SigLIP 2: 64, a
    Gemma-style BPE; MetaCLIP 2: 77, framed as XLM-R frames a text).

    Returns:
        the directory, loadable with the family's model class, `AutoImageProcessor` and `AutoTokenizer` offline.
    """
    import torch
    import transformers

    from .modeling.configuration_hysac import base_family

    if family == "clip":
        return make_tiny_clip(directory, seed=seed)
    directory = Path(directory)
    torch.manual_seed(seed)
    config = tiny_dual_encoder_config(family)
    model = getattr(transformers, base_family(family).model_class)(config).eval()
    model.save_pretrained(directory)
    tiny_image_processor(family).save_pretrained(directory)
    style = {"siglip": "wordpiece", "siglip2": "gemma", "metaclip_2": "xlmr"}[family]
    build_word_tokenizer(directory, config.text_config.max_position_embeddings, style)
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
    """A HySAC built from a tiny dual-encoder folder (:func:`make_tiny_clip`, :func:`make_tiny_dual_encoder`) with
    non-default scalars, so that each of them matters in a check: curvature c = 1.7, feature scales 0.3 (images) and
    0.25 (texts), logit scale 20, and logit bias -3.5 where the model has one (SigLIP families).

    Args:
        bounds: the model's `config.bounds` (default :data:`TINY_BOUNDS`).
    Returns:
        the `HySACModel`, in eval mode.
    """
    import math

    import torch

    from .modeling.modeling_hysac import HySACModel

    model = HySACModel.from_dual_encoder(clip_dir, bounds=TINY_BOUNDS if bounds is None else bounds)
    with torch.no_grad():
        model.curv.fill_(math.log(1.7))
        model.visual_alpha.fill_(math.log(0.3))
        model.textual_alpha.fill_(math.log(0.25))
        model.logit_scale.fill_(math.log(20.0))
        if model.has_logit_bias:
            model.logit_bias.fill_(-3.5)
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
