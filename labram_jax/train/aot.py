"""Ahead-of-time compilation of a recipe's train step with abstract shapes: no weights, no data, any mesh.

This is how a pod-sized run is checked on one machine: simulate the devices, build the state's shapes and
shardings, compile, and read XLA's per-device memory and FLOP counts.
"""
from __future__ import annotations

import time

import jax

from labram_jax.train.config import Experiment
from labram_jax.train.trainer import Trainer


def report(exp: Experiment) -> dict[str, float]:
    tic = time.perf_counter()
    trainer = Trainer(exp, "/nonexistent-aot-workdir", abstract=True)
    compiled = trainer.lower().compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = sum(x.size for x in jax.tree.leaves(trainer.state["params"]))
    result = {"devices": jax.device_count(), "mesh": dict(trainer.mesh.shape), "parameters": params,
              "flops_per_device_per_step": float(cost.get("flops", 0.0)),
              "argument_bytes_per_device": memory.argument_size_in_bytes,
              "output_bytes_per_device": memory.output_size_in_bytes,
              "temp_bytes_per_device": memory.temp_size_in_bytes,
              "compile_seconds": time.perf_counter() - tic}
    gib = 2 ** 30
    print(f"{exp.stage} step compiled for {result['devices']} devices, mesh {result['mesh']}: "
          f"{params / 1e6:.1f}M trainable parameters, {result['flops_per_device_per_step'] / 1e12:.2f} TFLOP "
          f"per device per step; per device memory: arguments {result['argument_bytes_per_device'] / gib:.2f} GiB, "
          f"outputs {result['output_bytes_per_device'] / gib:.2f} GiB, temporaries "
          f"{result['temp_bytes_per_device'] / gib:.2f} GiB (compiled in {result['compile_seconds']:.0f} s)")
    return result
