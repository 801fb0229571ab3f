"""How fast is one training step (forward + backward) of tinylm's GPT on the CPU, against PyTorch?

For each model size this times the same step five ways, each in a process of its own:

    tinylm           GPT.forward + GPT.backward after backend.keep_freed_memory(), as
                     `tinylm train` runs it
    tinylm plain     the same in a process that did nothing but `import tinylm`: the step a
                     student types in a notebook (glibc's malloc left as it is)
    tinylm dp        tinylm.parallel.DataParallel(model, 2).forward_backward: the batch in two
                     shards, one thread each (`tinylm train --data-parallel-workers threads`),
                     after keep_freed_memory() as in `tinylm train`
    tinylm dp proc   DataParallel(model, 2, processes=True): shard 0 in the worker's process,
                     shard 1 in a worker process of its own (what `tinylm train` does by
                     default), after keep_freed_memory()
    torch            nanoGPT's model in PyTorch eager (nn.Linear, nn.LayerNorm, GELU tanh,
                     F.scaled_dot_product_attention, causal; the output layer tied to wte),
                     the same weights and batch, loss.backward(); skipped, with a line saying
                     so, when torch cannot be imported

float32, the same number of threads everywhere (OPENBLAS_NUM_THREADS for NumPy,
torch.set_num_threads for torch). The processes take turns (a few steps each, then a pause so
the last one's idle BLAS threads stop spinning), so a neighbour's load falls on all three; each
figure is the median over every timed step. Printed per size: ms/step, the ratios to torch (and
how they spread from round to round: the median and quartiles of each round's ratio), page
faults per step, the peak resident memory of the process that steps (shard 0's for the
data-parallel ways; torch's includes libtorch itself, a few hundred MiB), the achieved GFLOP/s
as a fraction of this machine's float32 matmul throughput, and then a per-layer profile of
tinylm's step (forward and backward of each kind of layer, timed by wrapping tinylm.layers'
functions in the worker; layers.py itself is not changed).

FLOPs counted (a multiply-add is 2 FLOPs), per step, N = B*T tokens:
    forward, per layer:  qkv 2*N*C*3C + scores 2*B*H*T*T*D + P@V 2*B*H*T*T*D
                         + proj 2*N*C*C + fc 2*N*C*4C + proj 2*N*4C*C
    forward, head:       2*N*C*V
    backward = 2 x forward (each product has two gradient products), so step = 3 x forward.
The full T x T score matrix is computed (masked, not skipped), so causal attention is not
halved here.

    python benchmarks/cpu_step.py                      # both sizes, JSON to benchmarks/results/
    python benchmarks/cpu_step.py --rounds 5 --json out.json
    python benchmarks/cpu_step.py --size 2,2,64,32,4   # one size of your own: L,H,C,T,B
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from report import machine_info, write_report  # benchmarks/report.py

SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, batch_size)
    "4x4x128 block 64 batch 12": (4, 4, 128, 64, 12),
    "6x6x384 block 256 batch 8": (6, 6, 384, 256, 8),
}
VOCAB = 65  # a character-level vocabulary, as in the default training run
KINDS = ("tinylm", "tinylm_plain", "tinylm_dp", "tinylm_dp_proc", "torch")
TURN_SECONDS = 0.3  # a worker's turn runs about this long (whole steps, at least one)
PAUSE_SECONDS = 0.3  # between turns: OpenBLAS's idle threads spin for ~0.1 s before sleeping
PROFILE_SECONDS = 4.0  # torch.profiler's table covers about this many seconds of steps


def step_flops(n_layer, n_head, n_embd, T, B, V):
    C, N, D = n_embd, B * T, n_embd // n_head
    per_layer = 2 * N * C * 3 * C + 2 * (2 * B * n_head * T * T * D) + 2 * N * C * C
    per_layer += 2 * N * C * 4 * C + 2 * N * 4 * C * C
    forward = n_layer * per_layer + 2 * N * C * V
    return 3 * forward


def matmul_gflops(n=2048, repeats=5):
    """This machine's float32 matmul throughput: median over repeats of an n x n x n product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------------------------
# The model and batch, in tinylm and in torch


def tinylm_model(n_layer, n_head, n_embd, T):
    """tinylm's GPT with GPTConfig's defaults (learned positions, biases, tied output layer)."""
    from tinylm import GPT, GPTConfig

    config = GPTConfig(vocab_size=VOCAB, block_size=T, n_layer=n_layer, n_head=n_head,
                       n_embd=n_embd)
    return GPT(config, seed=0, dtype=np.float32)


def make_batch(T, B, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, size=(B, T)), rng.integers(0, VOCAB, size=(B, T))


