"""transformers config for dhara-jax models exported with custom code (trust_remote_code).

The field names and meanings are those of `dhara_jax.config.ModelConfig`; the exporter writes
every field into config.json and lists them under `dhara_fields`, so this file holds no copy of
the defaults. It is copied next to the weights: the checkpoint loads without dhara-jax installed.

Diffusion fields: `attention` ("causal" | "bidirectional"), `mask_token_id` (the absorbing mask
token; -1: the tokenizer's <mask>, unresolved), `mask_epsilon` (floor of the masking probability).
`label_alignment` is "next_token": logits at position i predict the token at i + 1 (see
modeling_dhara.py). `objective` ("ar" | "mdm" | "block") and `block_size` are what the run was
trained with last: they select the forward (block mode over [x_t ; x_0] for "block") and the
sampler; exports written before they were recorded have none (the attention implies ar or mdm).
"""

from transformers import PretrainedConfig


class DharaConfig(PretrainedConfig):
  model_type = "dhara"
  attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "num_layers",
                   "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
                   "intermediate_size": "mlp_dim", "max_position_embeddings": "max_seq_len"}

  def __init__(self, dhara_fields=(), label_alignment="next_token", objective=None,
               block_size=0, **kwargs):
    self.dhara_fields = list(dhara_fields)
    self.label_alignment = label_alignment
    self.objective, self.block_size = objective, block_size
    for name in self.dhara_fields:
      setattr(self, name, kwargs.pop(name))
    super().__init__(**kwargs)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def layer_kind(self, i: int) -> str:
    """A: global attention, L: sliding-window attention, C: gated short conv."""
    return self.layer_pattern[i % len(self.layer_pattern)]
