"""Where arrays live on a device mesh. The rule table below is the one place where sharding is decided.

Layers name the axes of their parameters (`embed`, `mlp`, `qkv`, ...); the table maps each name to mesh axes.
The mesh has a `data` axis (pure data parallelism), an `fsdp` axis (data parallel with parameters and optimizer
state sharded along `embed`), and an optional `tensor` axis (Megatron-style split of attention and MLP widths).
The same program runs on 1 CPU, 8 GPUs or a TPU pod; only the mesh shape changes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from labram_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("classes", None),
    ("norm", None),  # LayerNorm, layer scale: tiny, replicated
    # Every device must hold the same codebook; it is small (8192 x 64), so it is replicated.
    ("codebook", None),
    ("code", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise UserError("at most one mesh axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise UserError(f"mesh (data={shape[0]}, fsdp={shape[1]}, tensor={shape[2]}) needs "
                        f"{math.prod(shape)} devices, but {len(devices)} are given")
    # Auto axes: GSPMD propagates shardings through FSDP matmuls (Explicit axes reject them).
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_mesh(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES, *, what: str = "an array") -> PartitionSpec:
    """The PartitionSpec for an array with these logical axis names.

    A mesh axis splits a dimension where it has more than one device and no earlier dimension uses it. One that
    does not divide the dimension is an error naming `what`, the dimension and the axis (as in MaxText): falling
    back to replication would quietly give up the memory plan. A dimension meant to be replicated names a rule
    without mesh axes.
    """
    used: set[str] = set()
    spec = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        chosen: list[str] = []
        for axis in rule_axes(name, rules):
            if mesh.shape.get(axis, 1) == 1 or axis in used:
                continue
            if size % (mesh.shape[axis] * _prod(mesh, chosen)):
                raise UserError(f"{what}: dimension {dim} ({name!r}, {size}) does not divide over mesh axis {axis!r} "
                                f"({mesh.shape[axis]} devices{''.join(f' x {a!r}' for a in chosen)}); use a mesh "
                                f"whose {axis} size divides {size}")
            chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def rule_axes(name: str | None, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> tuple[str, ...]:
    """The mesh axes the table gives a logical axis name, in order (none for None or a replicated name)."""
    targets = dict(rules).get(name) if name is not None else None
    return (targets,) if isinstance(targets, str) else tuple(targets or ())


def _prod(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def variable_sharding(var: nnx.Variable, mesh: Mesh, what: str = "a variable") -> NamedSharding:
    """Where one model variable (named `what` in errors) lives: its logical axis names through the rule table."""
    value = var.get_value()
    names = var.get_metadata().get("out_sharding") or (None,) * np.ndim(value)
    return NamedSharding(mesh, logical_to_mesh(names, np.shape(value), mesh, what=what))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every leaf of `tree`: model variables by their logical axis names, every other leaf
    (optimizer counters, the step, the RNG key) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(path, leaf):
        # optax.masked leaves an empty MaskedNode inside some Variables: nothing to place there.
        if isinstance(leaf, nnx.Variable) and hasattr(leaf.get_value(), "shape"):
            return variable_sharding(leaf, mesh, jax.tree_util.keystr(path))
        return replicated
    return jax.tree_util.tree_map_with_path(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out on the mesh a train step is traced under (`jax.set_mesh`) by its logical axis names, through the
    same table; outside such a step (a model called on its own, evaluation) x as it is.

    Layers name the axes of the activations that decide a step's layout. Without them GSPMD propagates FSDP's
    embed-split weights into the activations: LaBraM-Large at depth 2 on 8 devices took 23 GiB of temporaries
    under FSDP against 7.6 GiB data-parallel (7.6 GiB both with the residual stream laid out here).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, x.shape, mesh, what="an activation"))


def devices_along(name: str) -> int:
    """How many parts the mesh a train step is traced under (`jax.set_mesh`) splits a dimension named `name`
    into, through the table; 1 outside such a step."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape.get(axis, 1) for axis in rule_axes(name))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their leading axis over every data-parallel device (data x fsdp)."""
    axes = tuple(a for a in rule_axes("batch") if mesh.shape.get(a, 1) > 1)
    return NamedSharding(mesh, PartitionSpec(axes or None))
