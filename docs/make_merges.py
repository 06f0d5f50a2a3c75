"""Regenerate docs/merges.png: a synthetic video of moving shapes through ``tempme visualize``.

    python docs/make_merges.py            # writes docs/demo_shapes.mp4 (temporary) and docs/merges.png

Random-weight ViT-B/32 (no download): the picture shows where TempMe's schedule merges tokens of a
simple scene, not what a trained model would merge.
"""
import os
import sys
import tempfile

import numpy as np

from tempme_fast.retrieval.video import write_video
from tempme_fast.visualize import add_visualize_arguments, run_visualize


def shapes_video(path: str, seconds: int = 12, fps: int = 2, size: int = 224) -> str:
    """A still, softly shaded background with a red disc crossing, a blue square bouncing and a
    green bar that stays put."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = np.stack([200 - 40 * yy / size, 210 - 20 * xx / size, 225 + 0 * xx], axis=-1)
    frames = []
    for i in range(seconds * fps):
        t = i / (seconds * fps - 1)
        image = background.copy()
        cx, cy = 30 + t * (size - 60), 70
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < 24 ** 2] = (220, 40, 40)
        sx, sy = 40 + 120 * abs(np.sin(np.pi * t)), 130 + 40 * t
        image[(abs(xx - sx) < 22) & (abs(yy - sy) < 22)] = (40, 70, 210)
        image[(xx > 170) & (xx < 200) & (yy > 20) & (yy < 200)] = (40, 160, 60)
        frames.append(image.clip(0, 255).astype(np.uint8))
    return write_video(path, frames, fps=fps)


def main(argv=None) -> int:
    import argparse

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        video = shapes_video(os.path.join(tmp, "shapes.mp4"))
        parser = argparse.ArgumentParser()
        add_visualize_arguments(parser)
        args = parser.parse_args([video, "--out", os.path.join(here, "merges.png"), "--backend", "torch"]
                                 + list(argv or []))
        return run_visualize(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
