"""Data parallelism on one machine: the shards of a batch step at once, in threads or processes.

This is the idea behind every multi-GPU trainer (PyTorch's DistributedDataParallel, the
data-parallel part of llm.c), at the size of a laptop. The training loss is a mean over the
batch's N counted targets, so it splits exactly over shards of the batch: with N_i targets
counted in shard i and L_i the mean loss of that shard alone,

    L       = sum_i (N_i / N) L_i
    dL/dW   = sum_i (N_i / N) dL_i/dW           for every parameter W

Each shard runs the ordinary forward and backward of a replica of the model that shares the
model's parameter arrays (in threads nothing is copied), and the gradients are combined by
that weighted sum, which is what an all-reduce does across GPUs. The result is the whole
batch's gradient, up to the order of float additions.

Why it is faster on a CPU: NumPy's element-wise operations (GELU, layer norm, softmax) run on
one core, and a matrix product of a small model is too small to keep two cores busy. Two
threads, each stepping half the batch with a one-thread BLAS, keep both cores busy all the
time. NumPy releases Python's lock inside its array operations, so the threads do run at once.

    parallel = DataParallel(model, shards=2)
    loss, grads = parallel.forward_backward(x, y)    # as model.forward(x, y); model.backward()

Threads or processes. Python's lock is taken back between any two NumPy operations, and a
small model makes thousands of them per step: with two threads, each keeps waiting for the
other's. ``DataParallel(model, shards, processes=True)`` steps shard 0 in this process and each
other shard in a worker process of its own, as DistributedDataParallel runs one process per
GPU: before each step the parameters are copied into memory that every worker maps (a file in
/dev/shm), worker i writes (N_i / N) dW_i into memory of its own that this process maps, and
the sum is taken here. The same arithmetic in the same order, so the same results, bit for
bit; only the waiting is gone. Starting a worker takes a fraction of a second (it imports
NumPy and tinylm). `tinylm train` uses worker processes (--data-parallel-workers). On one core
neither threads nor workers are started (the shards run one after the other), and on Windows
processes=True uses threads.

Dropout stays reproducible: each step draws one seed per shard from the model's own dropout
stream, so a run that is stopped and resumed draws the same masks (other masks than the whole
batch's, so a run keeps its number of shards to be repeated exactly).
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

from tinylm import backend
from tinylm.backend import blas_threads, blas_threads_now

IGNORE_INDEX = -100  # the targets GPT.forward's cross-entropy leaves out


def _shard_step(replica, x, y, seed, training):
    """(loss, grads) of one shard on its replica: forward and backward, with dropout masks from
    the shard's own seed. The same function in a thread and in a worker process."""
    replica.training = training
    replica.dropout_rng = np.random.default_rng(seed)
    _, loss = replica.forward(x, y)
    grads = replica.backward()
    return loss, grads  # (the activations stay until the next forward lets them go, layer by layer)


def _cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def workers_can_start() -> bool:
    """Whether DataParallel(..., processes=True) starts worker processes here: with two cores or
    more, and not on Windows (there it uses threads)."""
    return _cores() > 1 and os.name != "nt"


