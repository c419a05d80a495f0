import pytest

from data_pipeline.config import DataConfig, resolve_input
from dhara_jax import config
from dhara_jax.errors import ConfigError


def test_shipped_mix_config_loads():
  data = config.load("data/mix").data
  assert [s.name for s in data.sources] == ["finepdfs", "dclm", "fineweb_edu"]
  assert data.weights == pytest.approx({"finepdfs": 0.5, "dclm": 0.3, "fineweb_edu": 0.2})
  for s in data.sources:  # the shipped sample is found from any working directory
    assert list(resolve_input(s.path).glob("*.parquet")), s.path
  assert resolve_input(data.tokenizer).is_file()


def test_every_config_has_a_data_section_with_study_defaults():
  data = config.load("llama3").data
  assert data == DataConfig()
  assert data.tokenizer_vocab_size == 50304
  assert data.weights == pytest.approx({"finepdfs": 0.5, "dclm": 0.3, "fineweb_edu": 0.2})


def test_hub_config_and_round_trip_through_dict():
  cfg = config.load("data/dhara_1b")
  assert cfg.data.sources[0].hub == "codelion/finepdfs-1B" and cfg.data.sources[0].path == ""
  assert config.from_dict(config.to_dict(cfg)) == cfg


def test_weights_override_as_list_or_mapping():
  data = config.load("data/mix", ["data.weights=[0.6, 0.25, 0.15]"]).data
  assert [s.weight for s in data.sources] == [0.6, 0.25, 0.15]
  data = config.load("data/mix", ["data.weights={dclm: 1, finepdfs: 1, fineweb_edu: 0}"]).data
  assert data.weights == {"finepdfs": 0.5, "dclm": 0.5}  # zero weight: left out of the mix


def test_sources_override_replaces_the_list(tmp_path):
  data = config.load("data/mix", [f"data.sources=[{{name: a, path: {tmp_path}}}]",
                                  "data.seq_len=64"]).data
  assert len(data.sources) == 1 and data.sources[0].format == "auto" and data.seq_len == 64


BAD = [
    (["data.weights=[0.5, -0.1, 0.6]"], r"data\.sources\[1\]\.weight: must be >= 0"),
    (["data.weights=[0, 0, 0]"], r"data\.sources: all weights are zero"),
    (["data.weights=[0.5, 0.5]"], r"data\.weights: 2 weights for 3 sources"),
    (["data.weights={finepdfs: 1, dclm: 1, web: 1}"], r"data\.weights\.web: no source"),
    (["data.weights={finepdfs: 1, dclm: 1}"], r"data\.weights: no weight for source fineweb_edu"),
    (["data.sources=[{name: a, path: x}, {name: a, path: y}]"], r"data\.sources\[1\]\.name"),
    (["data.sources=[{path: x}]"], r"data\.sources\[0\]\.name: required"),
    (["data.sources=[{name: a}]"], r"data\.sources\[0\]\.path"),
    (["data.sources=[{name: a, path: x, format: csv}]"], r"data\.sources\[0\]\.format"),
    (["data.sources=[{name: a, path: x, colour: red}]"], r"data\.sources\[0\]\.colour: unknown"),
    (["data.sources=[{name: a, path: x, weight: lots}]"], r"data\.sources\[0\]\.weight"),
    (["data.sources=[]"], r"data\.sources"),
    (["data.seq_len=0"], r"data\.seq_len"),
    (["data.batch_size=-2"], r"data\.batch_size"),
    (["data.tokenizer_vocab_size=100"], r"data\.tokenizer_vocab_size"),
    (["data.shuffle=true"], r"data\.shuffle: unknown field"),
    (["data.eval_fraction=0.7"], r"data\.eval_fraction"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_data_configs_name_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config.load("data/mix", overrides)
