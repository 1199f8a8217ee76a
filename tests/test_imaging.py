import io

import cv2
import numpy as np
import pytest

from lungmask_kit.imaging import ImageDecodeError, decode_image, prepare_input, to_unit_range

from conftest import cxr_like

PIL = pytest.importorskip("PIL.Image")


def _png(pixels) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def _pil_bytes(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_8bit_gray_roundtrip():
    img = cxr_like()
    d = decode_image(_png(img))
    assert d.pixels.dtype == np.uint8 and d.bit_depth == 8 and d.source_channels == 1
    np.testing.assert_array_equal(d.pixels, img)


def test_16bit_keeps_native_depth():
    img = cxr_like(dtype=np.uint16)
    d = decode_image(_png(img))
    assert d.pixels.dtype == np.uint16 and d.bit_depth == 16
    np.testing.assert_array_equal(d.pixels, img)


def test_16bit_with_12_bit_range_is_stretched_for_the_model():
    img = (cxr_like().astype(np.uint16) * 16)  # 12-bit detector values in a 16-bit file
    x = to_unit_range(img)
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)


def test_rgb_rgba_palette_and_cmyk_become_luminance():
    gray = cxr_like()
    rgb = np.dstack([gray] * 3)
    rgba = np.dstack([gray] * 3 + [np.full_like(gray, 255)])
    for data in (_png(rgb), _png(rgba), _pil_bytes(PIL.fromarray(gray).convert("P"), "PNG")):
        d = decode_image(data)
        assert d.pixels.ndim == 2 and d.pixels.shape == gray.shape
        assert np.abs(d.pixels.astype(int) - gray).max() <= 1
    cmyk = decode_image(_pil_bytes(PIL.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.pixels.shape == gray.shape
    assert np.abs(cmyk.pixels.astype(int) - gray).mean() < 6


def test_exif_orientation_is_applied():
    img = np.zeros((40, 100), np.uint8)
    img[:, :10] = 255  # bright band on the left
    pil = PIL.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    d = decode_image(_pil_bytes(pil, "JPEG", exif=exif.tobytes(), quality=95))
    assert d.pixels.shape == (100, 40)
    assert d.pixels[:10].mean() > 200  # band now on top


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am text pretending to be a PNG", "not a decodable image"),
        (_png(cxr_like())[:500], "truncated PNG"),
        (cv2.imencode(".jpg", cxr_like())[1].tobytes()[:800], "truncated JPEG"),
    ],
)
def test_bad_bytes_give_clear_errors(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_decompression_bomb_refused_before_decoding():
    png = bytearray(_png(cxr_like(8, 8)))
    png[16:24] = (100000).to_bytes(4, "big") + (100000).to_bytes(4, "big")  # declare 100k x 100k
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(bytes(png))


def test_prepare_input_uses_config_stats():
    img = np.full((50, 70), 255, np.uint8)
    x = prepare_input(img, 32, [0.5], [0.25], 1)
    assert x.shape == (1, 32, 32) and np.allclose(x, 2.0)
    x3 = prepare_input(img, 16, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3)
    assert x3.shape == (3, 16, 16) and np.allclose(x3[1], (1 - 0.456) / 0.224)


def test_png_colour_profiles_do_not_print_a_warning_per_image(tmp_path):
    """libpng warns once per image with an RGB ICC profile on a grayscale PNG; lungkit drops the unused profile."""
    import io
    import subprocess
    import sys

    from PIL import Image, ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = (np.random.default_rng(0).random((64, 80)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", icc_profile=profile)
    path = tmp_path / "icc.png"
    path.write_bytes(buf.getvalue())
    code = ("import sys, cv2, numpy as np; from lungmask_kit.imaging import decode_image;"
            "data = open(sys.argv[1], 'rb').read();"
            "cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH) if sys.argv[2] == 'raw' else None;"
            "img = decode_image(data).pixels if sys.argv[2] == 'lungkit' else None;"
            "print(img.shape if img is not None else '')")
    raw = subprocess.run([sys.executable, "-c", code, str(path), "raw"], capture_output=True, text=True)
    ours = subprocess.run([sys.executable, "-c", code, str(path), "lungkit"], capture_output=True, text=True)
    assert "libpng warning" in raw.stderr  # the file really provokes the warning
    assert ours.returncode == 0 and "libpng warning" not in ours.stderr and "(64, 80)" in ours.stdout
    from lungmask_kit.imaging import decode_image

    assert np.array_equal(decode_image(path.read_bytes()).pixels, pixels)
