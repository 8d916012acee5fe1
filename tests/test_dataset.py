"""Image folders built with PIL in tmp_path: decoding, N_name subsets, captions, one error for all."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lora_train_core.data import images
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.images import image_size, load_rgb
from lora_train_core.errors import ConfigError, DatasetError


def rgb_at(image, x, y):
    return np.asarray(image, dtype=int)[y, x]


def exif_rotated_jpeg(path):
    """Stored 40x20, left half red, right half blue, EXIF orientation 6 (rotate 90 degrees clockwise)."""
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=95, exif=exif)


def test_exif_orientation_swaps_size_and_turns_pixels_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    exif_rotated_jpeg(path)
    assert image_size(path) == (20, 40)
    upright = load_rgb(path)
    assert upright.size == (20, 40) and upright.mode == "RGB"
    # clockwise rotation puts the stored left (red) on top, the right (blue) below
    assert np.abs(rgb_at(upright, 10, 5) - (255, 0, 0)).max() < 12
    assert np.abs(rgb_at(upright, 10, 35) - (0, 0, 255)).max() < 12
    assert load_dataset(DatasetConfig(tmp_path)).images[0].size == (20, 40)


def test_alpha_is_composited_on_the_background(tmp_path):
    path = tmp_path / "cutout.png"
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 128), (255, 0, 0, 0)])
    rgba.save(path)
    white = load_rgb(path)
    # out = a * fg + (1 - a) * bg with a = 128/255: green/blue 255 * 127/255 = 127
    assert rgb_at(white, 0, 0).tolist() == [255, 0, 0]
    assert np.abs(rgb_at(white, 1, 0) - (255, 127, 127)).max() <= 1
    assert rgb_at(white, 2, 0).tolist() == [255, 255, 255]
    assert rgb_at(load_rgb(path, background=(0, 0, 0)), 2, 0).tolist() == [0, 0, 0]


def test_grayscale_with_alpha_and_palette_with_transparency_are_composited(tmp_path):
    Image.new("LA", (2, 2), (50, 0)).save(tmp_path / "la.png")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=0)
    assert rgb_at(load_rgb(tmp_path / "la.png"), 0, 0).tolist() == [255, 255, 255]
    p = load_rgb(tmp_path / "p.png", background=(1, 2, 3))
    assert rgb_at(p, 0, 0).tolist() == [1, 2, 3] and rgb_at(p, 1, 0).tolist() == [10, 200, 30]


def test_palette_grayscale_and_cmyk_become_rgb(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)
    assert rgb_at(load_rgb(tmp_path / "p.png"), 1, 0).tolist() == [10, 200, 30]
    assert rgb_at(load_rgb(tmp_path / "gray.png"), 2, 2).tolist() == [77, 77, 77]
    cmyk = load_rgb(tmp_path / "print.jpg")
    assert cmyk.mode == "RGB" and np.abs(rgb_at(cmyk, 8, 8) - (255, 0, 0)).max() < 12


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    # round(v * 255 / 65535): 1000 -> 3.89 -> 4 (clipping would give 255), 32768 -> 127.5 -> 128
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 4, 128, 255]


def test_declared_size_over_the_limit_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 199)
    with pytest.raises(DatasetError, match="200 pixels"):
        load_rgb(tmp_path / "big.png")
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path))
    assert "big.png" in str(info.value) and "limit of 199" in str(info.value)


def png_header_only(path, width, height):
    """A PNG that declares width x height but holds almost no data: what a decompression bomb looks like."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, monkeypatch):
    png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(DatasetError, match="downscale"):
        load_rgb(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some ComfyUI custom nodes do
    with pytest.raises(DatasetError, match="20000x20000"):
        load_rgb(tmp_path / "bomb.png")
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path))
    assert "bomb.png" in str(info.value) and "downscale" in str(info.value)


def test_subfolders_give_repeats_and_class_token_captions(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "root.png")
    dog = tmp_path / "3_sks dog"
    dog.mkdir()
    Image.new("RGB", (16, 8)).save(dog / "a.png")
    Image.new("RGB", (8, 8)).save(dog / "b.jpg")
    (dog / "a.txt").write_bytes("\ufeff  a photo, sks dog\nsecond line \n".encode())
    (tmp_path / "notes").mkdir()
    (tmp_path / ".latent_cache").mkdir()
    with caplog.at_level(logging.WARNING):
        dataset = load_dataset(DatasetConfig(tmp_path, default_repeats=2))
    got = [(r.path.name, r.caption, r.repeats, r.subset, r.size) for r in dataset.images]
    assert got == [
        ("root.png", "", 2, "", (8, 8)),
        ("a.png", "a photo, sks dog\nsecond line", 3, "3_sks dog", (16, 8)),
        ("b.jpg", "sks dog", 3, "3_sks dog", (8, 8)),
    ]
    assert len(dataset.skipped) == 1 and "notes" in dataset.skipped[0]
    assert "notes" in caplog.text and ".latent_cache" not in caplog.text


def test_zero_repeat_folder_is_skipped_and_caption_extension_is_honoured(tmp_path):
    for folder in ("0_none", "2_cat"):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / folder / "x.png")
    (tmp_path / "2_cat" / "x.caption").write_text("tabby cat", encoding="utf-8")
    (tmp_path / "2_cat" / "x.txt").write_text("ignored", encoding="utf-8")
    dataset = load_dataset(DatasetConfig(tmp_path, caption_extension=".caption"))
    assert [(r.subset, r.caption) for r in dataset.images] == [("2_cat", "tabby cat")]
    assert "0_none" in dataset.skipped[0]


def test_every_problem_is_listed_in_one_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "full.png").unlink()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("this is not a picture", encoding="utf-8")
    Image.new("RGB", (8, 8)).save(tmp_path / "fine.png")
    (tmp_path / "fine.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path))
    message = str(info.value)
    for name in ("zero.png", "truncated.png", "notes.jpg", "fine.txt"):
        assert str(tmp_path / name) in message
    assert len(info.value.problems) == 4
    assert "UTF-8" in message and "0xe9" in message


def test_empty_and_missing_folders_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path))
    assert str(tmp_path) in str(info.value) and ".png" in str(info.value) and ".webp" in str(info.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as info:
        load_dataset(DatasetConfig(missing))
    assert str(missing) in str(info.value)


def test_empty_subset_folder_and_empty_caption_are_problems(tmp_path):
    (tmp_path / "5_ghost").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path))
    assert "5_ghost" in str(info.value) and "a.txt" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"caption_extension": "txt"}, "caption_extension"),
        ({"caption_extension": ".png"}, "caption_extension"),
        ({"default_repeats": 0}, "default_repeats"),
    ],
)
def test_invalid_dataset_config_names_the_field(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=f"dataset.{field}"):
        DatasetConfig(tmp_path, **kwargs)
