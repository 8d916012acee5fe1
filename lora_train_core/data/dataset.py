"""The image folder: kohya's `N_name` DreamBooth layout, scanned and checked once.

Layout (kohya `config_util.generate_dreambooth_subsets_config_by_subdirs`):
images directly in the folder form one subset with `default_repeats`; each
subfolder `N_name` (N an integer >= 1) is a subset whose images repeat N times
per epoch and whose "name" is the caption of any image without a caption file.
Other subfolders are skipped with a warning, as kohya does. Hidden entries
(names starting with ".", e.g. a `.latent_cache` folder or macOS `._x.jpg`
files) are not part of the dataset.

Regularisation (class) images for prior preservation (kohya `reg_data_dir`) come
from a second folder of the same layout. They join the same Dataset, marked
`is_reg`, weighted by `prior_loss_weight`, and repeated as kohya balances them
against the training images (regularization.py), so buckets, the latent cache
and the trainer need nothing special for them ("Reg and train images share
buckets").

Every image is decoded once here, so a corrupt file is reported before
training starts; all problems are collected into one DatasetError.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, DatasetError, check_int, check_range
from .images import DECODE_ERRORS, IMAGE_EXTENSIONS, open_image, oriented_size
from .regularization import balance_regularization

log = logging.getLogger(__name__)

# kohya reads the repeats as int(name.split("_")[0]), so a bare "10" is 10 repeats, no class token.
_SUBSET_FOLDER = re.compile(r"([0-9]+)(?:_(.*))?", re.DOTALL)
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class DatasetConfig:
    """[dataset] section: the image folder and how captions and repeats are found."""

    path: Path  # the image folder: images with same-stem caption files; N_name subfolders repeat N times
    caption_extension: str = ".txt"  # extension of each image's caption file (kohya's default is ".caption")
    default_repeats: int = 1  # repeats per epoch of the images directly in `path` (and in `reg_path`)
    reg_path: Path | None = None  # regularisation (class) images, same N_name layout (kohya reg_data_dir)
    prior_loss_weight: float = 1.0  # loss weight of regularisation images (kohya prior_loss_weight)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        ext = self.caption_extension
        if not isinstance(ext, str) or len(ext) < 2 or not ext.startswith(".") or "/" in ext:
            raise ConfigError(f"dataset.caption_extension: {ext!r} is not a file extension; use e.g. '.txt'")
        if ext.lower() in IMAGE_EXTENSIONS:
            raise ConfigError(
                f"dataset.caption_extension: {ext!r} is an image extension; use a text one such as '.txt'"
            )
        check_int("dataset.default_repeats", self.default_repeats, 1, hint="repeats per epoch, usually 1")
        self._check_regularization()

    def _check_regularization(self) -> None:
        check_range("dataset.prior_loss_weight", self.prior_loss_weight, 0, hint="kohya's default is 1.0")
        if self.reg_path is None:
            if self.prior_loss_weight != 1.0:
                raise ConfigError(
                    f"dataset.prior_loss_weight: {self.prior_loss_weight!r} weights regularisation images, "
                    "but dataset.reg_path is not set; set reg_path or remove prior_loss_weight"
                )
            return
        object.__setattr__(self, "reg_path", Path(self.reg_path))
        train, reg = self.path.resolve(), self.reg_path.resolve()
        if reg == train or train in reg.parents or reg in train.parents:
            raise ConfigError(
                f"dataset.reg_path: {str(self.reg_path)!r} overlaps the training folder "
                f"{str(self.path)!r}; give a separate folder of class images"
            )


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    caption: str  # the caption file's full text (BOM and outer whitespace stripped), or the class token
    repeats: int
    subset: str  # the subfolder's name, "" for images directly in the root
    size: tuple[int, int]  # (width, height) after EXIF orientation
    loss_weight: float = 1.0  # kohya's prior_loss_weight for regularisation images, else 1
    is_reg: bool = False  # a regularisation (class) image from dataset.reg_path


@dataclass(frozen=True)
class Dataset:
    """What trains: `images` holds the training images, then the regularisation images
    in use, each with its balanced repeats. `reg_images` lists every regularisation
    image found, with its folder's repeats (kohya's metadata counts them so)."""

    root: Path
    images: tuple[ImageRecord, ...]
    skipped: tuple[str, ...]  # one message per skipped folder
    reg_images: tuple[ImageRecord, ...] = ()


@dataclass(frozen=True)
class _Subset:
    name: str
    folder: Path
    repeats: int
    class_token: str


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Scan, caption and validate the folder(s); each sorted by subset, then file name.

    Raises DatasetError for a missing folder, a folder without images, or a
    list of every unusable image and caption file (of both folders), each with its fix.
    """
    train, skipped, problems = _scan(cfg.path, cfg, is_reg=False)
    reg: list[ImageRecord] = []
    if cfg.reg_path is not None:
        reg, reg_skipped, reg_problems = _scan(cfg.reg_path, cfg, is_reg=True)
        skipped += reg_skipped
        problems += reg_problems
    if problems:
        raise DatasetError(
            f"{cfg.path}: {len(problems)} problem(s) in the dataset; fix them and run again", problems
        )
    _require_images(
        cfg.path, train, skipped, "put images in the folder or in N_name subfolders (e.g. 10_mychar)"
    )
    if cfg.reg_path is not None:
        _require_images(
            cfg.reg_path,
            reg,
            skipped,
            "put class images in it or in N_name subfolders, or unset dataset.reg_path",
        )
    return Dataset(cfg.path, (*train, *_balanced(train, reg)), tuple(skipped), tuple(reg))


