"""``tempme schedule``: derived and budget schedules with their GFLOPs, ratio and speed-up bound."""
import re

import pytest

from tempme_fast import TempMeConfig
from tempme_fast.arguments import add_config_arguments, config_from_args
from tempme_fast.cli import main


def _run(capsys, *argv):
    assert main(["schedule", *argv]) == 0
    return capsys.readouterr().out


def test_budget_schedule_prints_table_ratio_and_bound(capsys):
    out = _run(capsys, "--model", "ViT-B-16", "--frames", "32", "--budget", "0.45")
    assert "layer  6  clipme  32 clips x 103 -> join 2: 206 -> 145 -> 131" in out
    assert "1 clip x 301 tokens = 301 tokens per video (unmerged: 6304)" in out
    ratio, bound = re.search(r"ratio (\d\.\d+), speed-up bound (\d+\.\d+)x", out).groups()
    assert float(ratio) <= 0.45 and float(bound) == pytest.approx(1 / float(ratio), abs=0.01)
    assert re.search(r"GFLOPs per video: 505\.\d \(unmerged: 1124\.\d\)", out)


def test_default_is_the_released_schedule_and_options_override_it(capsys):
    assert "97 tokens per video (unmerged: 600)" in _run(capsys)
    assert "ratio 0.656, speed-up bound 1.52x" in _run(capsys, "--model", "ViT-B-32")
    out = _run(capsys, "--frames", "4", "--imgme-r", "1", "--clip-layers", "10", "--clip-groups", "4")
    assert "layer 10  clipme   4 clips x  40 -> join 4: 160 -> 112 -> 101" in out


def test_it_prints_what_the_other_commands_run_with_the_same_options(capsys):
    """Without options it printed the schedule derived for the model, while every other command ran the released
    ViT-B/32 values on it (ViT-B/16: 367 against 493 tokens)."""
    out = _run(capsys, "--model", "ViT-B-16")
    assert out.startswith("schedule: the released ViT-B/32 values (what every command runs without --derived or "
                          "--budget)") and "493 tokens per video" in out
    out = _run(capsys, "--model", "ViT-B-16", "--derived")
    assert out.startswith("schedule: derived for the model (--derived)") and "367 tokens per video" in out
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True)
    add_config_arguments(parser)
    from tempme_fast.geometry import ViTGeometry

    assert config_from_args(parser.parse_args(["--derived"])) == \
        TempMeConfig.for_model(ViTGeometry.from_name("ViT-B-16"), frames=12)
    assert config_from_args(parser.parse_args([])) == TempMeConfig()
    for argv, message in ((["--derived", "--cross-ratio", "0.2"], "--derived derives the schedule; leave out "
                                                                    "--cross-ratio"),
                          (["--no-merge", "--derived"], "--no-merge runs the unmerged model: leave out --derived")):
        with pytest.raises(ValueError, match=message):
            config_from_args(parser.parse_args(argv))


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0.1"], r"flops_ratio=0.1 cannot be met .* \(valid: 0.430 <= flops_ratio <= 1\)"),
    (["--budget", "0.5", "--imgme-r", "3"], "--budget derives the schedule; leave out --imgme-r"),
    (["--frames", "200", "--derived"], r"frames=200 is outside .*valid: 1..128"),
    (["--frames", "200"], r"frames=200 is not divisible by the clip groups \(2, 2, 3\)"),
    (["--model", "RN50"], "RN50 is a ResNet, not a ViT with a class token"),
    (["--clip-layers", "12", "--clip-groups", "12"], r"clip_layers=\(12,\) reaches layer 12"),
])
def test_errors_exit_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        main(["schedule", *argv])
    assert err.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_config_from_args_reads_budget_and_frames():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args([])) == TempMeConfig()
    config = config_from_args(parser.parse_args(["--frames", "16", "--budget", "0.5"]))
    assert config.frames == 16 and config.clip_groups == (2, 2, 2, 2)
