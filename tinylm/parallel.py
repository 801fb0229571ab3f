"""Data parallelism on one machine: the shards of a batch step at once, one Python thread each.

This is the idea behind every multi-GPU trainer (PyTorch's DistributedDataParallel, the
data-parallel part of llm.c), at the size of a laptop. The training loss is a mean over the
batch's N counted targets, so it splits exactly over shards of the batch: with N_i targets
counted in shard i and L_i the mean loss of that shard alone,

    L       = sum_i (N_i / N) L_i
    dL/dW   = sum_i (N_i / N) dL_i/dW           for every parameter W

Each shard runs the ordinary forward and backward of a replica of the model that shares the
model's parameter arrays (nothing is copied), and the gradients are combined by that weighted
sum, which is what an all-reduce does across GPUs. The result is the whole batch's gradient, up
to the order of float additions.

Why it is faster on a CPU: NumPy's element-wise operations (GELU, layer norm, softmax) run on
one core, and a matrix product of a small model is too small to keep two cores busy. Two
threads, each stepping half the batch with a one-thread BLAS, keep both cores busy all the
time. NumPy releases Python's lock inside its array operations, so the threads do run at once.

    parallel = DataParallel(model, shards=2)
    loss, grads = parallel.forward_backward(x, y)    # as model.forward(x, y); model.backward()

Dropout stays reproducible: each step draws one seed per shard from the model's own dropout
stream, so a run that is stopped and resumed draws the same masks (other masks than the whole
batch's, so a run keeps its number of shards to be repeated exactly).
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from tinylm.backend import blas_threads, blas_threads_now

IGNORE_INDEX = -100  # the targets GPT.forward's cross-entropy leaves out


class DataParallel:
    """``model`` (a GPT on the CPU) stepped over ``shards`` parts of each batch, in threads.

    forward_backward(x, y) returns (loss, grads) equal to model.forward(x, y) followed by
    model.backward(), up to float rounding (with dropout on, the masks are other draws). The
    replicas share model.params, so an optimizer step on model.params is seen by all of them.
    """

    def __init__(self, model, shards: int = 2):
        from tinylm.model import GPT

        if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
            raise ValueError(f"shards must be a positive integer, got {shards!r}")
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a tinylm GPT, got {type(model).__name__}")
        if model.device != "cpu":
            raise ValueError("DataParallel splits a batch over CPU cores; the model is on the GPU")
        self.model, self.shards = model, int(shards)
        # Replicas: shallow copies, so model.params (the very same dict of arrays), the config
        # and the position table are shared; each keeps its own caches and dropout stream.
        self.replicas = [copy.copy(model) for _ in range(self.shards)]
        for replica in self.replicas:
            replica._caches = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # BLAS threads per shard: the threads NumPy's BLAS has now, shared out, at least one.
        self.blas_threads = max(1, (blas_threads_now() or cores or 1) // self.shards)
        # On one core the shards run one after the other in this thread: the same arithmetic,
        # so the same results, without threads that could only take turns.
        parallel = self.shards > 1 and (cores or 1) > 1
        self.pool = ThreadPoolExecutor(max_workers=self.shards) if parallel else None

    def forward_backward(self, x, y):
        """The loss of idx x (B, T) against targets y (B, T), and its gradients (a dict like
        model.params): each shard of rows forward and backward on its own replica, then
        L = sum_i (N_i / N) L_i and dW = sum_i (N_i / N) dW_i."""
        x, y = np.asarray(x), np.asarray(y)
        row_shards = [rows for rows in np.array_split(np.arange(len(x)), self.shards) if rows.size]
        seeds = self.model.dropout_rng.integers(0, 2**63, size=len(row_shards))  # one per shard

        def step(i):
            replica, rows = self.replicas[i], row_shards[i]
            replica.training = self.model.training
            replica.dropout_rng = np.random.default_rng(seeds[i])
            _, loss = replica.forward(x[rows], y[rows])
            grads = replica.backward()
            replica._caches = None  # the activations are not needed after the backward
            return loss, grads

        results = self._run(step, len(row_shards))

        counted = [int((y[rows] != IGNORE_INDEX).sum()) for rows in row_shards]  # N_i
        N = sum(counted)
        weights = [n / N if N else 1.0 / len(counted) for n in counted]  # N_i / N
        loss = sum(w * float(shard_loss) for w, (shard_loss, _) in zip(weights, results,
                                                                        strict=True))
        grads = results[0][1]
        for name, g in grads.items():  # dW = sum_i (N_i / N) dW_i, into the first shard's arrays
            g *= g.dtype.type(weights[0])
            for w, (_, other) in zip(weights[1:], results[1:], strict=True):
                g += g.dtype.type(w) * other[name]
        return np.asarray(loss, dtype=self.model.dtype), grads

    def loss_sum(self, x, y) -> float:
        """sum over the targets of y (B, T) of -log p(target), dropout off and no caches kept:
        each shard's logits on its own replica, in threads, summed in float64 (evaluation)."""
        from tinylm.evaluation import nll_sum

        x, y = np.asarray(x), np.asarray(y)
        row_shards = [rows for rows in np.array_split(np.arange(len(x)), self.shards) if rows.size]

        def shard_sum(i):
            rows = row_shards[i]
            return nll_sum(self.replicas[i].logits(x[rows]), y[rows])

        return sum(self._run(shard_sum, len(row_shards)))

    def _run(self, fn, n):
        """[fn(0), ..., fn(n - 1)], in the pool's threads with the BLAS threads shared out."""
        if self.pool is None or n == 1:
            return [fn(i) for i in range(n)]
        with blas_threads(self.blas_threads):
            futures = [self.pool.submit(fn, i) for i in range(n)]
            try:
                return [f.result() for f in futures]
            finally:
                # A Ctrl-C lands in this thread: let the shards finish before the BLAS thread
                # count is restored under them.
                wait(futures)

    def close(self):
        """Stop the threads (they also stop when the object is garbage-collected)."""
        if self.pool is not None:
            self.pool.shutdown()
