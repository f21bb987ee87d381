"""The pod plan: per-device memory of the large and huge pretraining steps on simulated meshes, compiled ahead
of time (labram_jax.train.aot), data-parallel against FSDP, rematerialisation off and on.

    python bench/pod_memory.py [--models large,huge] [--devices 8,64,256] [--json OUT]
    python bench/pod_memory.py --smoke    # seconds: TINY at width 200, its tokenizer, batch 64, 8 devices, FSDP

Each configuration compiles in its own process (the simulated device count is fixed when JAX starts), at the
recipe's global batch (512 windows of 64 channels x 4 patches) with the blocks as one scan. Per device it prints
the arguments (parameters, both Adam moments, the frozen tokenizer, the batch), the temporaries, the peak
(arguments + outputs + temporaries - the donated buffers counted twice), the analytic TFLOPs, the compile time,
and how many "Involuntary full rematerialization" warnings XLA's partitioner logged (each one a sharding it
could not keep and re-splits every step).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30
LAYOUTS = {"dp": {"data": -1, "fsdp": 1}, "fsdp": {"data": -1, "fsdp": 8}}
INVOLUNTARY = "Involuntary full rematerialization"


def child(model: str, layout: str, remat: str) -> None:
    sys.path.insert(0, str(ROOT))
    from labram_jax.recipes import pretrain_huge, pretrain_large
    from labram_jax.train import aot
    from labram_jax.train.config import MeshConfig

    if model == "tiny":  # --smoke: the TINY reference set's sizes at base's width of 200 (TINY's 100 does not
        # split over FSDP's 8), the recipe's windows at a batch of 64
        from labram_jax import configs
        from labram_jax.recipes import pretrain_base
        tokenizer = configs.tokenizer_tiny()
        tokenizer = tokenizer.replace(encoder=tokenizer.encoder.replace(embed_dim=200, out_chans=8),
                                      decoder=tokenizer.decoder.replace(embed_dim=200))
        exp = pretrain_base.config(configs.tiny(embed_dim=200, out_chans=8))
        exp = exp.replace(model=exp.model.replace(vocab_size=tokenizer.codebook_size), tokenizer=tokenizer,
                          train=dataclasses.replace(exp.train, batch_size=64))
    else:
        exp = {"large": pretrain_large, "huge": pretrain_huge}[model].config()
    exp = exp.replace(mesh=MeshConfig(**LAYOUTS[layout]),
                      runtime=dataclasses.replace(exp.runtime, remat=remat, scan_blocks=True))
    print(json.dumps(aot.report(exp)))


def measure(model: str, devices: int, layout: str, remat: str) -> dict:
    # JAX's own device count: a JAX_NUM_CPU_DEVICES inherited from the caller (the test suite sets 1) would win over
    # XLA's flag and leave every mesh on one device.
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, __file__, "--child", model, layout, remat], env=env,
                         capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr.strip().splitlines()[-1]}
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["involuntary"] = run.stderr.count(INVOLUNTARY)
    result["peak_bytes_per_device"] = (result["argument_bytes_per_device"] + result["output_bytes_per_device"]
                                       + result["temp_bytes_per_device"] - result["alias_bytes_per_device"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="large,huge")
    parser.add_argument("--devices", default="8,64,256")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="a check of the script in seconds: TINY on 8 "
                        "devices, FSDP, remat none")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    remats, layouts = ("none", "block"), tuple(LAYOUTS)
    if args.smoke:  # FSDP: the layout whose shardings reach furthest (data parallelism is its special case)
        args.models, args.devices, remats, layouts = "tiny", "8", ("none",), ("fsdp",)
    rows = []
    print("| model | devices | layout | remat | arguments GiB | temporaries GiB | peak GiB | TFLOP/device | "
          "compile s | involuntary remat |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for devices in map(int, args.devices.split(",")):
            for layout in layouts:
                for remat in remats:
                    r = measure(model, devices, layout, remat)
                    rows.append({"model": model, "devices": devices, "layout": layout, "remat": remat, **r})
                    if "error" in r:
                        print(f"| {model} | {devices} | {layout} | {remat} | error: {r['error']} |||||| ", flush=True)
                        continue
                    mesh = ", ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
                    print(f"| {model} | {devices} ({mesh}) | {layout} | {remat} | "
                          f"{r['argument_bytes_per_device'] / GIB:.2f} | {r['temp_bytes_per_device'] / GIB:.2f} | "
                          f"{r['peak_bytes_per_device'] / GIB:.2f} | {r['flops_per_device_per_step'] / 1e12:.2f} | "
                          f"{r['compile_seconds']:.0f} | {r['involuntary']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if failed := sum("error" in r for r in rows):
        sys.exit(f"{failed} of {len(rows)} configurations failed")


if __name__ == "__main__":
    main()
