"""ImageFolder data: checks, streaming decoding (with an in-memory cache for small sets), timm's transforms.

A dataset directory holds ``train/<class>/*`` and ``val/<class>/*`` (or
``validation/<class>/*``, timm's layout). Images are decoded where they are
read: in the DataLoader's worker processes when training uses them, so a set
of any size streams from disk. A set whose decoded images fit in
``cache_mb`` is decoded once into memory instead, so a CPU epoch of a small
set does not pay for PNG decoding again. Transforms are timm's
(``create_transform``) with the model's interpolation, crop and mean/std.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from updp.core.errors import UpdpError

CACHE_MB = 2048  # default budget of decoded images kept in memory per split
VAL_FOLDERS = ("val", "validation")


class DataError(UpdpError):
    """A dataset directory that is missing, empty or inconsistent."""


def _images(folder: Path) -> list[tuple[str, int]]:
    classes, index = find_classes(str(folder))
    samples = []
    for name in classes:
        for root, _, files in sorted(os.walk(folder / name)):
            samples += [(os.path.join(root, f), index[name]) for f in sorted(files)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    return samples


def _npz(path: Path) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - any unreadable archive is the same user error
        raise DataError(f"dataset '{path}' is not a readable .npz archive ({type(e).__name__})") from None
    missing = {"train_x", "train_y", "val_x", "val_y", "classes"} - set(data)
    if missing:
        raise DataError(f"dataset '{path}' lacks arrays {', '.join(sorted(missing))}")
    for split in ("train", "val"):
        _check_arrays(path, split, data[f"{split}_x"], data[f"{split}_y"], len(data["classes"]))
    return data


def _check_arrays(path: Path, split: str, x, y, num_classes: int) -> None:
    """uint8 NHWC images (1 or 3 channels) and one integer label in [0, classes) per image."""
    import numpy as np

    where = f"dataset '{path}': {split}_x"
    if not len(x):
        raise DataError(f"dataset '{path}' holds no {split} images")
    if x.dtype != np.uint8:
        raise DataError(f"{where} must be uint8 images (0-255), not {x.dtype}; convert with (x * 255).astype('uint8')")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{where} must be NHWC images with 1 or 3 channels last, got shape {tuple(x.shape)}"
                        + ("; transpose NCHW with x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3)
                           else ""))
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"dataset '{path}': {split}_y must hold one label per image ({len(x)}), "
                        f"got shape {tuple(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"dataset '{path}': {split}_y must be integer class indices, not {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"dataset '{path}': {split}_y has labels outside 0..{num_classes - 1} "
                        f"(min {y.min()}, max {y.max()}) for its {num_classes} classes")


def split_folder(root: Path, split: str) -> Path:
    """``root/train``; ``root/val``, else ``root/validation`` (timm's and ImageNet's layout)."""
    if split == "train":
        return root / "train"
    return next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), root / "val")


def check_dataset(root: str | os.PathLike) -> list[str]:
    """The class names, after checking train/ and val/ exist, hold images and agree.

    ``root`` may also be an ``.npz`` archive (``train_x/train_y/val_x/val_y``
    uint8 NHWC images and labels, ``classes``), as the demo data ships.
    """
    root = Path(root)
    if root.suffix == ".npz" and root.is_file():
        return [str(c) for c in _npz(root)["classes"]]
    if not root.is_dir():
        raise DataError(f"dataset directory '{root}' does not exist")
    classes = {}
    for split in ("train", "val"):
        folder = split_folder(root, split)
        if not folder.is_dir():
            raise DataError(f"dataset '{root}' has no {split}/ folder (expected {split}/<class>/<image>"
                            + (", or validation/<class>/<image>)" if split == "val" else ")"))
        try:
            classes[split] = find_classes(str(folder))[0]
        except FileNotFoundError:
            raise DataError(f"'{folder}' has no class folders") from None
        if not _images(folder):
            raise DataError(f"'{folder}' holds no images ({', '.join(IMG_EXTENSIONS[:4])}, ...)")
    if classes["train"] != classes["val"]:
        only = set(classes["train"]) ^ set(classes["val"])
        raise DataError(f"train/ and val/ of '{root}' have different classes (e.g. {', '.join(sorted(only)[:3])})")
    return classes["train"]


class ImageFolderImages(Dataset):
    """An ImageFolder split (or arrays from an .npz) as RGB PIL images under ``transform``.

    Images are decoded when read (in DataLoader workers during training); a split whose decoded
    size (estimated from its first image) fits in ``cache_mb`` is decoded once into memory.
    """

    def __init__(self, folder: str | os.PathLike | None, transform=None, arrays=None, cache_mb: float = CACHE_MB):
        self.transform = transform
        self.cache = None
        if arrays is not None:
            images, labels = arrays
            self.cache = [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).convert("RGB")
                          for img in images]
            self.samples = [("", int(y)) for y in labels]
            return
        self.samples = _images(Path(folder))
        first = self._decode(self.samples[0][0])
        if len(first.tobytes()) * len(self.samples) <= cache_mb * 2 ** 20:
            self.cache = [first] + [self._decode(p) for p, _ in self.samples[1:]]

    @property
    def streaming(self) -> bool:
        return self.cache is None

    @staticmethod
    def _decode(path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                return img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt or truncated files
            raise DataError(f"cannot decode image '{path}' ({type(e).__name__}: {str(e)[:120]}); "
                            "remove or replace the file") from None

    def __len__(self) -> int:
        return len(self.samples)

    def with_transform(self, transform) -> "ImageFolderImages":
        """The same images (and decoded cache) under another transform."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, i: int):
        img = self.cache[i] if self.cache is not None else self._decode(self.samples[i][0])
        return (self.transform(img) if self.transform else img), self.samples[i][1]


