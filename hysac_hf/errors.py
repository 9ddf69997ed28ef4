"""The ground floor of the library: the usage error every layer raises, and the optional-dependency check.

Nothing here imports the rest of `hysac_hf`, so `data/`, `encode.py`, `index/`, the commands and the apps all
stand on it. How a command turns these errors into one line and exit status 2 is `cli.run`'s business.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

# Optional dependency (import name) -> (pip name, extra that installs it).
EXTRAS = {
    "peft": ("peft", "train"),
    "skimage": ("scikit-image", "train"),
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "train"),
    "faiss": ("faiss-cpu", "eval"),
    "tensorboard": ("tensorboard", "train"),
    "wandb": ("wandb", "train"),
    "litserve": ("litserve", "serve"),
    "prometheus_client": ("prometheus-client", "serve"),
}


class UsageError(ValueError):
    """A mistake in the command line or the inputs it names; the message says what is wrong and how to fix it."""


def require(*modules: str, purpose: str) -> None:
    """Fail at start, with the pip command, when optional dependencies are missing.

    Args:
        modules: import names (keys of :data:`EXTRAS` or any module).
        purpose: what needs them, for the message ("the bundled mini-ViSU photos").
    Raises:
        UsageError: naming the packages and the `hysac-hf[extra]` that installs them.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        packages = sorted({EXTRAS.get(m, (m, None))[0] for m in missing})
        extras = sorted({EXTRAS[m][1] for m in missing if m in EXTRAS})
        hint = f"pip install 'hysac-hf[{','.join(extras)}]'" if extras else f"pip install {' '.join(packages)}"
        raise UsageError(f"{purpose} needs {', '.join(packages)}, which is not installed: {hint}")


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the `ValueError` of lower layers (the remote-code readers, which cannot know `UsageError`) into a
    `UsageError` with the same message."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as error:
        raise UsageError(str(error)) from None


def one_line(error: BaseException) -> str:
    """The message of an error on one line; for an error re-raised from a DataLoader worker (whose message carries
    the worker's traceback), the original message only."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(error).__name__


__all__ = ["EXTRAS", "UsageError", "one_line", "require", "usage_errors"]
