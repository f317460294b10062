import io

import numpy as np
import pytest
from PIL import Image

from defectloop.data.images import ImageError, load_image, load_mask


def _save(tmp_path, img: Image.Image, name: str, **kw):
    p = tmp_path / name
    img.save(p, **kw)
    return p


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "F", "1", "LA", "CMYK"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    img = base.convert(mode) if mode not in ("I;16", "F") else Image.fromarray(
        (rng.random((20, 30)) * (65535 if mode == "I;16" else 1)).astype(np.uint16 if mode == "I;16" else np.float32))
    fmt = "tiff" if mode in ("I;16", "F", "CMYK", "LA") else "png"
    if mode == "CMYK":
        fmt = "jpeg"
    arr = load_image(_save(tmp_path, img, f"x.{fmt}"))
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    a = np.full((8, 8), 65535, np.uint16)
    a[0, 0] = 0
    arr = load_image(_save(tmp_path, Image.fromarray(a), "x.png"))
    assert arr[1, 1, 0] == 255 and arr[0, 0, 0] == 0


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff"])
def test_formats(tmp_path, fmt):
    img = Image.fromarray(np.zeros((10, 12, 3), np.uint8))
    assert load_image(_save(tmp_path, img, f"x.{fmt}")).shape == (10, 12, 3)


def test_bad_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good, format="png")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    for path, words in [(empty, "0 bytes"), (text, "not a readable image"), (trunc, "truncated"),
                        (tmp_path / "missing.png", "no such file")]:
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert str(path) in str(e.value) and words in str(e.value)
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")


def test_decompression_bomb_refused(tmp_path):
    p = _save(tmp_path, Image.new("L", (300, 300)), "big.png")
    with pytest.raises(ImageError, match="too large"):
        load_image(p, max_pixels=10_000)


def test_mask_size_mismatch(tmp_path):
    p = _save(tmp_path, Image.new("L", (10, 10), 255), "m.png")
    assert load_mask(p, (10, 10)).all()
    with pytest.raises(ImageError, match="differs from its image"):
        load_mask(p, (12, 10))


def test_what_an_image_file_says_is_respected():
    """A wrong chunk CRC is corruption (Pillow would decode it), several frames are refused (which
    one would be meant?), a camera JPEG with previews (MPO) is its photo, EXIF orientation is applied."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 4 + int.from_bytes(data[idat - 4:idat], "big")] ^= 0xFF  # the CRC after the IDAT data
    with pytest.raises(ImageError, match="corrupt"):
        load_image(bytes(data))

    frames = [Image.fromarray(np.full((20, 30), v, np.uint8)) for v in (0, 255)]
    for fmt in ("GIF", "TIFF"):
        anim = io.BytesIO()
        frames[0].save(anim, format=fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(ImageError, match="2 frames"):
            load_image(anim.getvalue())
    mpo = io.BytesIO()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(mpo, format="MPO", save_all=True,
                                                               append_images=[Image.new("RGB", (10, 10))])
    assert Image.open(io.BytesIO(mpo.getvalue())).n_frames == 2 and load_image(mpo.getvalue()).shape == (20, 30, 3)

    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:, :10] = 255  # a bright left edge
    img = Image.fromarray(upright)
    exif = img.getexif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    jpeg = io.BytesIO()
    img.save(jpeg, format="JPEG", exif=exif.tobytes(), quality=95)
    shown = load_image(jpeg.getvalue())
    assert shown.shape == (60, 40, 3) and shown[:10].mean() > 200 and shown[-10:].mean() < 50  # the edge on top
