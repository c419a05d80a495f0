"""Train state, the sharded train step and the held-out eval step.

The state is a plain dict {params, opt_state, step, rng}: parameters and AdamW moments in
float32 (the model computes in `model.dtype`), sharded by the logical rules; `rng` is the run's
PRNG key (raw key data, replicated), split once per step and checkpointed with the rest, so an
objective that draws randomness (the diffusion objective's masks) resumes exactly. One
`jax.jit` per step function, with explicit in/out shardings; the train step donates the old
state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dhara_jax import objectives
from dhara_jax.config import Config
from dhara_jax.model import init_params, param_shapes, param_shardings
from dhara_jax.objectives import add_draws
from dhara_jax.optim import learning_rate, optimizer
from dhara_jax.phases import Phase, run_phase
from dhara_jax.sharding import axis_rules, batch_shards, batch_sharding

State = dict[str, Any]
Batch = dict[str, jax.Array]
EVAL_SEED = 20_231  # held-out diffusion masks: the same in every evaluation of every run


def state_shardings(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation) -> State:
  """Shardings of the whole state: optimizer moments follow their parameters."""
  params = param_shardings(cfg.model, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, param_shapes(cfg.model))
  opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt,
                              params, transform_non_params=lambda _: replicated,
                              is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"params": params, "opt_state": opt, "step": replicated, "rng": replicated}


def fresh_state(cfg: Config, tx: optax.GradientTransformation, key: jax.Array) -> State:
  return _state_of(init_params(cfg.model, key), tx, key)


def _state_of(params: Any, tx: optax.GradientTransformation, key: jax.Array) -> State:
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.fold_in(key, 1))}  # a stream apart from init's


def _rest_of_state(tx: optax.GradientTransformation, params: Any, key: jax.Array) -> State:
  state = _state_of(params, tx, key)
  del state["params"]
  return state


def abstract_state(cfg: Config, tx: optax.GradientTransformation, shardings: State) -> State:
  """ShapeDtypeStructs of the state in `shardings`: the target of a restore on any mesh."""
  shapes = jax.eval_shape(lambda params: _state_of(params, tx, jax.random.key(0)),
                          param_shapes(cfg.model))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def init_state(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation, shardings: State,
               params: Any | None = None) -> State:
  """The state of step 0, created directly in its shardings (no full copy on one device): a
  random init, or starting `params` already in their shardings (an import, a conversion's AR
  weights) with the optimizer state, step and rng a random init would have. Given `params`, no
  random init is made only to be thrown away: for SmolLM2's 135M parameters that init was a
  20-second compile."""
  key = jax.random.key(cfg.train.seed)
  with jax.set_mesh(mesh), axis_rules():
    if params is None:
      return jax.jit(functools.partial(fresh_state, cfg, tx), out_shardings=shardings)(key)
    rest = {name: sharding for name, sharding in shardings.items() if name != "params"}
    return {"params": params,
            **jax.jit(functools.partial(_rest_of_state, tx), out_shardings=rest)(params, key)}


def loss_sum(cfg: Config, params: Any, batch: Batch, batch_shards: int = 1,
             phase: Phase | None = None, noise_rng: jax.Array | None = None
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(loss sum + aux, (loss sum, token count)) for one microbatch spread over `batch_shards`
  devices (the batch carries its diffusion masks: `objectives.add_draws`)."""
  total, count, aux = objectives.loss_sum(cfg, phase or run_phase(cfg), params, batch,
                                      batch_shards, noise_rng)
  # The auxiliary (MoE balance) loss is per microbatch; weight it by the tokens it saw so that
  # the final division by the batch's token count leaves it at its configured weight.
  return total + aux * count, (total, count)


def make_train_step(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation,
                    shardings: State, phase: Phase | None = None
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
  """jit(step) over the mesh for `phase` (default: the run's objective): grad accumulation over
  `train.grad_accum` microbatches, one normalisation by the batch's token count, clipping +
  AdamW, metrics."""
  phase = phase or run_phase(cfg)
  accum = cfg.train.grad_accum
  schedule = learning_rate(cfg.train)
  shards = batch_shards(mesh)

  def split_microbatches(x: jax.Array) -> jax.Array:
    """(B, ...) → (accum, B/accum, ...) taking every device's local rows in equal parts, so
    each microbatch stays spread over all batch shards (no data movement)."""
    if x.shape[0] % (shards * accum):
      return x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
    local = x.shape[0] // shards
    x = x.reshape(shards, accum, local // accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(accum, x.shape[0] * x.shape[2], *x.shape[3:])

  def step(state: State, batch: Batch) -> tuple[State, dict]:
    params = state["params"]
    # Each step splits off one key for its objective (the AR loss draws nothing): the masks,
    # drawn for the whole batch so that accumulation equals one big batch, and the noise.
    step_rng, next_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    draw_rng, noise_rng = jax.random.split(step_rng)
    micro = jax.tree.map(split_microbatches, add_draws(cfg.model, phase, draw_rng, batch))
    grad_fn = jax.grad(functools.partial(loss_sum, cfg, batch_shards=shards, phase=phase,
                                         noise_rng=noise_rng), has_aux=True)

    def accumulate(carry, microbatch):
      grads, total, count = carry
      g, (t, c) = grad_fn(params, microbatch)
      return (jax.tree.map(jnp.add, grads, g), total + t, count + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, total, count), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.key_data(next_rng)}
    # param_norm lets the loop refuse to checkpoint a state that overflowed in this update.
    metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params), "lr": schedule(state["step"]),
               "tokens": count}
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  return _under_mesh(jitted, mesh)


def make_eval_step(cfg: Config, mesh: Mesh, shardings: State, phase: Phase | None = None
                   ) -> Callable[[Any, Batch, int], dict]:
  """jit(params, batch, index) → {loss sum, token count} of `phase`'s objective on held-out
  data. Diffusion masks come from a fixed key per held-out batch `index`, so an evaluation is
  comparable across steps and runs."""
  phase = phase or run_phase(cfg)
  shards = batch_shards(mesh)

  def evaluate(params: Any, batch: Batch, index: jax.Array) -> dict:
    rng = jax.random.fold_in(jax.random.key(EVAL_SEED), index)
    batch = add_draws(cfg.model, phase, rng, batch)
    _, (total, count) = loss_sum(cfg, params, batch, shards, phase)
    return {"loss_sum": total, "tokens": count}

  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(evaluate, in_shardings=(shardings["params"], batch_sharding(mesh),
                                           replicated), out_shardings=replicated)
  return _under_mesh(jitted, mesh)


def _under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """Calls fn with the mesh and logical rules active (for the modules' sharding constraints)."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.set_mesh(mesh), axis_rules():
      return fn(*args)
  return wrapped


def build(cfg: Config, mesh: Mesh) -> tuple[optax.GradientTransformation, State]:
  tx = optimizer(cfg.train)
  return tx, state_shardings(cfg, mesh, tx)
