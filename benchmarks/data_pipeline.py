"""Multi-crop data pipeline throughput per worker: ours against the straightforward PIL pipeline.

Samples per second of one process on one thread (``torch.set_num_threads(1)``, as a DataLoader
worker runs) turning JPEG files on disk into the guide's 2x224 (scale 0.14-1) + 6x96 (scale
0.05-0.14) crops with flip, colour distortion, blur, ToTensor and Normalize:

- ``ours``: ``swav.data`` exactly as training uses it (folder dataset, MultiCropDataset seeded per
  (seed, epoch, index), build_transforms on the transform list of ``pretrain/swav/swav_8node_resnet``).
- ``pil``: the straightforward way (the official SwAV code's): decode the whole image with PIL, then
  per crop torchvision RandomResizedCrop, RandomHorizontalFlip, ColorJitter(0.8, 0.8, 0.8, 0.2) with
  p 0.8, RandomGrayscale(0.2), PIL GaussianBlur (radius U(0.1, 2)) with p 0.5, ToTensor, Normalize.

The two run interleaved (A B A B ...) in one process so background load hits both alike; each
round decodes and crops every photo ``--repeats`` times; the median and range over ``--rounds``
rounds are reported, with CPU time per sample (less sensitive to other processes than wall time).

The photos are real: scikit-image's sample photographs written once as JPEG (quality 90):
    /work/benchenv/bin/python benchmarks/data_pipeline.py --make-photos /work/data/photos
    /work/benchenv/bin/python benchmarks/data_pipeline.py --make-photos /work/data/photos_large --large
    python benchmarks/data_pipeline.py /work/data/photos --rounds 9 --repeats 6 --ablate-draft
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter

# ImageNet-like sizes (300x451 to 500x741): scikit-image's colour photographs.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
# Larger ones (872x1000 and 1411x1411), where JPEG draft decoding can apply.
LARGE_PHOTOS = ("hubble_deep_field", "retina")


def make_photos(folder: Path, large: bool) -> None:
    import skimage.data  # only in the benchmark venv

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in LARGE_PHOTOS if large else PHOTOS:
        if name.startswith("motorcycle"):
            left, right, _ = skimage.data.stereo_motorcycle()
            arrays[name] = left if name.endswith("left") else right
        else:
            arrays[name] = getattr(skimage.data, name)()
    for name, array in arrays.items():
        Image.fromarray(array).convert("RGB").save(folder / f"{name}.jpg", quality=90)
        print(f"{folder / name}.jpg {array.shape[1]}x{array.shape[0]}")


def guide_transforms() -> list[dict]:
    from omegaconf import OmegaConf

    from swav.config import load_config

    cfg = load_config(["config=pretrain/swav/swav_8node_resnet"])
    return OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS)


class PilBlur:
    """Gaussian blur with p 0.5 and radius U(0.1, 2), as the official SwAV code does it."""

    def __call__(self, img):
        if random.random() >= 0.5:
            return img
        return img.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))


def pil_pipeline(specs: list[dict]):
    import torchvision.transforms as T

    crop = specs[0]
    normalize = next(s for s in specs if s["name"] == "Normalize")
    per_crop = []
    for n, size, scale in zip(crop["num_crops"], crop["size_crops"], crop["crop_scales"], strict=True):
        t = T.Compose([
            T.RandomResizedCrop(size, scale=tuple(scale)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            PilBlur(),
            T.ToTensor(),
            T.Normalize(normalize["mean"], normalize["std"]),
        ])
        per_crop += [t] * n

    def sample(path: str) -> list[torch.Tensor]:
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return [t(img) for t in per_crop]

    return sample


def ours_pipeline(specs: list[dict], folder: str):
    from swav.data import MultiCropDataset, build_dataset, build_transforms

    dataset = MultiCropDataset(build_dataset(["disk_folder"], [folder]), build_transforms(specs), seed=0)
    state = {"epoch": 0}

    def sample(index: int) -> list[torch.Tensor]:
        if index == 0:  # a new pass over the photos: new crops, as in a new epoch
            state["epoch"] += 1
            dataset.set_epoch(state["epoch"])
        return dataset[index][0]

    return dataset, sample


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="/work/data/photos", help="folder of JPEG photos")
    parser.add_argument("--make-photos", metavar="FOLDER", help="write scikit-image's photos there and exit")
    parser.add_argument("--large", action="store_true", help="with --make-photos: the two large photos instead")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per pipeline (interleaved)")
    parser.add_argument("--repeats", type=int, default=6, help="passes over the photos per round")
    parser.add_argument("--ablate-draft", action="store_true", help="also time ours with JPEG draft decoding off")
    args = parser.parse_args()
    if args.make_photos:
        make_photos(Path(args.make_photos), args.large)
        return

    torch.set_num_threads(1)
    specs = guide_transforms()
    dataset, ours = ours_pipeline(specs, args.folder)
    paths = [dataset.path(i) for i in range(len(dataset))]
    pil = pil_pipeline(specs)
    random.seed(0)
    torch.manual_seed(0)
    sizes = sorted({Image.open(p).size for p in paths})
    print(f"# {platform.machine()}, torch {torch.__version__}, 1 thread; {len(paths)} photos in {args.folder} "
          f"({', '.join(f'{w}x{h}' for w, h in sizes)}); {load()}")
    crop = specs[0]
    print(f"# crops {crop['num_crops']} x {crop['size_crops']} px, scales {crop['crop_scales']}; "
          f"{args.rounds} rounds x {args.repeats} passes")

    runs = {"pil": lambda i: pil(paths[i]), "ours": ours}
    if args.ablate_draft:
        import swav.data.transforms as transforms

        _, ours_full = ours_pipeline(specs, args.folder)
        draft_scale = transforms.draft_scale

        def without_draft(i: int) -> list[torch.Tensor]:
            transforms.draft_scale = lambda boxes, sizes: 1
            try:
                return ours_full(i)
            finally:
                transforms.draft_scale = draft_scale

        runs["ours-nodraft"] = without_draft
    for fn in runs.values():  # warm-up: file cache, lazy imports
        for i in range(len(paths)):
            fn(i)
    rates = {k: [] for k in runs}
    cpu_ms = {k: [] for k in runs}
    n = args.repeats * len(paths)
    for _ in range(args.rounds):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.repeats):
                for i in range(len(paths)):
                    fn(i)
            rates[name].append(n / (time.perf_counter() - wall))
            cpu_ms[name].append(1e3 * (time.process_time() - cpu) / n)
    print(f"{'pipeline':12s} {'median samples/s':>17s} {'min':>7s} {'max':>7s} {'CPU ms/sample':>14s}")
    for name in runs:
        r = rates[name]
        print(f"{name:12s} {statistics.median(r):17.1f} {min(r):7.1f} {max(r):7.1f} {statistics.median(cpu_ms[name]):14.2f}")
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["pil"])
    cpu_ratio = statistics.median(cpu_ms["pil"]) / statistics.median(cpu_ms["ours"])
    print(f"ours / pil: {ratio:.2f}x samples/s (wall), {cpu_ratio:.2f}x (CPU time); {load()}")


if __name__ == "__main__":
    main()
