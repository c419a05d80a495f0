"""Device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state
sharded), `tensor` (heads / MLP / vocab split). Axes are `AxisType.Auto` on purpose: the Flax
modules annotate parameters and a few activations with logical names and leave the rest to
XLA's sharding propagation, which is what Auto axes provide (Explicit axes would require a
sharding in every op's type).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dhara_jax.config import MeshConfig
from dhara_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes batch rows are cut over

# Logical axis -> mesh axes. Parameters: `embed` rows are FSDP-sharded, head / MLP / vocab
# columns tensor-sharded. Activations: batch over data × fsdp, everything else replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", None),
    ("positions", None),
    ("norm", None),
    ("head_dim", None),
    ("conv_kernel", None),
    ("canon_channels", None),  # Canon weights are tiny (K × C): replicated
)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"mesh: fsdp × tensor × data = {known} does not divide the "
                        f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) > len(devices):
    raise ConfigError(f"mesh: data × fsdp × tensor = {math.prod(sizes)} but there are only "
                      f"{len(devices)} devices")
  if math.prod(sizes) < len(devices):  # an explicit smaller mesh: use the first devices
    logging.getLogger(__name__).warning("mesh uses %d of %d devices", math.prod(sizes),
                                        len(devices))
    devices = devices[:math.prod(sizes)]
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def spec_for(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Maps logical names to mesh axes, dropping any mesh axis that does not divide its dim
  (e.g. 4 KV heads on an 8-way tensor axis stay replicated) or is already used."""
  rules = dict(LOGICAL_RULES)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for axis in axes:
      size = mesh.shape[axis]
      split = size * math.prod(mesh.shape[a] for a in kept)
      if axis not in used and size > 1 and dim % split == 0:
        kept.append(axis)
    used.update(kept)
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data × fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
  """How many pieces `batch_sharding` cuts the batch into (data × fsdp)."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_rows_per_process(mesh: Mesh) -> None:
  """Each process of a job feeds its own rows of every batch, so each batch shard (one
  data × fsdp position) must lie on the devices of one process: a `tensor` axis (or any
  placement) that puts one shard on devices of several processes is refused in one line."""
  processes = jax.process_count()
  if processes == 1:
    return
  owners = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(
      -1, mesh.shape["tensor"])
  if (owners != owners[:, :1]).any():
    sizes = " × ".join(f"{axis}={mesh.shape[axis]}" for axis in MESH_AXES)
    raise ConfigError(
        f"mesh: {sizes} puts a batch shard on devices of several of the {processes} processes "
        f"(each process feeds its own rows); keep tensor within one process's "
        f"{jax.local_device_count()} devices and make data × fsdp a multiple of {processes}, "
        f"e.g. mesh.data={processes} mesh.tensor={jax.local_device_count()}")


def per_batch_shard(fn: Callable[..., jax.Array],
                    split: Sequence[bool]) -> Callable[..., jax.Array]:
  """`fn` run on each batch shard in `shard_map` when the current mesh has more than one
  device, for kernels XLA cannot partition (Pallas calls). Arguments whose `split` is True are
  cut by rows over data × fsdp, the others replicated; the output is cut by rows."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn
  rows = PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None)
  # check_vma=False: pallas_call outputs carry no varying-axes annotation.
  in_specs = tuple(rows if cut else PartitionSpec() for cut in split)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)


def axis_rules() -> Any:
  """Context manager that activates LOGICAL_RULES for `nn.with_logical_constraint`."""
  return nn.logical_axis_rules(LOGICAL_RULES)
