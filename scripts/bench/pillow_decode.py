#!/usr/bin/env python3
"""Pillow peer of `tensorbake bench decode`: decode + resize + centre crop.

Run by the bench itself on the same files in the same run; by hand:

    python scripts/bench/pillow_decode.py --resolution 512 --seconds 3 a.jpg b.jpg

Needs Pillow (measured with Pillow 13.0 and its bundled libjpeg-turbo). Each mode
does what a PyTorch data loader does with Pillow:

    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (w', h'))          # only in mode "draft"
    im = im.convert("RGB")
    im = ImageOps.fit(im, (r, r), Image.Resampling.BICUBIC)

where (w', h') is the size after resizing the shortest side to r, so draft picks the
smallest 1/2^k DCT scale that still covers it. Files are read into memory first;
timing covers the per-image work only. Single-threaded (Pillow decodes on the
calling thread). Prints one JSON object: {mode: {"images": n, "seconds": s,
"images_per_s": x}, "pillow_version": ...}.
"""

import argparse
import io
import json
import math
import time

from PIL import Image, ImageOps


def one(data: bytes, resolution: int, draft: bool) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    if draft:
        w, h = im.size
        scale = resolution / min(w, h)
        im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    im = im.convert("RGB")
    return ImageOps.fit(im, (resolution, resolution), Image.Resampling.BICUBIC)


def measure(blobs, resolution, draft, seconds):
    # One untimed pass: warms caches and checks every file decodes.
    for data in blobs:
        out = one(data, resolution, draft)
        assert out.size == (resolution, resolution), out.size
    n = 0
    start = time.perf_counter()
    while True:
        for data in blobs:
            one(data, resolution, draft)
        n += len(blobs)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per mode")
    p.add_argument("--modes", default="plain,draft", help="comma-separated: plain, draft")
    args = p.parse_args()
    blobs = []
    for f in args.files:
        with open(f, "rb") as fh:
            blobs.append(fh.read())
    result = {"pillow_version": Image.__version__}
    for mode in args.modes.split(","):
        if mode not in ("plain", "draft"):
            p.error(f"unknown mode {mode!r}")
        result[mode] = measure(blobs, args.resolution, mode == "draft", args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
