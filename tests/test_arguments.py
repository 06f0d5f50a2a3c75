"""The options the commands share: one definition, the same choices, and one way to a TempMeConfig."""
import argparse

import pytest

from tempme_fast import TempMeConfig, ops
from tempme_fast.arguments import add_config_arguments, config_from_args
from tempme_fast.cli import build_parser
from tempme_fast.errors import ConfigError

COMMANDS = {"bench": [], "eval": ["--data", "d"], "train": ["--synthetic", "4"], "visualize": ["v.mp4"],
            "schedule": []}


def _parse(command, *argv):
    return build_parser().parse_args([command, *COMMANDS[command], *argv])


def _subparser(command) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["bench", "eval", "train", "visualize"])
def test_model_options_are_shared(command):
    options = {s: a for a in _subparser(command)._actions for s in a.option_strings}
    for option in ("--model", "--pretrained", "--device", "--dtype", "--backend", "--imgme-r", "--clip-layers",
                   "--clip-groups", "--cross-ratio", "--intra-ratio", "--frames"):
        assert option in options, (command, option)
    assert tuple(options["--backend"].choices) == ops.BACKENDS
    assert set(options["--dtype"].choices) == {"fp32", "fp16", "bf16"}
    assert options["--model"].default == "ViT-B-32-quickgelu"


def test_schedule_takes_the_model(capsys):
    from tempme_fast.cli import main

    assert main(["schedule", "--model", "ViT-B-16"]) == 0
    assert "(unmerged: 2364)" in capsys.readouterr().out  # 12 frames x (1 + 14 * 14)
    assert main(["schedule", "--model", "ViT-B-16", "--depth", "12", "--tokens-per-frame", "50"]) == 0
    assert "97 tokens per video (unmerged: 600)" in capsys.readouterr().out


def test_workers_default_fits_the_machine(monkeypatch):
    from tempme_fast import arguments

    for cores, workers, index_workers in ((None, 0, 0), (1, 0, 0), (2, 1, 1), (4, 3, 3), (5, 3, 4), (64, 3, 4)):
        monkeypatch.setattr(arguments.os, "cpu_count", lambda: cores)
        assert arguments.default_workers() == workers
        assert arguments.default_workers(most=4) == index_workers  # tempme index's
    assert _parse("eval").workers <= max(0, (__import__("os").cpu_count() or 1) - 1)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_give_the_released_schedule(command):
    assert config_from_args(_parse(command)) == TempMeConfig()


@pytest.mark.parametrize("command", ["eval", "train"])
def test_no_merge_is_the_unmerged_baseline_and_takes_no_knob(command):
    assert config_from_args(_parse(command, "--no-merge", "--frames", "6")) == TempMeConfig.unmerged(6)
    with pytest.raises(ConfigError, match="--no-merge runs the unmerged model: leave out --imgme-r, --budget"):
        config_from_args(_parse(command, "--no-merge", "--frames", "6", "--imgme-r", "3", "--budget", "0.5"))


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


def test_threads_past_the_cores_warn(monkeypatch):
    import torch

    from tempme_fast import arguments

    monkeypatch.setattr(arguments.os, "cpu_count", lambda: 1)
    threads = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match="--threads 2 exceeds the 1 CPU core;"):
            assert arguments.apply_threads(2) == 2
    finally:
        torch.set_num_threads(threads)
    assert arguments.apply_threads(None) == threads
