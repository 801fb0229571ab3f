"""Benchmark of tinylm's byte-level BPE (tinylm/tokenizer.py) on the default corpus.

Measures, on one CPU core (the tokenizer is pure Python):

- training: seconds to learn ``--merges`` merges (default 2,000, vocab_size = 256 + 2000 + 1);
- encode throughput in MB/s of UTF-8 input: the median of ``--repeats`` runs over the whole
  corpus, with the chunk cache cleared before each run, so every distinct chunk is encoded
  from its bytes again (a warm-cache figure is reported separately: that is the speed when
  the same tokenizer encodes text it has already seen, e.g. the validation split);
- decode throughput in MB/s of UTF-8 output, the median of the same number of runs;
- compression: UTF-8 bytes per token on the corpus (the tokenizer is trained and measured
  on the same text, so this is an optimistic figure);
- GPT-2's format: the encode throughput (cache cleared) of a tokenizer read from vocab.json +
  merges.txt with ``BPETokenizer.from_pretrained`` (GPT-2's exact pre-tokenizer): the trained
  one written with ``save_pretrained``, or GPT-2's own with ``--gpt2-dir DIR``.

Results are printed and written as JSON with the machine and the date:

    python benchmarks/bpe.py                      # -> benchmarks/results/bpe_cpu.json
    python benchmarks/bpe.py --merges 500 --json /tmp/bpe.json
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time

from report import machine_info, write_report  # benchmarks/report.py

from tinylm.tokenizer import BPETokenizer


def default_corpus():
    """The "pydoc" corpus: from tinylm.data if it is there, else built the same way inline."""
    try:
        from tinylm.data import load_corpus
    except ImportError:
        import pydoc_data.topics as topics

        return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return load_corpus("pydoc")


def timed(fn):
    """(seconds, result) of one call of fn()."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--merges", type=int, default=2000, help="number of merges to learn")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of encode and decode")
    parser.add_argument("--json", default="benchmarks/results/bpe_cpu.json", help="output path")
    parser.add_argument("--gpt2-dir", help="a directory with GPT-2's vocab.json and merges.txt")
    args = parser.parse_args(argv)

    text = default_corpus()
    n_bytes = len(text.encode("utf-8"))
    mb = n_bytes / 1e6
    print(f"corpus: pydoc, {len(text):,} characters, {n_bytes:,} UTF-8 bytes")

    vocab_size = 256 + args.merges + 1
    train_s, tok = timed(lambda: BPETokenizer.train(text, vocab_size))
    print(f"train: {len(tok.merges)} merges (vocab_size {tok.vocab_size}) in {train_s:.2f} s")

    # Cold encode: clear the chunk cache before every run, so each run does all the work.
    cold = []
    for _ in range(args.repeats):
        tok.clear_cache()
        seconds, ids = timed(lambda: tok.encode(text))
        cold.append(seconds)
    # Warm encode: the cache now holds every chunk of the corpus.
    warm = [timed(lambda: tok.encode(text))[0] for _ in range(args.repeats)]
    decode = []
    for _ in range(args.repeats):
        seconds, decoded = timed(lambda: tok.decode(ids))
        decode.append(seconds)
    assert decoded == text, "round trip failed"

    # GPT-2's format: the same encoder, its tables read from vocab.json + merges.txt.
    if args.gpt2_dir:
        gpt2_tok, gpt2_source = BPETokenizer.from_pretrained(args.gpt2_dir), args.gpt2_dir
    else:
        with tempfile.TemporaryDirectory() as tmp:
            gpt2_tok = BPETokenizer.from_pretrained(tok.save_pretrained(tmp))
        gpt2_source = "the trained tokenizer, written and read back in GPT-2's format"
    gpt2_cold = []
    for _ in range(args.repeats):
        gpt2_tok.clear_cache()
        gpt2_cold.append(timed(lambda: gpt2_tok.encode(text))[0])

    results = {
        "benchmark": "bpe",
        "corpus": "pydoc",
        "corpus_chars": len(text),
        "corpus_bytes": n_bytes,
        "merges": len(tok.merges),
        "vocab_size": tok.vocab_size,
        "train_seconds": round(train_s, 3),
        "encode_MB_per_s": round(mb / statistics.median(cold), 3),
        "encode_note": f"median of {args.repeats} runs over the whole corpus, "
        "chunk cache cleared before each run",
        "encode_warm_cache_MB_per_s": round(mb / statistics.median(warm), 3),
        "decode_MB_per_s": round(mb / statistics.median(decode), 3),
        "tokens": len(ids),
        "bytes_per_token": round(n_bytes / len(ids), 3),
        "gpt2_format_encode_MB_per_s": round(mb / statistics.median(gpt2_cold), 3),
        "gpt2_format_tokenizer": f"{gpt2_source} (vocab_size {gpt2_tok.vocab_size})",
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(
        f"encode: {results['encode_MB_per_s']:.2f} MB/s (cache cleared), "
        f"{results['encode_warm_cache_MB_per_s']:.2f} MB/s (warm cache)"
    )
    print(f"decode: {results['decode_MB_per_s']:.2f} MB/s")
    print(
        f"GPT-2 format encode: {results['gpt2_format_encode_MB_per_s']:.2f} MB/s "
        f"(cache cleared; {results['gpt2_format_tokenizer']})"
    )
    print(f"compression: {len(ids):,} tokens, {results['bytes_per_token']:.3f} bytes per token")

    write_report(args.json, results)


if __name__ == "__main__":
    main()
