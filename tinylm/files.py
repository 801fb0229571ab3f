"""Reading and writing the small files tinylm keeps: one JSON reader, one way to write safely.

Every JSON file tinylm reads (a checkpoint's config.json, a tokenizer file, a --config file, a
Hugging Face config.json) goes through ``read_json_object``, so a bad one is always reported the
same way: the path, then what was expected and what came.

    cfg = read_json_object("runs/a/checkpoint/config.json")   # a dict, or a clear error
    write_atomic("runs/a/notes.txt", "...")                   # all of it, or nothing

A write that is cut short (a crash, a full disk, kill -9) must never leave half a file where a
good one stood. ``write_atomic`` writes a temporary sibling, flushes it to disk, and only then
renames it over the target: a rename within one directory is atomic, so a reader sees either the
old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

TMP_MARK = ".tmp-"  # what a temporary sibling's name holds: NAME.tmp-XXXXXXXX


def read_json_object(path, what: str = "JSON file") -> dict:
    """The JSON object stored in ``path``.

    Raises FileNotFoundError when there is no such file, and ValueError naming the path when it
    is not UTF-8, not JSON, or JSON but not an object. ``what`` names the file in the messages
    ("config file", "tokenizer file", ...).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{what} {str(path)!r} is not a file")
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from err
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty; expected a JSON object")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{what} {str(path)!r} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg})"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(
            f"{what} {str(path)!r}: expected a JSON object, got a {type(obj).__name__}"
        )
    return obj


def temporary_sibling(path) -> Path:
    """A fresh name next to ``path`` for writing it before the rename: NAME.tmp-XXXXXXXX."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(4)}")


def write_atomic(path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path``: all of it, or nothing at all."""
    path = Path(path)
    tmp = temporary_sibling(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (see write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=1) + "\n")


def fsync_dir(path) -> None:
    """Make a directory's entries (new files, renames) durable; not possible on every OS."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
