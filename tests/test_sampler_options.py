"""The diffusion sampler options, declared once (dhara_jax/sampler_options.py): the same
declaration in every command that takes them, Sampling's defaults where a command fills them,
None where it must see what was given, and the study's keys are the same options."""

import argparse
import dataclasses

import pytest

from dhara_jax import cli
from dhara_jax.errors import DharaError
from dhara_jax.sampler_options import SAMPLER_KEYS, SAMPLING_DEFAULTS, option_flag
from dhara_jax.sampling import Sampling
from dhara_jax.sampling.settings import CACHES, REMASKING
from dhara_jax.study import runner, spec
from test_study import TOY, write_study

COMMANDS = {"generate": ["generate", "RUN", "--prompt", "x"], "eval": ["eval", "RUN"],
            "bench throughput": ["bench", "throughput", "RUN"]}


def _subparser(command: str) -> argparse.ArgumentParser:
  parser = cli.build_parser()
  for name in command.split():
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parser = sub.choices[name]
  return parser


def _declared(command: str) -> dict[str, tuple]:
  return {a.dest: (a.option_strings, a.type, a.metavar, a.help)
          for a in _subparser(command)._actions if a.dest in SAMPLER_KEYS}


def test_the_keys_and_defaults_are_samplings():
  fields = {f.name: f.default for f in dataclasses.fields(Sampling)}
  assert SAMPLING_DEFAULTS == {k: fields[k] for k in SAMPLER_KEYS}
  assert list(SAMPLER_KEYS) == [k for k in fields if k in SAMPLER_KEYS]  # Sampling's order
  declared = _declared("generate")
  assert declared["remasking"][2] == "|".join(REMASKING)
  assert declared["cache"][2] == "|".join(CACHES)
  assert [declared[k][0] for k in SAMPLER_KEYS] == [[option_flag(k)] for k in SAMPLER_KEYS]


def test_every_command_declares_the_same_options():
  generate = _declared("generate")
  assert set(generate) == set(SAMPLER_KEYS)
  for command in COMMANDS:
    assert _declared(command) == generate, command


def test_generate_fills_samplings_defaults_and_the_others_see_what_was_given():
  args = cli.parse(COMMANDS["generate"])
  sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                      **{k: getattr(args, k) for k in SAMPLER_KEYS})
  assert sampling == Sampling()
  for command in ("eval", "bench throughput"):
    args = cli.parse(COMMANDS[command])
    assert all(getattr(args, k) is None for k in SAMPLER_KEYS), command
    given = cli.parse([*COMMANDS[command], "--steps", "4", "--remasking", "random"])
    assert (given.steps, given.remasking, given.cache) == (4, "random", None), command


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_step_counts_are_integers_from_zero(command, capsys):
  assert cli.parse([*COMMANDS[command], "--block-length", "0"]).block_length == 0
  with pytest.raises(SystemExit) as e:
    cli.parse([*COMMANDS[command], "--steps", "-1"])
  assert e.value.code == 2
  assert "expected an integer >= 0, got '-1'" in capsys.readouterr().err


def test_the_study_passes_its_sampler_settings_as_these_options(tmp_path):
  settings = {"steps": 8, "block_length": 4, "remasking": "random", "threshold": 0.9,
              "cache": "none"}
  toy = {**TOY, "throughput": {**TOY["throughput"], "diffusion": settings}}
  study = spec.load(write_study(tmp_path / "study.yaml", toy))
  cell = next(c for c in study.cells if c.diffusion)
  [argv] = [argv for name, argv in runner.steps(study, tmp_path, cell) if name == "throughput"]
  args = cli.parse(argv[1:])  # without the leading "dhara"
  assert {k: getattr(args, k) for k in SAMPLER_KEYS} == settings
  bad = {**TOY, "throughput": {**TOY["throughput"], "diffusion": {"temperature": 1.0}}}
  with pytest.raises(DharaError, match="throughput.diffusion takes " + ", ".join(SAMPLER_KEYS)):
    spec.load(write_study(tmp_path / "bad.yaml", bad))
