"""Tests for tinylm.data: corpora, text loading, the train/validation split and batching."""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from tinylm.data import (
    _join_capped,
    count_eval_tokens,
    eval_windows,
    get_batch,
    load_corpus,
    load_text,
    split_train_val,
    stdlib_files,
)

# ----------------------------------------------------------------------------------------------
# Corpora


def test_pydoc_corpus_is_deterministic_and_large():
    text = load_corpus("pydoc")
    assert len(text.encode("utf-8")) > 100_000
    assert load_corpus() == text  # "pydoc" is the default
    # Rebuilt here from its definition: the topics in sorted key order.
    from pydoc_data.topics import topics

    assert text == "\n\n".join(topics[k] for k in sorted(topics))


def test_pydoc_corpus_cap_gives_a_prefix():
    full = load_corpus("pydoc", max_bytes=None)
    capped = load_corpus("pydoc", max_bytes=1000)
    assert len(capped.encode("utf-8")) <= 1000
    assert full.startswith(capped) and len(capped) > 900


def test_stdlib_corpus_is_capped_code_without_tests():
    text = load_corpus("stdlib", max_bytes=200_000)
    n_bytes = len(text.encode("utf-8"))
    assert 199_990 <= n_bytes <= 200_000  # cut within a multi-byte character of the cap
    assert text.startswith("# ==== __future__.py ====\n")
    assert "def " in text and "import " in text
    assert load_corpus("stdlib", max_bytes=200_000) == text


def test_stdlib_files_leave_out_tests_and_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root) for p in stdlib_files()]
    assert len(rel) > 100
    for path in rel:
        assert not set(path.parts[:-1]) & {"test", "tests", "idle_test", "site-packages"}, path
    names = [p.as_posix() for p in rel]
    assert names == sorted(names)
    assert "os.py" in names and "json/decoder.py" in names
    assert "pydoc_data/topics.py" not in names  # that is the "pydoc" corpus


def test_stdlib_corpus_tiny_cap():
    text = load_corpus("stdlib", max_bytes=3)
    assert text == "# ="


def test_cap_drops_a_split_multibyte_character():
    # "é" is 2 bytes in UTF-8; a cap after its first byte keeps the text before it.
    assert _join_capped(["aé", "b"], 2) == "a"
    assert _join_capped(["aé", "b"], 3) == "aé"
    assert _join_capped(["aé", "b"], None) == "aéb"


def test_load_corpus_rejects_unknown_name_and_bad_cap():
    with pytest.raises(ValueError, match=r"name must be one of \('pydoc', 'stdlib'\), got 'wiki'"):
        load_corpus("wiki")
    with pytest.raises(TypeError, match="name must be a string"):
        load_corpus(3)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer or None, got 0"):
        load_corpus("pydoc", max_bytes=0)


# ----------------------------------------------------------------------------------------------
# load_text


def test_load_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo\r\nworld\n".encode())
    assert load_text(path) == "héllo\r\nworld\n"  # bytes decoded as they are
    assert load_text(str(path)) == "héllo\r\nworld\n"


def test_load_text_directory_sorted_and_joined(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.md").write_text("not text", encoding="utf-8")
    assert load_text(tmp_path) == "first\n\nsecond"


def test_load_text_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(missing)


def test_load_text_empty_file_and_empty_dir(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.* is an empty file"):
        load_text(empty)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="folder.* no .txt files"):
        load_text(folder)


def test_load_text_not_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"abc\xe9def" + b"\xff")  # 0xe9 (Latin-1 e-acute) at offset 3
    with pytest.raises(ValueError, match=r"latin1\.txt.*0xe9 at byte offset 3\b"):
        load_text(bad)
    # Inside a folder the message names the bad file, not the folder.
    (tmp_path / "a_good.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(ValueError, match=r"latin1\.txt.*byte offset 3\b"):
        load_text(tmp_path)


def test_load_text_wrong_type():
    with pytest.raises(TypeError, match="path must be a string or a path, got int"):
        load_text(5)


# ----------------------------------------------------------------------------------------------
# split_train_val


def test_split_proportions_and_order():
    ids = list(range(1000))
    train, val = split_train_val(ids)
    assert len(train) == 900 and len(val) == 100
    assert train.dtype == np.int64 and val.dtype == np.int64
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)  # contiguous, not shuffled
    train, val = split_train_val(np.arange(101, dtype=np.uint16), val_fraction=0.25)
    assert (len(train), len(val)) == (76, 25)  # n_val = floor(101 * 0.25)


def test_split_is_a_copy():
    ids = np.arange(50, dtype=np.int64)
    train, _ = split_train_val(ids)
    train[0] = 7
    assert ids[0] == 0


