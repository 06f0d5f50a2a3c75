"""``tempme visualize``: frames in (a video file or an image folder), one PNG out, tokens coloured consistently."""
import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tempme_fast import apply_tempme
from tempme_fast.cli import main
from tempme_fast.errors import ConfigError
from tempme_fast.retrieval import video as video_io
from tempme_fast.visualize import (add_visualize_arguments, draw_merges, load_frames, run_visualize, token_colours,
                                   visualize)

from tiny import TINY_ARGS, TINY_CONFIG, tiny_clip


def _frames(count, size=32):
    """A red square moving right over a grey background."""
    frames = []
    for i in range(count):
        image = np.full((size, size, 3), 120, dtype=np.uint8)
        image[8:16, 2 + 4 * i:10 + 4 * i] = (220, 30, 30)
        frames.append(image)
    return frames


def write_video(path, frames, fps):
    """Encode ``frames`` to ``path``; skips the test where PyAV (which bundles FFmpeg) is not installed."""
    pytest.importorskip("av")
    return video_io.write_video(path, frames, fps=fps)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_visualize_arguments(parser)
    return parser.parse_args(list(argv))


def test_draw_merges_colours_each_token_the_same_in_every_frame():
    images = np.full((2, 16, 16, 3), 100, dtype=np.uint8)
    # 2 frames of 2x2 patches (8 px): token 3 spans both frames, tokens 0, 1 and 4 hold one patch each.
    grid = np.array([[[3, 3], [0, 5]], [[3, 1], [4, 5]]])
    sizes = np.array([1, 1, 1, 3, 1, 2])
    alpha = 0.5
    picture = np.asarray(draw_merges(images, grid, sizes, columns=2, alpha=alpha))
    colours = token_colours(6)
    pad, label = 6, 18

    def pixel(frame, row, col):  # a pixel inside patch (row, col), away from its edges
        x0 = pad + frame * (16 + pad)
        return picture[pad + label + row * 8 + 4, x0 + col * 8 + 4].astype(int)

    blend = lambda k: np.round(0.5 * 100 + alpha * colours[k]).astype(int)  # noqa: E731
    assert (pixel(0, 0, 0) == blend(3)).all() and (pixel(0, 0, 1) == blend(3)).all()
    assert (pixel(1, 0, 0) == blend(3)).all()  # the same token, the same colour, in the other frame
    assert (pixel(0, 1, 1) == blend(5)).all() and (pixel(1, 1, 1) == blend(5)).all()
    for frame, row, col in [(0, 1, 0), (1, 0, 1), (1, 1, 0)]:  # single-patch tokens: not filled
        assert (pixel(frame, row, col) == 100).all()
    # A darkened line where the token changes (between patch (1,0) and (1,1) of frame 0).
    assert (picture[pad + label + 12, pad + 8] < 100).all()
    everything = np.asarray(draw_merges(images, grid, sizes, columns=2, alpha=alpha, all_tokens=True))
    assert (everything[pad + label + 12, pad + 4] == blend(0)).all()
    with pytest.raises(ConfigError, match="alpha=1.5 must be in"):
        draw_merges(images, grid, sizes, alpha=1.5)
    for columns in (0, -2, 1.5, True):  # 0 is refused, not read as the default
        with pytest.raises(ConfigError, match=re.escape(f"columns={columns!r} must be an int >= 1")):
            draw_merges(images, grid, sizes, columns=columns)
    with pytest.raises(ValueError, match="does not tile"):
        draw_merges(images, grid[:1], sizes)


