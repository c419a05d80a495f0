"""PyTorch twin of the dhara-jax decoder, for checkpoints no stock transformers class can express
(Canon layers, bidirectional/diffusion attention, unusual mixes of switches).

Module and parameter names mirror the JAX parameter tree (`layers.3.attn.q.weight` is
`layers_3/attn/q/kernel` transposed), so the exporter's mapping is mechanical. Padding
(attention_mask 0) and packed documents (`segment_ids`, 0 = padding, documents 1, 2, ...) behave
as in JAX: tokens see only their own segment, positions restart at each segment, and convolution
taps never cross a segment boundary.

Three ways to run the decoder, as in JAX (dhara_jax/model):
- the plain forward over one stream (causal, or bidirectional for `attention: bidirectional`);
- block-diffusion mode (`block_size` > 0; the default of configs with `objective: block`, the
  model's trained forward): input_ids are the row [x_t ; x_0] (B×2L), attention_mask /
  segment_ids / position_ids are x_0's (B×L), and the output covers all 2L rows. x_t block k
  sees x_t block k and x_0 blocks < k; x_0 block k sees x_0 blocks ≤ k; Canon and short-conv
  taps of x_t that fall into an earlier block read x_0 there;
- cached (`cache`, a `DharaCache`): input_ids are the new tokens, attention_mask covers every
  slot (cached ones and new ones); attention is block-causal over `chunk_block` slots (1: causal),
  and the first `commit` new tokens are kept in the cache (keys, values, conv inputs). This is
  the AR KV cache of `generate()` and the exact block cache of the block-diffusion sampler.

Classes (config.json's `auto_map` names them):
- `DharaModel` (AutoModel): the bare decoder; `last_hidden_state` is after the final norm.
- `DharaForCausalLM` (AutoModelForCausalLM, AR-trained configs): next-token LM; `generate()` is
  KV-cached (`DharaCache`).
- `DharaForMaskedDiffusion` (AutoModelForCausalLM, configs trained with `objective: mdm` or
  `block`): a masked diffusion LM (LLaDA/MDLM, or BD3LM block diffusion). Same weights and
  forward as DharaForCausalLM; its `generate` is a diffusion sampler. See its docstring for the
  mask token, the label alignment and the samplers.

Label alignment (config.json `label_alignment: "next_token"`, for every class): the logits at
position i predict the token at position i + 1, as in an AR model (and as Dream / Fast-dLLM v2
do), so a model converted from AR keeps its head's meaning. A masked token at position j is read
from the logits at j - 1; the first token of each document is never masked.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput

from .configuration_dhara import DharaConfig


def resolve_segment_ids(input_ids, attention_mask, segment_ids):
  """Segment ids with padding as 0: given ones (padding where attention_mask is 0 as well),
  else the attention mask (one document per row), else all ones."""
  if segment_ids is None:
    return (torch.ones_like(input_ids) if attention_mask is None
            else attention_mask.to(input_ids.dtype))
  if attention_mask is not None:
    segment_ids = segment_ids * attention_mask.to(segment_ids.dtype)
  return segment_ids


def segment_positions(segment_ids):
  index = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
  starts = torch.ones_like(segment_ids, dtype=torch.bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  start_index = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
  return index - start_index


def shift_right(x, shift):
  """x[:, t - shift] along dim 1, zeros where t < shift."""
  out = torch.zeros_like(x)
  if shift < x.shape[1]:
    out[:, shift:] = x[:, :x.shape[1] - shift]
  return out


def causal_depthwise_conv(x, kernel, segment_ids):
  """out[t] = sum_j kernel[K-1-j] * x[t-j] over taps inside the token's own segment."""
  taps = kernel.shape[0]
  out = x * kernel[taps - 1]
  for back in range(1, taps):
    same = (shift_right(segment_ids, back) == segment_ids).unsqueeze(-1).to(x.dtype)
    out = out + shift_right(x, back) * same * kernel[taps - 1 - back]
  return out


def block_diffusion_conv(x, kernel, segment_ids, block_size):
  """The causal conv over [x_t ; x_0] (B×2L×C, segment ids x_0's B×L): x_0 gets the ordinary
  conv; an x_t tap inside the output's block reads x_t, one in an earlier block reads x_0 there.
  With `block_size` 0, x is one stream."""
  if not block_size:
    return causal_depthwise_conv(x, kernel, segment_ids)
  length = segment_ids.shape[1]
  x_t, x_0 = x[:, :length], x[:, length:]
  block = torch.arange(length, device=x.device) // block_size
  taps = kernel.shape[0]
  noisy = x_t * kernel[taps - 1]
  for back in range(1, taps):
    same = (shift_right(segment_ids, back) == segment_ids).unsqueeze(-1).to(x.dtype)
    same_block = torch.zeros_like(block, dtype=torch.bool)
    same_block[back:] = block[back:] == block[:-back]
    source = torch.where(same_block[None, :, None], shift_right(x_t, back), shift_right(x_0, back))
    noisy = noisy + source * same * kernel[taps - 1 - back]
  return torch.cat([noisy, causal_depthwise_conv(x_0, kernel, segment_ids)], dim=1)


