import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from tiny import random_params, tiny_config

from dhara_jax.config import FAMILIES, MeshConfig
from dhara_jax.errors import ConfigError
from dhara_jax.model import forward, param_shardings
from dhara_jax.sharding import axis_rules, batch_sharding, make_mesh, spec_for


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_mesh_resolves_minus_one_and_rejects_bad_products():
  mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ConfigError, match="mesh"):
    make_mesh(MeshConfig(data=3, fsdp=3, tensor=1))
  assert make_mesh(MeshConfig(data=1, fsdp=2, tensor=1)).size == 2  # a smaller explicit mesh
  with pytest.raises(ConfigError, match="mesh"):
    make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))


def test_spec_drops_axes_that_do_not_divide():
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
  assert spec_for(P("embed", "kv_heads"), (64, 8), mesh) == P("fsdp", "tensor")
  assert spec_for(P("embed", "kv_heads"), (63, 6), mesh) == P(None, None)
  assert spec_for(P("batch", None), (8, 3), mesh) == P("fsdp", None)


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_forward_equals_single_device(family):
  cfg = tiny_config(family)
  params = random_params(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
  seg = np.repeat(np.array([[1] * 10 + [2] * 6]), 8, axis=0).astype(np.int32)
  expected, expected_aux = jax.jit(forward, static_argnums=0)(cfg, params, tokens, seg)

  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  shardings = param_shardings(cfg, mesh)
  batch = batch_sharding(mesh)
  with jax.set_mesh(mesh), axis_rules():
    sharded = jax.device_put(params, shardings)
    fn = jax.jit(functools.partial(forward, cfg), in_shardings=(shardings, batch, batch),
                 out_shardings=(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")),
                                NamedSharding(mesh, P())))
    logits, aux = fn(sharded, tokens, seg)
  # Parameters really are split: the token table over tensor (vocab) × fsdp (embed).
  assert sharded["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert len(logits.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(aux), float(expected_aux), atol=1e-6)
