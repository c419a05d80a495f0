"""PyTorch twin of the dhara-jax decoder, for checkpoints no stock transformers class can express
(Canon layers, bidirectional/diffusion attention, unusual mixes of switches).

Module and parameter names mirror the JAX parameter tree (`layers.3.attn.q.weight` is
`layers_3/attn/q/kernel` transposed), so the exporter's mapping is mechanical. No KV cache: each
forward recomputes the whole sequence. Padding (attention_mask 0) and packed documents
(`segment_ids`, 0 = padding, documents 1, 2, ...) behave as in JAX: tokens see only their own
segment, positions restart at each segment, and convolution taps never cross a segment boundary.

Classes (config.json's `auto_map` names them):
- `DharaModel` (AutoModel): the bare decoder; `last_hidden_state` is after the final norm.
- `DharaForCausalLM` (AutoModelForCausalLM, causal configs): next-token LM with `generate`.
- `DharaForMaskedDiffusion` (AutoModelForCausalLM, `attention: bidirectional` configs): a masked
  diffusion LM (LLaDA/MDLM style). Same weights and forward as DharaForCausalLM; its `generate`
  is a diffusion sampler. See its docstring for the mask token, the label alignment and the
  sampler.

Label alignment (config.json `label_alignment: "next_token"`, for every class): the logits at
position i predict the token at position i + 1, as in an AR model (and as Dream / Fast-dLLM v2
do), so a model converted from AR keeps its head's meaning. A masked token at position j is read
from the logits at j - 1; the first token of each document is never masked.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

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
    segment_ids = resolve_segment_ids(input_ids, attention_mask, segment_ids)
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
    return BaseModelOutput(last_hidden_state=self.final_norm(x))


# The diffusion sampler of DharaForMaskedDiffusion.generate. dhara_jax.sampling has the same
# semantics in JAX: with greedy settings both give the same tokens, so keep the two in step.
SAMPLER_ARGS = ("input_ids, attention_mask, max_new_tokens, steps, block_length, remasking, "
                "threshold, temperature, mask_token_id, eos_token_id, generator, return_stats")


def _left_align(input_ids, real):
  """Each row with its padding first and its tokens in order (a right-padded row is rolled)."""
  order = torch.argsort(real.long(), dim=1, stable=True)
  return input_ids.gather(1, order), real.gather(1, order)


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


def _diffusion_step(model, x, attention_mask, in_block, mask_id, remasking, temperature,
                    generator, n_commit=None, threshold=None):
  """One denoising step: the canvas with some masked slots of the current block committed;
  the n_commit most confident ones, or (threshold) those with confidence ≥ τ and the best."""
  logits = model(x, attention_mask=attention_mask).logits.float()
  # Next-token alignment: slot j is read from the logits at j - 1 (slot 0 is never masked).
  pred = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
  pred[..., mask_id] = -math.inf  # committing the mask token would commit nothing
  x0 = _candidates(pred, temperature, generator)
  if remasking == "low_confidence":
    conf = torch.softmax(pred, dim=-1).gather(-1, x0[..., None])[..., 0]
  else:
    conf = torch.rand(x.shape, generator=generator, device=x.device)
  eligible = (x == mask_id) & in_block
  conf = conf.masked_fill(~eligible, -math.inf)
  rank = _ranks(conf)
  if threshold is None:
    commit = eligible & (rank < n_commit)
  else:
    commit = eligible & ((conf >= threshold) | (rank == 0))
  return torch.where(commit, x0, x)


def _sampler_settings(config, prompt_len, max_new_tokens, steps, block_length, remasking,
                      threshold, temperature, mask_token_id, eos_token_id):
  """(steps per block, block length, mask id, EOS id or None); a ValueError on a bad one."""
  g = max_new_tokens
  if g < 1:
    raise ValueError(f"generate: max_new_tokens must be ≥ 1, got {g}")
  b = g if block_length is None else block_length
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


class DharaForCausalLM(DharaPreTrainedModel, GenerationMixin):
  """Next-token LM head over DharaModel.

  `labels` (the input tokens, -100 where no loss is wanted) are shifted as in every causal LM:
  logits[:, i] are scored against labels[:, i + 1], never across a document boundary or onto
  padding. The loss is the plain mean cross-entropy over the scored tokens.
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

  def forward(self, input_ids=None, attention_mask=None, segment_ids=None, position_ids=None,
              labels=None, **kwargs):
    hidden = self.model(input_ids, attention_mask, segment_ids, position_ids).last_hidden_state
    logits = self.lm_head(hidden).float()
    if self.config.final_logit_softcap:
      cap = self.config.final_logit_softcap
      logits = cap * torch.tanh(logits / cap)
    loss = None
    if labels is not None:
      # Next-token alignment for causal and diffusion configs alike (module docstring).
      segments = resolve_segment_ids(input_ids, attention_mask, segment_ids)
      same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
      targets = labels[:, 1:].masked_fill(~same_doc, -100)
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=-100)
    return CausalLMOutput(loss=loss, logits=logits)

  def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
    return {"input_ids": input_ids, "attention_mask": attention_mask}

  def generate(self, *args, **kwargs):
    # GenerationMixin would decode left to right on a bidirectional model without a word.
    if self.config.attention != "causal":
      raise NotImplementedError(
          "DharaForCausalLM.generate decodes left to right, which a bidirectional (masked-"
          "diffusion) model was not trained for: load it as DharaForMaskedDiffusion "
          "(AutoModelForCausalLM does), whose generate is a diffusion sampler.")
    return super().generate(*args, **kwargs)


