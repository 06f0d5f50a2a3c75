"""The options the commands share: one definition, the same choices, and one way to a TempMeConfig."""
import argparse

import pytest

from tempme_fast import TempMeConfig, ops
from tempme_fast.arguments import add_config_arguments, config_from_args
from tempme_fast.cli import build_parser

COMMANDS = {"bench": [], "eval": ["--data", "d"], "train": ["--synthetic", "4"], "visualize": ["v.mp4"],
            "schedule": []}


def _parse(command, *argv):
    return build_parser().parse_args([command, *COMMANDS[command], *argv])


def _subparser(command) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["bench", "eval", "train", "visualize"])
def test_model_options_are_shared(command):
    options = {a.dest: a for a in _subparser(command)._actions}
    for dest in ("model", "pretrained", "device", "imgme_r", "clip_layers", "clip_groups", "cross_ratio",
                 "intra_ratio", "frames"):
        assert dest in options, (command, dest)
    backends = options["backends" if command == "bench" else "backend"]
    assert tuple(backends.choices) == ops.BACKENDS
    assert options["model"].default == "ViT-B-32-quickgelu"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_give_the_released_schedule(command):
    assert config_from_args(_parse(command)) == TempMeConfig()


@pytest.mark.parametrize("command", ["eval", "train"])
def test_no_merge_is_the_unmerged_baseline_whatever_the_knobs(command):
    assert config_from_args(_parse(command, "--no-merge", "--frames", "6", "--imgme-r", "3")) == \
        TempMeConfig.unmerged(6)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_knobs_override_the_released_values(command):
    args = _parse(command, "--frames", "4", "--imgme-r", "1", "--clip-layers", "5", "--clip-groups", "4",
                  "--cross-ratio", "0.2", "--intra-ratio", "0.05")
    assert config_from_args(args) == TempMeConfig(frames=4, imgme_r=1, clip_layers=(5,), clip_groups=(4,),
                                                  cross_ratio=0.2, intra_ratio=0.05)


def test_empty_clip_layers_mean_no_joins():
    args = _parse("bench", "--clip-layers", "--clip-groups")
    assert config_from_args(args).clip_layers == () and config_from_args(args).clip_groups == ()


def test_bad_values_name_the_option(capsys):
    with pytest.raises(SystemExit):
        _parse("eval", "--backend", "cuda")
    assert "--backend: invalid choice: 'cuda'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("bench", "--frames", "0")
    assert "--frames: 0 is not a positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"frames=10 is not divisible by the clip groups \(2, 2, 3\)"):
        config_from_args(_parse("train", "--frames", "10"))


def test_a_parser_without_merge_always_merges():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--frames", "6", "--clip-groups", "2", "3", "--clip-layers", "8", "9"])
    assert config_from_args(args) == TempMeConfig(frames=6, clip_layers=(8, 9), clip_groups=(2, 3))
