"""Text in, batches of token windows out: corpora, the train/validation split, and batching.

A language model learns to predict token t+1 from tokens 0..t. Once a text is turned into one long
array of token ids ``data`` (the tokenizer's job), training needs only two things from this file:

    x = data[i : i + T]          # the context window, T = block_size tokens
    y = data[i + 1 : i + T + 1]  # the targets: the same window shifted left by one

``get_batch`` draws B such windows at random positions (training), ``eval_windows`` walks the
validation split once from start to end (a deterministic validation loss).

Legend: B batch size, T block_size (tokens per window), N tokens in the array.

Corpora that ship with every CPython, so tinylm needs no download:

    "pydoc"   the English text of Python's reference documentation (``pydoc_data.topics``), ~0.5 MB
    "stdlib"  the source code of Python's standard library, tests left out, capped at 5 MB

Both are the same on every machine with the same Python version.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinylm.backend import get_array_module, to_numpy

CORPORA = ("pydoc", "stdlib")
DEFAULT_MAX_BYTES = 5_000_000

# Folders of the standard library that hold test suites (test/, ctypes/test/, idlelib/idle_test/,
# lib2to3/tests/, ...) or third-party code and build files rather than the library itself.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# ----------------------------------------------------------------------------------------------
# Corpora and text files


def load_corpus(name: str = "pydoc", max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Return one of the built-in corpora as a single string.

    Inputs:
    - name: "pydoc" (Python's reference documentation, English prose) or "stdlib" (the
      standard library's Python source, a code corpus).
    - max_bytes: keep only the first ``max_bytes`` bytes of the corpus (counted in UTF-8, cut at a
      character boundary), or None for all of it. The capped corpus is always a prefix of the
      full one.

    Returns: the text. It depends only on the Python version, not on the machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {CORPORA}, got {type(name).__name__}")
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
    ):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    if name == "pydoc":
        pieces = [_pydoc_text()]
    elif name == "stdlib":
        pieces = _stdlib_pieces()
    else:
        raise ValueError(f"name must be one of {CORPORA}, got {name!r}")
    return _join_capped(pieces, max_bytes)


def _pydoc_text() -> str:
    """The topics of Python's ``help()``: the language reference as plain English text."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some Linux distributions ship pydoc_data in a separate package
        raise ValueError(
            "name='pydoc' needs the module pydoc_data.topics, which this Python does not have; "
            "install your distribution's full Python standard library or use name='stdlib'"
        ) from err
    # Sorted keys, so the order does not depend on how the dict was built.
    return "\n\n".join(topics[key] for key in sorted(topics))


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The .py files of the standard library that make up the "stdlib" corpus, in corpus order.

    Every .py file under ``root`` (default: this Python's ``sysconfig.get_paths()["stdlib"]``) and
    its sub-folders, except test suites, site-packages, build configuration (``config-*``,
    ``_sysconfigdata*``, which differ between machines) and ``pydoc_data/topics.py`` (the "pydoc"
    corpus itself, documentation stored as a string). Sorted by path relative to ``root``.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library folder {str(root)!r} does not exist")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        folders = rel.parts[:-1]
        if _STDLIB_SKIP_DIRS.intersection(folders):
            continue
        if folders and folders[0].startswith(("config-", "lib-dynload")):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() == "pydoc_data/topics.py":
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_pieces() -> Iterator[str]:
    """Yield the stdlib corpus file by file, each under a one-line header naming it.

    A generator, so that a capped corpus reads only the files it keeps.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    n_skipped = 0
    first = True
    for path in stdlib_files(root):
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            n_skipped += 1  # the same files on every run, so the corpus stays deterministic
            continue
        header = f"# ==== {path.relative_to(root).as_posix()} ====\n"
        yield ("" if first else "\n\n") + header + source
        first = False
    if n_skipped:
        warnings.warn(
            f"stdlib corpus: skipped {n_skipped} file(s) that are not valid UTF-8", stacklevel=3
        )


def _join_capped(pieces, max_bytes: int | None) -> str:
    """Concatenate ``pieces``, stopping after ``max_bytes`` UTF-8 bytes (None: no limit)."""
    out = []
    n_bytes = 0
    for piece in pieces:
        if max_bytes is None:
            out.append(piece)
            continue
        encoded = piece.encode("utf-8")
        if n_bytes + len(encoded) <= max_bytes:
            out.append(piece)
            n_bytes += len(encoded)
            continue
        # Cut inside this piece; "ignore" drops only a multi-byte character split by the cut.
        out.append(encoded[: max_bytes - n_bytes].decode("utf-8", errors="ignore"))
        break
    return "".join(out)


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, or every ``.txt`` file directly inside a folder.

    A folder's files are read in sorted name order and joined with a blank line ("\\n\\n").
    The bytes are decoded as they are (no newline conversion), so the text is the same on every
    operating system.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if a file is not UTF-8 (naming
    the file and the byte offset of the first bad byte) or if there is no text at all.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a string or a path, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise ValueError(f"path {str(path)!r} is a folder with no .txt files in it")
        text = "\n\n".join(_read_utf8(f) for f in files)
        if not text.strip("\n"):
            raise ValueError(f"path {str(path)!r} holds only empty .txt files")
        return text
    text = _read_utf8(path)
    if not text:
        raise ValueError(f"path {str(path)!r} is an empty file")
    return text


def text_sha256(text: str) -> str:
    """The SHA-256 of a text's UTF-8 bytes (lone surrogates kept): a checkpoint stores it, so a
    resumed run can tell whether it was given the same text."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _read_utf8(path: Path) -> str:
    """Decode one file as UTF-8, saying where the first byte that is not UTF-8 sits."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"file {str(path)!r} is not valid UTF-8: byte 0x{raw[err.start]:02x} at byte offset "
            f"{err.start} ({err.reason}); convert it to UTF-8 first"
        ) from err


# ----------------------------------------------------------------------------------------------
# Train/validation split


def validation_size(n: int, val_fraction: float) -> int:
    """How many of n items (tokens, documents) the validation split takes: the last
    floor(n * val_fraction). The one place this is computed."""
    return math.floor(n * val_fraction)


def split_train_val(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Split a token sequence into a training part and a validation part, without shuffling.

    The first ``1 - val_fraction`` of the tokens train, the last ``val_fraction`` validate
    (n_val = floor(N * val_fraction)). A fixed, contiguous split: the validation text is text the
    model never saw, and it is the same split on every run.

    Inputs:
    - ids: 1-D sequence of N integer token ids (list, NumPy array).
    - val_fraction: float in (0, 1).

    Returns: (train, val), NumPy int64 arrays of shapes (N - n_val,) and (n_val,). int64 is
    NumPy's default integer: indexing arithmetic never overflows, and 8 bytes per token is 40 MB
    for a 5 MB corpus, which is affordable. Both are copies, not views of ``ids``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(f"val_fraction must be a float, got {type(val_fraction).__name__}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    ids = to_numpy(ids)  # a list, a NumPy array, or a CuPy array copied to the host
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(
            f"ids must be a 1-D sequence of integer token ids, got shape {ids.shape} "
            f"of dtype {ids.dtype}"
        )
    n = len(ids)
    n_val = validation_size(n, val_fraction)
    if n_val == 0 or n_val == n:
        raise ValueError(
            f"val_fraction={val_fraction} of {n} tokens leaves an empty train or validation "
            "split; use more text"
        )
    ids = ids.astype(np.int64)  # a copy in every case
    return ids[: n - n_val], ids[n - n_val :]


# ----------------------------------------------------------------------------------------------
# Batches


def _check_data(data, block_size: int, batch_size: int) -> None:
    """Validate the arguments shared by get_batch and eval_windows."""
    if not hasattr(data, "ndim"):
        raise TypeError(
            f"data must be a 1-D integer array (NumPy or CuPy), got {type(data).__name__}"
        )
    if data.ndim != 1 or data.dtype.kind not in "iu":
        raise TypeError(
            f"data must be a 1-D integer array (NumPy or CuPy), got shape {data.shape} "
            f"of dtype {data.dtype}"
        )
    for arg, value in (("block_size", block_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")


def get_batch(data, block_size: int, batch_size: int, rng: np.random.Generator):
    """Draw ``batch_size`` random windows of ``block_size`` tokens, and their targets.

    Inputs:
    - data: (N,) integer token ids, a NumPy or CuPy array. The batch lives where ``data`` lives,
      so putting the token array on the GPU once makes every batch a GPU batch.
    - block_size: T, the context length.
    - batch_size: B, windows per batch.
    - rng: a seeded ``numpy.random.Generator``; the same seed gives the same batches.

    Returns: x, y, each (B, T) of data's dtype, with y[b, t] = x[b, t + 1] inside the window and
    y[b, T - 1] the token after the window. Start positions are uniform over the N - T positions
    i with a full target window, 0 <= i <= N - T - 1.
    """
    _check_data(data, block_size, batch_size)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    n = len(data)
    if n < block_size + 1:
        raise ValueError(
            f"data has {n} tokens, too few for one window of block_size={block_size} plus its "
            f"target: need at least {block_size + 1}"
        )
    xp = get_array_module(data)
    starts = rng.integers(0, n - block_size, size=batch_size)  # (B,), high end exclusive
    # One index matrix instead of a loop over the batch: row b is starts[b], ..., starts[b]+T-1.
    index = starts[:, None] + np.arange(block_size)[None, :]  # (B, 1) + (1, T) -> (B, T)
    index = xp.asarray(index)  # the indices go where the data is
    return data[index], data[index + 1]  # (B, T), (B, T)


def count_eval_tokens(data) -> int:
    """The number of targets ``eval_windows(data, ...)`` yields in total: N - 1.

    Every token except the first is predicted exactly once, whatever block_size and batch_size.
    Divide the summed loss by this number to get the exact mean loss per token.
    """
    return max(len(data) - 1, 0)


def eval_windows(data, block_size: int, batch_size: int):
    """Walk all of ``data`` once in non-overlapping windows, ``batch_size`` windows at a time.

    Window k predicts the targets data[k*T + 1 : k*T + T + 1] from data[k*T : k*T + T]. The windows
    tile the N - 1 targets of ``data``: each target is predicted exactly once, with the context of
    its own window only (the first target of each window sees one token, the last sees T).

    Contract:
    - The full windows come first, in order, in batches (b, T) with b = batch_size except possibly
      the last such batch.
    - If T does not divide N - 1, the remaining r < T targets come last, as one batch of shape
      (1, r): a shorter window, not padding, so no mask is needed.
    - Every yielded x, y is a dense rectangle, so the exact mean loss over all N - 1 targets is

          sum over batches of (mean loss of the batch) * y.size,  divided by count_eval_tokens(data)

      and it is a deterministic function of ``data`` and ``block_size`` alone.

    Yields: (x, y), each (b, T) or (1, r), of data's dtype, NumPy or CuPy like ``data``.
    """
    # Checked here, not inside the generator, so that bad arguments fail at the call.
    _check_data(data, block_size, batch_size)
    if count_eval_tokens(data) == 0:
        raise ValueError(f"data has {len(data)} tokens, need at least 2 for one target")
    return _eval_batches(data, block_size, batch_size)


def _eval_batches(data, block_size: int, batch_size: int):
    """The generator behind eval_windows (arguments already checked)."""
    xp = get_array_module(data)
    n_targets = count_eval_tokens(data)
    n_full = n_targets // block_size  # windows of length T
    for first in range(0, n_full, batch_size):
        windows = np.arange(first, min(first + batch_size, n_full))  # (b,) window numbers
        index = windows[:, None] * block_size + np.arange(block_size)[None, :]  # (b, T)
        index = xp.asarray(index)
        yield data[index], data[index + 1]
    rest = n_targets - n_full * block_size  # 0 <= r < T targets left after the full windows
    if rest:
        start = n_full * block_size
        yield data[None, start : start + rest], data[None, start + 1 : start + 1 + rest]  # (1, r)
