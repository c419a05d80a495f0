"""PyTorch twin of the dhara-jax decoder, for checkpoints no stock transformers class can express
(Canon layers, bidirectional/diffusion attention, unusual mixes of switches).

Module and parameter names mirror the JAX parameter tree (`layers.3.attn.q.weight` is
`layers_3/attn/q/kernel` transposed), so the exporter's mapping is mechanical. No KV cache: each
forward recomputes the whole sequence. Padding (attention_mask 0) and packed documents
(`segment_ids`) behave as in JAX: tokens see only their own segment, positions restart at each
segment, and convolution taps never cross a segment boundary.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_dhara import DharaConfig


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

  def forward(self, h, segment_ids):
    y = causal_depthwise_conv(h, self.kernel.to(h.dtype), segment_ids)
    if self.bias is not None:
      y = y + self.bias.to(h.dtype)
    if self.config.canon_activation:
      y = F.silu(y)
    return h + y if self.config.canon_residual else y


def maybe_canon(module, h, segment_ids):
  return h if module is None else module(h, segment_ids)


def canon_or_none(position, channels, config):
  return DharaCanon(channels, config) if position in config.canon_set else None


def linear(in_features, out_features, config):
  return nn.Linear(in_features, out_features, bias=config.use_bias)


def apply_rope(x, positions, theta):
  """Rotate-half RoPE on x (B, L, H, K) in float32."""
  dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
  angles = positions[..., None].float() * inv_freq
  cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
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

  def forward(self, x, positions, mask, segment_ids):
    batch, length, _ = x.shape
    q = self.q(x).view(batch, length, self.heads, self.head_dim)
    k = self.k(x).view(batch, length, self.kv_heads, self.head_dim)
    v = self.v(x).view(batch, length, self.kv_heads, self.head_dim)
    if self.config.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.canon_b is not None:
      qkv = torch.cat([t.reshape(batch, length, -1) for t in (q, k, v)], dim=-1)
      q, k, v = self.canon_b(qkv, segment_ids).split(
          [self.heads * self.head_dim, self.kv_heads * self.head_dim,
           self.kv_heads * self.head_dim], dim=-1)
      q = q.reshape(batch, length, self.heads, self.head_dim)
      k = k.reshape(batch, length, self.kv_heads, self.head_dim)
      v = v.reshape(batch, length, self.kv_heads, self.head_dim)
    if self.config.position == "rope":
      q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
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

  def forward(self, x, segment_ids):
    bcx = maybe_canon(self.canon_b, self.in_proj(x), segment_ids)
    b, c, h = bcx.chunk(3, dim=-1)
    return self.out_proj(c * causal_depthwise_conv(b * h, self.conv.to(x.dtype), segment_ids))


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

  def forward(self, x, segment_ids):
    up = self.up(x)
    h = self.act(up) if self.gate is None else self.act(self.gate(x)) * up
    return self.down(maybe_canon(self.canon_d, h, segment_ids))


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

  def forward(self, x, segment_ids):
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

  def forward(self, x, positions, masks, segment_ids):
    h = maybe_canon(self.canon_a, self.pre_mixer_norm(x), segment_ids)
    if self.kind == "C":
      h = self.conv(h, segment_ids)
    else:
      h = self.attn(h, positions, masks[self.kind], segment_ids)
    if self.config.sandwich_norm:
      h = self.post_mixer_norm(h)
    x = x + h
    h = maybe_canon(self.canon_c, self.pre_mlp_norm(x), segment_ids)
    h = self.moe(h, segment_ids) if self.config.num_experts else self.mlp(h, segment_ids)
    if self.config.sandwich_norm:
      h = self.post_mlp_norm(h)
    return x + h


def segment_mask(segment_ids, causal, window):
  """Boolean B×1×L×L mask: same segment (+ key ≤ query) (+ |query − key| < window)."""
  length = segment_ids.shape[1]
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  q = torch.arange(length, device=segment_ids.device)[:, None]
  k = torch.arange(length, device=segment_ids.device)[None, :]
  if causal:
    mask = mask & (k <= q)
  if window:
    mask = mask & ((q - k).abs() < window)
  return mask[:, None]


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

  def forward(self, input_ids, attention_mask=None, segment_ids=None, position_ids=None):
    if segment_ids is None:
      segment_ids = (torch.ones_like(input_ids) if attention_mask is None
                     else attention_mask.to(input_ids.dtype))
    if position_ids is None:
      position_ids = segment_positions(segment_ids)
    config = self.config
    x = self.embed(input_ids)
    if config.embed_scale:
      x = x * torch.tensor(math.sqrt(config.d_model), dtype=x.dtype)
    if config.position == "learned":
      x = x + self.pos_embed(position_ids)
    causal = config.attention == "causal"
    masks = {"A": segment_mask(segment_ids, causal, 0),
             "L": segment_mask(segment_ids, causal, config.sliding_window)}
    for layer in self.layers:
      x = layer(x, position_ids, masks, segment_ids)
    return self.final_norm(x)


class DharaForCausalLM(DharaPreTrainedModel, GenerationMixin):
  """Causal LM head over DharaModel. For bidirectional (diffusion) configs the logits at each
  position predict that position's token; `labels` then give the loss without a shift."""

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

  def forward(self, input_ids=None, attention_mask=None, segment_ids=None, position_ids=None,
              labels=None, **kwargs):
    hidden = self.model(input_ids, attention_mask, segment_ids, position_ids)
    logits = self.lm_head(hidden).float()
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      logits = cap * torch.tanh(logits / cap)
    loss = None
    if labels is not None:
      if self.config.attention == "causal":
        logits_for_loss, labels = logits[:, :-1], labels[:, 1:]
      else:
        logits_for_loss = logits
      loss = F.cross_entropy(logits_for_loss.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100)
    return CausalLMOutput(loss=loss, logits=logits)

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    return {"input_ids": input_ids, "attention_mask": attention_mask}
