"""LaBraM-Huge (369M) masked EEG modeling: the base recipe with the huge model, FSDP over the mesh.

Check it for a pod without one: `python experiments/pretrain_huge.py --workdir /tmp/aot --aot
--simulate-devices 64 --set mesh.data=8 mesh.fsdp=8` compiles the step and prints per-device memory and FLOPs.
"""
from labram_jax import configs
from labram_jax.train.config import Experiment, MeshConfig
from labram_jax.train.launch import main

import pretrain_base


def config() -> Experiment:
    # Parameters and optimizer state sharded over fsdp; block activations recomputed in the backward pass.
    exp = pretrain_base.config(configs.huge())
    return exp.replace(mesh=MeshConfig(data=-1, fsdp=8), train=exp.train.__class__(
        **{**exp.train.__dict__, "remat": "dots"}))


if __name__ == "__main__":
    raise SystemExit(main(config))
