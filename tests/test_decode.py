"""Decoding: one rule for both sides (16-bit, EXIF orientation, CMYK, palette, alpha), covered by
the plan fingerprint, and applied when shards are written and replayed."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import pipeline.decode as D
from pipeline.plan import AugConfig, fingerprint
from pipeline.shards import RawSample, SampleError, decode_image, encode_for_shard


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(w: int = 60, h: int = 40) -> np.ndarray:
    """An asymmetric test picture: dark left half, bright right half, a red top-left block."""
    arr = np.full((h, w, 3), 40, np.uint8)
    arr[:, w // 2:] = 220
    arr[: h // 4, : w // 4] = (230, 20, 20)
    return arr


def test_16bit_png_decodes_to_a_gradient():
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    # what a plain convert("RGB") does: clips to white
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean() > 250
    rgb = np.asarray(D.decode(data))
    assert rgb.shape == (8, 256, 3) and (rgb[..., 0] == rgb[..., 1]).all()
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and np.abs(row - np.arange(256)).max() <= 1  # a linear ramp


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_rotated_jpeg_comes_out_upright(orientation):
    upright = Image.fromarray(_photo())
    # a camera stores the sensor image and the tag that turns it upright
    stored = upright.transpose({6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
                                3: Image.Transpose.ROTATE_180}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    out = np.asarray(D.decode(data)).astype(int)
    assert out.shape == _photo().shape
    assert np.abs(out - _photo()).mean() < 6          # upright, up to JPEG error
    ignored = np.asarray(D.decode(data, exif_transpose=False)).astype(int)
    assert ignored.shape == np.asarray(stored).shape   # switched off: the stored, sideways image
    if ignored.shape == out.shape:
        assert np.abs(ignored - out).mean() > 50


def test_cmyk_palette_and_alpha_come_out_as_rgb():
    photo = Image.fromarray(_photo())
    cmyk = np.asarray(D.decode(_encode(photo.convert("CMYK"), "JPEG", quality=95))).astype(int)
    assert np.abs(cmyk - _photo()).mean() < 6
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert np.abs(np.asarray(D.decode(_encode(pal, "PNG"))).astype(int) - _photo()).mean() < 3
    # alpha: transparent pixels become the white background, opaque ones keep their colour
    rgba = np.concatenate([_photo(), np.full((40, 60, 1), 255, np.uint8)], axis=-1)
    rgba[:, :10, 3] = 0
    rgba[:, :10, :3] = 0   # the colour hidden under transparency is black
    out = np.asarray(D.decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (out[:, :10] == 255).all() and (out[:, 10:] == _photo()[:, 10:]).all()
    la = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)]), "LA")
    assert (np.asarray(D.decode(_encode(la, "PNG"))) == 255).all()
    assert D.decode(_encode(Image.fromarray(np.zeros((4, 4), np.uint8)), "PNG")).mode == "RGB"


def test_undecodable_and_float_images_are_refused():
    with pytest.raises(D.DecodeError):
        D.decode(b"not an image")
    with pytest.raises(D.DecodeError, match="float"):
        D.to_rgb(Image.fromarray(np.zeros((4, 4), np.float32)))
    raw = RawSample(sample_id=7, key="k7", label=0, data=b"\xff\xd8garbage", ext="jpg", shard="train-000001.tar")
    with pytest.raises(SampleError, match="train-000001.tar key k7"):
        decode_image(raw)


def test_shard_writing_keeps_or_reencodes_with_the_same_rule():
    photo = Image.fromarray(_photo())
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        data = _encode(photo, fmt)
        assert encode_for_shard(data, "x") == (data, ext)   # bytes kept as they are
    # a 16-bit TIFF is re-encoded as a 16-bit PNG: nothing clipped, nothing lost
    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    data, ext = encode_for_shard(_encode(Image.fromarray(ramp), "TIFF"), "x")
    assert ext == "png" and (np.asarray(Image.open(io.BytesIO(data))) == ramp).all()
    with pytest.raises(SampleError, match="bad.tif"):
        encode_for_shard(_encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"), "bad.tif")


def test_fingerprint_covers_decoding(monkeypatch):
    base = fingerprint(AugConfig())
    assert fingerprint(AugConfig(exif_transpose=False)) != base
    to_rgb = D.to_rgb

    def truncating(image):  # the old behaviour: 16-bit clipped by convert("RGB")
        return image.convert("RGB") if image.mode.startswith("I") else to_rgb(image)

    monkeypatch.setattr(D, "to_rgb", truncating)
    assert fingerprint(AugConfig()) != base
    monkeypatch.undo()
    assert fingerprint(AugConfig()) == base
