"""Image loading (any mode -> upright RGB, clear ValueErrors) and heatmap overlays, with files written here."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from caption_model.heatmap import overlay
from caption_model.processing import load_image, original_size

RED = (220, 40, 40)
BLUE = (40, 80, 220)


def _close(pixel, colour, tol=40):
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, colour))


def _upright_with_marker(width=48, height=80) -> Image.Image:
    """A portrait image: blue background, a red marker in the top-left corner."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 3, height // 4))
    return image


# --- EXIF orientation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation,stored_as", [
    (6, Image.Transpose.ROTATE_90),   # "rotate 90 CW to view": the sensor stored it rotated CCW
    (8, Image.Transpose.ROTATE_270),  # "rotate 90 CCW to view"
    (3, Image.Transpose.ROTATE_180),
])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, stored_as):
    upright = _upright_with_marker()
    stored = upright.transpose(stored_as)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated_{orientation}.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    assert Image.open(path).size == stored.size  # the file itself is not upright

    image = load_image(path)
    assert image.mode == "RGB" and image.size == upright.size
    W, H = image.size
    assert _close(image.getpixel((3, 3)), RED), image.getpixel((3, 3))  # marker top-left
    for corner in [(W - 4, 3), (3, H - 4), (W - 4, H - 4)]:
        assert _close(image.getpixel(corner), BLUE), (corner, image.getpixel(corner))
    # also from bytes and from an already opened PIL image
    assert load_image(path.read_bytes()).size == upright.size
    assert _close(load_image(Image.open(path)).getpixel((3, 3)), RED)


def test_caption_model_sees_the_upright_image(tiny_trained_captioner, tmp_path):
    model = tiny_trained_captioner
    upright = _upright_with_marker(96, 64)
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_path, plain_path = tmp_path / "rotated.jpg", tmp_path / "plain.jpg"
    stored.save(rotated_path, quality=95, exif=exif.tobytes())
    upright.save(plain_path, quality=95)
    a, b = model.preprocess([rotated_path, plain_path])
    wrong = model.preprocess([stored])[0]
    assert (a - b).abs().mean() < 0.1 < (a - wrong).abs().mean()
    cap = model.caption(rotated_path, num_beams=1, max_length=8)
    assert cap.attention.shape == (len(cap.words), *model.grid_size)
    assert cap.token_ids == model.caption(load_image(rotated_path), num_beams=1, max_length=8).token_ids


