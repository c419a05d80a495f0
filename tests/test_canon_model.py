"""Canon layers inside the decoder: placement, counts, causality, packing, export."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import logits_before_after_change, random_params, tiny_config

from dhara_jax import config
from dhara_jax.config import FAMILIES
from dhara_jax.errors import ConfigError
from dhara_jax.export import export_hf, import_hf, uses_custom_code
from dhara_jax.export.parity import load_torch_model, torch_logits
from dhara_jax.model import forward, init_params
from dhara_jax.model.canon import Canon
from dhara_jax.params import count_params

RNG = np.random.default_rng(0)
# Canon D needs a dense MLP, so the MoE family takes A, B and C.
CANON_SETS = {family: "ABC" if family == "moe" else "ABCD" for family in FAMILIES}


def test_dhara_70m_counts():
  counts = count_params(config.load("configs/models/dhara_70m.yaml").model)
  assert abs(counts["total"] - 71.34e6) <= 0.01e6
  assert counts["canon"] == 98_304  # 32 layers × (A: 384·4 + C: 384·4)


def test_dhara_250m_ar_base_abcd_canon_count():
  """32 layers, d 768, FF 2176, 12 heads / 4 KV heads of 64: A d·4 + B (q+k+v)·4 + C d·4 +
  D ff·4 per layer = 638,976 (the model card's figure)."""
  cfg = config.load("llama3", ["model.num_layers=32", "model.d_model=768", "model.mlp_dim=2176",
                               "model.num_heads=12", "model.num_kv_heads=4",
                               "model.vocab_size=49152", "model.canon_set=ABCD"]).model
  assert count_params(cfg)["canon"] == 638_976


def test_canon_params_sit_at_their_positions():
  cfg = tiny_config("llama3", "model.canon_set=ABCD")
  layer = init_params(cfg, jax.random.key(0))["layers_0"]
  k, d = cfg.canon_kernel, cfg.d_model
  assert layer["canon_a"]["kernel"].shape == (k, d)
  assert layer["attn"]["canon_b"]["kernel"].shape == (
      k, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.resolved_head_dim)
  assert layer["canon_c"]["kernel"].shape == (k, d)
  assert layer["mlp"]["canon_d"]["kernel"].shape == (k, cfg.mlp_dim)
  bound = 1 / np.sqrt(k)  # PyTorch Conv1d default init
  assert np.all(np.abs(np.asarray(layer["canon_a"]["kernel"])) <= bound)
  assert np.std(np.asarray(layer["mlp"]["canon_d"]["kernel"])) > 0.3 * bound


def test_canon_layer_semantics():
  cfg = tiny_config("llama3", "model.canon_set=A", "model.canon_kernel=3")
  canon = Canon(cfg)
  h = jnp.asarray(RNG.standard_normal((1, 6, 4)), jnp.float32)
  seg = jnp.array([[1, 1, 1, 2, 2, 2]])
  params = nn.meta.unbox(canon.init(jax.random.key(0), h, seg))
  w = np.asarray(params["params"]["kernel"])
  out = np.asarray(canon.apply(params, h, seg))
  x = np.asarray(h)[0]
  # t = 2: residual + w[2]·x2 + w[1]·x1 + w[0]·x0 ; t = 3 starts a new document: only its own tap.
  np.testing.assert_allclose(out[0, 2], x[2] + w[2] * x[2] + w[1] * x[1] + w[0] * x[0], atol=1e-6)
  np.testing.assert_allclose(out[0, 3], x[3] + w[2] * x[3], atol=1e-6)
  no_residual = Canon(tiny_config("llama3", "model.canon_set=A", "model.canon_kernel=3",
                                  "model.canon_residual=false"))
  np.testing.assert_allclose(np.asarray(no_residual.apply(params, h, seg)), out - np.asarray(h),
                             atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_canon_packed_documents_equal_separate_runs(family):
  cfg = tiny_config(family, f"model.canon_set={CANON_SETS[family]}")
  params = random_params(cfg)
  doc_a, doc_b = RNG.integers(0, cfg.vocab_size, 6), RNG.integers(0, cfg.vocab_size, 7)
  packed, _ = forward(cfg, params, np.concatenate([doc_a, doc_b])[None],
                      np.array([[1] * 6 + [2] * 7]))
  np.testing.assert_allclose(packed[0, :6], forward(cfg, params, doc_a[None])[0][0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 6:], forward(cfg, params, doc_b[None])[0][0], atol=1e-5)


def test_canon_stays_causal_in_bidirectional_mode():
  """With attention bidirectional, a model whose only token mixing is Canon must stay causal:
  one short-conv layer (no attention, so nothing else mixes tokens) with Canon A/B/C/D."""
  cfg = tiny_config("lfm2", "model.layer_pattern=C", "model.num_layers=1",
                    "model.canon_set=ABCD", "model.attention=bidirectional")
  a, b = logits_before_after_change(cfg, random_params(cfg),
                                    RNG.integers(0, cfg.vocab_size, (1, 9)), position=6)
  np.testing.assert_allclose(a[0, :6], b[0, :6], atol=1e-6)
  assert np.max(np.abs(a[0, 6:] - b[0, 6:])) > 1e-4


@pytest.mark.parametrize("overrides,field", [
    (["model.canon_set=AE"], "model.canon_set"),
    (["model.canon_set=AA"], "model.canon_set"),
    (["model.canon_kernel=0"], "model.canon_kernel"),
])
def test_bad_canon_settings(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    config.load("llama3", overrides)


def test_moe_rejects_canon_d():
  with pytest.raises(ConfigError, match="model.canon_set"):
    config.load("moe", ["model.canon_set=D"])


@pytest.fixture(scope="module", params=FAMILIES)
def canon_export(request, tmp_path_factory):
  family = request.param
  cfg = tiny_config(family, f"model.canon_set={CANON_SETS[family]}")
  params = random_params(cfg, seed=7)
  out = export_hf(cfg, params, tmp_path_factory.mktemp(f"canon_{family}"))
  return cfg, params, out, load_torch_model(out)


def test_canon_export_uses_custom_code_and_matches(canon_export):
  cfg, params, out, model = canon_export
  assert uses_custom_code(cfg)
  assert (out / "modeling_dhara.py").is_file() and (out / "configuration_dhara.py").is_file()
  assert type(model).__name__ == "DharaForCausalLM"
  tokens = RNG.integers(0, cfg.vocab_size, (2, 13))
  mask = np.ones((2, 13), np.int64)
  mask[1, 9:] = 0  # right padding
  ours = np.asarray(forward(cfg, params, tokens, mask.astype(np.int32))[0])
  theirs = torch_logits(model, tokens, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)


def test_canon_import_is_bit_identical(canon_export):
  cfg, params, out, _ = canon_export
  cfg_back, params_back = import_hf(out)
  assert cfg_back == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
    assert np.array_equal(np.asarray(a), b)


def test_kernel_choices_are_not_exported():
  """config.json carries the architecture only: the PyTorch model has its own kernels, and an
  import runs on whatever the importing machine picks."""
  from dhara_jax.config import RUNTIME_FIELDS, architecture
  from dhara_jax.export.custom import config_from_json, config_json

  cfg = tiny_config("llama3", "model.canon_set=AC", "model.canon_impl=xla",
                    "model.attention_impl=pallas_gpu")
  written = config_json(cfg)
  assert not set(RUNTIME_FIELDS) & set(written["dhara_fields"])
  back = config_from_json(written)
  assert architecture(back) == architecture(cfg)
  assert (back.canon_impl, back.attention_impl) == ("auto", "auto")


def test_dhara_70m_exports_with_custom_code(tmp_path):
  """The real preset (at 2 layers to stay fast) exports and matches through trust_remote_code."""
  cfg = config.load("configs/models/dhara_70m.yaml", ["model.num_layers=2",
                                                      "model.vocab_size=512",
                                                      "model.mask_token_id=500"]).model
  params = random_params(cfg)
  model = load_torch_model(export_hf(cfg, params, tmp_path))
  tokens = RNG.integers(0, cfg.vocab_size, (1, 16))
  np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens)[0]),
                             torch_logits(model, tokens), atol=1e-4, rtol=0)