class DharaForMaskedDiffusion(DharaForCausalLM):
  """Masked-diffusion LM (LLaDA/MDLM style) over DharaModel: the class of `attention:
  bidirectional` exports. One forward with DharaForCausalLM; only the use differs.

  - Attention is bidirectional over the whole input: every token sees every token of its own
    document (segment), before and after it. Canon and short-conv taps stay causal.
  - `config.mask_token_id` is the absorbing mask token: replace the tokens to predict with it
    (-1 would mean "the tokenizer's <mask>", left unresolved at export). `config.mask_epsilon`
    is the floor of the training masking probability, p = (1 - eps) t + eps.
  - Labels are shifted (`config.label_alignment == "next_token"`): a masked token at position j
    is predicted by logits[:, j - 1]; the first token of a document is never masked, so give
    every sequence at least one clean first token (a BOS or the prompt). `labels` work as in
    DharaForCausalLM: pass the clean tokens with -100 wherever the input is not masked; the
    loss is the plain mean cross-entropy (no 1/t weighting, which is the trainer's business).

  `generate` is LLaDA's semi-autoregressive sampler (no KV cache: each step runs the whole
  canvas). The canvas is [prompt, MASK × max_new_tokens]; the new tokens are cut into blocks of
  `block_length`, decoded left to right, each in steps // blocks steps. A step predicts every
  slot (argmax, or a Gumbel sample at temperature > 0) and commits the most confident masked
  slots of the block (`remasking="low_confidence"`: softmax probability; `"random"`: random
  order), as many as the even split of the block over its steps gives. With `threshold` τ
  (Fast-dLLM), a step instead commits every masked slot of the block with confidence ≥ τ and
  at least the best one, until the block has no masks (`steps` is unused then, though still
  checked). Prompts are left-padded (right-padded rows are left-aligned first). Once every row
  has an EOS the remaining blocks are skipped, and every new slot after a row's first EOS is
  that EOS. Returns the canvas (B, P + G), or (canvas, {"forwards": n}) with return_stats=True.
  """

  @torch.no_grad()
  def generate(self, input_ids, attention_mask=None, max_new_tokens=64, steps=None,
               block_length=None, remasking="low_confidence", threshold=None, temperature=0.0,
               mask_token_id=None, eos_token_id=None, generator=None, return_stats=False,
               **kwargs):
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
    per_block, b, mask_id, eos = _sampler_settings(
        self.config, prompt_len, max_new_tokens, steps, block_length, remasking, threshold,
        temperature, mask_token_id, eos_token_id)
    prompt, real = _left_align(input_ids, real)
    new = torch.full((batch, max_new_tokens), mask_id, dtype=torch.long, device=prompt.device)
    x = torch.cat([prompt, new], dim=1)
    attention = torch.cat([real.long(), torch.ones_like(new)], dim=1)  # masks are real tokens
    slot = torch.arange(x.shape[1], device=x.device)[None]
    schedule = _transfer_schedule(b, per_block)
    forwards = 0
    for k in range(max_new_tokens // b):
      lo, hi = prompt_len + k * b, prompt_len + (k + 1) * b
      in_block = (slot >= lo) & (slot < hi)
      # Threshold: each step commits ≥ 1 token of each row with masks (the mask token is never
      # a candidate), so b steps end a block.
      for t in range(b if threshold is not None else per_block):
        x = _diffusion_step(self, x, attention, in_block, mask_id, remasking, temperature,
                            generator, n_commit=schedule[t] if threshold is None else None,
                            threshold=threshold)
        forwards += 1
        if threshold is not None and not (x[:, lo:hi] == mask_id).any():
          break
      if eos is not None and (x[:, prompt_len:hi] == eos).any(1).all():
        break  # every row has ended: the slots left are filled with EOS below
    if eos is not None:
      tail = x[:, prompt_len:]
      x[:, prompt_len:] = tail.masked_fill((tail == eos).cumsum(1) > 0, eos)
    return (x, {"forwards": forwards}) if return_stats else x
