"""Write ImageNet-sized JPEG files with procedural content, in class folders, for loader benchmarks.

Random noise decodes unlike photographs (it does not compress), so each image is a smooth colour
gradient with a few filled shapes and a little blur, saved at quality 90, about 500 x 375 pixels
like an average ImageNet image. Several processes write at once.

    python benchmarks/make_jpegs.py /tmp/jpegs --images 3200 --classes 10
"""

from __future__ import annotations

import argparse
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make(args: tuple[Path, int, int]) -> None:
    folder, index, classes = args
    rng = np.random.default_rng(index)
    width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    corners = rng.uniform(0, 255, (2, 3))
    t = (xs / width + ys / height)[..., None] / 2
    image = Image.fromarray(((1 - t) * corners[0] + t * corners[1]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = (x0, y0, x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.0))
    target = folder / f"class{index % classes:03d}" / f"{index:06d}.jpg"
    image.save(target, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=3200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--processes", type=int, default=None)
    args = parser.parse_args()
    for c in range(args.classes):
        (args.folder / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    with Pool(args.processes) as pool:
        pool.map(make, [(args.folder, i, args.classes) for i in range(args.images)], chunksize=16)
    print(f"{args.images} JPEG files in {args.folder}")


if __name__ == "__main__":
    main()
