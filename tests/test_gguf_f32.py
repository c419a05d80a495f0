"""export/gguf.py `write_f32_gguf` (llama.cpp's float32 copy of a GGUF file, for
bench/real_decode.py): every metadata field comes along (general.file_type then says F32), every
tensor is what GGUFReader + gguf.quants.dequantize give, in float32."""

import numpy as np

from dhara_jax.export.gguf import write_f32_gguf


def _quantized_gguf(path):
  """A small llama GGUF with Q4_1, Q8_0, F16 and F32 tensors and metadata of several types."""
  import gguf

  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
  writer.add_rope_freq_base(1e5)
  writer.add_bool("tokenizer.ggml.add_bos_token", True)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(["<s>", "</s>", "a", "b"])
  writer.add_token_types([3, 3, 1, 1])
  writer.add_eos_token_id(1)
  for name, qtype in [("token_embd.weight", "Q8_0"), ("blk.0.ffn_up.weight", "Q4_1")]:
    qtype = gguf.GGMLQuantizationType[qtype]
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
  writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((2, 32)).astype(np.float16))
  writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(32).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_f32_gguf_keeps_the_metadata_and_dequantizes_every_tensor(tmp_path):
  import gguf

  source = gguf.GGUFReader(_quantized_gguf(tmp_path / "q.gguf"))
  out = gguf.GGUFReader(write_f32_gguf(tmp_path / "q.gguf", tmp_path / "f32.gguf"))
  assert list(out.fields) == list(source.fields)
  for name, field in source.fields.items():
    if name.startswith("GGUF.") or name == "general.file_type":
      continue
    assert (out.fields[name].types, out.fields[name].contents()) == (field.types,
                                                                     field.contents()), name
  assert out.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
  assert [t.name for t in out.tensors] == [t.name for t in source.tensors]
  assert {t.tensor_type.name for t in source.tensors} == {"Q8_0", "Q4_1", "F16", "F32"}
  for ours, theirs in zip(out.tensors, source.tensors):
    assert ours.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(ours.shape) == list(theirs.shape)
    np.testing.assert_array_equal(ours.data, gguf.quants.dequantize(theirs.data,
                                                                    theirs.tensor_type))
