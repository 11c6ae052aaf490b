"""Pack the demo dataset: a class-balanced slice of the CIFAR-10 subset as one compressed .npz.

The shipped ``data/cifar10_demo.npz`` holds 250 train and 50 val images per
class (2,500 + 500), the defaults here. Rebuild it from a checkout that has the
CIFAR-10 subset beside it:
    python tools/pack_cifar_demo.py SRC_DIR data/cifar10_demo.npz --train 250 --val 50
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def take(folder: Path, per_class: int, prefer: str | None = None):
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys, names = [], [], []
    for i, cls in enumerate(classes):
        files = sorted((folder / cls).glob("*.png"))
        if prefer:
            files = sorted(files, key=lambda f: not f.name.startswith(prefer))  # stable: preferred first
        for f in files[:per_class]:
            xs.append(np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8))
            ys.append(i)
            names.append(f"{cls}/{f.name}")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes, names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=250, help="images per class (default 250)")
    ap.add_argument("--val", type=int, default=50, help="images per class (default 50)")
    args = ap.parse_args()
    src = Path(args.src)
    tx, ty, classes, tn = take(src / "train", args.train)
    vx, vy, _, vn = take(src / "val", args.val, prefer="test_batch")
    np.savez_compressed(args.out, train_x=tx, train_y=ty, val_x=vx, val_y=vy, classes=np.asarray(classes),
                        train_files=np.asarray(tn), val_files=np.asarray(vn))
    print(f"{args.out}: train {tx.shape}, val {vx.shape}, {Path(args.out).stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
