"""Real photos available offline, and ImageNet-shaped data made from them.

* :func:`real_photos`: every photo the installed packages ship that loads without a download
  (scikit-image's ``skimage.data``, matplotlib's sample data; the list is ``bench/realrows.py``'s),
  as RGB uint8 arrays.
* :func:`imagenet_like` / :func:`imagenet_jpegs`: ImageNet-typical training JPEGs from those
  photos: a random crop at one of ImageNet's common sizes (mostly 500x375), a random flip and a
  mild colour change, so every file differs.
* :func:`write_imagenet_tree`: an ImageNet-shaped folder tree (``<root>/<synset>/<name>.JPEG``,
  synset folders in sorted order, as ImageNet is laid out), plus a few odd files that real
  datasets hold: a 16-bit PNG, an EXIF-rotated JPEG, a CMYK JPEG, a palette PNG with transparency,
  a grayscale JPEG, and (optionally) a truncated JPEG.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance

# ImageNet's most common sizes (w, h) and rough shares; a 500x375 JPEG is the typical image.
SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (333, 500), (500, 400), (640, 480), (500, 281))
SIZE_WEIGHTS = (0.40, 0.15, 0.15, 0.10, 0.05, 0.05, 0.05, 0.05)


def real_photos(min_side: int = 200) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) of every offline photo (``bench/realrows.photos``: skimage, matplotlib;
    the photos the soft-target tests use are left out) at least ``min_side`` px on its short side."""
    from bench.realrows import photos

    out = [(p.name, p.pixels) for p in photos(fmnist=0) if p.kind == "photo" and min(p.pixels.shape[:2]) >= min_side]
    if not out:
        raise RuntimeError("no offline photos found (scikit-image / matplotlib sample data)")
    return out


def imagenet_like(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An ImageNet-typical picture from ``photo``: a random crop (60-100 % of the largest with the
    target aspect) resized to one of ImageNet's common sizes, a random flip, mild brightness/contrast."""
    src = Image.fromarray(photo)
    w, h = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    sw, sh = src.size
    scale = min(sw / w, sh / h) * rng.uniform(0.6, 1.0)  # crop with the target aspect
    cw, ch = w * scale, h * scale
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = src.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
    return ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.85, 1.15)))


def imagenet_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct ImageNet-like JPEGs (q 90) cycling over the offline photos."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    return [jpeg_bytes(imagenet_like(photos[i % len(photos)][1], rng)) for i in range(n)]


def jpeg_bytes(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def write_imagenet_tree(root: str | os.PathLike, classes: Sequence[str], per_class: int, seed: int = 0,
                        odd_files: bool = True, corrupt: bool = False,
                        photos: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Write ``root/<class>/<class>_<i>.JPEG`` (q 90) for every class, in sorted class order.

    Returns ``{"files": n, "odd": {kind: path}}``; odd files go into the first classes' folders
    (``corrupt`` adds a truncated JPEG, for ``make_shards --skip-bad``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = photos or real_photos()
    n = 0
    for c, name in enumerate(sorted(classes)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _, photo = photos[int(rng.integers(len(photos)))]
            (folder / f"{name}_{i}.JPEG").write_bytes(jpeg_bytes(imagenet_like(photo, rng)))
            n += 1
    odd: dict[str, str] = {}
    if odd_files:
        names = sorted(classes)
        pic = lambda: imagenet_like(photos[int(rng.integers(len(photos)))][1], rng)  # noqa: E731
        gray16 = (np.asarray(pic().convert("L"), dtype=np.uint16) * 257)
        kinds = {
            "png16": lambda p: Image.fromarray(gray16).save(p, format="PNG"),
            "exif_rotated": lambda p: _exif_rotated(pic(), p),
            "cmyk": lambda p: pic().convert("CMYK").save(p, format="JPEG", quality=90),
            "palette_alpha": lambda p: pic().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            .save(p, format="PNG", transparency=0),
            "grayscale": lambda p: pic().convert("L").save(p, format="JPEG", quality=90),
        }
        for j, (kind, save) in enumerate(kinds.items()):
            ext = "png" if kind in ("png16", "palette_alpha") else "JPEG"
            path = root / names[j % len(names)] / f"odd_{kind}.{ext}"
            save(path)
            odd[kind] = str(path)
        n += len(kinds)
        if corrupt:
            path = root / names[-1] / "odd_truncated.JPEG"
            path.write_bytes(jpeg_bytes(pic())[:2000])
            odd["truncated"] = str(path)
    return {"files": n, "odd": odd}


def _exif_rotated(upright: Image.Image, path: Path) -> None:
    """Save ``upright`` as a camera would: the sensor image turned, plus orientation tag 6."""
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, format="JPEG", quality=90, exif=exif.tobytes())