KERNEL_IMPLS = ["reference", "xla", "pallas_tpu", "pallas_gpu"]


def _sgd_losses(cfg, params, tokens, seg, steps=3, lr=0.5):
  def loss_fn(p):
    logits, _ = forward(cfg, p, tokens, seg)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1))

  step = jax.jit(jax.value_and_grad(loss_fn))
  losses = []
  for _ in range(steps):
    loss, grads = step(params)
    # Wait before dispatching more work: the TPU interpreter's callbacks run JAX ops on the same
    # CPU stream, and an op queued behind the running step would deadlock with them.
    jax.block_until_ready(grads)
    losses.append(float(loss))
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return np.array(losses)


def test_canon_abcd_trains_identically_with_every_kernel(interpret_pallas):
  tokens = RNG.integers(0, 128, (2, 24))
  seg = np.array([[1] * 24, [1] * 10 + [2] * 14])
  base = tiny_config("llama3", "model.canon_set=ABCD", "model.canon_impl=reference")
  params = random_params(base)
  expected = _sgd_losses(base, params, tokens, seg)
  assert expected[-1] < expected[0]  # it is training
  for impl in KERNEL_IMPLS[1:]:
    cfg = tiny_config("llama3", "model.canon_set=ABCD", f"model.canon_impl={impl}")
    np.testing.assert_allclose(_sgd_losses(cfg, params, tokens, seg), expected, rtol=1e-5,
                               err_msg=impl)


# pallas_tpu is not in this list: its interpreter simulates the 8 devices' barriers with
# callbacks that dispatch JAX ops, which deadlock against the test's own ops on this 2-core CPU.
# The shard_map wrapping under test is the same code path for every non-reference kernel, and
# pallas_tpu's values and gradients are checked on one device above and in
# tests/test_canon_kernels.py.
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas_gpu"])
def test_canon_gradients_on_a_mesh_equal_single_device(impl, interpret_pallas):
  """Guards the shard_map around non-reference kernels: without it, Pallas cannot be
  partitioned and XLA's partitioner doubled the grouped-conv weight gradient."""
  from dhara_jax.config import MeshConfig
  from dhara_jax.model import param_shardings
  from dhara_jax.sharding import axis_rules, make_mesh

  cfg = tiny_config("llama3", "model.canon_set=ABCD", f"model.canon_impl={impl}")
  reference = tiny_config("llama3", "model.canon_set=ABCD", "model.canon_impl=reference")
  params = random_params(cfg)
  tokens = RNG.integers(0, cfg.vocab_size, (8, 16))
  seg = np.repeat(np.array([[1] * 9 + [2] * 7]), 8, axis=0)

  def loss_fn(model_cfg, p):
    return jnp.mean(forward(model_cfg, p, tokens, seg)[0] ** 2)

  expected = jax.jit(jax.grad(functools.partial(loss_fn, reference)))(params)
  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  shardings = param_shardings(cfg, mesh)
  with jax.set_mesh(mesh), axis_rules():
    got = jax.jit(jax.grad(functools.partial(loss_fn, cfg)), in_shardings=(shardings,))(
        jax.device_put(params, shardings))
    jax.block_until_ready(got)  # see _sgd_losses: no work queued behind interpreter callbacks
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))))
