"""Ahead-of-time compilation of a recipe's train step with abstract shapes: no weights, no data, any mesh.

This is how a pod-sized run is checked on one machine: simulate the devices, build the state's shapes and
shardings, compile, and read XLA's per-device memory and FLOP counts.
"""
from __future__ import annotations

import time
from typing import Any

import jax

from labram_jax.train.config import Experiment
from labram_jax.train.flops import step_flops
from labram_jax.train.trainer import Trainer


def report(exp: Experiment) -> dict[str, Any]:
    """Compile the step for the mesh of `exp`, print one line of its figures and return them.

    FLOPs are the analytic model count (flops.step_flops, per device) and XLA's cost analysis; XLA counts a while
    loop's body once, so under runtime.scan_blocks its figure covers one block per pass and is not a step's cost.
    """
    tic = time.perf_counter()
    trainer = Trainer(exp, "/nonexistent-aot-workdir", abstract=True)
    compiled = trainer.compiled_step()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(x.size for x in jax.tree.leaves(trainer.state["params"]))
    result = {"devices": jax.device_count(), "mesh": dict(trainer.mesh.shape), "parameters": params,
              "flops_per_device_per_step": step_flops(trainer.exp) / jax.device_count(),
              "xla_flops_per_device_per_step": float(cost.get("flops", 0.0)),
              "argument_bytes_per_device": memory.argument_size_in_bytes,
              "output_bytes_per_device": memory.output_size_in_bytes,
              "temp_bytes_per_device": memory.temp_size_in_bytes,
              # Donated state: outputs written over the arguments' buffers, counted in both figures above.
              "alias_bytes_per_device": memory.alias_size_in_bytes,
              "compile_seconds": time.perf_counter() - tic}
    gib, tera = 2 ** 30, 1e12
    xla = f"XLA counts {result['xla_flops_per_device_per_step'] / tera:.2f}"
    if trainer.exp.runtime.scan_blocks:
        xla += ", one scanned block per pass"
    print(f"{exp.stage} step compiled for {result['devices']} devices, mesh {result['mesh']}: "
          f"{params / 1e6:.1f}M trainable parameters, {result['flops_per_device_per_step'] / tera:.2f} TFLOP "
          f"per device per step ({xla}); per device memory: arguments "
          f"{result['argument_bytes_per_device'] / gib:.2f} GiB, outputs {result['output_bytes_per_device'] / gib:.2f}"
          f" GiB, temporaries {result['temp_bytes_per_device'] / gib:.2f} GiB (compiled in "
          f"{result['compile_seconds']:.0f} s)")
    return result
