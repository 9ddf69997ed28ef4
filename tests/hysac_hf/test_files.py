"""Folders written atomically by one writer at a time (`hysac_hf.files`): concurrent writers, a writer that waits too
long, and what killed writers leave behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from hysac_hf.errors import UsageError
from hysac_hf.files import folder_lock, stale_leftovers, write_folder_atomically
from hysac_hf.testing import REPO_ROOT


def _write(folder, text):
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text(text)


def test_a_replacement_is_whole_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "out"
    write_folder_atomically(target, lambda f: _write(f, "one"))
    write_folder_atomically(target, lambda f: _write(f, "two"))
    assert (target / "a.txt").read_text() == (target / "b.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # the lock file stays (empty)
    with pytest.raises(FileExistsError, match="not empty"):
        write_folder_atomically(target, lambda f: _write(f, "three"), replace=False)
    assert (target / "a.txt").read_text() == "two"


def test_the_next_writer_removes_what_killed_writers_left(tmp_path):
    target = tmp_path / "out"
    write_folder_atomically(target, lambda f: _write(f, "one"))
    for name in (".out.tmp-abc123", ".out.old-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "embeddings.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".other.tmp-1").mkdir()  # another folder's: not ours to remove
    assert [p.name for p in stale_leftovers(target)] == [".out.old-4242", ".out.tmp-abc123"]
    write_folder_atomically(target, lambda f: _write(f, "two"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-1", ".out.lock", "out"]


def _hold_lock(target, seconds: float) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from hysac_hf.files import folder_lock
        with folder_lock({str(target)!r}):
            print("held", flush=True)
            time.sleep({seconds})
        """
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_waits_then_gives_up_with_one_line(tmp_path):
    target = tmp_path / "out"
    holder = _hold_lock(target, 30)
    try:
        start = time.perf_counter()
        with pytest.raises(UsageError, match="another process has been writing .* wait for it") as error:
            write_folder_atomically(target, lambda f: _write(f, "late"), timeout=0.5)
        assert time.perf_counter() - start >= 0.5 and "\n" not in str(error.value)
        assert not target.exists() and stale_leftovers(target) == []  # nothing written while it waited
    finally:
        holder.kill()
        holder.wait()
    write_folder_atomically(target, lambda f: _write(f, "now"), timeout=5)  # a killed holder frees the lock
    assert (target / "a.txt").read_text() == "now"


def test_the_lock_is_reentrant_within_a_thread(tmp_path):
    target = tmp_path / "out"
    with folder_lock(target):
        write_folder_atomically(target, lambda f: _write(f, "inside"), timeout=0.5)  # would time out otherwise
    assert (target / "a.txt").read_text() == "inside"


@pytest.mark.slow
def test_three_processes_saving_one_index_leave_a_loadable_index_and_no_leftovers(tmp_path):
    """The issue's scenario: three processes save the same gallery index folder at once, several times each."""
    target, go = tmp_path / "index", tmp_path / "go"
    script = textwrap.dedent(
        """
        import os, sys, time, torch
        sys.path.insert(0, {root!r})
        from hysac_hf.index import GalleryIndex
        writer = int(sys.argv[1])
        while not os.path.exists({go!r}):
            time.sleep(0.005)
        for round in range(4):
            embeddings = torch.nn.functional.normalize(torch.randn(2000, 16), dim=1) * (0.1 + writer)
            rows = [{{"writer": writer, "round": round}}] * 2000
            GalleryIndex.from_embeddings(embeddings, "image", curvature=1.0, metadata=rows).save({target!r})
        """
    ).format(root=str(REPO_ROOT), go=str(go), target=str(target))
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(n)], stderr=subprocess.PIPE, text=True) for n in range(3)
    ]
    go.touch()
    errors = [w.communicate(timeout=300)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0, 0], errors
    assert not any("Traceback" in e or "Error" in e for e in errors), errors
    from hysac_hf.index import GalleryIndex

    loaded = GalleryIndex.load(target)  # whole: checksums, shapes and metadata agree
    assert len(loaded) == 2000 and loaded.metadata[0]["round"] == 3  # some writer's last save, all of it
    writer = loaded.metadata[0]["writer"]
    assert all(row == {"writer": writer, "round": 3} for row in loaded.metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.lock", "go", "index"]
