#!/usr/bin/env python3
"""Golden outputs of Pillow for the image preprocessing tests (ingest/src/image/tests.rs).

Run from the repository root, here (not in CI; CI reads the files it writes):

    /opt/refvenv/bin/python ingest/tests/data/image/make_golden.py

Made with Python 3.11, Pillow 13.0.0 (bundled libjpeg-turbo 3.1, libwebp 1.6) and
numpy 2.4. Inputs are drawn from a seeded numpy generator (smooth gradients plus
texture and noise, so JPEG behaves as on photos) and written by Pillow; outputs are
what a Pillow data loader produces:

    im = Image.open(f); im = im.convert("RGB")   # RGBA: composited onto white first
    ImageOps.fit(im, (r, r), method, centering=(0.5, 0.5))

saved as PNG. `golden.json` lists every case: input, output, resolution, filter,
and whether the output was made with `Image.draft` (DCT-scaled JPEG decode).
"""

import json
import math
import pathlib

import numpy as np
from PIL import Image, ImageOps

HERE = pathlib.Path(__file__).resolve().parent
RNG = np.random.default_rng(20261126)
FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


def photo(w: int, h: int) -> np.ndarray:
    """Photo-like RGB: two-colour gradient, soft disc, smooth texture, grain."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    c0, c1, c2 = RNG.uniform(30, 230, size=(3, 3))
    t = (x / w * 0.7 + y / h * 0.3)[..., None]
    img = c0 * (1 - t) + c1 * t
    cx, cy, r = RNG.uniform(0.3, 0.7) * w, RNG.uniform(0.3, 0.7) * h, 0.3 * min(w, h)
    disc = np.clip((r - np.hypot(x - cx, y - cy)) / 6 + 0.5, 0, 1)[..., None]
    img = img * (1 - disc) + c2 * disc
    coarse = RNG.normal(0, 18, size=(h // 8 + 2, w // 8 + 2))
    coarse = np.kron(coarse, np.ones((8, 8)))[:h, :w]
    k = np.ones(5) / 5
    coarse = np.apply_along_axis(lambda v: np.convolve(v, k, "same"), 0, coarse)
    coarse = np.apply_along_axis(lambda v: np.convolve(v, k, "same"), 1, coarse)
    img = img + coarse[..., None] + RNG.normal(0, 3, size=(h, w, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def fit(im: Image.Image, res: int, filt: str) -> Image.Image:
    return ImageOps.fit(im, (res, res), FILTERS[filt], centering=(0.5, 0.5))


def main():
    cases = []

    def case(name, src, res, filt="bicubic", draft=False, rgba=False):
        path = HERE / src
        im = Image.open(path)
        if draft:
            w, h = im.size
            s = res / min(w, h)
            im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
        if rgba:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        im = im.convert("RGB")
        out = fit(im, res, filt)
        out_name = f"{name}.out.png"
        out.save(HERE / out_name)
        cases.append({"name": name, "input": src, "output": out_name, "resolution": res,
                      "resample": filt, "draft": draft})

    # JPEG, landscape, 4:2:0, quality 90: the SA-1B shape at small scale.
    Image.fromarray(photo(240, 160)).save(HERE / "photo.jpg", quality=90, subsampling=2)
    for filt in FILTERS:
        case(f"photo_{filt}", "photo.jpg", 64, filt)
    # Upscaling (shortest side 160 -> 200).
    case("photo_up", "photo.jpg", 200)
    # Portrait, odd sizes, 4:4:4.
    Image.fromarray(photo(97, 151)).save(HERE / "portrait.jpg", quality=95, subsampling=0)
    case("portrait", "portrait.jpg", 40)
    # Large enough for DCT scaling: tensorbake decodes at M/8, Pillow at 1/2^k.
    Image.fromarray(photo(480, 320)).save(HERE / "big.jpg", quality=90, subsampling=2)
    case("big_full", "big.jpg", 64)
    case("big_draft", "big.jpg", 64, draft=True)
    # Grayscale JPEG.
    Image.fromarray(photo(120, 90)[..., 1]).save(HERE / "gray.jpg", quality=90)
    case("gray_jpeg", "gray.jpg", 48)
    # CMYK JPEG (Pillow writes Adobe-style inverted CMYK, as Photoshop does).
    Image.fromarray(photo(120, 90)).convert("CMYK").save(HERE / "cmyk.jpg", quality=95)
    case("cmyk_jpeg", "cmyk.jpg", 48)
    # PNG: RGB, grayscale, palette, RGBA with a transparent band.
    Image.fromarray(photo(90, 70)).save(HERE / "rgb.png")
    case("rgb_png", "rgb.png", 48)
    Image.fromarray(photo(90, 70)[..., 0]).save(HERE / "gray.png")
    case("gray_png", "gray.png", 48)
    Image.fromarray(photo(90, 70)).quantize(64).save(HERE / "palette.png")
    case("palette_png", "palette.png", 48)
    rgba = np.dstack([photo(90, 70), np.tile(np.linspace(0, 255, 90).astype(np.uint8), (70, 1))])
    rgba[:, :10, 3] = 0
    Image.fromarray(rgba, "RGBA").save(HERE / "rgba.png")
    case("rgba_png", "rgba.png", 48, rgba=True)
    # WebP: lossless (decoders must agree exactly) and lossy.
    Image.fromarray(photo(90, 70)).save(HERE / "lossless.webp", lossless=True)
    case("lossless_webp", "lossless.webp", 48)
    Image.fromarray(photo(90, 70)).save(HERE / "lossy.webp", quality=90)
    case("lossy_webp", "lossy.webp", 48)

    (HERE / "golden.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {HERE}")


if __name__ == "__main__":
    main()
