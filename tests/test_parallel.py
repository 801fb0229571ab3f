"""tinylm.parallel.DataParallel: the batch's shards stepped in threads (or in worker processes,
bit for bit the same) give the whole batch's loss and gradients (float64, to rounding), share
the model's arrays, and stay reproducible."""

import numpy as np
import pytest

from tinylm.backend import blas_threads_now
from tinylm.gradcheck import randomize_params, rel_error
from tinylm.model import GPT, GPTConfig
from tinylm.parallel import DataParallel, workers_can_start

V = 11
TWO_CORES = pytest.mark.skipif(not workers_can_start(),
                               reason="worker processes start on 2 cores or more (not Windows)")


def tiny_model(dropout=0.0):
    config = GPTConfig(vocab_size=V, block_size=8, n_layer=2, n_head=2, n_embd=8,
                       dropout=dropout)  # fmt: skip
    model = GPT(config, seed=0, dtype=np.float64)
    randomize_params(model, np.random.default_rng(1))
    return model


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_shards_give_the_whole_batchs_loss_and_gradients(shards):
    model = tiny_model()
    rng = np.random.default_rng(2)
    x = rng.integers(0, V, size=(5, 8))  # 5 rows: uneven shards, and 7 > 5 leaves some empty
    y = rng.integers(0, V, size=(5, 8))
    y[0, :6] = -100  # ignored targets, unevenly spread: shards are weighted by N_i / N
    y[3, 2] = -100
    _, loss = model.forward(x, y)
    grads = model.backward()
    parallel = DataParallel(model, shards)
    try:
        loss_p, grads_p = parallel.forward_backward(x, y)
    finally:
        parallel.close()
    assert abs(float(loss_p) - float(loss)) <= 1e-12 * abs(float(loss))
    assert set(grads_p) == set(grads)
    for name in grads:
        assert rel_error(grads_p[name], grads[name]) <= 1e-12, name


def test_replicas_share_the_models_arrays_and_see_its_updates():
    model = tiny_model()
    parallel = DataParallel(model, 2)
    for replica in parallel.replicas:
        assert all(replica.params[k] is model.params[k] for k in model.params)
    model.params["wte.weight"][0, 0] += 1.0  # an optimizer's in-place update
    assert all(r.params["wte.weight"][0, 0] == model.params["wte.weight"][0, 0]
               for r in parallel.replicas)  # fmt: skip
    parallel.close()


def test_replicas_keep_their_last_step_until_the_next_forward_or_close():
    model = tiny_model()
    x = np.random.default_rng(2).integers(0, V, size=(4, 8))
    parallel = DataParallel(model, 2)
    parallel.forward_backward(x, x)
    assert all(replica._caches is not None for replica in parallel.replicas)  # reused next step
    parallel.close()
    assert all(replica._caches is None for replica in parallel.replicas)  # and let go here


def test_dropout_masks_follow_the_models_stream_and_threads_are_restored():
    model = tiny_model(dropout=0.3)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, V, size=(4, 8)), rng.integers(0, V, size=(4, 8))
    parallel = DataParallel(model, 2)
    threads_before = blas_threads_now()
    state = model.dropout_rng.bit_generator.state
    first, grads_first = parallel.forward_backward(x, y)
    model.dropout_rng.bit_generator.state = state  # as a resumed run restores it
    again, grads_again = parallel.forward_backward(x, y)
    assert float(first) == float(again)
    assert all(np.array_equal(grads_first[k], grads_again[k]) for k in grads_first)
    third, _ = parallel.forward_backward(x, y)  # the stream moved on: new masks
    assert float(third) != float(first)
    model.eval()  # no dropout: the plain forward's loss
    plain = float(model.forward(x, y)[1])
    assert abs(float(parallel.forward_backward(x, y)[0]) - plain) <= 1e-12 * plain
    assert blas_threads_now() == threads_before
    parallel.close()


def test_bad_arguments_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="shards must be a positive integer, got 0"):
        DataParallel(model, 0)
    with pytest.raises(TypeError, match="model must be a tinylm GPT, got dict"):
        DataParallel({}, 2)


def test_loss_sum_scores_the_batch_like_the_whole_model():
    from tinylm.evaluation import nll_sum

    model = tiny_model(dropout=0.5).train()  # loss_sum must turn dropout off, as logits does
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, V, size=(5, 8)), rng.integers(0, V, size=(5, 8))
    whole = nll_sum(model.logits(x), y)
    parallel = DataParallel(model, 2)
    assert abs(parallel.loss_sum(x, y) - whole) <= 1e-12 * whole
    assert model.training and all(r.training for r in parallel.replicas)  # left as they were
    parallel.close()


# -- worker processes (processes=True) --------------------------------------------------------


def _same_dropout_start(model, f):
    """f() with the model's dropout stream rewound afterwards, so the next call draws alike."""
    state = model.dropout_rng.bit_generator.state
    out = f()
    model.dropout_rng.bit_generator.state = state
    return out


@TWO_CORES
@pytest.mark.parametrize("shards", [2, 3])
def test_worker_processes_give_the_threads_results_bit_for_bit(shards):
    """Shard 0 here, the others in worker processes on shared memory: the same arithmetic as
    the threads, so the same loss, gradients and evaluation sum, to the last bit."""
    model = tiny_model(dropout=0.2)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, V, size=(5, 8)), rng.integers(0, V, size=(5, 8))
    y_ignored = y.copy()
    y_ignored[1, :5] = -100
    threads, processes = DataParallel(model, shards), DataParallel(model, shards, processes=True)
    try:
        assert processes.workers is not None and len(processes.workers.procs) == shards - 1
        # the shared files' names are gone once the workers mapped them: nothing to leak
        assert processes.workers.paths == []
        for _ in range(2):  # the second step sees parameters changed in place between steps
            loss_t, grads_t = _same_dropout_start(
                model, lambda: threads.forward_backward(x, y_ignored))
            loss_p, grads_p = processes.forward_backward(x, y_ignored)
            assert float(loss_p) == float(loss_t)
            assert list(grads_p) == list(grads_t)
            assert all(np.array_equal(grads_p[k], grads_t[k]) for k in grads_t)
            for name, g in grads_p.items():  # an optimizer step, in place on model.params
                model.params[name] -= 0.1 * g
        assert processes.loss_sum(x, y) == threads.loss_sum(x, y)
        # the gradients returned are the caller's: the next step does not write over them
        kept = {k: g.copy() for k, g in grads_p.items()}
        processes.forward_backward(x[::-1], y[::-1])
        assert all(np.array_equal(kept[k], grads_p[k]) for k in kept)
    finally:
        threads.close()
        workers = list(processes.workers.procs)
        processes.close()
    assert all(w.poll() is not None for w in workers)  # stopped


def test_an_error_in_a_worker_is_raised_here_and_the_workers_go_on():
    model = tiny_model()
    parallel = DataParallel(model, 2, processes=True)
    try:
        x = np.zeros((4, 8), dtype=np.int64)
        x[3, 0] = V  # a bad token id in the last row: shard 1, in the worker
        with pytest.raises(ValueError, match=f"{V}"):
            parallel.forward_backward(x, x)
        x[3, 0] = 0
        loss, _ = parallel.forward_backward(x, x)  # the workers still answer, in order
        assert np.isfinite(float(loss))
    finally:
        parallel.close()
