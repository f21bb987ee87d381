"""LaBraM-Huge (369M) masked EEG modeling: the base recipe with the huge model, FSDP over the mesh.

Check it for a pod without one: `labram train pretrain_huge --workdir /tmp/aot --aot
--simulate-devices 64 --set mesh.data=8 mesh.fsdp=8` compiles the step and prints per-device memory and FLOPs.
"""
import dataclasses

from labram_jax import configs
from labram_jax.recipes import pretrain_base
from labram_jax.train.config import Experiment, MeshConfig


def config() -> Experiment:
    # Parameters and optimizer state sharded over fsdp; each block recomputed in the backward pass ("dots" saves
    # nothing here: LaBraM's linear layers are exactly the matmuls it keeps; "block" cut temporaries from 5.1 to
    # 1.8 GiB per device at 4 blocks on 64 devices, for 1.34 vs 1.06 TFLOP per step).
    # The 48 blocks run as one scan, so XLA compiles one block: the 64-device AOT check above compiles in about
    # 80 s of CPU time instead of 14 minutes (bench/RESULTS.md, the pod plan).
    exp = pretrain_base.config(configs.huge())
    return exp.replace(mesh=MeshConfig(data=-1, fsdp=8),
                       runtime=dataclasses.replace(exp.runtime, remat="block", scan_blocks=True))