def transforms(img_size: int, train: bool, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               interpolation: str = "bicubic", crop_pct: float = 1.0):
    """timm's transforms (``create_transform``): for training a random resized crop (scale 0.35-1, as
    small inputs need) and a flip, no colour jitter; for evaluation a resize to ``img_size / crop_pct``
    and a center crop. Both end in a float tensor normalized with ``mean``/``std``."""
    if train:
        return create_transform(img_size, is_training=True, scale=(0.35, 1.0), color_jitter=0.0,
                                interpolation=interpolation, mean=mean, std=std)
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=mean, std=std)


@dataclass
class Splits:
    """Training images, a held-out slice of train (scored with ``--score-on held_out``) and val."""

    classes: list[str]
    train: Dataset
    train_eval: Dataset  # the same training images without augmentation (BN calibration)
    held_out: Dataset
    val: Dataset


def normalization(model: nn.Module) -> dict:
    """The mean/std, interpolation and evaluation crop the model was trained with, as timm resolves them
    from its pretrained config (keyword arguments of :func:`load_splits`)."""
    cfg = resolve_data_config(model=model)
    return {"mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]), "interpolation": cfg["interpolation"],
            "crop_pct": float(cfg["crop_pct"])}


def load_splits(root: str | os.PathLike, img_size: int, held_out_every: int = 10,
                mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN, std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
                interpolation: str = "bicubic", crop_pct: float = 1.0, cache_mb: float = CACHE_MB) -> Splits:
    """Every ``held_out_every``-th training image is held out from training for search scoring.

    Images are preprocessed as the model expects: pass :func:`normalization` of it.
    """
    classes = check_dataset(root)
    norm = dict(mean=mean, std=std, interpolation=interpolation)
    evaluation = transforms(img_size, False, crop_pct=crop_pct, **norm)
    root = Path(root)
    if root.suffix == ".npz":
        arrays = _npz(root)
        aug = ImageFolderImages(None, transforms(img_size, True, **norm), (arrays["train_x"], arrays["train_y"]))
        val = ImageFolderImages(None, evaluation, (arrays["val_x"], arrays["val_y"]))
    else:
        aug = ImageFolderImages(root / "train", transforms(img_size, True, **norm), cache_mb=cache_mb)
        val = ImageFolderImages(split_folder(root, "val"), evaluation, cache_mb=cache_mb)
    plain = aug.with_transform(evaluation)
    idx = range(len(aug))
    keep = [i for i in idx if i % held_out_every != held_out_every - 1]
    held = [i for i in idx if i % held_out_every == held_out_every - 1]
    return Splits(classes, Subset(aug, keep), Subset(plain, keep), Subset(plain, held), val)


def labels(ds: Dataset) -> list[int]:
    """The class index of every sample, without decoding images where the dataset knows them."""
    if isinstance(ds, Subset):
        base = labels(ds.dataset)
        return [base[i] for i in ds.indices]
    if isinstance(ds, ImageFolderImages):
        return [y for _, y in ds.samples]
    return [int(ds[i][1]) for i in range(len(ds))]


def stratified_indices(targets: list[int], n: int, seed: int = 0) -> list[int]:
    """``n`` sample indices drawn class by class in proportion to each class's share, then shuffled.

    Seeded: the same ``targets``, ``n`` and ``seed`` give the same indices (every candidate
    plan is scored on the same images). Largest remainders round the per-class quotas.
    """
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(targets):
        by_class.setdefault(int(y), []).append(i)
    n = min(n, len(targets))
    exact = {c: n * len(idx) / len(targets) for c, idx in sorted(by_class.items())}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[:n - sum(quota.values())]:
        quota[c] += 1
    chosen = [by_class[c][int(j)] for c, k in quota.items()
              for j in torch.randperm(len(by_class[c]), generator=gen)[:k]]
    return [chosen[int(j)] for j in torch.randperm(len(chosen), generator=gen)]


def fixed_batches(ds: Dataset, n: int, seed: int = 0, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A class-stratified seeded sample of ``n`` images as fixed batches (the whole set when ``n`` >= its size).

    ImageFolder files are sorted by class, so the first ``n`` images would be one or two classes.
    """
    idx = list(range(len(ds))) if n >= len(ds) else stratified_indices(labels(ds), n, seed)
    return list(DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False))