def test_token_colours_are_distinct_and_stable():
    colours = token_colours(97)
    assert colours.shape == (97, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 97
    assert np.array_equal(colours[:10], token_colours(10))


def test_visualize_a_video_file(tmp_path, tiny_model_file, capsys):
    video = write_video(str(tmp_path / "moving.mp4"), _frames(6), fps=1)
    out = tmp_path / "pics" / "merges.png"
    assert run_visualize(_args(video, "--out", str(out), "--model", tiny_model_file, "--backend", "torch",
                               *TINY_ARGS)) == 0
    assert "4 frame(s), 68 tokens -> 25 final tokens" in capsys.readouterr().out
    picture = Image.open(out)
    # 4 frames in one row of 32 px tiles, with labels and a two-line caption.
    assert picture.size == (4 * (32 + 6) + 6, 32 + 18 + 6 + 6 + 2 * 18 + 6)


def test_visualize_a_frame_folder_with_padding(tmp_path, tiny_model_file, capsys):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, image in enumerate(_frames(3)):  # natural order: frame_2 before frame_10
        Image.fromarray(image).save(folder / f"frame_{[1, 2, 10][i]}.png")
    (folder / "notes.txt").write_text("not a frame")
    assert [np.asarray(f)[12, 4 + 4 * i].tolist() for i, f in enumerate(load_frames(str(folder), 4))] == \
        [[220, 30, 30]] * 3
    out = tmp_path / "m.png"
    assert run_visualize(_args(str(folder), "--out", str(out), "--model", tiny_model_file, "--columns", "2",
                               "--all-tokens", *TINY_ARGS)) == 0
    assert "3 frame(s) (+1 padded)" in capsys.readouterr().out
    assert Image.open(out).size[0] == 2 * (32 + 6) + 6
    # The picture never lands among the frames: it would overwrite one, or be read as one next time.
    for inside in ("frame_2.png", "merges.png"):
        with pytest.raises(ConfigError, match="is inside the frame folder .*: it would overwrite a frame"):
            run_visualize(_args(str(folder), "--out", str(folder / inside), "--model", tiny_model_file, *TINY_ARGS))
    assert sorted(p.name for p in folder.iterdir()) == ["frame_1.png", "frame_10.png", "frame_2.png", "notes.txt"]
    assert np.asarray(Image.open(folder / "frame_2.png"))[12, 8].tolist() == [220, 30, 30]


@pytest.mark.parametrize("argv, message", [
    (["missing.mp4"], "no such video file or frame folder"),
    (["EMPTY"], "the folder holds no images"),
    (["VIDEO", "--out", "x.jpg"], "--out x.jpg: write a .png file"),
    (["NOT_A_VIDEO"], "cannot open"),
    (["VIDEO", "--frames", "5"], "frames=5 is not divisible by the clip groups (2, 2)"),
])
def test_visualize_errors(tmp_path, tiny_model_file, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    # Only the cases that read or write a video file need PyAV.
    video = write_video(str(tmp_path / "v.mp4"), _frames(4), fps=1) if {"VIDEO", "NOT_A_VIDEO"} & set(argv) else None
    names = {"EMPTY": str(tmp_path / "empty"), "VIDEO": video, "NOT_A_VIDEO": str(tmp_path / "junk.mp4"),
             "missing.mp4": str(tmp_path / "missing.mp4")}
    argv = [names.get(a, a) for a in argv]
    # The case's own options come last, so they override the defaults before them.
    args = _args(argv[0], "--model", tiny_model_file, "--out", str(tmp_path / "o.png"), *TINY_ARGS, *argv[1:])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_visualize(args)


def test_bad_options_are_refused_before_the_model_runs(tmp_path, capsys):
    for option, value, says in (("--sample-fps", "-1", "argument --sample-fps: -1.0 is not a finite number >= 0"),
                                ("--sample-fps", "nan", "argument --sample-fps: nan is not a finite number >= 0"),
                                ("--alpha", "2", "argument --alpha: 2.0 is not a number in [0, 1]"),
                                ("--alpha", "nan", "argument --alpha: nan is not a number in [0, 1]"),
                                ("--columns", "0", "argument --columns: 0 is not a positive integer")):
        with pytest.raises(SystemExit) as exit_:
            main(["visualize", str(tmp_path / "missing.mp4"), option, value])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    model = tiny_clip()
    apply_tempme(model, TINY_CONFIG)

    def never(*args, **kwargs):
        raise AssertionError("the model ran before the options were checked")

    model.visual.forward = never
    with pytest.raises(ConfigError, match="alpha=-0.5 must be in"):
        visualize(model, [], alpha=-0.5)


def test_visualize_loads_a_checkpoint(tmp_path, tiny_model_file):
    """--checkpoint goes through tempme eval's loader: a state dict of a patched model, frame_pos included."""
    from tempme_fast import apply_tempme
    from tempme_fast.arguments import config_from_args
    from tempme_fast.loading import create_model

    args = _args("unused", *TINY_ARGS)
    model = apply_tempme(create_model(tiny_model_file), config_from_args(args))
    with torch.no_grad():
        model.visual.tempme_frame_pos["2"].fill_(0.5)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    video = write_video(str(tmp_path / "v.mp4"), _frames(4), fps=1)
    assert run_visualize(_args(video, "--out", str(tmp_path / "o.png"), "--model", tiny_model_file,
                               "--checkpoint", str(tmp_path / "ckpt.pt"), *TINY_ARGS)) == 0


def test_padding_frames_neither_colour_nor_count():
    """With fewer frames than the schedule's, the caption counted the padding's tokens and the drawing filled a
    patch as merged when its only partners were padding, which is never drawn."""
    from tempme_fast.visualize import _caption, _trace, shown_sizes

    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch").eval()
    images = [Image.fromarray(f) for f in _frames(3)]
    shown, grid, sources = _trace(model, images)
    sizes = shown_sizes(grid, sources.tokens)
    assert sizes.sum() == 3 * 16  # the drawn frames' patches, each once
    whole = sources.sizes()[0].numpy()
    whole[sources.is_class_token().numpy()] = 0
    assert (sizes <= whole).all()
    caption = _caption("tiny", sources, grid, "random weights", TINY_CONFIG)
    assert f"3 frames (+1 padded, not drawn): 51 tokens in, {sources.tokens} out. Coloured: the " \
           f"{int((sizes >= 2).sum())} final tokens holding 2+ of these patches" in caption
