"""Training throughput (tokens/s) on the CPU and on the GPU, for two model sizes.

    default : 4 layers x 4 heads x 128 wide, block 64, batch 12   (the `tinylm train` default)
    large   : 6 layers x 6 heads x 384 wide, block 256, batch 8

Each case runs `tinylm.train` for a fixed number of steps on the default corpus (no
evaluation in between, no samples) and reports the training tokens per second, measured
over the training steps alone. On the GPU the layers run on CuPy and attention uses the
CUDA kernel; on the CPU, NumPy. A device that is not available is reported as skipped,
with the reason, so the script runs everywhere.

    python benchmarks/train_gpu.py                         # both devices, both sizes
    python benchmarks/train_gpu.py --devices cpu --steps 20
"""

from __future__ import annotations

import argparse
import datetime
import platform

from report import machine_info, write_report  # benchmarks/report.py

import tinylm

SIZES = {
    "default 4x4x128 block 64 batch 12": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12
    ),
    "large 6x6x384 block 256 batch 8": dict(
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8
    ),
}


def device_name(device):
    if device == "cpu":
        return platform.processor() or platform.machine()
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def run_case(device, size, steps):
    settings = SIZES[size]
    result = tinylm.train(
        steps=steps, device=device, eval_interval=10 * steps, sample_tokens=0,
        warmup_steps=min(100, steps), progress=False, verbose=False, **settings,
    )
    return {
        "device": device, "size": size, **settings, "steps": steps,
        "train_seconds": round(result.train_seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "ms_per_step": round(1e3 * result.train_seconds / steps, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, default=50, help="training steps per case")
    parser.add_argument("--json", default="benchmarks/results/train_gpu.json", help="output file")
    args = parser.parse_args()

    rows, skipped = [], {}
    for device in args.devices:
        try:
            tinylm.set_backend(device)
            name = device_name(device)
        except RuntimeError as err:  # no CuPy, or no CUDA device: say so and go on
            skipped[device] = str(err)
            print(f"{device}: skipped ({err})")
            continue
        finally:
            tinylm.set_backend("cpu")
        for size in SIZES:
            row = run_case(device, size, args.steps)
            row["device_name"] = name
            rows.append(row)
            print(f"{device:4s} {size:36s} {row['ms_per_step']:9.1f} ms/step "
                  f"{row['tokens_per_s']:10.0f} tok/s")
    report = {
        "benchmark": "train_gpu: tinylm.train tokens/s on CPU and GPU",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "results": rows,
        "skipped": skipped,
    }
    write_report(args.json, report)


if __name__ == "__main__":
    main()