# --- large JPEGs: decoded at reduced scale ---------------------------------------------------------------------
def _large_rotated_jpeg(path, size=(2400, 1600)):
    """A landscape-stored JPEG with EXIF orientation 6 (upright it is portrait: 1600 x 2400): left half red,
    right half blue as stored."""
    stored = Image.new("RGB", size, BLUE)
    stored.paste(RED, (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, quality=90, exif=exif.tobytes())
    return stored.transpose(Image.Transpose.ROTATE_270)  # what the viewer shows


def test_a_large_jpeg_is_decoded_only_as_large_as_asked(tmp_path):
    """min_side: JPEG draft mode decodes at 1/2^k scale with both sides still >= min_side; upright; the file's
    own size stays known."""
    upright = _large_rotated_jpeg(tmp_path / "big.jpg")
    full = load_image(tmp_path / "big.jpg")
    assert full.size == upright.size == original_size(full) == (1600, 2400)
    for min_side, expected in [(190, (200, 300)), (224, (400, 600)), (400, (400, 600)), (768, (800, 1200))]:
        small = load_image(tmp_path / "big.jpg", min_side=min_side)
        assert small.size == expected and min(small.size) >= min_side
        assert original_size(small) == (1600, 2400)  # upright: width and height swapped by the EXIF turn
        assert _close(small.getpixel((small.width // 2, 3)), RED) and _close(small.getpixel((small.width // 2,
                                                                                              small.height - 4)), BLUE)
    display = load_image(tmp_path / "big.jpg", min_side=64, display_side=500)  # the longer side >= 500
    assert display.size == (400, 600) and original_size(display) == (1600, 2400)
    assert original_size(load_image(display)) == (1600, 2400)  # loading the reduced copy again keeps the file's size
    png = tmp_path / "big.png"  # other formats decode whole, as before
    upright.save(png)
    assert load_image(png, min_side=224).size == (1600, 2400)


def test_preprocessing_a_large_jpeg_matches_the_full_decode(tiny_trained_captioner, tmp_path):
    """The model reads nearly the same pixels from the reduced decode as from the whole image, so captions keep."""
    rng = np.random.default_rng(0)
    texture = Image.fromarray((rng.random((150, 200, 3)) * 255).astype(np.uint8)).resize((3200, 2400))
    texture.save(tmp_path / "photo.jpg", quality=92)
    model = tiny_trained_captioner
    reduced = model.preprocess([tmp_path / "photo.jpg"])[0]
    whole = model.preprocess([load_image(tmp_path / "photo.jpg")])[0]  # a PIL image: decoded in full
    assert (reduced - whole).abs().mean() < 0.05  # normalised units (one grey level ~ 0.017)


def test_a_batch_is_preprocessed_in_threads_as_one_by_one(tiny_trained_captioner, tmp_path):
    """Several images are decoded and resized on threads: the batch equals each image preprocessed alone, in order,
    and a bad file among them still raises the error that names it."""
    rng = np.random.default_rng(1)
    paths = []
    for index in range(6):
        path = tmp_path / f"im{index}.png"
        Image.fromarray((rng.random((40 + 7 * index, 60, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    model = tiny_trained_captioner
    batch = model.preprocess(paths)
    alone = torch.cat([model.preprocess(path) for path in paths])
    assert torch.equal(batch, alone)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        model.preprocess(paths[:3] + [tmp_path / "notes.png"] + paths[3:])


def test_in_threads_keeps_order_and_raises_the_first_failure():
    from caption_model.processing import in_threads

    def square_or_fail(value: int) -> int:
        if value in (5, 9):
            raise ValueError(f"item {value}")
        return value * value

    assert in_threads(square_or_fail, [3, 1, 4, 2], threads=2) == [9, 1, 16, 4]
    assert in_threads(square_or_fail, [7], threads=2) == [49]
    with pytest.raises(ValueError, match="item 5"):
        in_threads(square_or_fail, [1, 2, 5, 3, 9], threads=2)


# --- modes -> RGB ----------------------------------------------------------------------------------------------
def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # red in CMYK
    cmyk.paste((255, 255, 0, 0), (20, 0, 40, 30))  # blue on the right half
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((5, 15))
    assert r > 200 and g < 60 and b < 60, (r, g, b)
    r, g, b = image.getpixel((35, 15))
    assert b > 200 and r < 60 and g < 60, (r, g, b)


def test_16_bit_png_becomes_rgb_with_its_grey_levels(tmp_path):
    array = np.full((20, 40), 16384, dtype=np.uint16)  # 25% grey on the left
    array[:, 20:] = 49152  # 75% grey on the right
    path = tmp_path / "deep.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 20)
    left, right = np.asarray(image)[10, 5], np.asarray(image)[10, 35]
    assert left[0] == left[1] == left[2] and right[0] == right[1] == right[2]
    assert abs(int(left[0]) - 64) <= 2 and abs(int(right[0]) - 191) <= 2, (left, right)


def test_16_bit_png_full_range_gradient_is_not_clipped(tmp_path):
    array = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    path = tmp_path / "gradient.png"
    Image.fromarray(array).save(path)
    row = np.asarray(load_image(path))[4, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and (np.diff(row) >= 0).all()
    assert len(np.unique(row)) > 50  # not clipped to a few levels


def test_palette_gif_becomes_rgb(tmp_path):
    rgb = Image.new("RGB", (30, 20), RED)
    rgb.paste(BLUE, (15, 0, 30, 20))
    path = tmp_path / "palette.gif"
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert _close(image.getpixel((3, 10)), RED, 8) and _close(image.getpixel((27, 10)), BLUE, 8)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (24, 24), colour).convert("P", palette=Image.Palette.ADAPTIVE) for colour in (RED, BLUE, (40, 170, 60))]
    path = tmp_path / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3
    opened = Image.open(path)
    opened.seek(2)  # even an image left on a later frame
    for source in (path, opened):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (24, 24)
        assert _close(image.getpixel((12, 12)), RED, 10), image.getpixel((12, 12))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_png_goes_on_white(tmp_path, mode):
    path = tmp_path / f"alpha_{mode}.png"
    if mode == "P":  # palette with a transparent entry (tRNS)
        source = Image.new("P", (20, 20), 0)
        source.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
        source.paste(1, (0, 0, 10, 20))
        source.save(path, transparency=0)
    else:
        rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # fully transparent black
        rgba.paste((RED[0], RED[1], RED[2], 255), (0, 0, 10, 20))  # opaque red on the left
        source = rgba if mode == "RGBA" else rgba.convert(mode)
        source.save(path)
    assert Image.open(path).mode == mode
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (20, 20)
    assert image.getpixel((15, 10)) == (255, 255, 255)  # transparent -> white background, not black
    left = image.getpixel((3, 10))
    if mode == "LA":
        assert left[0] == left[1] == left[2] and left[0] < 200  # opaque grey stays grey
    else:
        assert _close(left, RED, 10)


def test_grey_and_bilevel_images_become_rgb(tmp_path):
    grey = Image.new("L", (16, 12), 90)
    path = tmp_path / "grey.png"
    grey.save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 12) and image.getpixel((4, 4)) == (90, 90, 90)
    jpg = tmp_path / "grey.jpg"
    grey.save(jpg)
    assert load_image(jpg).mode == "RGB"
    bilevel = Image.new("1", (16, 12), 1)
    assert load_image(bilevel).getpixel((0, 0)) == (255, 255, 255)
    array = np.zeros((10, 12, 3), dtype=np.uint8)
    array[..., 0] = 200
    assert load_image(array).getpixel((1, 1)) == (200, 0, 0)


# --- bad inputs --------------------------------------------------------------------------------------------------
def _noise_jpeg(path, size=(96, 96)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def test_truncated_jpeg_is_a_value_error(tmp_path):
    whole = tmp_path / "whole.jpg"
    _noise_jpeg(whole)
    data = whole.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"(?i)truncated"):
        load_image(path)
    with pytest.raises(ValueError, match=r"(?i)truncated"):
        load_image(data[: len(data) // 2])


def test_text_file_named_jpg_is_a_value_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(ValueError, match=r"(?i)not an image") as error:
        load_image(path)
    assert "notes.jpg" in str(error.value)


def test_empty_and_missing_files_are_value_errors(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?i)empty"):
        load_image(path)
    with pytest.raises(ValueError, match=r"(?i)empty"):
        load_image(b"")
    with pytest.raises(ValueError, match=r"(?i)does not exist"):
        load_image(tmp_path / "nowhere.jpg")
    with pytest.raises(ValueError, match=r"(?i)expected"):
        load_image(12345)


def _png_claiming_size(path, width, height):
    """A small valid PNG whose IHDR is patched to claim width x height (CRC fixed): a decompression bomb."""
    Image.new("RGB", (8, 8), RED).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (13_000, 12_000)])
def test_decompression_bomb_png_is_a_value_error(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    _png_claiming_size(path, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out (pytest -W error would turn it
        with pytest.raises(ValueError, match=r"(?i)decompression bomb") as error:  # into a non-ValueError)
            load_image(path)
    assert "bomb.png" in str(error.value) and "pixels" in str(error.value)


def test_big_bilevel_image_bomb_is_a_value_error(tmp_path):
    path = tmp_path / "big.png"
    Image.new("1", (20_000, 10_000)).save(path)  # 200 M pixels, a few kB on disk
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"(?i)decompression bomb"):
        load_image(path)


def test_caption_reports_bad_files_as_value_errors(tiny_trained_captioner, tmp_path):
    text = tmp_path / "readme.jpg"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"(?i)not an image"):
        tiny_trained_captioner.caption(text)
    bomb = tmp_path / "bomb.png"
    _png_claiming_size(bomb, 50_000, 50_000)
    with pytest.raises(ValueError, match=r"(?i)decompression bomb"):
        tiny_trained_captioner.caption_batch([_upright_with_marker(), bomb])


# --- heatmap overlay ---------------------------------------------------------------------------------------------
def test_overlay_is_rgb_of_the_image_size(shapes_image):
    attention = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    attention /= attention.sum()
    out = overlay(shapes_image, attention, alpha=0.5)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == shapes_image.size
    assert overlay(shapes_image.convert("L"), attention).size == shapes_image.size
    # alpha 0 is the image itself, alpha 1 the heatmap only
    np.testing.assert_array_equal(np.asarray(overlay(shapes_image, attention, alpha=0.0)), np.asarray(shapes_image))
    assert not np.array_equal(np.asarray(overlay(shapes_image, attention, alpha=1.0)), np.asarray(shapes_image))


def test_overlay_is_smooth_and_puts_the_peak_on_its_cell():
    W, H, gh, gw = 200, 120, 8, 8
    image = Image.new("RGB", (W, H), (128, 128, 128))
    attention = np.full((gh, gw), 0.1, dtype=np.float32)
    attention[2, 5] = 5.0
    attention[6, 1] = 2.0
    attention /= attention.sum()
    heat = np.asarray(overlay(image, attention, alpha=1.0), dtype=np.float32)
    assert heat.shape == (H, W, 3)
    # nearest-neighbour upsample of the same map through the same pipeline: blocky
    blocky_map = np.kron(attention, np.ones((H // gh, W // gw)))  # exact blocks of 15 x 25 px
    blocky = np.asarray(overlay(image, blocky_map, alpha=1.0), dtype=np.float32)

    def max_step(a):
        return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())

    assert max_step(blocky) > 100
    assert max_step(heat) < 0.4 * max_step(blocky), (max_step(heat), max_step(blocky))
    # the brightest pixel lies in cell (2, 5): x in [5W/8, 6W/8), y in [2H/8, 3H/8)
    y, x = np.unravel_index(heat.sum(-1).argmax(), (H, W))
    assert 5 * W / gw <= x < 6 * W / gw and 2 * H / gh <= y < 3 * H / gh, (x, y)


def test_overlay_leaves_low_attention_pixels_close_to_the_photo():
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    attention = np.full((8, 8), 1e-4, dtype=np.float32)
    attention[1, 6] = 1.0  # one cell looked at, top right
    out = np.asarray(overlay(photo, attention, alpha=0.9), dtype=np.int16)
    original = np.asarray(photo, dtype=np.int16)
    far = (slice(60, 96), slice(0, 48))  # bottom left, far from the peak
    assert np.abs(out[far] - original[far]).max() <= 3  # the photo itself, not greyed by the colour map
    assert np.abs(out[12, 100] - original[12, 100]).sum() > 30  # the looked-at cell is coloured


def test_overlay_rejects_bad_maps_and_alpha(shapes_image):
    good = np.full((4, 4), 1 / 16, dtype=np.float32)
    for bad in (np.ones(16), np.ones((2, 4, 4)), np.ones((1, 1, 4, 4))):
        with pytest.raises(ValueError, match=r"shape \(gh, gw\)"):
            overlay(shapes_image, bad)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha.*\[0, 1\]"):
            overlay(shapes_image, good, alpha=alpha)
    overlay(shapes_image, good, alpha=1.0)  # edges are fine