class DharaCache:
  """The twin's generation cache: per attention layer its keys and values (B×T×G×K, after RoPE),
  per convolution (Canon, short conv) its last K−1 inputs. `length` slots T are committed.
  `generate()` makes one for AR configs; the block-diffusion sampler makes its own."""

  def __init__(self):
    self.keys, self.values, self.tails = {}, {}, {}
    self.length = 0

  def get_seq_length(self, layer_idx=0):
    return self.length

  def attend(self, layer, k, v, commit):
    """(keys, values) over the cached slots and this chunk; the first `commit` are kept."""
    if layer in self.keys:
      k, v = torch.cat([self.keys[layer], k], dim=1), torch.cat([self.values[layer], v], dim=1)
    self.keys[layer], self.values[layer] = k[:, :self.length + commit], v[:, :self.length + commit]
    return k, v

  def conv(self, layer, x, kernel, commit):
    """The causal conv of a chunk (padding zeroed) whose taps before it read the K−1 cached
    inputs; those then move to the K−1 inputs before the chunk's `commit`-th token."""
    taps = kernel.shape[0] - 1
    tail = self.tails.get(layer)
    if tail is None:
      tail = x.new_zeros(x.shape[0], taps, x.shape[2])
    full = torch.cat([tail, x], dim=1)
    self.tails[layer] = full[:, commit:commit + taps]
    # Each output's K inputs (a view, B×n×C×K) against the taps: out[t] = Σ_j w[K-1-j] x[t-j].
    return (full.unfold(1, taps + 1, 1) * kernel.t()).sum(-1)

  def reorder_cache(self, beam_idx):
    for store in (self.keys, self.values, self.tails):
      for key, value in store.items():
        store[key] = value.index_select(0, beam_idx.to(value.device))


class Context:
  """What the layers of one forward read besides their hidden states: the segment ids of the
  stream (x_0's in block mode), the block size (> 0: the row is [x_t ; x_0]), and in cached
  mode the cache, the tokens to commit and which new tokens are real."""

  def __init__(self, segment_ids, block_size=0, cache=None, commit=0, real=None):
    self.segment_ids, self.block_size = segment_ids, block_size
    self.cache, self.commit, self.real = cache, commit, real
    self.angles = {}  # (head dim, theta) -> RoPE's (cos, sin), shared by the layers using it

  def rope(self, positions, dim, theta):
    if (dim, theta) not in self.angles:
      self.angles[dim, theta] = rope_angles(positions, dim, theta)
    return self.angles[dim, theta]

  def conv(self, layer, x, kernel):
    if self.cache is None:
      return block_diffusion_conv(x, kernel, self.segment_ids, self.block_size)
    return self.cache.conv(layer, x * self.real.unsqueeze(-1).to(x.dtype), kernel, self.commit)

  def keys_values(self, layer, k, v):
    return (k, v) if self.cache is None else self.cache.attend(layer, k, v, self.commit)


def gelu_tanh(x):
  return F.gelu(x, approximate="tanh")


class DharaNorm(nn.Module):
  def __init__(self, dim, config):
    super().__init__()
    self.kind, self.eps, self.unit_offset = config.norm, config.norm_eps, config.norm_unit_offset
    self.weight = nn.Parameter(torch.zeros(dim) if self.unit_offset else torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim)) if self.kind == "layernorm" else None

  def forward(self, x):
    h = x.float()
    if self.kind == "layernorm":
      h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    h = h * ((1.0 + self.weight.float()) if self.unit_offset else self.weight.float())
    if self.bias is not None:
      h = h + self.bias.float()
    return h.to(x.dtype)


class DharaCanon(nn.Module):
  """h + causal depthwise conv(h) (PhysicsLM4 Canon layer); `kernel` is (K, channels)."""

  def __init__(self, channels, config):
    super().__init__()
    self.config = config
    bound = 1.0 / math.sqrt(config.canon_kernel)
    self.kernel = nn.Parameter(torch.empty(config.canon_kernel, channels).uniform_(-bound, bound))
    self.bias = nn.Parameter(torch.zeros(channels)) if config.canon_bias else None

  def forward(self, h, ctx):
    y = ctx.conv(self, h, self.kernel.to(h.dtype))
    if self.bias is not None:
      y = y + self.bias.to(h.dtype)
    if self.config.canon_activation:
      y = F.silu(y)
    return h + y if self.config.canon_residual else y


def maybe_canon(module, h, ctx):
  return h if module is None else module(h, ctx)


def canon_or_none(position, channels, config):
  return DharaCanon(channels, config) if position in config.canon_set else None


def linear(in_features, out_features, config):
  return nn.Linear(in_features, out_features, bias=config.use_bias)