def torch_gpt(config, params):
    """nanoGPT's GPT in PyTorch eager, holding copies of tinylm's ``params`` (GPT-2 names).

    Same architecture as tinylm.model.GPT with GPTConfig's defaults: learned positions,
    pre-LayerNorm blocks with biases, GELU (tanh), causal attention, logits = ln_f(x) @ wte^T.
    tinylm stores a linear weight as (in, out); nn.Linear wants (out, in), so each is
    transposed. ``model(idx, targets)`` returns the mean cross-entropy.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own name for it)
    from torch import nn

    C, H = config.n_embd, config.n_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
            self.gelu = nn.GELU(approximate="tanh")

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # 3 x (B, T, C)
            q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in (q, k, v))  # (B,H,T,D)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
            x = x + self.attn_proj(a.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(config.vocab_size, C)
            self.wpe = nn.Embedding(config.block_size, C)
            self.h = nn.ModuleList(Block() for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(C)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied: (B, T, C) @ wte^T
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    model = TorchGPT()
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "c_attn", "attn.c_proj": "attn_proj",
             "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
    state = {"wte.weight": params["wte.weight"], "wpe.weight": params["wpe.weight"],
             "ln_f.weight": params["ln_f.weight"], "ln_f.bias": params["ln_f.bias"]}
    for i in range(config.n_layer):
        for theirs, ours in names.items():
            W, b = params[f"h.{i}.{theirs}.weight"], params[f"h.{i}.{theirs}.bias"]
            state[f"h.{i}.{ours}.weight"] = W.T if W.ndim == 2 else W  # (in, out) -> (out, in)
            state[f"h.{i}.{ours}.bias"] = b
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
                           for k, v in state.items()})
    return model


# ----------------------------------------------------------------------------------------------
# Where tinylm's step spends its time: every tinylm.layers call, timed and named


def layer_kind(name, args, config):
    """The row of the profile table that a call of tinylm.layers.<name>(*args) belongs to.

    A linear layer is named by its weight's shape (the backward finds it in the cache):
    (C, 3C) qkv, (C, C) attention proj, (C, 4C) fc, (4C, C) MLP proj, (C, V) the output head.
    """
    base = name.rsplit("_", 1)[0]  # "linear_forward" -> "linear"
    if base != "linear":
        return base.replace("_", "-")
    W = args[1] if name == "linear_forward" else args[1][1]  # forward (x, W, b); cache (x, W, _)
    C, V = config.n_embd, config.vocab_size
    return {(C, V): "head (linear)", (C, 3 * C): "linear qkv", (C, C): "linear attn proj",
            (C, 4 * C): "linear fc", (4 * C, C): "linear mlp proj"}.get(tuple(W.shape), "linear")


PROFILED = ("embedding", "layernorm", "linear", "attention", "gelu", "cross_entropy", "dropout")


def profile_steps(model, idx, targets, n_steps):
    """Each profiled step's seconds, and each (layer kind, direction)'s seconds in every step.

    Each profiled function of tinylm.layers is replaced, for these steps only, by a wrapper that
    times it; model.py finds them through the module, so every call goes through the wrappers.
    Returns {"steps": [s, ...], "layers": {"kind|direction": [s per step, ...]}}, raw, so that
    the profiles of several turns can be merged before summarize_profile takes the medians.
    """
    from tinylm import layers

    originals = {}
    per_step = defaultdict(list)
    totals = defaultdict(float)

    def wrap(name, f):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            key = f"{layer_kind(name, args, model.config)}|{name.rsplit('_', 1)[1]}"
            totals[key] += time.perf_counter() - t0
            return out

        return timed

    for base in PROFILED:
        for direction in ("forward", "backward"):
            name = f"{base}_{direction}"
            originals[name] = getattr(layers, name)
            setattr(layers, name, wrap(name, originals[name]))
    steps = []
    try:
        for _ in range(n_steps):
            totals.clear()
            t0 = time.perf_counter()
            model.forward(idx, targets)
            model.backward()
            steps.append(time.perf_counter() - t0)
            for key, seconds in totals.items():
                per_step[key].append(seconds)
    finally:
        for name, f in originals.items():
            setattr(layers, name, f)
    return {"steps": steps, "layers": dict(per_step)}


def merge_profiles(profiles):
    """One raw profile from several (the turns of one worker)."""
    merged = {"steps": [], "layers": defaultdict(list)}
    for prof in profiles:
        merged["steps"] += prof["steps"]
        for key, v in prof["layers"].items():
            merged["layers"][key] += v
    return merged


def summarize_profile(raw):
    """Medians in ms: {"step_ms", "rows": [{"layer", "direction", "ms"}, ..] (largest first),
    "other_ms"}; other_ms is the step's median minus the layers' medians (model.py's glue)."""
    rows = []
    for key, v in raw["layers"].items():
        kind, direction = key.split("|")
        rows.append({"layer": kind, "direction": direction, "ms": 1e3 * statistics.median(v)})
    rows.sort(key=lambda r: -r["ms"])
    step_ms = 1e3 * statistics.median(raw["steps"])
    return {"step_ms": step_ms, "steps": len(raw["steps"]), "rows": rows,
            "other_ms": step_ms - sum(r["ms"] for r in rows)}


def print_profile(title, prof):
    step = prof["step_ms"]
    print(f"  {title}: {step:.1f} ms per step (median of {prof['steps']} profiled steps)")
    print(f"    {'layer':20s} {'direction':9s} {'ms':>8s} {'share':>6s}")
    for r in prof["rows"]:
        if r["ms"] >= 0.005 * step or r["layer"] != "dropout":
            print(f"    {r['layer']:20s} {r['direction']:9s} {r['ms']:8.2f} "
                  f"{100 * r['ms'] / step:5.1f}%")
    print(f"    {'model.py glue':20s} {'both':9s} {prof['other_ms']:8.2f} "
          f"{100 * prof['other_ms'] / step:5.1f}%   (reshapes, residual adds, dict of grads)")


def torch_profile(model, idx, targets, n_steps, top=12):
    """torch.profiler's self CPU time per aten operator, ms per step, the largest first."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n_steps):
            model.zero_grad(set_to_none=True)
            model(idx, targets).backward()
    rows = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3 / n_steps}
            for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


# ----------------------------------------------------------------------------------------------
# A worker: one process, one way of stepping one model; the parent tells it when to run


def peak_rss_mib():
    """This process's peak resident memory so far, in MiB: VmHWM on Linux (ru_maxrss there
    carries the parent's peak over into a new process), else ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def worker(kind, size, threads):
    """Serve the parent's commands on stdin, one JSON reply per line on stdout.

    "steps K": run K timed steps; reply {"seconds": [...], "minor_faults": n, "peak_rss_mib": m}.
    "profile K": reply the raw per-layer profile of K steps (tinylm) or torch.profiler's table.
    "loss": reply the loss of the batch (the same weights give the same loss in every worker).
    """
    L, H, C, T, B = size
    if kind in ("tinylm", "tinylm_dp", "tinylm_dp_proc"):
        from tinylm.backend import keep_freed_memory

        keep_freed_memory()
    idx, targets = make_batch(T, B)
    model = tinylm_model(L, H, C, T)
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        tmodel = torch_gpt(model.config, model.params)
        t_idx, t_targets = torch.from_numpy(idx), torch.from_numpy(targets)

        def step():
            tmodel.zero_grad(set_to_none=True)
            loss = tmodel(t_idx, t_targets)
            loss.backward()
            return loss.item()
    elif kind in ("tinylm_dp", "tinylm_dp_proc"):
        from tinylm.parallel import DataParallel

        if kind == "tinylm_dp_proc":
            parallel = DataParallel(model, 2, processes=True)
        else:
            parallel = DataParallel(model, 2)

        def step():
            loss, _ = parallel.forward_backward(idx, targets)
            return float(loss)
    else:

        def step():
            _, loss = model.forward(idx, targets)
            model.backward()
            return float(loss)

    loss = step()  # two warm-up steps
    step()
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "steps":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = []
            for _ in range(int(arg)):
                t0 = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - t0)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            reply = {"seconds": seconds, "minor_faults": faults, "peak_rss_mib": peak_rss_mib()}
        elif command == "profile":
            if kind == "torch":
                reply = {"ops": torch_profile(tmodel, t_idx, t_targets, int(arg))}
            elif kind in ("tinylm_dp", "tinylm_dp_proc"):
                reply = {}  # threads: the per-layer profile is taken of the one-thread kinds
            else:
                reply = profile_steps(model, idx, targets, int(arg))
        elif command == "loss":
            reply = {"loss": loss}
        else:
            break
        print(json.dumps(reply), flush=True)


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, kind, size, threads):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
             "--size", ",".join(map(str, size)), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker stopped (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def ratio_spread(turns):
    """How much each ratio moves from round to round, from each way's median step per round.

    Within a round the ways run one right after the other, so load from outside falls on all of
    them alike; the spread of the per-round ratios says how far one run's ratio can be trusted.
    Returns {"kind/torch": {"median": m, "quartiles": [q1, q3], "rounds": n}, ...} for every way
    over torch, and plain over the tuned one-process step, when those were timed.
    """
    pairs = [(kind, "torch") for kind in turns if kind != "torch" and "torch" in turns]
    if "tinylm_plain" in turns and "tinylm" in turns:
        pairs.append(("tinylm_plain", "tinylm"))
    spread = {}
    for kind, base in pairs:
        ratios = [a / b for a, b in zip(turns[kind], turns[base], strict=True)]
        if len(ratios) > 1:
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        else:  # one round: its ratio is every quartile
            q1 = q3 = ratios[0]
        spread[f"{kind}/{base}"] = {"median": statistics.median(ratios), "quartiles": [q1, q3],
                                    "rounds": len(ratios)}
    return spread


def measure_size(size, kinds, rounds, threads, profile_steps_n):
    """Alternate the workers' turns for ``rounds`` rounds; medians, ratios, faults, profiles."""
    workers = {kind: Worker(kind, size, threads) for kind in kinds}
    try:
        losses = {kind: w.ask("loss")["loss"] for kind, w in workers.items()}
        # Steps per turn, from the slowest way's median of three probe steps (one step alone
        # can be an outlier, and turns of two steps would then time mostly first steps after
        # a pause, when threads and caches are cold).
        probe = max(statistics.median(w.ask("steps 3")["seconds"]) for w in workers.values())
        per_turn = max(1, round(TURN_SECONDS / probe))
        if not profile_steps_n:  # torch.profiler's: about PROFILE_SECONDS of steps, at least 5
            profile_steps_n = max(5, round(PROFILE_SECONDS / probe))
        seconds, faults, peaks = defaultdict(list), defaultdict(list), {}
        turns = defaultdict(list)  # per kind, each round's median step: for per-round ratios
        for _ in range(rounds):
            for kind, w in workers.items():
                time.sleep(PAUSE_SECONDS)
                reply = w.ask(f"steps {per_turn}")
                seconds[kind] += reply["seconds"]
                turns[kind].append(statistics.median(reply["seconds"]))
                faults[kind].append(reply["minor_faults"] / per_turn)
                peaks[kind] = reply["peak_rss_mib"]  # the peak so far: the last one is the peak
        # The per-layer profile, in turns as well, so that a burst of load elsewhere falls on
        # a few of its steps only; torch.profiler's table once at the end.
        raw = defaultdict(list)
        for _ in range(rounds):
            for kind, w in workers.items():
                if kind in ("tinylm", "tinylm_plain"):
                    time.sleep(PAUSE_SECONDS)
                    raw[kind].append(w.ask(f"profile {per_turn}"))
        profiles = {kind: summarize_profile(merge_profiles(v)) for kind, v in raw.items()}
        if "torch" in workers:
            time.sleep(PAUSE_SECONDS)
            profiles["torch"] = workers["torch"].ask(f"profile {profile_steps_n}")
    finally:
        for w in workers.values():
            w.close()
    out = {"steps_per_turn": per_turn, "timed_steps": rounds * per_turn,
           "torch_profiled_steps": profile_steps_n, "loss": losses}
    for kind in kinds:
        out[f"{kind}_ms_per_step"] = 1e3 * statistics.median(seconds[kind])
        out[f"{kind}_minor_faults_per_step"] = statistics.median(faults[kind])
        out[f"{kind}_peak_rss_mib"] = peaks[kind]
    if "torch" in kinds:
        for kind in kinds:
            if kind != "torch":
                out[f"ratio_{kind}_over_torch"] = (out[f"{kind}_ms_per_step"]
                                                   / out["torch_ms_per_step"])
    if "tinylm_plain" in kinds:
        out["ratio_plain_over_tinylm"] = out["tinylm_plain_ms_per_step"] / out["tinylm_ms_per_step"]
    out["ratio_spread_by_round"] = ratio_spread(turns)
    out["profiles"] = profiles
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9,
                        help="turns per worker; each turn runs whole steps for ~0.3 s")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="steps of torch.profiler's table; 0: about 4 s of steps (tinylm's "
                             "per-layer profile takes as many turns as the timing)")
    parser.add_argument("--size", default=None, metavar="L,H,C,T,B",
                        help="one size of your own (n_layer,n_head,n_embd,block,batch) instead "
                             "of the two standard ones")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="BLAS / torch threads (default: the core count)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch column")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help="which ways to time, comma-separated (default: all of them; "
                             "tinylm and tinylm_plain are always timed)")
    parser.add_argument("--json", default="benchmarks/results/cpu_step.json", help="output file")
    parser.add_argument("--note", default="", help="how loaded the machine was, for the record")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    if args.size is not None:
        try:
            size = tuple(int(v) for v in args.size.split(","))
        except ValueError:
            size = ()
        if len(size) != 5 or min(size) < 1:
            parser.error(f"--size must be five positive integers L,H,C,T,B, got {args.size!r}")
        if size[2] % size[1]:
            parser.error(f"--size: n_embd {size[2]} must be divisible by n_head {size[1]}")
        args.sizes = {"{}x{}x{} block {} batch {}".format(*size): size}
    else:
        args.sizes = dict(SIZES)
    if args.rounds < 1 or args.profile_steps < 0 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1, --profile-steps at least 0")
    return args


