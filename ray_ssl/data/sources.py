"""Image sources for shard writing: Fashion-MNIST idx files, scikit-learn digits, an image folder
tree, random synthetic images. Each yields (encoded image bytes, label) in a fixed order."""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ray_ssl.config import ShardsConfig
from ray_ssl.data.errors import ShardError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # idx file format (LeCun et al., MNIST page)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_MAX_VALUE = 16  # scikit-learn digits pixels are counts 0..16
FOLDER_TEST_BUCKETS = 5  # folder without train/ and test/: 1 file in 5 (by name hash) is test
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SYNTHETIC_CLASSES = 10
SYNTHETIC_GRID = 4  # random colour field at 4x4, upsampled: smooth images that compress like photos
PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


@dataclass
class ImageSource:
    """A finite, ordered stream of labelled images."""

    name: str  # what was actually read (may differ from the requested source after a fallback)
    classes: list[str]
    count: int
    channels: int
    samples: Iterator[tuple[bytes, int]]  # (encoded image, label)


def encode_image(array: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """uint8 HW or HWC array -> PNG/JPEG bytes."""
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if image_format == "jpg":
        image.save(buffer, "JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, "PNG", compress_level=1)  # fast; PNG is lossless at every level
    return buffer.getvalue()


def _encoded(
    arrays: np.ndarray, labels: np.ndarray, cfg: ShardsConfig
) -> Iterator[tuple[bytes, int]]:
    for array, label in zip(arrays, labels, strict=True):
        yield encode_image(array, cfg.image_format, cfg.jpeg_quality), int(label)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx(.gz) file: big-endian magic, dimension sizes, then uint8 data."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ShardError(f"cannot read {path} ({err}); reinstall fashion-mnist") from err
    ndim = raw[3] if len(raw) >= 4 else 0
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise ShardError(f"{path} is not an idx file (bad magic); reinstall the fashion-mnist data")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ShardError(f"{path} is truncated: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images [N, 8, 8] (0-255) and labels: the seeded ``split``
    ("train" or "test", a fixed DIGITS_TEST_FRACTION held out), in the dataset's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    n_test = int(round(len(images) * DIGITS_TEST_FRACTION))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    chosen.sort()
    return images[chosen], digits.target[chosen]


def digits_source(cfg: ShardsConfig, name: str = "digits") -> ImageSource:
    images, labels = digits_split(cfg.split)
    return ImageSource(
        name, [str(d) for d in range(10)], len(images), 1, _encoded(images, labels, cfg)
    )


def fashion_mnist_source(cfg: ShardsConfig) -> ImageSource:
    root = Path(cfg.fashion_mnist_dir)
    image_file, label_file = FASHION_MNIST_FILES[cfg.split]
    if not (root / image_file).is_file() or not (root / label_file).is_file():
        log.warning(
            "Fashion-MNIST not found in %s (install the Debian package fashion-mnist or set "
            "shards.fashion_mnist_dir); FALLING BACK to scikit-learn digits",
            root,
        )
        return digits_source(cfg, name="digits (fallback: fashion-mnist not found)")
    images = read_idx(root / image_file, IDX_IMAGES_MAGIC)
    labels = read_idx(root / label_file, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ShardError(f"{root}: {len(images)} images but {len(labels)} labels; reinstall it")
    return ImageSource(
        "fashion-mnist", list(FASHION_MNIST_CLASSES), len(images), 1, _encoded(images, labels, cfg)
    )


def synthetic_source(cfg: ShardsConfig) -> ImageSource:
    """Smooth random colour fields; the class sets the mean colour so the labels carry signal."""
    split_offset = SPLITS.index(cfg.split)
    rng = np.random.default_rng([cfg.seed, split_offset])
    class_colours = np.random.default_rng(cfg.seed).uniform(40, 215, size=(SYNTHETIC_CLASSES, 3))
    labels = rng.integers(0, SYNTHETIC_CLASSES, size=cfg.synthetic_count)
    size = cfg.synthetic_size

    def generate() -> Iterator[tuple[bytes, int]]:
        for label in labels:
            field = rng.normal(0.0, 40.0, size=(SYNTHETIC_GRID, SYNTHETIC_GRID, 3))
            small = np.clip(field + class_colours[label], 0, 255).astype(np.uint8)
            image = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            yield encode_image(np.asarray(image), cfg.image_format, cfg.jpeg_quality), int(label)

    classes = [f"class_{c}" for c in range(SYNTHETIC_CLASSES)]
    return ImageSource("synthetic", classes, cfg.synthetic_count, 3, generate())


def _folder_files(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise ShardError(
            f"image folder '{root}' does not exist; pass folder:PATH (one subdirectory per class)"
        )
    split_root = root / split
    use_hash_split = not split_root.is_dir()
    tree = root if use_hash_split else split_root
    try:
        classes = sorted(e.name for e in os.scandir(tree) if e.is_dir() and e.name not in SPLITS)
    except OSError as err:
        raise ShardError(f"cannot read folder '{tree}' ({err.strerror}); fix permissions") from err
    if not classes:
        raise ShardError(
            f"image folder '{tree}' has no class subdirectories; expected {tree}/<class>/<image>"
        )
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        try:
            entries = sorted(os.scandir(tree / name), key=lambda e: e.name)
        except OSError as err:
            raise ShardError(
                f"cannot read folder '{tree / name}' ({err.strerror}); check permissions"
            ) from err
        for entry in entries:
            if not (entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES):
                continue
            if use_hash_split:
                in_test = zlib.crc32(f"{name}/{entry.name}".encode()) % FOLDER_TEST_BUCKETS == 0
                if in_test != (split == "test"):
                    continue
            files.append((Path(entry.path), label))
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ShardError(f"image folder '{tree}' has no {split} images ({suffixes}); add some")
    if use_hash_split:
        log.info("%s has no %s/ subtree: using a fixed 80/20 split by file-name hash", root, split)
    return classes, files


def _folder_image_bytes(path: Path, cfg: ShardsConfig) -> tuple[bytes, int]:
    """Original bytes when already in the target format and mode, else re-encoded."""
    try:
        raw = path.read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            mode = image.mode if image.mode in ("L", "RGB") else "RGB"
            if image.format == PIL_FORMAT[cfg.image_format] and image.mode == mode:
                return raw, len(image.getbands())
            array = np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ShardError(f"cannot decode image '{path}' ({err}); fix or remove the file") from err
    channels = array.shape[2] if array.ndim == 3 else 1
    return encode_image(array, cfg.image_format, cfg.jpeg_quality), channels


def folder_source(cfg: ShardsConfig, root: Path) -> ImageSource:
    classes, files = _folder_files(root, cfg.split)
    # channels: 3 unless every image is grayscale; the first image decides it cheaply
    _, channels = _folder_image_bytes(files[0][0], cfg)

    def generate() -> Iterator[tuple[bytes, int]]:
        for path, label in files:
            data, _ = _folder_image_bytes(path, cfg)
            yield data, label

    return ImageSource(f"folder:{root}", classes, len(files), channels, generate())


def open_source(cfg: ShardsConfig) -> ImageSource:
    """The source named by ``cfg.source``; raises ShardError for an unknown or missing one."""
    if cfg.split not in SPLITS:
        raise ShardError(f"unknown split '{cfg.split}'; choose one of {', '.join(SPLITS)}")
    if cfg.source == "fashion-mnist":
        return fashion_mnist_source(cfg)
    if cfg.source == "digits":
        return digits_source(cfg)
    if cfg.source == "synthetic":
        if cfg.synthetic_count < 1 or cfg.synthetic_size < 1:
            raise ShardError("shards.synthetic_count and shards.synthetic_size must be >= 1")
        return synthetic_source(cfg)
    if cfg.source.startswith("folder:"):
        path = cfg.source[len("folder:") :]
        if not path:
            raise ShardError("source 'folder:' names no path; use folder:/path/to/images")
        return folder_source(cfg, Path(path).expanduser())
    raise ShardError(
        f"unknown shard source '{cfg.source}'; "
        "choose fashion-mnist, digits, folder:PATH or synthetic"
    )
