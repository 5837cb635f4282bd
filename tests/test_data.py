"""Data: datasets and their errors, bad-file replacement, multi-crop transforms, determinism,
the resumable sampler, collate and the builders."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from swav.data import (
    FileListDataset,
    ImageFolderDataset,
    MultiCropDataset,
    ResumableSampler,
    RobustDataset,
    build_dataset,
    build_loader,
    build_transforms,
    collate_multicrop,
    shut_down_workers,
)
from swav.data.transforms import ImgPilColorDistortion, random_resized_crop_box

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def specs(
    num_crops=(2, 3),
    size_crops=(16, 8),
    scales=((0.3, 1.0), (0.1, 0.3)),
    colour=True,
    blur=True,
    flip=0.5,
    total=None,
):
    out = [
        {
            "name": "ImgPilToMultiCrop",
            "total_num_crops": sum(num_crops) if total is None else total,
            "num_crops": list(num_crops),
            "size_crops": list(size_crops),
            "crop_scales": [list(s) for s in scales],
        },
        {"name": "RandomHorizontalFlip", "p": flip},
    ]
    if colour:
        out.append({"name": "ImgPilColorDistortion", "strength": 1.0})
    if blur:
        out.append({"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 0.1, "radius_max": 2.0})
    out += [{"name": "ToTensor"}, {"name": "Normalize", "mean": MEAN, "std": STD}]
    return out


def write_png(path, colour, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(colour)).save(path)
    return path


def noise_image(seed=0, size=(24, 20)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


class ListDataset:
    """(image, label) from a Python list; index k is unreadable when k is in ``bad``."""

    def __init__(self, images, bad=()):
        self.images, self.bad = images, set(bad)

    def __len__(self):
        return len(self.images)

    def path(self, i):
        return f"mem:{i}"

    def __getitem__(self, i):
        if i in self.bad:
            raise OSError("cannot identify image file")
        return self.images[i], i


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def test_image_folder_with_classes(tmp_path):
    # Written out of order: labels follow sorted class names, images sorted within a class.
    write_png(tmp_path / "zebra" / "b.png", (0, 0, 255))
    write_png(tmp_path / "zebra" / "a.PNG", (0, 255, 0))
    write_png(tmp_path / "ant" / "sub" / "c.jpg", (255, 0, 0))
    write_png(tmp_path / ".hidden" / "x.png", (1, 2, 3))  # never a class
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "loose.png", (9, 9, 9))  # ignored next to class folders

    ds = ImageFolderDataset(str(tmp_path))
    assert ds.classes == ["ant", "zebra"]
    assert len(ds) == 3
    assert [ds.path(i).split("/")[-1] for i in range(3)] == ["c.jpg", "a.PNG", "b.png"]
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]
    img, _ = ds[1]
    assert img.mode == "RGB" and img.size == (20, 16)
    assert img.getpixel((0, 0)) == (0, 255, 0)


def test_image_folder_without_classes_is_unlabelled(tmp_path):
    write_png(tmp_path / "b.png", (0, 0, 255))
    write_png(tmp_path / "a.png", (0, 255, 0))
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")  # converted to RGB
    (tmp_path / "readme.md").write_text("x")
    ds = ImageFolderDataset(str(tmp_path))
    assert len(ds) == 3
    assert [ds.path(i).split("/")[-1] for i in range(3)] == ["a.png", "b.png", "grey.png"]
    assert all(ds[i][1] == -1 for i in range(3))
    img, _ = ds[2]
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (77, 77, 77)


def test_file_list_txt_with_and_without_labels(tmp_path):
    write_png(tmp_path / "imgs" / "a.png", (10, 20, 30))
    write_png(tmp_path / "imgs" / "b c.png", (40, 50, 60))  # a space in the name
    absolute = write_png(tmp_path / "elsewhere" / "d.png", (70, 80, 90))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text(
        f"../imgs/a.png 3\n\n# a comment\n../imgs/b c.png\n{absolute}  7\n"
    )
    ds = FileListDataset(str(lists / "train.txt"))
    assert len(ds) == 3
    assert [ds[i][1] for i in range(3)] == [3, -1, 7]
    assert [ds[i][0].getpixel((0, 0)) for i in range(3)] == [
        (10, 20, 30),
        (40, 50, 60),
        (70, 80, 90),
    ]


def test_file_list_npy(tmp_path):
    write_png(tmp_path / "x" / "a.png", (1, 2, 3))
    write_png(tmp_path / "x" / "b.png", (4, 5, 6))
    np.save(tmp_path / "x" / "files.npy", np.array(["a.png", str(tmp_path / "x" / "b.png")]))
    ds = FileListDataset(str(tmp_path / "x" / "files.npy"))
    assert len(ds) == 2
    assert [ds[i][1] for i in range(2)] == [-1, -1]
    assert ds[1][0].getpixel((0, 0)) == (4, 5, 6)


def test_missing_or_empty_locations_fail_at_construction(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        FileListDataset(missing + ".txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt.* is empty"):
        FileListDataset(str(tmp_path / "empty.txt"))
    (tmp_path / "wrong_base.txt").write_text("a.png\nb.png\n")
    with pytest.raises(FileNotFoundError, match="resolved against"):
        FileListDataset(str(tmp_path / "wrong_base.txt"))
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset(["disk_folder"], [missing])


def test_corrupt_image_is_replaced_logged_and_counted(tmp_path, caplog):
    for k in range(4):
        write_png(tmp_path / f"img{k}.png", (60 * k, 0, 0))
    bad = tmp_path / "img1b.jpg"  # sorts between img1 and img2
    bad.write_bytes(b"this is not a jpeg" * 10)
    ds = build_dataset(["disk_folder"], [str(tmp_path)])
    assert len(ds) == 5 and ds.path(2) == str(bad)

    with caplog.at_level(logging.WARNING, logger="swav"):
        img, label, replaced = ds[2]
    assert replaced is True
    assert img.getpixel((0, 0)) == (120, 0, 0)  # the next index, img2
    assert str(bad) in caplog.text and "UnidentifiedImageError" in caplog.text
    assert ds[1][2] is False

    multicrop = MultiCropDataset(ds, build_transforms(specs()), seed=0)
    batch = collate_multicrop([multicrop[i] for i in range(5)])
    assert batch["replaced"].tolist() == [0, 0, 1, 0, 0]
    assert batch["indices"].tolist() == [0, 1, 2, 3, 4]


def test_replacement_wraps_and_gives_up_on_broken_data(caplog):
    images = [noise_image(k) for k in range(3)]
    ds = RobustDataset(ListDataset(images, bad={2}))
    img, label, replaced = ds[2]  # the last one wraps around to index 0
    assert label == 0 and replaced and img is images[0]

    broken = RobustDataset(
        ListDataset([noise_image()] * 100, bad=range(100)), max_consecutive_failures=5
    )
    with (
        caplog.at_level(logging.WARNING, logger="swav"),
        pytest.raises(RuntimeError, match="5 consecutive"),
    ):
        broken[10]
    assert "mem:14" in caplog.text and "mem:15" not in caplog.text


def test_build_dataset_sources_concat_and_limit(tmp_path):
    write_png(tmp_path / "f" / "a.png", (1, 1, 1))
    write_png(tmp_path / "f" / "b.png", (2, 2, 2))
    (tmp_path / "list.txt").write_text("f/a.png 5\n")
    ds = build_dataset(
        ["disk_folder", "disk_filelist", "synthetic"],
        [str(tmp_path / "f"), str(tmp_path / "list.txt"), "test"],
        synthetic_num_images={"train": 7, "test": 4},
        synthetic_image_size=16,
        synthetic_num_classes=3,
        seed=1,
    )
    assert len(ds) == 2 + 1 + 4
    assert [ds[i][1] for i in range(3)] == [-1, -1, 5]
    assert ds[3][0].size == (16, 16) and 0 <= ds[3][1] < 3
    assert ds.path(6) == "synthetic:test:3"

    # One source broadcasts over several paths; DATA_LIMIT keeps the first images.
    two = build_dataset(["disk_folder"], [str(tmp_path / "f")] * 2, limit=3)
    assert len(two) == 3 and two.path(2) == str(tmp_path / "f" / "a.png")
    with pytest.raises(IndexError):
        two[3]

    with pytest.raises(ValueError, match="disk_folder, disk_filelist, synthetic"):
        build_dataset(["disk_folders"], ["x"])
    with pytest.raises(ValueError, match="one source per path"):
        build_dataset(["synthetic", "synthetic"], ["train", "test", "x"])
    with pytest.raises(ValueError, match="'val'.*train, test"):
        build_dataset(["synthetic"], ["val"], synthetic_num_images={"train": 7, "test": 4})


# ----------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------


def test_multicrop_shapes_order_and_sizes():
    t = build_transforms(specs(num_crops=(2, 3), size_crops=(16, 8)))
    assert t.size_crops_per_crop == [16, 16, 8, 8, 8]
    crops = t(noise_image(), torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert all(c.dtype == torch.float32 and c.is_contiguous() for c in crops)


def test_normalisation_of_a_constant_grey_image():
    # No colour change, blur or flip moves a constant image: every pixel maps to (v/255 - mean)/std.
    grey = Image.new("RGB", (30, 20), (128, 128, 128))
    t = build_transforms(specs(colour=False, blur=False))
    expected = torch.tensor([(128 / 255 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    for crop in t(grey, torch.Generator().manual_seed(3)):
        assert torch.allclose(crop, expected.view(3, 1, 1).expand_as(crop), atol=1e-6)
    assert abs(expected[0].item() - 0.0741) < 1e-3  # (0.50196 - 0.485) / 0.229


def test_flip_reverses_a_horizontal_ramp():
    ramp = np.tile(np.arange(0, 240, 10, dtype=np.uint8)[None, :, None], (24, 1, 3))
    img = Image.fromarray(ramp, "RGB")
    full = [
        {
            "name": "ImgPilToMultiCrop",
            "num_crops": [1],
            "size_crops": [24],
            "crop_scales": [[1.0, 1.0]],
        }
    ]
    tail = [{"name": "ToTensor"}]
    never = build_transforms(full + [{"name": "RandomHorizontalFlip", "p": 0.0}] + tail)
    always = build_transforms(full + [{"name": "RandomHorizontalFlip", "p": 1.0}] + tail)
    a = never(img, torch.Generator().manual_seed(0))[0]
    b = always(img, torch.Generator().manual_seed(0))[0]
    assert a[0, 0, 0] < a[0, 0, -1]  # scale 1 and a square image: the whole ramp, left to right
    assert torch.equal(b, a.flip(-1))


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(200, 150, (0.05, 0.14), rng.random(40).tolist())
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        areas.append(w * h / (200 * 150))
        ratios.append(w / h)
    assert 0.05 - 0.005 < min(areas) and max(areas) < 0.14 + 0.005
    assert 3 / 4 - 0.03 < min(ratios) and max(ratios) < 4 / 3 + 0.03
    # log-ratio uniform: about half the crops are wider than tall.
    assert 0.4 < np.mean(np.array(ratios) > 1) < 0.6
    # A scale no box can reach (10x10 out of 4x100) falls back to a centre crop.
    assert random_resized_crop_box(4, 100, (1.0, 1.0), [0.5] * 40) == (0, 47, 4, 5)


def _unnormalise(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


def test_colour_distortion_and_blur_frequencies():
    img = noise_image(size=(12, 12))
    one = dict(num_crops=(1,), size_crops=(12,), scales=((1.0, 1.0),), flip=0.0)
    # Scale 1 of a square image and nothing else: the identity up to normalisation.
    plain = build_transforms(specs(**one, colour=False, blur=False))(img, torch.Generator())[0]
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255
    assert torch.allclose(_unnormalise(plain), expected, atol=1e-5)

    colour = build_transforms(specs(**one, blur=False))
    n, grey, unchanged = 400, 0, 0
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = _unnormalise(colour(img, g)[0])
        grey += bool((x.max(0).values - x.min(0).values).max() < 1e-5)
        unchanged += torch.allclose(x, expected, atol=1e-5)
    # Binomial bounds at about 4 sd: grayscale p 0.2; untouched = no jitter (0.2) x no grey (0.8).
    assert abs(grey - 0.2 * n) < 32
    assert abs(unchanged - 0.16 * n) < 30

    blur_specs = specs(**one, colour=False, blur=False)
    blur_specs.insert(
        2, {"name": "ImgPilGaussianBlur", "p": 0.5, "radius_min": 1.0, "radius_max": 1.0}
    )
    blur = build_transforms(blur_specs)
    blurred = sum(
        not torch.allclose(_unnormalise(blur(img, g)[0]), expected, atol=1e-5) for _ in range(n)
    )
    assert abs(blurred - 0.5 * n) < 40


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"name": "RandomHorizontalFlip"}], "must start with ImgPilToMultiCrop"),
        (
            specs()[:1] + [{"name": "RandomVerticalFlip"}],
            "unknown transform 'RandomVerticalFlip'; allowed: .*ImgPilGaussianBlur",
        ),
        (
            specs()[:1] + [{"name": "RandomHorizontalFlip", "prob": 0.5}, {"name": "ToTensor"}],
            "unknown key.*prob; allowed: p",
        ),
        (specs(total=6), "total_num_crops=6 but sum\\(num_crops\\)=5"),
        (
            specs()[:1] + [{"name": "Normalize", "mean": MEAN, "std": STD}, {"name": "ToTensor"}],
            "Normalize .* after ToTensor",
        ),
        (
            specs()[:1] + [{"name": "ToTensor"}, {"name": "ImgPilColorDistortion"}],
            "before ToTensor",
        ),
        (specs()[:1] + [{"name": "RandomHorizontalFlip"}], "must include ToTensor"),
        (specs()[:1] + [{"name": "ToTensor"}, {"name": "Normalize", "mean": MEAN}], "Normalize"),
        ([{**specs()[0], "size_crops": [16]}] + specs()[1:], "one entry per crop group"),
        (
            specs()[:1] + [{"name": "ImgPilGaussianBlur", "p": 1.5}, {"name": "ToTensor"}],
            "p must be in \\[0, 1\\]",
        ),
    ],
)
def test_bad_transform_specs_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        build_transforms(bad)


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def _multicrop(n=10, seed=0):
    images = [noise_image(k, size=(20 + k, 18)) for k in range(n)]
    return MultiCropDataset(ListDataset(images, bad={3}), build_transforms(specs()), seed=seed)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_crops_are_a_pure_function_of_seed_epoch_index():
    ds = _multicrop()
    first = ds[4][0]
    ds[7], ds[2]  # other samples in between change nothing
    assert _same(first, ds[4][0])
    assert _same(first, _multicrop()[4][0])  # a fresh dataset
    assert not _same(first, _multicrop(seed=1)[4][0])
    ds.set_epoch(1)
    assert not _same(first, ds[4][0])
    ds.set_epoch(0)
    assert _same(first, ds[4][0])
    # Crops within a sample are different draws (seed + epoch + i mixing would also fail below).
    assert not torch.equal(first[0], first[1])
    ds.set_epoch(1)
    shifted = ds[3][0]
    ds.set_epoch(0)
    assert not _same(shifted, first)


def test_the_step_augments_a_collated_batch_exactly_as_the_loader_does():
    # DATA.TRAIN.GPU_AUGMENT: the workers send uint8 crops and the draws; augment_batch (on the
    # training device) must give the crops the loader would have given, replaced images included.
    augmented = _multicrop(n=12)
    raw = MultiCropDataset(augmented.base, augmented.transform, seed=0, augment=False)
    want = collate_multicrop(augmented.__getitems__(list(range(12))))
    sent = collate_multicrop(raw.__getitems__(list(range(12))))
    assert all(c.dtype == torch.uint8 for c in sent["crops"])
    transform = augmented.transform
    assert sent["draws"].shape == (12, transform.total_num_crops, sum(op.num_random for op in transform.ops))
    assert torch.equal(sent["replaced"], want["replaced"]) and int(want["replaced"].sum()) == 1
    got = transform.augment_batch(sent["crops"], sent["draws"])
    for a, b in zip(got, want["crops"], strict=True):
        assert torch.equal(a, b)
    # Some crops only (what a memory-bank pass asks for).
    (one,) = transform.augment_batch([sent["crops"][3]], sent["draws"], which=[3])
    assert torch.equal(one, want["crops"][3])
    with pytest.raises(ValueError, match="2 crop batches for crops .3."):
        transform.augment_batch(sent["crops"][:2], sent["draws"], which=[3])
    with pytest.raises(ValueError, match="needs the batch's draws"):
        transform.augment_batch(sent["crops"], None)


def test_the_batched_blur_of_the_gpu_path_is_the_one_image_blur():
    from swav.data.transforms import gaussian_blur, gaussian_blur_batch

    x = torch.rand(5, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    sigmas = [0.1, 2.0, 0.0, 0.7, 1.3]  # kernels of different widths in one batch, and none
    together = gaussian_blur_batch(x.clone(), sigmas)
    for image, sigma, got in zip(x, sigmas, together, strict=True):
        torch.testing.assert_close(got, gaussian_blur(image.clone(), sigma), rtol=0, atol=1e-6)


def test_a_batch_gets_the_crops_each_sample_gets_alone():
    # The loader augments whole batches; every op must give each image what the op gives that
    # image on its own (the per-image ops are the ones checked against PIL and colorsys below).
    ds = _multicrop(n=12)
    batch = ds.__getitems__(list(range(12)))
    for i, (crops, label, index, replaced) in enumerate(batch):
        alone = ds[i]
        assert (label, index, replaced) == alone[1:]
        for a, b in zip(crops, alone[0], strict=True):
            assert torch.allclose(a, b, atol=2e-5)
    transform = ds.transform
    samples = [
        transform.resample(noise_image(i, size=(20 + i, 18)), torch.Generator().manual_seed(100 + i))
        for i in range(12)
    ]
    together = transform.augment([([c.clone() for c in crops], draws) for crops, draws in samples])
    for (crops, draws), batched in zip(samples, together, strict=True):
        for x, u, got in zip(crops, draws.tolist(), batched, strict=True):
            pos = 0
            for op in transform.ops:  # one crop at a time, op by op
                x = op(x, u[pos : pos + op.num_random])
                pos += op.num_random
            assert torch.allclose(got, x, atol=2e-5), (got - x).abs().max()  # float32 rounding, normalised
    # Colour on its own: each slot of the random order, the grayscale and the no-jitter rows.
    colour = ImgPilColorDistortion(strength=1.0)
    x = torch.rand(64, 3, 6, 5, generator=torch.Generator().manual_seed(1))
    u = torch.rand(64, colour.num_random, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    together = colour.batch(x.clone(), u)
    for i in range(64):
        assert torch.allclose(together[i], colour(x[i].clone(), u[i].tolist()), atol=1e-6), i


def test_getitem_leaves_the_global_rng_alone():
    ds = _multicrop()
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    import random

    py_state = random.getstate()
    for i in range(4):
        ds[i]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])


def _epochs(num_workers, epochs=(0, 1), start_index=0):
    ds = _multicrop()
    sampler = ResumableSampler(len(ds), seed=5)
    loader = build_loader(
        ds, batch_size=4, num_workers=num_workers, sampler=sampler, pin_memory=False
    )
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch, start_index if epoch == epochs[0] else 0)
        ds.set_epoch(epoch)
        out.append(list(loader))
    return out


def test_loader_batches_do_not_depend_on_workers_and_resume_mid_epoch():
    state = torch.get_rng_state()
    serial = _epochs(0)
    assert torch.equal(torch.get_rng_state(), state)  # the loader draws its seeds privately
    parallel = _epochs(2)  # persistent workers: set_epoch must still reach them
    resumed = _epochs(0, epochs=(0,), start_index=4)
    assert [len(e) for e in serial] == [2, 2]  # 10 images, batch 4, drop_last
    for e_serial, e_parallel in zip(serial, parallel, strict=True):
        for a, b in zip(e_serial, e_parallel, strict=True):
            assert a["indices"].tolist() == b["indices"].tolist()
            assert _same(a["crops"], b["crops"])
            assert torch.equal(a["replaced"], b["replaced"])
    assert serial[0][0]["indices"].tolist() != serial[1][0]["indices"].tolist()
    assert resumed[0][0]["indices"].tolist() == serial[0][1]["indices"].tolist()
    assert _same(resumed[0][0]["crops"], serial[0][1]["crops"])
    batch = serial[0][0]
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert batch["labels"].dtype == torch.long and batch["replaced"].shape == (4,)
    # Index 3 is unreadable: counted once if this epoch's 8 sampled indices include it.
    seen = [i for b in serial[0] for i in b["indices"].tolist()]
    assert sum(int(b["replaced"].sum()) for b in serial[0]) == int(3 in seen)
    flags = {
        i: f
        for b in serial[0]
        for i, f in zip(b["indices"].tolist(), b["replaced"].tolist(), strict=True)
    }
    assert all(f == int(i == 3) for i, f in flags.items())


# ----------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------


def test_sampler_is_a_seeded_permutation_per_epoch():
    s = ResumableSampler(50, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and e0 != list(range(50))
    assert list(s) == e0 and list(ResumableSampler(50, seed=3)) == e0
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(50))
    unshuffled = ResumableSampler(7, seed=3, shuffle=False)
    assert list(unshuffled) == list(range(7))


def test_sampler_resume_gives_the_tail():
    s = ResumableSampler(37, seed=0, rank=1, world_size=3)
    s.set_epoch(4)
    whole = list(s)
    assert len(whole) == len(s) == 12
    for start in (0, 5, 12):
        s.set_epoch(4, start_index=start)
        assert list(s) == whole[start:]
    with pytest.raises(ValueError):
        s.set_epoch(4, start_index=13)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_partition_the_data(drop_last):
    n, world = 23, 4
    per_rank = []
    for rank in range(world):
        s = ResumableSampler(n, seed=9, rank=rank, world_size=world, drop_last=drop_last)
        s.set_epoch(2)
        per_rank.append(list(s))
    lengths = {len(p) for p in per_rank}
    merged = [i for p in per_rank for i in p]
    if drop_last:
        assert lengths == {n // world}
        assert len(set(merged)) == len(merged) == world * (n // world)
    else:
        assert lengths == {math.ceil(n / world)}
        assert set(merged) == set(range(n))  # every sample, a few twice as padding
        assert len(merged) - len(set(merged)) == world * math.ceil(n / world) - n
    # Interleaved like DistributedSampler: rank r takes every world-th element of one order.
    order = ResumableSampler(n, seed=9)
    order.set_epoch(2)
    full = list(order)
    assert per_rank[1][:3] == full[1 : 1 + 3 * world : world]


# ----------------------------------------------------------------------------------------------
# Fast path: tensor colour ops, blur, torch resampling, JPEG draft decoding
# ----------------------------------------------------------------------------------------------


def test_hue_rotation_equals_colorsys_in_float64():
    import colorsys

    from swav.data.transforms import adjust_hue

    x = torch.rand(3, 6, 7, generator=torch.Generator().manual_seed(0))
    x[:, 0, :3] = 0.4  # grey pixels keep their value
    x[0, 1] = x[1, 1]  # ties between the largest channels
    x[1, 2] = x[2, 2]
    for shift in (0.3, -0.45, 0.5, 0.0, -0.07):
        got = adjust_hue(x.clone(), shift)
        ref = torch.tensor(
            [
                colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(3, -1).T.double().tolist())
            ],
            dtype=torch.float64,
        ).T.reshape(3, 6, 7)
        assert torch.allclose(got.double(), ref, atol=1e-5), shift


def test_colour_ops_match_pil_within_rounding():
    import torchvision.transforms.functional as TF

    from swav.data.transforms import (
        adjust_brightness,
        adjust_contrast,
        adjust_hue,
        adjust_saturation,
        to_float_tensor,
        to_grayscale,
    )

    img = noise_image(1, size=(20, 24))
    x = to_float_tensor(img)
    cases = [
        (adjust_brightness, TF.adjust_brightness, 1.5, 1),
        (adjust_brightness, TF.adjust_brightness, 0.3, 1),
        (adjust_contrast, TF.adjust_contrast, 0.4, 1),
        (adjust_saturation, TF.adjust_saturation, 1.7, 2),
        (adjust_hue, TF.adjust_hue, 0.3, 16),  # PIL rounds H, S and V to 8 bits on the way
    ]
    for ours, pil, factor, max_levels in cases:
        diff = (ours(x.clone(), factor) - to_float_tensor(pil(img, factor))).abs() * 255
        assert diff.max() <= max_levels and diff.mean() < 1.5, (ours.__name__, factor)
    grey = (to_grayscale(x) - to_float_tensor(img.convert("L").convert("RGB"))).abs() * 255
    assert grey.max() <= 0.5 + 1e-4


def test_gaussian_blur_is_pils_filter():
    from PIL import ImageFilter

    from swav.data.transforms import gaussian_blur, gaussian_kernel, to_float_tensor

    for sigma in (0.1, 0.3, 0.8, 1.0, 1.7, 2.0):
        half = np.array(gaussian_kernel(sigma), dtype=np.float64)
        taps = np.concatenate([half[:0:-1], half])
        offsets = np.arange(len(taps)) - (len(taps) - 1) / 2
        assert abs(taps.sum() - 1) < 1e-6  # blurring keeps the mean
        assert abs((taps * offsets**2).sum() - sigma**2) < 0.01 * sigma**2 + 1e-4  # variance sigma^2

    blocks = np.random.default_rng(2).integers(0, 256, (6, 5, 3))
    img = Image.fromarray(np.kron(blocks, np.ones((4, 4, 1))).astype(np.uint8))  # 20 x 24 px
    x = to_float_tensor(img)
    for sigma in (0.3, 1.0, 2.0):
        half = np.array(gaussian_kernel(sigma))
        w = np.concatenate([half[:0:-1], half])
        r = len(half) - 1
        ref = np.pad(x.double().numpy(), ((0, 0), (r, r), (r, r)), mode="edge")
        for axis in (2, 1):
            ref = np.apply_along_axis(np.convolve, axis, ref, w, mode="valid")
        got = gaussian_blur(x, sigma)
        assert got.shape == x.shape and np.allclose(got.numpy(), ref, atol=1e-5)
        # PIL rounds each of its six passes to 8 bits and pads each pass: a level or two apart.
        diff = (got - to_float_tensor(img.filter(ImageFilter.GaussianBlur(sigma)))).abs() * 255
        assert diff.mean() < 0.6 and diff.max() < 4, sigma
    assert gaussian_blur(x, 0.0) is x


def test_crops_resample_like_torchvisions_random_resized_crop():
    # torchvision's RandomResizedCrop on a PIL image: crop the box, then resize it (bilinear,
    # antialiased when shrinking). Scale 1 shrinks the centred box; scale 0.1 enlarges a small one.
    from PIL import ImageFilter

    from swav.data.transforms import random_resized_crop_box, to_float_tensor

    img = noise_image(3, size=(40, 30)).filter(ImageFilter.SMOOTH)
    for scale in (1.0, 0.1):
        one = [{"name": "ImgPilToMultiCrop", "num_crops": [1], "size_crops": [12], "crop_scales": [[scale, scale]]}]
        t = build_transforms(one + [{"name": "ToTensor"}])
        g = torch.Generator().manual_seed(0)
        u = torch.rand((1, t._num_random), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        left, top, w, h = random_resized_crop_box(40, 30, (scale, scale), u[0].tolist())
        crop = t(img, g)[0]
        pil = to_float_tensor(img.crop((left, top, left + w, top + h)).resize((12, 12), Image.Resampling.BILINEAR))
        diff = (crop - pil).abs() * 255
        assert diff.max() <= 1.0 + 1e-4 and diff.mean() < 0.25, scale


def test_draft_scale_keeps_every_crop_at_least_at_its_output_size():
    from swav.data.transforms import draft_scale

    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(8, 64, rng.integers(1, 5)).tolist()
        boxes = [(0, 0, int(rng.integers(4, 700)), int(rng.integers(4, 700))) for _ in sizes]
        s = draft_scale(boxes, sizes)
        assert s in (1, 2, 4, 8)
        room = min(min(w, h) / size for (_, _, w, h), size in zip(boxes, sizes, strict=True))
        assert s <= max(room, 1)  # never below a crop's output size ...
        assert s == 8 or 2 * s > room  # ... and the largest scale that allows it
    assert draft_scale([(0, 0, 100, 64)], [32]) == 2
    assert draft_scale([(0, 0, 100, 64), (0, 0, 40, 40)], [32, 32]) == 1


def _smooth_jpeg(path, size=(320, 256)):
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / 40.0
    arr = np.stack([np.sin(xx) + np.cos(yy), np.sin(xx + yy), np.cos(xx * 0.7 - yy)], -1)
    Image.fromarray(((arr + 2) * 60).astype(np.uint8)).save(path, quality=95)
    return path


def test_draft_decoding_is_used_and_close_to_full_decoding(tmp_path):
    from swav.data.datasets import open_image
    from swav.data.transforms import decode_for_crops

    path = str(_smooth_jpeg(tmp_path / "big.jpg"))
    # Every box keeps at least 0.5 of 256 px a side: 128 >= 4 x 24, so a draft at scale 4.
    t = build_transforms(
        specs(num_crops=(2, 2), size_crops=(24, 16), scales=((0.5, 1.0), (0.5, 0.6)), colour=False, blur=False)
    )
    img, scale = decode_for_crops(open_image(path), [(0, 0, 130, 128)], [24])
    assert scale == 4.0 and img.size == (80, 64) and img.mode == "RGB"
    drafted = t(open_image(path), torch.Generator().manual_seed(5))
    full = Image.open(path).convert("RGB")  # already decoded: no draft possible
    reference = t(full, torch.Generator().manual_seed(5))
    for a, b in zip(drafted, reference, strict=True):
        assert a.shape == b.shape
        assert (_unnormalise(a) - _unnormalise(b)).abs().mean() * 255 < 3
    # A crop box smaller than twice the output size: decoded at full size.
    assert decode_for_crops(open_image(path), [(0, 0, 47, 200)], [24])[1] == 1.0


def test_file_that_fails_only_while_decoding_is_replaced(tmp_path, caplog):
    good = _smooth_jpeg(tmp_path / "a.jpg", size=(64, 48))
    data = good.read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 3])  # a valid header, truncated pixels
    ds = MultiCropDataset(build_dataset(["disk_folder"], [str(tmp_path)]), build_transforms(specs()), seed=0)
    with caplog.at_level(logging.WARNING, logger="swav"):
        crops, _, index, replaced = ds[1]
    assert index == 1 and replaced and "b.jpg" in caplog.text
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3
    assert ds[0][3] is False


def test_persistent_workers_end_when_shut_down_although_they_ignore_sigterm():
    loader = build_loader(_multicrop(), batch_size=4, num_workers=1, sampler=None, pin_memory=False)
    next(iter(loader))
    [worker] = loader._iterator._workers
    # The terminate that Python sends daemonic children at exit: the worker ignores it, so a
    # training process whose loader outlived the run would wait for it forever.
    worker.terminate()
    worker.join(timeout=2)
    assert worker.is_alive()
    shut_down_workers(loader)
    assert not worker.is_alive()
    assert loader._iterator is None
    assert len(list(loader)) == 2  # the loader still works: a new iterator starts new workers
    shut_down_workers(loader)