def rope_angles(positions, dim, theta):
  """(cos, sin), each (B, L, 1, K/2) in float32: the rotation of every position."""
  inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                           device=positions.device) / dim))
  angles = positions[..., None].float() * inv_freq
  return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x, cos, sin):
  """Rotate-half RoPE on x (B, L, H, K) in float32."""
  x1, x2 = x.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class DharaAttention(nn.Module):
  def __init__(self, config, rope_theta):
    super().__init__()
    self.config, self.rope_theta = config, rope_theta
    self.heads, self.kv_heads = config.num_heads, config.num_kv_heads
    self.head_dim = config.resolved_head_dim
    d = config.d_model
    self.q = linear(d, self.heads * self.head_dim, config)
    self.k = linear(d, self.kv_heads * self.head_dim, config)
    self.v = linear(d, self.kv_heads * self.head_dim, config)
    self.o = linear(self.heads * self.head_dim, d, config)
    if config.qk_norm:
      self.q_norm = DharaNorm(self.head_dim, config)
      self.k_norm = DharaNorm(self.head_dim, config)
    self.canon_b = canon_or_none("B", (self.heads + 2 * self.kv_heads) * self.head_dim, config)

  def forward(self, x, positions, mask, ctx):
    batch, length, _ = x.shape
    q = self.q(x).view(batch, length, self.heads, self.head_dim)
    k = self.k(x).view(batch, length, self.kv_heads, self.head_dim)
    v = self.v(x).view(batch, length, self.kv_heads, self.head_dim)
    if self.config.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.canon_b is not None:
      qkv = torch.cat([t.reshape(batch, length, -1) for t in (q, k, v)], dim=-1)
      q, k, v = self.canon_b(qkv, ctx).split(
          [self.heads * self.head_dim, self.kv_heads * self.head_dim,
           self.kv_heads * self.head_dim], dim=-1)
      q = q.reshape(batch, length, self.heads, self.head_dim)
      k = k.reshape(batch, length, self.kv_heads, self.head_dim)
      v = v.reshape(batch, length, self.kv_heads, self.head_dim)
    if self.config.position == "rope":
      cos, sin = ctx.rope(positions, self.head_dim, self.rope_theta)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = ctx.keys_values(self, k, v)
    group = self.heads // self.kv_heads
    q = q.transpose(1, 2)                                   # B, H, L, K
    k = k.transpose(1, 2).repeat_interleave(group, dim=1)
    v = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scale = (self.config.query_scale_dim or self.head_dim) ** -0.5
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float()
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, -1)
    return self.o(out)


class DharaShortConv(nn.Module):
  """LFM2 gated short convolution: (B, C, x) = in_proj(h); out_proj(C * conv(B * x))."""

  def __init__(self, config):
    super().__init__()
    d = config.d_model
    self.in_proj = linear(d, 3 * d, config)
    self.out_proj = linear(d, d, config)
    bound = 1.0 / math.sqrt(config.conv_kernel)
    self.conv = nn.Parameter(torch.empty(config.conv_kernel, d).uniform_(-bound, bound))
    self.canon_b = canon_or_none("B", 3 * d, config)

  def forward(self, x, ctx):
    bcx = maybe_canon(self.canon_b, self.in_proj(x), ctx)
    b, c, h = bcx.chunk(3, dim=-1)
    return self.out_proj(c * ctx.conv(self, b * h, self.conv.to(x.dtype)))