def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, next(iter(args.sizes.values())), args.threads)
        return
    asked = set(args.kinds.split(",")) | {"tinylm", "tinylm_plain"}
    unknown = asked - set(KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(KINDS)}")
    kinds = [kind for kind in KINDS if kind in asked]
    torch_version = None
    if "torch" not in kinds:
        pass
    elif args.no_torch:
        kinds.remove("torch")
        print("torch column left out (--no-torch)")
    elif not torch_available():
        kinds.remove("torch")
        print("skipped the torch column: torch is not installed (pip install torch)")
    else:
        import torch

        torch_version = torch.__version__
    load_before = os.getloadavg()
    print(f"threads: {args.threads}; load average {load_before[0]:.2f}")
    from tinylm.backend import blas_threads

    with blas_threads(args.threads):  # the workers' thread count, so the peak is theirs too
        peak = matmul_gflops()
    print(f"float32 matmul throughput (2048^3, median): {peak:.1f} GFLOP/s")
    results = []
    for name, (L, H, C, T, B) in args.sizes.items():
        m = measure_size((L, H, C, T, B), kinds, args.rounds, args.threads, args.profile_steps)
        flops = step_flops(L, H, C, T, B, VOCAB)
        row = {"size": name, "n_layer": L, "n_head": H, "n_embd": C, "block_size": T,
               "batch_size": B, "vocab_size": VOCAB, "gflop_per_step": flops / 1e9}
        for kind in kinds:
            ms = m[f"{kind}_ms_per_step"]
            row[f"{kind}_ms_per_step"] = ms
            row[f"{kind}_tokens_per_s"] = B * T / ms * 1e3
            row[f"{kind}_fraction_of_matmul"] = flops / (ms / 1e3) / 1e9 / peak
        row.update({k: v for k, v in m.items() if not k.endswith("_ms_per_step")})
        results.append(row)
        line = f"{name}: " + ", ".join(f"{k} {row[f'{k}_ms_per_step']:.1f} ms" for k in kinds)
        if "torch" in kinds:
            line += "; " + ", ".join(f"{kind}/torch {row[f'ratio_{kind}_over_torch']:.2f}"
                                     for kind in kinds if kind != "torch")
        line += f"; plain/tinylm {row['ratio_plain_over_tinylm']:.2f}"
        print(line)
        print("  ratio per round, median [quartiles]: " + ", ".join(
            f"{pair} {r['median']:.2f} [{r['quartiles'][0]:.2f}, {r['quartiles'][1]:.2f}]"
            for pair, r in row["ratio_spread_by_round"].items()))
        print("  minor page faults per step: " + ", ".join(
            f"{k} {row[f'{k}_minor_faults_per_step']:,.0f}" for k in kinds))
        print("  peak resident memory, MiB (the process stepping shard 0; worker processes not "
              "counted): " + ", ".join(f"{k} {row[f'{k}_peak_rss_mib']:,.0f}" for k in kinds))
        print("  % of matmul throughput: " + ", ".join(
            f"{k} {100 * row[f'{k}_fraction_of_matmul']:.1f}%" for k in kinds))
        print(f"  losses (same weights, same batch): {m['loss']}")
        for kind in ("tinylm", "tinylm_plain"):
            print_profile(f"per-layer profile, {kind}", m["profiles"][kind])
        if "torch" in kinds:
            print("  torch.profiler, self CPU ms per step (the largest operators):")
            for r in m["profiles"]["torch"]["ops"][:8]:
                print(f"    {r['op']:44s} {r['ms']:8.2f}")

    report = {
        "benchmark": "cpu_step (forward + backward, float32, median), tinylm with and without "
                     "keep_freed_memory and data-parallel over 2 threads or 2 processes vs "
                     "torch eager, separate processes taking turns",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": args.threads,
        "torch": torch_version,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": args.note,
        "matmul_gflops": peak,
        "target_ratio": 1.05,
        "results": results,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