def test_split_bad_inputs():
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1.*got 1.5"):
        split_train_val(range(100), 1.5)
    with pytest.raises(ValueError, match="empty train or validation split"):
        split_train_val([1, 2, 3], 0.1)
    with pytest.raises(ValueError, match="ids must be a 1-D sequence of integer"):
        split_train_val(np.zeros((4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="ids must be a 1-D sequence of integer"):
        split_train_val(np.linspace(0, 1, 100))


# ----------------------------------------------------------------------------------------------
# get_batch


def test_get_batch_shapes_shift_and_bounds():
    data = np.arange(100, dtype=np.int64) * 3  # token = 3 * position, so windows are easy to read
    x, y = get_batch(data, block_size=8, batch_size=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 8)
    assert x.dtype == y.dtype == data.dtype
    starts = x[:, 0] // 3
    # Each row is a contiguous window, y is x shifted by one position, all inside the data.
    np.testing.assert_array_equal(x, data[starts[:, None] + np.arange(8)])
    np.testing.assert_array_equal(y, data[starts[:, None] + np.arange(1, 9)])
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    assert starts.min() >= 0 and starts.max() + 8 <= 99


def test_get_batch_reaches_both_ends():
    data = np.arange(12, dtype=np.int64)
    x, y = get_batch(data, block_size=10, batch_size=200, rng=np.random.default_rng(1))
    # N - T = 2 possible starts: 0 and 1; the last target is the last token.
    assert set(x[:, 0].tolist()) == {0, 1}
    assert y.max() == 11


def test_get_batch_reproducible():
    data = np.random.default_rng(5).integers(0, 50, size=500)
    a = get_batch(data, 16, 4, np.random.default_rng(42))
    b = get_batch(data, 16, 4, np.random.default_rng(42))
    c = get_batch(data, 16, 4, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"data has 8 tokens.*block_size=8.*at least 9"):
        get_batch(np.arange(8), 8, 2, rng)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        get_batch(np.arange(8), 0, 2, rng)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -1"):
        get_batch(np.arange(8), 2, -1, rng)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        get_batch(np.arange(8), 2, 2, 0)
    with pytest.raises(TypeError, match="data must be a 1-D integer array"):
        get_batch(np.zeros(8), 2, 2, rng)


# ----------------------------------------------------------------------------------------------
# eval_windows


@pytest.mark.parametrize(
    "n, block_size, batch_size",
    [(101, 10, 3), (100, 10, 4), (11, 10, 1), (2, 5, 2), (57, 7, 100)],
)
def test_eval_windows_cover_every_target_once(n, block_size, batch_size):
    data = np.arange(n, dtype=np.int64) + 1000  # token value says its position
    seen = []
    total = 0
    for x, y in eval_windows(data, block_size, batch_size):
        assert x.shape == y.shape and x.ndim == 2
        assert x.shape[0] <= batch_size and x.shape[1] <= block_size
        np.testing.assert_array_equal(y - x, 1)  # y is x shifted by one position in the data
        seen.extend((y - 1000).ravel().tolist())
        total += y.size
    # Targets are positions 1 .. n-1, each exactly once, in order.
    assert seen == list(range(1, n))
    assert total == count_eval_tokens(data) == n - 1


def test_eval_windows_layout():
    data = np.arange(24, dtype=np.int64)  # 23 targets, T = 5: 4 full windows and 3 left over
    shapes = [x.shape for x, _ in eval_windows(data, block_size=5, batch_size=3)]
    assert shapes == [(3, 5), (1, 5), (1, 3)]


def test_eval_windows_weighted_mean_is_exact():
    # A stand-in "loss": the target value itself. The y.size-weighted mean of batch means must be
    # the plain mean over all targets, whatever the batching.
    data = np.random.default_rng(0).integers(0, 100, size=203)
    exact = data[1:].mean()
    for block_size, batch_size in [(7, 2), (16, 5), (202, 1), (300, 3)]:
        s = sum(y.mean() * y.size for _, y in eval_windows(data, block_size, batch_size))
        assert s / count_eval_tokens(data) == pytest.approx(exact, rel=1e-12)


def test_eval_windows_errors_at_call_time():
    with pytest.raises(ValueError, match="need at least 2"):
        eval_windows(np.arange(1), 4, 2)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        eval_windows(np.arange(10), 0, 2)


def test_the_validation_size_is_computed_in_one_place():
    from tinylm.data import validation_size

    assert validation_size(100, 0.1) == 10 and validation_size(99, 0.1) == 9
    train_ids, val_ids = split_train_val(np.arange(99), 0.1)
    assert len(val_ids) == validation_size(99, 0.1) and len(train_ids) == 90


def test_text_sha256_names_a_text_by_its_utf8_bytes():
    import hashlib

    from tinylm.data import text_sha256

    assert text_sha256("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    assert text_sha256("a\ud800b") != text_sha256("ab")  # a lone surrogate still counts
