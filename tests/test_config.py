import subprocess
import sys

import pytest

from dhara_jax import cli, config
from dhara_jax.config import FAMILIES, ModelConfig
from dhara_jax.errors import ConfigError


@pytest.mark.parametrize("family", FAMILIES)
def test_family_presets_load(family):
  cfg = config.load(family).model
  assert cfg.family == family
  assert cfg.num_layers == 32


def test_shape_preset_inherits_family_and_overrides():
  cfg = config.load("shapes/gpt2_64l").model
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim) == (64, 256, 4, 1024)
  assert cfg.norm == "layernorm" and cfg.position == "learned"  # from families/gpt2.yaml


def test_overrides_are_typed():
  cfg = config.load("llama3", ["model.d_model=512", "model.rope_theta=500000",
                               "model.qk_norm=true", "mesh.tensor=2"])
  assert cfg.model.d_model == 512 and cfg.model.qk_norm is True
  assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
  assert cfg.mesh.tensor == 2


def test_config_is_frozen():
  cfg = ModelConfig()
  with pytest.raises(Exception):
    cfg.d_model = 1  # type: ignore[misc]


def test_base_chain_and_cycle(tmp_path):
  (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel: {d_model: 128, num_heads: 4}\n")
  (tmp_path / "b.yaml").write_text("base: llama3\nmodel: {num_layers: 2}\n")
  cfg = config.load(tmp_path / "a.yaml").model
  assert (cfg.d_model, cfg.num_layers, cfg.family) == (128, 2, "llama3")
  (tmp_path / "c.yaml").write_text("base: d.yaml\n")
  (tmp_path / "d.yaml").write_text("base: c.yaml\n")
  with pytest.raises(ConfigError, match="cycle"):
    config.load(tmp_path / "c.yaml")


def test_base_list_merges_in_order(tmp_path):
  (tmp_path / "m.yaml").write_text("model: {d_model: 128, num_heads: 4, num_layers: 3}\n")
  (tmp_path / "n.yaml").write_text("model: {num_layers: 5}\ntrain: {steps: 7}\n")
  (tmp_path / "run.yaml").write_text("base: [llama3, m.yaml, n.yaml]\ntrain: {lr: 0.01}\n")
  cfg = config.load(tmp_path / "run.yaml")
  assert (cfg.model.family, cfg.model.d_model, cfg.model.num_layers) == ("llama3", 128, 5)
  assert (cfg.train.steps, cfg.train.lr) == (7, 0.01)
  (tmp_path / "bad.yaml").write_text("base: [llama3, {model: 1}]\n")
  with pytest.raises(ConfigError, match="base must be"):
    config.load(tmp_path / "bad.yaml")


@pytest.mark.parametrize("run", ["quickstart", "dhara_70m_ar", "gpt2_70m"])
def test_run_presets_load(run):
  cfg = config.load(f"configs/runs/{run}.yaml")
  assert cfg.data.tokenizer_vocab_size <= cfg.model.vocab_size
  assert abs(sum(s.weight for s in cfg.data.sources) - 1.0) < 1e-9
  if run != "quickstart":  # the study's runs: 1024-token sequences in bf16
    assert (cfg.data.seq_len, cfg.model.dtype) == (1024, "bfloat16")


def test_mesh_presets_stack_onto_a_run(tmp_path):
  (tmp_path / "run.yaml").write_text(
      f"base: [{config.CONFIG_ROOT}/runs/quickstart.yaml, {config.CONFIG_ROOT}/mesh/fsdp.yaml]\n")
  cfg = config.load(tmp_path / "run.yaml")
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.model.d_model) == (1, -1, 128)


def test_compact_pattern():
  assert config.compact_pattern("CCACCACC") == "CCA"
  assert config.compact_pattern("LLLLLALLLLLA") == "LLLLLA"
  assert config.compact_pattern("AAAA") == "A"