class DataParallel:
    """``model`` (a GPT on the CPU) stepped over ``shards`` parts of each batch, at once: in
    threads, or with ``processes=True`` shard 0 here and the others in worker processes.

    forward_backward(x, y) returns (loss, grads) equal to model.forward(x, y) followed by
    model.backward(), up to float rounding (with dropout on, the masks are other draws). The
    replicas share model.params (worker processes get a copy before each command), so an
    optimizer step on model.params is seen by all of them. close() stops the workers.
    """

    def __init__(self, model, shards: int = 2, processes: bool = False):
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
        # BLAS threads per shard: the threads NumPy's BLAS has now, shared out, at least one.
        self.blas_threads = max(1, (blas_threads_now() or _cores()) // self.shards)
        # On one core the shards run one after the other in this thread: the same arithmetic,
        # so the same results, without threads or processes that could only take turns.
        parallel = self.shards > 1 and _cores() > 1
        self.workers = None  # the worker processes (shards 1, 2, ...), when processes=True
        self.pool = None  # the threads, otherwise
        if parallel and processes and workers_can_start():
            self.workers = _WorkerProcesses(model, self.shards - 1, self.blas_threads)
        elif parallel:
            self.pool = ThreadPoolExecutor(max_workers=self.shards)

    def forward_backward(self, x, y):
        """The loss of idx x (B, T) against targets y (B, T), and its gradients (a dict like
        model.params): each shard of rows forward and backward on its own replica, then
        L = sum_i (N_i / N) L_i and dW = sum_i (N_i / N) dW_i."""
        x, y = np.asarray(x), np.asarray(y)
        row_shards = [rows for rows in np.array_split(np.arange(len(x)), self.shards) if rows.size]
        seeds = self.model.dropout_rng.integers(0, 2**63, size=len(row_shards))  # one per shard

        def step(i):
            rows = row_shards[i]
            return _shard_step(self.replicas[i], x[rows], y[rows], seeds[i], self.model.training)

        counted = [int((y[rows] != IGNORE_INDEX).sum()) for rows in row_shards]  # N_i
        N = sum(counted)
        weights = [n / N if N else 1.0 / len(counted) for n in counted]  # N_i / N
        if self.workers is not None:
            # Shards 1, 2, ... in the workers, each writing w_i dW_i; shard 0 here, meanwhile.
            training = bool(self.model.training)
            self.workers.send([("step", x[rows], y[rows], int(seed), training, w)
                                 for rows, seed, w in zip(row_shards[1:], seeds[1:], weights[1:],
                                                          strict=True)])
            loss_0, grads = self._here(step, 0)
            worker_losses = self.workers.collect()
            results = [(loss_0, grads)] + [(shard_loss, None) for shard_loss in worker_losses]
            others = self.workers.gradients(len(worker_losses))  # [w_i dW_i], i = 1, 2, ...
        else:
            results = self._run(step, len(row_shards))
            others = [shard_grads for _, shard_grads in results[1:]]
            for w, shard_grads in zip(weights[1:], others, strict=True):
                for g in shard_grads.values():
                    g *= g.dtype.type(w)  # w_i dW_i, in the replica's own new arrays
            grads = results[0][1]
        for name, g in grads.items():  # dW = sum_i (N_i / N) dW_i, into shard 0's arrays
            g *= g.dtype.type(weights[0])
            for other in others:
                g += other[name]
        loss = sum(w * float(shard_loss) for w, (shard_loss, _) in zip(weights, results,
                                                                        strict=True))
        return np.asarray(loss, dtype=self.model.dtype), grads

    def loss_sum(self, x, y) -> float:
        """sum over the targets of y (B, T) of -log p(target), dropout off and no caches kept:
        each shard's logits on its own replica, at once, summed in float64 (evaluation)."""
        from tinylm.evaluation import nll_sum

        x, y = np.asarray(x), np.asarray(y)
        row_shards = [rows for rows in np.array_split(np.arange(len(x)), self.shards) if rows.size]

        def shard_sum(i):
            rows = row_shards[i]
            return nll_sum(self.replicas[i].logits(x[rows]), y[rows])

        if self.workers is not None and row_shards:
            self.workers.send([("loss_sum", x[rows], y[rows]) for rows in row_shards[1:]])
            return sum([self._here(shard_sum, 0)] + self.workers.collect())
        return sum(self._run(shard_sum, len(row_shards)))

    def _here(self, fn, i):
        """fn(i) in this thread, with its share of BLAS threads, while the worker processes run
        theirs; their replies are collected by the caller, or here when fn raises."""
        try:
            with blas_threads(self.blas_threads):
                return fn(i)
        except BaseException:
            try:
                self.workers.collect(raise_errors=False)  # the workers left ready to go on
            except BaseException:  # (a worker that stopped too): fn's error is the one to see
                pass
            raise

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
        """Stop the threads or worker processes (they also stop when the object is
        garbage-collected, and worker processes when this process exits), and let the replicas'
        activations go (each keeps its last step's until its next forward)."""
        for replica in self.replicas:
            replica._caches = None
        if self.pool is not None:
            self.pool.shutdown()
        if self.workers is not None:
            self.workers.close()


# ---------------------------------------------------------------------------------------------
# Worker processes: what DataParallel(..., processes=True) runs each shard in.
# ---------------------------------------------------------------------------------------------


def _memory_size(layout):
    """Bytes for layout (see _layout), in whole 64-byte blocks so any dtype can view them."""
    size = max((off + int(np.prod(shape)) * np.dtype(dt).itemsize for _, shape, dt, off in layout),
               default=0)
    return max(64, -(-size // 64) * 64)


def _shared_memory(path, layout, mode):
    """The file at path mapped as bytes (np.memmap, mode "r" or "r+"), sized for layout."""
    return np.memmap(path, dtype=np.uint8, mode=mode, shape=(_memory_size(layout),))


def _views(memory, layout):
    """name -> the array of that name in memory (bytes), as layout places it."""
    return {name: memory[off:off + int(np.prod(shape)) * np.dtype(dt).itemsize]
            .view(dt).reshape(shape) for name, shape, dt, off in layout}


def _layout(params):
    """[(name, shape, dtype string, byte offset)] of a dict of arrays, in its order: how
    _views places them in one shared memory, each at a 64-byte boundary."""
    layout, offset = [], 0
    for name, array in params.items():
        layout.append((name, tuple(array.shape), array.dtype.str, offset))
        offset += -(-array.nbytes // 64) * 64  # the next 64-byte boundary
    return layout


def _shared_file(prefix, nbytes, room_for):
    """A new file of nbytes for shared memory: in /dev/shm (memory) where it has room for
    room_for bytes (a container's is often only 64 MB), else in the temp folder (page cache).

    The bytes are reserved now (posix_fallocate), so a full disk is an error here and not a
    crash (SIGBUS) at the first write into a page that has no room.
    """
    folder = None
    if os.path.isdir("/dev/shm"):
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize >= room_for:
            folder = "/dev/shm"
    fd, path = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
        else:
            os.ftruncate(fd, nbytes)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def _stop_workers(workers, paths):
    """Ask each worker to stop and wait for it; remove the shared files (at close or exit)."""
    for proc in workers:
        try:
            proc.stdin.write(pickle.dumps(("stop",)))
            proc.stdin.close()
        except (OSError, ValueError):
            pass
    for proc in workers:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    for path in paths:
        try:
            os.unlink(path)
        except OSError:
            pass


@contextlib.contextmanager
def _stop_signals_held():
    """Inside the block, Ctrl-C (SIGINT) and SIGTERM are noted, not acted on; on the way out the
    handlers that were in place get them (a Ctrl-C then raises KeyboardInterrupt, after the
    block). So a command or an answer is never cut in the middle of the pipe. Signal handlers
    belong to the main thread: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    before = {s: signal.getsignal(s) for s in signals}
    received = []
    for s in signals:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        for signum in received:
            handler = before[signum]
            if callable(handler):
                handler(signum, None)  # e.g. KeyboardInterrupt, or the training loop's own
            elif handler == signal.SIG_DFL:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.raise_signal(signum)  # the default action (SIGTERM ends the process)


class _WorkerProcesses:
    """Worker processes for shards 1, 2, ..., each with a replica of ``model`` on shared
    parameters (shard 0 runs in this process, as rank 0 does in DistributedDataParallel).

    Parameters: one file in shared memory, written here before each command, mapped read-only
    by the workers. Gradients: one file per worker, written by it, read here. Commands and the
    (small) batches go through each worker's stdin and stdout, pickled; every command sent is
    answered, and ``pending`` counts the answers still to read, so that a command interrupted
    on this side (Ctrl-C) never leaves an old answer to be taken for a new one. A worker that
    stops, or a pipe left in an unknown state, stops them all: later calls raise.
    """

    def __init__(self, model, n_workers, blas_threads_per_worker):
        import tinylm

        self.model = model
        self.params_layout = _layout(model.params)
        nbytes = _memory_size(self.params_layout)
        self.paths = [_shared_file("tinylm-params-", nbytes, (1 + n_workers) * nbytes)]
        self.params = _views(_shared_memory(self.paths[0], self.params_layout, "r+"),
                             self.params_layout)
        self.grads = []  # worker i's gradients: name -> array
        self.pending = 0  # workers sent a command whose answer has not been read yet
        self.broken = None  # why the workers were stopped, once they were
        threads = str(blas_threads_per_worker)
        # the workers import this very tinylm (a notebook may have found it through sys.path)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(tinylm.__file__)))
        env = dict(os.environ, OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, VECLIB_MAXIMUM_THREADS=threads,
                   PYTHONPATH=os.pathsep.join(
                       [package_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.procs = []
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.paths)
        for i in range(n_workers):
            self.paths.append(_shared_file(f"tinylm-grads{i}-", nbytes,
                                           (n_workers - i) * nbytes))
            self.grads.append(_views(_shared_memory(self.paths[-1], self.params_layout, "r+"),
                                     self.params_layout))
            # A session of its own: a Ctrl-C or a SIGTERM to the terminal's process group is
            # this process's to handle (it saves a checkpoint); a worker stops when its stdin
            # closes, which it does when this process ends, however it ends.
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", "from tinylm.parallel import _worker_main; _worker_main()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True))
        init = {"config": model.config.to_dict(), "dtype": np.dtype(model.dtype).str,
                "layout": self.params_layout, "params_path": self.paths[0],
                "keep_freed_memory": backend._freed_memory_kept}
        self.send([("init", dict(init, grads_path=self.paths[1 + i])) for i in range(n_workers)])
        self.collect()
        # Every worker has mapped the files: their names can go now (the memory stays until the
        # last process unmaps it), so nothing is left behind even if this process is killed.
        for path in list(self.paths):
            try:
                os.unlink(path)
                self.paths.remove(path)
            except OSError:  # where an open file cannot be removed: at close() instead
                pass

    def send(self, messages):
        """The parameters as they are now into the shared memory, then message i to worker i.

        Answers still pending from an interrupted call are read (and dropped) first.
        """
        self._check_usable()
        if self.pending:
            self.collect(raise_errors=False)
        if not messages:
            return
        for name, array in self.model.params.items():
            self.params[name][...] = array
        payloads = [pickle.dumps(message) for message in messages]
        with _stop_signals_held():
            for i, (proc, payload) in enumerate(zip(self.procs, payloads, strict=False)):
                try:
                    proc.stdin.write(payload)
                    proc.stdin.flush()
                except (OSError, ValueError) as error:  # the worker has stopped
                    self._stop(f"sending to data-parallel worker {i + 1} failed ({error!r})")
                    raise RuntimeError(self.broken) from error
                self.pending += 1

    def collect(self, raise_errors=True):
        """The answers of the workers that were sent a command, in order.

        A Ctrl-C here waits until every one has answered, so that the next command meets
        workers that wait for it; then it is raised. An error in a worker is raised here.
        """
        self._check_usable()
        replies = []
        with _stop_signals_held():
            for i, proc in enumerate(self.procs[:self.pending]):
                try:
                    replies.append(pickle.load(proc.stdout))
                except Exception as error:  # EOF: the worker stopped; or an unreadable answer
                    code = proc.poll()
                    self._stop(f"data-parallel worker {i + 1} stopped (exit code {code}; what "
                               f"it printed went to standard error)" if code is not None else
                               f"data-parallel worker {i + 1} sent an unreadable answer "
                               f"({error!r})")
                    raise RuntimeError(self.broken) from error
            self.pending = 0
        for i, (kind, value) in enumerate(replies):
            if kind == "error" and raise_errors:
                if hasattr(value, "add_note"):  # Python 3.11+
                    value.add_note(f"(raised in data-parallel worker {i + 1}, on shard {i + 1})")
                raise value
        return [value for _, value in replies]

    def gradients(self, n):
        """[w_i dW_i] of the first n workers, as their last "step" wrote them."""
        return self.grads[:n]

    def _check_usable(self):
        if self.broken is not None:
            raise RuntimeError(f"the data-parallel worker processes were stopped: {self.broken}; "
                               "make a new DataParallel")

    def _stop(self, why):
        """Stop every worker (their pipes are in an unknown state) and remember why."""
        self.broken, self.pending = why, 0
        for proc in self.procs:
            proc.kill()
        self._finalizer()

    def close(self):
        self._finalizer()


def _worker_main():
    """A worker process: serve the commands of _WorkerProcesses, one at a time, until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    commands, replies = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # a stray print must not land in the replies
    from tinylm.evaluation import nll_sum
    from tinylm.model import GPT, GPTConfig

    replica = grads_out = None
    while True:
        try:
            message = pickle.load(commands)
        except EOFError:
            return
        kind, args = message[0], message[1:]
        if kind == "stop":
            return
        try:
            if kind == "init":
                (init,) = args
                if init["keep_freed_memory"]:
                    backend.keep_freed_memory()
                layout = init["layout"]
                params = _views(_shared_memory(init["params_path"], layout, "r"), layout)
                grads_out = _views(_shared_memory(init["grads_path"], layout, "r+"), layout)
                replica = GPT(GPTConfig(**init["config"]), dtype=np.dtype(init["dtype"]),
                              params=params)
                value = None
            elif kind == "step":
                x, y, seed, training, weight = args
                loss, grads = _shard_step(replica, x, y, seed, training)
                for name, g in grads.items():  # w_i dW_i
                    np.multiply(g, g.dtype.type(weight), out=grads_out[name])
                value = float(loss)
            elif kind == "loss_sum":
                x, y = args
                value = nll_sum(replica.logits(x), y)
            else:
                raise ValueError(f"unknown command {kind!r}")
            reply = ("ok", value)
        except Exception as error:  # sent to the parent, which raises it
            reply = ("error", error)
        try:
            payload = pickle.dumps(reply)
            pickle.loads(payload)  # an error the parent could not rebuild is sent as its text
        except Exception:
            text = f"{type(reply[1]).__name__}: {reply[1]}"
            payload = pickle.dumps(("error", RuntimeError(text)))
        replies.write(payload)
        replies.flush()

