"""Decoding: one rule for both sides (16-bit, EXIF orientation, CMYK, palette, alpha), covered by
the plan fingerprint, and applied when shards are written and replayed."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import pipeline.decode as D
from pipeline.plan import AugConfig, fingerprint
from pipeline.decode import decode_image, encode_for_shard
from pipeline.errors import SampleError
from pipeline.shards import RawSample


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


def _big_png(width: int, height: int) -> bytes:
    """A valid 8-bit gray PNG of ``width`` x ``height`` black pixels, made row by row (~KB of
    zlib data for tens of MP): what a decompression bomb looks like."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + zero pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture
def loads(monkeypatch):
    """Record every pixel decode (ImageFile.load): the limit must refuse before one."""
    seen = []
    load = ImageFile.ImageFile.load

    def recording(self):
        seen.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording)
    return seen


def test_pixel_limit_refuses_from_the_header_before_decoding(loads):
    big = _big_png(10_000, 7_000)  # 70 MP: below PIL's own warning (89 MP), above the 64 MP default
    assert len(big) < 200_000 and Image.open(io.BytesIO(big)).size == (10_000, 7_000)
    with pytest.raises(D.ImageTooLargeError, match=r"PNG of 10000x7000 = 70\.0 MP exceeds the pixel limit of 64 MP"):
        D.decode(big)
    assert loads == []  # refused from the header: no pixel decoded
    # a JPEG written by PIL, with the limit lowered below its size: refused too, and decodes when allowed
    jpeg = _encode(Image.fromarray(_photo(60, 40)), "JPEG")
    with pytest.raises(D.ImageTooLargeError, match="JPEG of 60x40"):
        D.decode(jpeg, max_pixels=60 * 40 - 1)
    assert loads == []
    assert D.decode(jpeg, max_pixels=60 * 40).size == (60, 40) and loads and set(loads) == {(60, 40)}
    loads.clear()
    # the replay side names shard and key
    raw = RawSample(sample_id=3, key="k3", label=0, data=big, ext="png", shard="train-000002.tar")
    with pytest.raises(SampleError, match=r"shard train-000002.tar key k3 \(sample_id 3\): cannot decode png: .*pixel limit"):
        decode_image(raw)
    with pytest.raises(SampleError, match="pixel limit"):
        encode_for_shard(big, "crawl/huge.png")
    assert loads == []
    with pytest.raises(Exception, match="max_pixels"):
        AugConfig(max_pixels=0)


def test_make_shards_and_index_record_an_oversized_image_as_bad(tmp_path, make_imagefolder):
    import subprocess
    import sys

    from pipeline.index import index_shards
    from pipeline.manifest import load_manifest

    src = make_imagefolder(tmp_path / "src")
    huge = src / "dog" / "huge.png"
    huge.write_bytes(_big_png(10_000, 7_000))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "pipeline.make_shards", "imagefolder", "--train-dir", str(src), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and str(huge) in r.stderr and "pixel limit" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_manifest(out / "train")
    assert [s["path"] for s in m.skipped] == [str(huge)] and "pixel limit of 64 MP" in m.skipped[0]["error"]
    # --max-pixels raises the limit (the image then goes in as it is)
    r = subprocess.run(cmd + ["--max-pixels", "80000000", "--overwrite", "--shard-size", "50"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_manifest(out / "train")
    assert not m.skipped and m.num_samples == 13
    # indexing someone else's shards: the same image is an unusable sample, listed with --skip-bad
    with pytest.raises(SampleError, match="pixel limit"):
        index_shards(str(out / "train" / "train-000000.tar"), str(tmp_path / "idx"))
    m = index_shards(str(out / "train" / "train-000000.tar"), str(tmp_path / "idx"), skip_bad=True)
    assert [b["error"] for b in m.bad_samples() if "pixel limit" in b["error"]]