BAD = [
    (["model.family=bert"], "model.family"),
    (["model.num_heads=7"], "model.num_heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["model.d_model=-8"], "model.d_model"),
    (["model.num_layers=0"], "model.num_layers"),
    (["model.vocab=5"], "model.vocab"),
    (["model.d_model=big"], "model.d_model"),
    (["model.layer_pattern=AXA"], "model.layer_pattern"),
    (["model.layer_pattern=AL"], "model.sliding_window"),
    (["model.num_experts=4", "model.moe_mlp_dim=0"], "model.moe_mlp_dim"),
    (["model.experts_per_token=9", "model.num_experts=8", "model.moe_mlp_dim=8"],
     "model.experts_per_token"),
    (["optim.lr=1"], "optim"),
    (["mesh.data=0"], "mesh.data"),
    (["train.logit_chunk_tokens=0"], "train.logit_chunk_tokens"),
    (["data.batch_size=8", "train.grad_accum=3"], "train.grad_accum"),
    (["d_model=3"], "override"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_bad_configs_raise_naming_the_field(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    config.load("llama3", overrides)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("base: llama3\nmodel:\n  d_model: 384\n  num_heads: 5\n  colour: red\n")
  for args in (["params", str(bad)], ["params", "llama3", "model.num_kv_heads=3"],
               ["params", str(tmp_path / "missing.yaml")]):
    proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  proc = subprocess.run([sys.executable, "-m", "dhara_jax.cli", "params", str(bad)],
                        capture_output=True, text=True, timeout=300)
  assert proc.stderr.strip() == "error: model.colour: unknown field"


def test_invalid_yaml_is_reported_with_line_and_column(tmp_path, capsys):
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed\n")
  with pytest.raises(ConfigError, match="bad.yaml:2:1: not valid YAML"):
    config.load(bad)
  bad.write_text("model:\n  d_model: 64\n   num_heads: 4\n")
  assert cli.main(["params", str(bad)]) == 2
  assert capsys.readouterr().err == (f"error: config: {bad.resolve()}:3:13: not valid YAML "
                                     "(mapping values are not allowed here)\n")


def test_a_config_that_is_no_text_file_is_one_line(tmp_path):
  (tmp_path / "adir.yaml").mkdir()
  with pytest.raises(ConfigError, match=r"^config: cannot read .*adir\.yaml \(Is a directory\)$"):
    config.load(tmp_path / "adir.yaml")
  (tmp_path / "bin.yaml").write_bytes(b"model: \xff\xfe\x00\x81")
  with pytest.raises(ConfigError, match=r"^config: .*bin\.yaml is not a text file$"):
    config.load(tmp_path / "bin.yaml")


def test_architecture_compares_resolved_values():
  """Equivalent spellings of one model (as an import from transformers writes it, and as its
  preset does) are one architecture; a real difference is not."""
  arch = lambda *overrides: config.architecture(config.load("llama3", [
      "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2", "model.num_layers=3",
      *overrides]).model)
  assert arch("model.head_dim=16") == arch() != arch("model.head_dim=32")
  assert arch("model.query_scale_dim=16") == arch() != arch("model.query_scale_dim=8")
  assert arch("model.layer_pattern=CAC") == arch("model.layer_pattern=CA")
  assert arch("model.layer_pattern=CAC") != arch("model.layer_pattern=CCA")
  assert arch("model.sliding_window=8") == arch()  # no sliding-window layers
  local = ("model.layer_pattern=LA", "model.sliding_window=8")
  assert arch(*local, "model.rope_local_theta=10000") == arch(*local)  # 0: rope_theta
  assert arch(*local, "model.sliding_window=4") != arch(*local)
  assert arch("model.dtype=bfloat16", "model.attention_impl=xla") == arch()


def test_cli_overrides_may_follow_options_and_counts_are_checked():
  args = cli.parse(["train", "llama3", "train.seed=1", "--steps", "2", "model.d_model=64",
                    "--run-dir", "r"])
  assert args.overrides == ["train.seed=1", "model.d_model=64"]
  assert (args.steps, args.run_dir) == (2, "r")
  for stray in (["plot", "r", "model.d_model=64"], ["train", "llama3", "--bogus"],
                ["train", "llama3", "--steps", "0"], ["export", "r", "--out", "o", "--step", "-1"]):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
      cli.parse(stray)
    assert exit_info.value.code == 2