def _balanced(train: list[ImageRecord], reg: list[ImageRecord]) -> list[ImageRecord]:
    """The regularisation images in use, each with kohya's balanced repeats (unused ones dropped)."""
    used = balance_regularization(sum(r.repeats for r in train), [(r, r.repeats) for r in reg])
    counts: dict[ImageRecord, int] = {}
    for record in used:  # copies of one image are adjacent, in registration order
        counts[record] = counts.get(record, 0) + 1
    return [replace(record, repeats=n) for record, n in counts.items()]


def _scan(root: Path, cfg: DatasetConfig, is_reg: bool) -> tuple[list[ImageRecord], list[str], list[str]]:
    """(records, skipped folders, problems) of one folder in the N_name layout."""
    field = "dataset.reg_path" if is_reg else "dataset.path"
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        kind = "regularisation" if is_reg else "dataset"
        raise DatasetError(f"{root}: the {kind} folder {what} — check {field}")
    subsets, skipped = _find_subsets(root, cfg.default_repeats)
    for message in skipped:
        log.warning(message)
    weight = cfg.prior_loss_weight if is_reg else 1.0
    records: list[ImageRecord] = []
    problems: list[str] = []
    for subset in subsets:
        paths = _image_files(subset.folder)
        if not paths and subset.name:
            problems.append(f"{subset.folder}: no images ({_accepted()}) — add images, or delete the folder")
        for path in paths:
            size = _check_image(path, problems)
            caption = _read_caption(path.with_name(path.stem + cfg.caption_extension), subset, problems)
            records.append(ImageRecord(path, caption, subset.repeats, subset.name, size, weight, is_reg))
    return records, skipped, problems


def _require_images(root: Path, records: list[ImageRecord], skipped: list[str], fix: str) -> None:
    if not records:
        note = f" Skipped: {'; '.join(skipped)}" if skipped else ""
        raise DatasetError(f"{root}: no images found ({_accepted()}) — {fix}.{note}")


def _find_subsets(root: Path, default_repeats: int) -> tuple[list[_Subset], list[str]]:
    subsets = [_Subset("", root, default_repeats, "")]
    skipped = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _SUBSET_FOLDER.fullmatch(folder.name)
        if match is None or int(match[1]) < 1:
            skipped.append(
                f"{folder}: skipped, the name is not N_name with N >= 1 repeats "
                "(rename it e.g. 10_mychar to train on it)"
            )
            continue
        subsets.append(_Subset(folder.name, folder, int(match[1]), match[2] or ""))
        skipped += [
            f"{nested}: skipped, folders inside a subset folder are not read (move its images up)"
            for nested in sorted(folder.iterdir())
            if nested.is_dir() and not nested.name.startswith(".")
        ]
    return subsets, skipped


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _accepted() -> str:
    return "accepted extensions: " + ", ".join(IMAGE_EXTENSIONS)


def _check_image(path: Path, problems: list[str]) -> tuple[int, int]:
    """Decode the image once (pixels are dropped at once); append a problem on failure."""
    if path.stat().st_size == 0:
        problems.append(f"{path}: empty file (0 bytes) — delete it or copy the image again")
        return (0, 0)
    try:
        with open_image(path) as image:
            image.load()
            return oriented_size(image)
    except DatasetError as error:
        problems.append(str(error))
    except DECODE_ERRORS as error:
        problems.append(
            f"{path}: not a readable image, corrupt or truncated ({type(error).__name__}: {error}) — "
            "re-export it as PNG or JPEG, or delete it"
        )
    return (0, 0)


def _read_caption(caption_path: Path, subset: _Subset, problems: list[str]) -> str:
    """The caption file's text, or the subset's class token when there is no file."""
    if not caption_path.is_file():
        return subset.class_token
    raw = caption_path.read_bytes()
    if raw.startswith(_UTF16_BOMS):
        problems.append(
            f"{caption_path}: caption is UTF-16 (has a UTF-16 byte-order mark) — re-save it as UTF-8"
        )
        return ""
    body = raw.removeprefix(_UTF8_BOM)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start + len(raw) - len(body)
        problems.append(
            f"{caption_path}: caption is not UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}: "
            f"{error.reason}; "
            "perhaps Latin-1/Windows-1252) — re-save it as UTF-8"
        )
        return ""
    if not text.strip():
        # kohya refuses an empty caption file too (an assertion in read_caption).
        fallback = f"the class token {subset.class_token!r}" if subset.class_token else "an empty caption"
        problems.append(
            f"{caption_path}: caption file is empty — write a caption, or delete it to use {fallback}"
        )
    return text.strip()