class DharaMlp(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.config = config
    d, f = config.d_model, config.mlp_dim
    self.up = linear(d, f, config)
    self.gate = linear(d, f, config) if config.mlp != "gelu" else None
    self.down = linear(f, d, config)
    self.act = F.silu if config.mlp == "swiglu" else gelu_tanh
    self.canon_d = canon_or_none("D", f, config)

  def forward(self, x, ctx):
    up = self.up(x)
    h = self.act(up) if self.gate is None else self.act(self.gate(x)) * up
    return self.down(maybe_canon(self.canon_d, h, ctx))


class DharaMoe(nn.Module):
  """Top-k softmax router over gated experts; weights stored as stacked (E, in, out) tensors."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    e, d, f = config.num_experts, config.d_model, config.moe_mlp_dim
    self.router = nn.Parameter(torch.zeros(d, e))
    self.gate = nn.Parameter(torch.zeros(e, d, f))
    self.up = nn.Parameter(torch.zeros(e, d, f))
    self.down = nn.Parameter(torch.zeros(e, f, d))
    self.act = F.silu if config.mlp == "swiglu" else gelu_tanh

  def forward(self, x, ctx):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    probs = torch.softmax(x.float() @ self.router.float(), dim=-1)
    weights, experts = probs.topk(self.config.experts_per_token, dim=-1)
    if self.config.moe_norm_topk:
      weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(self.config.num_experts):
      token, slot = torch.where(experts == e)
      if token.numel():
        h = self.act(x[token] @ self.gate[e]) * (x[token] @ self.up[e])
        out.index_add_(0, token, (h @ self.down[e]) * weights[token, slot, None].to(x.dtype))
    return out.reshape(shape)


class DharaBlock(nn.Module):
  def __init__(self, config, layer_idx):
    super().__init__()
    self.config, self.kind = config, config.layer_kind(layer_idx)
    d = config.d_model
    self.pre_mixer_norm = DharaNorm(d, config)
    self.canon_a = canon_or_none("A", d, config)
    if self.kind == "C":
      self.conv = DharaShortConv(config)
    else:
      local_theta = config.rope_local_theta or config.rope_theta
      theta = local_theta if self.kind == "L" else config.rope_theta
      self.attn = DharaAttention(config, theta)
    self.pre_mlp_norm = DharaNorm(d, config)
    self.canon_c = canon_or_none("C", d, config)
    if config.num_experts:
      self.moe = DharaMoe(config)
    else:
      self.mlp = DharaMlp(config)
    if config.sandwich_norm:
      self.post_mixer_norm = DharaNorm(d, config)
      self.post_mlp_norm = DharaNorm(d, config)

  def forward(self, x, positions, masks, ctx):
    h = maybe_canon(self.canon_a, self.pre_mixer_norm(x), ctx)
    if self.kind == "C":
      h = self.conv(h, ctx)
    else:
      h = self.attn(h, positions, masks[self.kind], ctx)
    if self.config.sandwich_norm:
      h = self.post_mixer_norm(h)
    x = x + h
    h = maybe_canon(self.canon_c, self.pre_mlp_norm(x), ctx)
    h = self.moe(h, ctx) if self.config.num_experts else self.mlp(h, ctx)
    if self.config.sandwich_norm:
      h = self.post_mlp_norm(h)
    return x + h


def segment_mask(segment_ids, causal, window, causal_block=1):
  """Boolean B×1×L×L mask: same segment (+ causal: key block ≤ query block, blocks of
  `causal_block` slots; 1 is key ≤ query) (+ |query − key| < window)."""
  length = segment_ids.shape[1]
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  q = torch.arange(length, device=segment_ids.device)[:, None]
  k = torch.arange(length, device=segment_ids.device)[None, :]
  if causal:
    mask = mask & (k // causal_block <= q // causal_block)
  if window:
    mask = mask & ((q - k).abs() < window)
  return mask[:, None]


def block_diffusion_mask(segment_ids, block_size, window):
  """Boolean B×1×2L×2L mask over [x_t ; x_0] (segment ids x_0's, B×L): x_t block k sees x_t
  block k and x_0 blocks < k, x_0 block k sees x_0 blocks ≤ k, within the query's segment;
  with a window, |query − key| < window measured inside a half."""
  length = segment_ids.shape[1]
  both = torch.cat([segment_ids, segment_ids], dim=1)
  same = both[:, :, None] == both[:, None, :]
  index = torch.arange(2 * length, device=segment_ids.device)
  clean, row = index >= length, index % length
  block = row // block_size
  q_clean, k_clean = clean[:, None], clean[None, :]
  q_block, k_block = block[:, None], block[None, :]
  noisy_query = ~q_clean & torch.where(k_clean, k_block < q_block, k_block == q_block)
  clean_query = q_clean & k_clean & (k_block <= q_block)
  pattern = noisy_query | clean_query
  if window:
    pattern = pattern & ((row[:, None] - row[None, :]).abs() < window)
  return (same & pattern)[:, None]


def trained_objective(config):
  """The objective config.json names; exports written before it was recorded imply it by
  their attention (causal: ar, bidirectional: mdm)."""
  return getattr(config, "objective", None) or (
      "ar" if config.attention == "causal" else "mdm")


def default_block_size(config):
  """The forward a config selects: block mode at its block size if trained with `block`."""
  return getattr(config, "block_size", 0) if trained_objective(config) == "block" else 0


class DharaPreTrainedModel(PreTrainedModel):
  config_class = DharaConfig
  base_model_prefix = "model"
  _no_split_modules = ["DharaBlock"]

  def _init_weights(self, module):
    std = self.config.init_std
    if isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, std=std)
      if module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, std=std)


class DharaModel(DharaPreTrainedModel):
  def __init__(self, config):
    super().__init__(config)
    self.embed = nn.Embedding(config.vocab_size, config.d_model)
    if config.position == "learned":
      self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
    self.layers = nn.ModuleList(DharaBlock(config, i) for i in range(config.num_layers))
    self.final_norm = DharaNorm(config.d_model, config)
    self.post_init()

  def forward(self, input_ids, attention_mask=None, segment_ids=None, position_ids=None,
              block_size=None, cache=None, chunk_block=1, commit=None):
    """`block_size` (default: the config's trained forward) > 0: block-diffusion mode;
    `cache`: cached mode (module docstring)."""
    config = self.config
    if cache is not None:
      ctx, positions, masks = self._cached_inputs(input_ids, attention_mask, segment_ids,
                                                  position_ids, cache, chunk_block, commit)
    else:
      block_size = default_block_size(config) if block_size is None else block_size
      ctx, positions, masks = self._stream_inputs(input_ids, attention_mask, segment_ids,
                                                  position_ids, block_size)
    x = self.embed(input_ids)
    if config.embed_scale:
      x = x * torch.tensor(math.sqrt(config.d_model), dtype=x.dtype)
    if config.position == "learned":
      x = x + self.pos_embed(positions)
    for layer in self.layers:
      x = layer(x, positions, masks, ctx)
    if cache is not None:
      cache.length += ctx.commit
    return BaseModelOutput(last_hidden_state=self.final_norm(x))

  def _stream_inputs(self, input_ids, attention_mask, segment_ids, position_ids, block_size):
    """(context, positions, masks by layer kind) of an uncached forward."""
    config = self.config
    stream = input_ids
    if block_size:
      given = attention_mask if segment_ids is None else segment_ids
      length = input_ids.shape[1] // 2 if given is None else given.shape[1]
      if input_ids.shape[1] != 2 * length or length % block_size:
        raise ValueError(
            f"block-diffusion forward: input_ids must be the row [x_t ; x_0] (B×2L, L a "
            f"multiple of block_size {block_size}) with attention_mask / segment_ids of x_0 "
            f"(B×L); got input_ids {tuple(input_ids.shape)}"
            + ("" if given is None else f" and a mask of {tuple(given.shape)}")
            + " (block_size=0 runs the one-stream forward)")
      stream = input_ids[:, length:]
    segment_ids = resolve_segment_ids(stream, attention_mask, segment_ids)
    positions = segment_positions(segment_ids) if position_ids is None else position_ids
    if block_size:
      positions = torch.cat([positions, positions], dim=1)  # the halves share positions

      def mask(window):
        return block_diffusion_mask(segment_ids, block_size, window)
    else:
      def mask(window):
        return segment_mask(segment_ids, config.attention == "causal", window)
    masks = {"A": mask(0), "L": mask(config.sliding_window)}
    return Context(segment_ids, block_size), positions, masks

  def _cached_inputs(self, input_ids, attention_mask, segment_ids, position_ids, cache,
                     chunk_block, commit):
    """(context, positions, masks) of the new tokens against `cache`: the attention mask or
    segment ids cover every slot, cached and new; attention is block-causal over
    `chunk_block` slots whatever the config's attention (as JAX's cached decoding)."""
    config = self.config
    past, new = cache.length, input_ids.shape[1]
    slots = input_ids.new_ones(input_ids.shape[0], past + new)
    segment_ids = resolve_segment_ids(slots, attention_mask, segment_ids)
    if segment_ids.shape[1] != past + new:
      raise ValueError(f"cached forward: attention_mask / segment_ids must cover the {past} "
                       f"cached slots and the {new} new ones, got {segment_ids.shape[1]}")
    positions = segment_positions(segment_ids)[:, past:] if position_ids is None else position_ids
    masks = {kind: segment_mask(segment_ids, True, window, chunk_block)[:, :, past:]
             for kind, window in (("A", 0), ("L", config.sliding_window))}
    real = segment_ids[:, past:] > 0
    ctx = Context(segment_ids[:, past:], 0, cache, new if commit is None else commit, real)
    return ctx, positions, masks


# The diffusion samplers of DharaForMaskedDiffusion.generate. dhara_jax/sampling/diffusion.py
# has the same semantics in JAX: with greedy settings both give the same tokens, so keep the two
# in step.
SAMPLER_ARGS = ("input_ids, attention_mask, max_new_tokens, steps, block_length, remasking, "
                "threshold, temperature, mask_token_id, eos_token_id, generator, use_cache, "
                "return_stats")


def _left_padded(input_ids, real, bucket):
  """(prompts B×P, real B×P): each row's tokens last, in order (a right-padded row is rolled),
  P the longest prompt rounded up to a multiple of `bucket` (None: the input's width)."""
  order = torch.argsort(real.long(), dim=1, stable=True)
  prompt, real = input_ids.gather(1, order), real.gather(1, order)
  if bucket is None:
    return prompt, real
  width = -(-int(real.sum(1).max()) // bucket) * bucket
  extra = width - prompt.shape[1]
  if extra <= 0:
    return prompt[:, -extra:], real[:, -extra:]
  return F.pad(prompt, (extra, 0)), F.pad(real, (extra, 0))


def _transfer_schedule(block_length, steps):
  """Tokens committed at each of `steps` steps of a fully masked block: as even as possible,
  the extra ones first (LLaDA's get_num_transfer_tokens)."""
  base, rem = divmod(block_length, steps)
  return [base + 1 if t < rem else base for t in range(steps)]


def _ranks(conf):
  """rank[b, j]: slot j's place when row b is sorted by confidence, highest first. Stable, so
  ties go to the earlier slot, as in the JAX sampler."""
  order = torch.argsort(-conf, dim=1, stable=True)
  return torch.argsort(order, dim=1, stable=True)


def _candidates(pred, temperature, generator):
  """x0: the argmax token of each slot, or with temperature > 0 a Gumbel-max sample."""
  if temperature == 0:
    return pred.argmax(-1)
  u = torch.rand(pred.shape, generator=generator, device=pred.device)
  return (pred / temperature - torch.log(-torch.log(u))).argmax(-1)


def _commit(pred, tokens, mask_id, remasking, temperature, generator, n_commit=None,
            threshold=None):
  """One denoising step of a block: `tokens` (B×b) with some masked slots committed, given
  `pred` (B×b×V), each slot's prediction; the n_commit most confident ones, or (threshold)
  those with confidence ≥ τ and the best."""
  pred = pred.float().clone()
  pred[..., mask_id] = -math.inf  # committing the mask token would commit nothing
  x0 = _candidates(pred, temperature, generator)
  if remasking == "low_confidence":
    conf = torch.softmax(pred, dim=-1).gather(-1, x0[..., None])[..., 0]
  else:
    conf = torch.rand(tokens.shape, generator=generator, device=tokens.device)
  eligible = tokens == mask_id
  conf = conf.masked_fill(~eligible, -math.inf)
  rank = _ranks(conf)
  if threshold is None:
    commit = eligible & (rank < n_commit)
  else:
    commit = eligible & ((conf >= threshold) | (rank == 0))
  return torch.where(commit, x0, tokens)


class _Canvas:
  """Each step's predictions of the block at `start` from a forward over the whole canvas
  (next-token alignment: slot j is read from the logits at j - 1). `block_size` > 0: the
  block-diffusion forward over [canvas ; canvas], a block's first slot read from the clean
  stream's last position before it (as the model was trained)."""

  def __init__(self, model, attention, block_size):
    self.model, self.attention, self.block_size = model, attention, block_size

  def first(self, x, start, b):
    return self.later(x, start, b)

  def later(self, x, start, b):
    if not self.block_size:
      return self.model(x, attention_mask=self.attention).logits[:, start - 1:start - 1 + b]
    logits = self.model(torch.cat([x, x], dim=1), attention_mask=self.attention,
                        block_size=self.block_size).logits
    pred = logits[:, start - 1:start - 1 + b].clone()
    pred[:, 0] = logits[:, x.shape[1] + start - 1]
    return pred


class _BlockCache:
  """The exact block KV cache (BD3LM / SDAR commit-on-finish), as dhara's cache=block: a
  block's first step is one chunk of the clean slots not yet cached (the prompt, or the block
  before) and the masked block, block-causal; the clean part is committed to the cache and its
  last position predicts the block's first slot. Later steps run the block alone against the
  cache. Equal to `_Canvas` with the block forward on a block-trained model."""

  def __init__(self, model, attention):
    self.model, self.attention, self.cache = model, attention, DharaCache()

  def first(self, x, start, b):
    cached = self.cache.length
    logits = self.model(x[:, cached:start + b], attention_mask=self.attention[:, :start + b],
                        cache=self.cache, chunk_block=b, commit=start - cached).logits
    pred = logits[:, start - 1 - cached:start - 1 - cached + b]
    self.first_pred = pred[:, 0]
    return pred

  def later(self, x, start, b):
    logits = self.model(x[:, start:start + b], attention_mask=self.attention[:, :start + b],
                        cache=self.cache, chunk_block=b, commit=0).logits
    return torch.cat([self.first_pred[:, None], logits[:, :-1]], dim=1)


def default_block_length(config, new_tokens):
  """The trained block size, or its largest divisor of G below it; G for full-sequence models
  (dhara_jax/sampling/diffusion.py default_block)."""
  trained = default_block_size(config)
  if not trained:
    return new_tokens
  return max(b for b in range(1, min(trained, new_tokens) + 1) if new_tokens % b == 0)


def _sampler_settings(config, prompt_len, max_new_tokens, steps, block_length, remasking,
                      threshold, temperature, mask_token_id, eos_token_id):
  """(steps per block, block length, mask id, EOS id or None); a ValueError on a bad one."""
  g = max_new_tokens
  if g < 1:
    raise ValueError(f"generate: max_new_tokens must be ≥ 1, got {g}")
  b = default_block_length(config, g) if block_length is None else block_length
  if b < 1 or g % b:
    raise ValueError(f"generate: max_new_tokens ({g}) must be a positive multiple of "
                     f"block_length ({b})")
  blocks = g // b
  steps = g if steps is None else steps
  if steps < 1 or steps % blocks:
    raise ValueError(f"generate: steps ({steps}) must be a positive multiple of the number of "
                     f"blocks ({blocks} = max_new_tokens {g} / block_length {b})")
  per_block = steps // blocks
  if per_block > b:
    raise ValueError(f"generate: {per_block} steps per block is more than block_length ({b}): "
                     f"each step commits at least one token")
  if threshold is not None and not 0 < threshold <= 1:
    raise ValueError(f"generate: threshold must be None or in (0, 1], got {threshold}")
  if remasking not in ("low_confidence", "random"):
    raise ValueError(f"generate: remasking must be 'low_confidence' or 'random', got "
                     f"{remasking!r}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be ≥ 0, got {temperature}")
  if prompt_len + g > config.max_seq_len:
    raise ValueError(f"generate: prompt ({prompt_len}) + max_new_tokens ({g}) is more than "
                     f"max_seq_len ({config.max_seq_len})")
  mask_id = getattr(config, "mask_token_id", -1) if mask_token_id is None else mask_token_id
  if not 0 <= mask_id < config.vocab_size:
    raise ValueError(f"generate: mask token id {mask_id} is not a token of this model (config "
                     f"mask_token_id -1 means the tokenizer's <mask>, unresolved at export): pass "
                     f"mask_token_id=tokenizer.mask_token_id")
  eos = getattr(config, "eos_token_id", None) if eos_token_id is None else eos_token_id
  if isinstance(eos, (list, tuple)):
    raise ValueError(f"generate: eos_token_id must be one token id or None, got {eos!r}")
  return per_block, b, mask_id, None if eos is None else int(eos)


@dataclass
class DharaOutput(ModelOutput):
  """Loss, logits, and the generation cache (`cache`, which transformers 5 reads between
  steps; it also answers to `past_key_values`)."""

  loss: torch.FloatTensor | None = None
  logits: torch.FloatTensor | None = None
  cache: DharaCache | None = None


class DharaForCausalLM(DharaPreTrainedModel, GenerationMixin):
  """Next-token LM head over DharaModel.

  `labels` (the input tokens, -100 where no loss is wanted) are shifted as in every causal LM:
  logits[:, i] are scored against labels[:, i + 1], never across a document boundary or onto
  padding. The loss is the plain mean cross-entropy over the scored tokens.

  `generate()` (transformers') runs with the twin's KV cache (`DharaCache`: keys and values,
  and the last K−1 inputs of every Canon layer and short conv): each step runs only the new
  token. `use_cache=False` recomputes the whole sequence instead.
  """

  _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

  def __init__(self, config):
    super().__init__(config)
    self.model = DharaModel(config)
    self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self):
    return self.model.embed

  def get_output_embeddings(self):
    return self.lm_head

  @classmethod
  def _supports_default_dynamic_cache(cls):
    return False  # the twin brings its own cache (prepare_inputs_for_generation)

  def forward(self, input_ids=None, attention_mask=None, segment_ids=None, position_ids=None,
              labels=None, block_size=None, cache=None, past_key_values=None, use_cache=None,
              chunk_block=1, commit=None, **kwargs):
    """`block_size`, `cache`, `chunk_block`, `commit`: DharaModel.forward's modes. With
    `use_cache=True` and no cache, a new DharaCache holds this forward's tokens."""
    cache = past_key_values if cache is None else cache
    if cache is None and use_cache and trained_objective(self.config) == "ar":
      cache = DharaCache()
    if cache is None:
      block_size = default_block_size(self.config) if block_size is None else block_size
    hidden = self.model(input_ids, attention_mask, segment_ids, position_ids, block_size, cache,
                        chunk_block, commit).last_hidden_state
    logits = self.lm_head(hidden).float()
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      logits = cap * torch.tanh(logits / cap)
    loss = None
    if labels is not None:
      # Next-token alignment for causal and diffusion configs alike (module docstring).
      predictors = block_predictors(logits, block_size) if cache is None and block_size else logits
      stream = input_ids[:, -predictors.shape[1]:]
      segments = resolve_segment_ids(stream, attention_mask, segment_ids)
      same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
      targets = labels[:, 1:].masked_fill(~same_doc, -100)
      loss = F.cross_entropy(predictors[:, :-1].reshape(-1, logits.shape[-1]),
                             targets.reshape(-1), ignore_index=-100)
    return DharaOutput(loss=loss, logits=logits, cache=cache)

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None,
                                    past_key_values=None, use_cache=True, **kwargs):
    """The tokens the cache has not seen (all of them without a cache) and the whole mask."""
    cache = past_key_values if cache is None else cache
    if cache is None and use_cache:
      cache = DharaCache()
    if cache is not None:
      input_ids = input_ids[:, cache.length:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}

  def generate(self, *args, **kwargs):
    # GenerationMixin would decode left to right on a diffusion model without a word.
    if trained_objective(self.config) != "ar":
      raise NotImplementedError(
          "DharaForCausalLM.generate decodes left to right, which a masked-diffusion model "
          "(bidirectional attention, or the block objective) was not trained for: load it as "
          "DharaForMaskedDiffusion (AutoModelForCausalLM does), whose generate is a diffusion "
          "sampler.")
    return super().generate(*args, **kwargs)


def block_predictors(logits, block_size):
  """B×L predictions of block diffusion from its [x_t ; x_0] logits (B×2L): inside a block the
  noisy stream's previous position, a block's first token from the clean stream's last
  position of the block before (dhara_jax/losses.py block_predictors)."""
  length = logits.shape[1] // 2
  ends_block = torch.arange(length, device=logits.device) % block_size == block_size - 1
  return torch.where(ends_block[None, :, None], logits[:, length:], logits[:, :length])


class DharaForMaskedDiffusion(DharaForCausalLM):
  """Masked-diffusion LM over DharaModel: the class of configs trained with a diffusion
  objective (config.json `objective`: `mdm`, LLaDA/MDLM over the whole row; `block`, BD3LM block
  diffusion with `block_size`). One forward with DharaForCausalLM; only the use differs.

  - `mdm`: attention is bidirectional over the whole input: every token sees every token of
    its own document (segment), before and after it. Canon and short-conv taps stay causal.
  - `block`: the forward is the block-diffusion one over [x_t ; x_0] (B×2L; module docstring),
    as the model was trained; `block_size=0` runs the one-stream forward instead. Labels (B×L,
    the clean tokens, -100 where x_t is not masked) are read from the block predictors: the
    noisy stream's previous position, or for a block's first token the clean stream's last
    position before it.
  - `config.mask_token_id` is the absorbing mask token: replace the tokens to predict with it
    (-1 would mean "the tokenizer's <mask>", left unresolved at export). `config.mask_epsilon`
    is the floor of the training masking probability, p = (1 - eps) t + eps.
  - Labels are shifted (`config.label_alignment == "next_token"`): a masked token at position j
    is predicted by logits[:, j - 1]; the first token of a document is never masked, so give
    every sequence at least one clean first token (a BOS or the prompt). The loss is the plain
    mean cross-entropy (no 1/t weighting, which is the trainer's business).

  `generate` is LLaDA's semi-autoregressive sampler, as `dhara generate` runs it (greedy
  settings give the same tokens). The canvas is [prompt, MASK × max_new_tokens]; the new tokens
  are cut into blocks of `block_length` (default: the trained block size, or its largest divisor
  of max_new_tokens, for `block`; max_new_tokens for `mdm`), decoded left to right, each in
  steps // blocks steps. A step predicts every slot of the block (argmax, or a Gumbel sample at
  temperature > 0) and commits the most confident masked slots (`remasking="low_confidence"`:
  softmax probability; `"random"`: random order), as many as the even split of the block over
  its steps gives. With `threshold` τ (Fast-dLLM), a step instead commits every masked slot of
  the block with confidence ≥ τ and at least the best one, until the block has no masks
  (`steps` is unused then, though still checked). Prompts are left-padded (right-padded rows are
  left-aligned first); for `block` models to a multiple of the block, so blocks sit where
  training put them. `mdm` models run the whole canvas at every step. `block` models use the
  exact block KV cache (`use_cache=True`, the default: each step runs the block against the
  cached clean prefix) or, with `use_cache=False`, the [x_t ; x_0] forward over the whole canvas
  at every step; both give the same tokens. Once every row has an EOS the remaining blocks are
  skipped, and every new slot after a row's first EOS is that EOS. Returns the canvas
  (B, P + G), P the input's width, or (canvas, {"forwards": n}) with return_stats=True.
  """

  @torch.no_grad()
  def generate(self, input_ids, attention_mask=None, max_new_tokens=64, steps=None,
               block_length=None, remasking="low_confidence", threshold=None, temperature=0.0,
               mask_token_id=None, eos_token_id=None, generator=None, use_cache=True,
               return_stats=False, **kwargs):
    if kwargs:
      # HF options (do_sample, num_beams, ...) mean nothing here; ignoring them would mislead.
      raise TypeError(f"generate: unexpected arguments {', '.join(sorted(kwargs))}; the "
                      f"diffusion sampler takes {SAMPLER_ARGS}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
      raise ValueError(f"generate: input_ids must be a (batch, prompt length) tensor with a "
                       f"prompt, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    if attention_mask is None:
      real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
      real = torch.as_tensor(attention_mask, device=input_ids.device) != 0
      if real.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask shape {tuple(real.shape)} is not input_ids "
                         f"shape {tuple(input_ids.shape)}")
    empty = torch.nonzero(~real.any(1)).flatten().tolist()
    if empty:
      raise ValueError(f"generate: empty prompt in rows {empty} (attention_mask all 0); every "
                       f"row needs at least one prompt token")
    batch, prompt_len = input_ids.shape
    block_trained = trained_objective(self.config) == "block"
    per_block, b, mask_id, eos = _sampler_settings(
        self.config, prompt_len, max_new_tokens, steps, block_length, remasking, threshold,
        temperature, mask_token_id, eos_token_id)
    aligned = _left_padded(input_ids, real, None)[0]
    prompt, real = _left_padded(input_ids, real, b if block_trained else None)
    width = prompt.shape[1]
    new = torch.full((batch, max_new_tokens), mask_id, dtype=torch.long, device=prompt.device)
    x = torch.cat([prompt, new], dim=1)
    attention = torch.cat([real.long(), torch.ones_like(new)], dim=1)  # masks are real tokens
    if block_trained and use_cache:
      source = _BlockCache(self, attention)
    else:
      source = _Canvas(self, attention, b if block_trained else 0)
    schedule = _transfer_schedule(b, per_block)
    forwards = 0
    for k in range(max_new_tokens // b):
      lo, hi = width + k * b, width + (k + 1) * b
      # Threshold: each step commits ≥ 1 token of each row with masks (the mask token is never
      # a candidate), so b steps end a block.
      for t in range(b if threshold is not None else per_block):
        pred = (source.first if t == 0 else source.later)(x, lo, b)
        x[:, lo:hi] = _commit(pred, x[:, lo:hi], mask_id, remasking, temperature, generator,
                              n_commit=schedule[t] if threshold is None else None,
                              threshold=threshold)
        forwards += 1
        if threshold is not None and not (x[:, lo:hi] == mask_id).any():
          break
      if eos is not None and (x[:, width:hi] == eos).any(1).all():
        break  # every row has ended: the slots left are filled with EOS below
    tail = x[:, width:]
    if eos is not None:
      tail = tail.masked_fill((tail == eos).cumsum(1) > 0, eos)
    out = torch.cat([aligned, tail], dim=1)  # the input's width, left-aligned
    return (out, {"forwards": forwards}) if return_stats else out
