#!/usr/bin/env python3
"""diffusers peer of `tensorbake bench sample`: PixArtAlphaPipeline on the same models.

Run by the bench itself on the same directories in the same run; by hand:

    python scripts/bench/pixart_sample.py --transformer DIR --redux DIR --vae DIR \\
        --scheduler scheduler_config.json --siglip siglip.safetensors \\
        --images 1 --steps 20 --guidance 4.5 --rounds 2 --redux-tokens 120

Needs torch and diffusers (measured with torch 2.15, diffusers 0.42.1). What is timed
is what `tensorbake sample` does for one image prompt, as a diffusers user writes it:

    cond   = redux(siglip[:N]) * 0.04          the stored SigLIP hidden state, first N tokens
    uncond = redux(zeros[:N]) * 0.04           the black image's (the store's null/)
    PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae, transformer, scheduler)(
        prompt_embeds=cond, negative_prompt_embeds=uncond (masks of ones),
        num_images_per_prompt=images, num_inference_steps=steps, guidance_scale=g,
        output_type="np", use_resolution_binning=False)

with the scheduler config tensorbake samples with (DPM-Solver++ 2M, PixArt-XL-2-512's).
One untimed round first. Prints one JSON object: seconds_per_image_rounds, mean_pixel
(of the last round's images, in [0, 1]), torch and diffusers versions.
"""

import argparse
import json
import time

import diffusers
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformer", required=True)
    ap.add_argument("--redux", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--scheduler", required=True, help="scheduler_config.json")
    ap.add_argument("--siglip", required=True, help="safetensors with siglip_hidden [T, W]")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--redux-tokens", type=int, default=120)
    ap.add_argument("--redux-scale", type=float, default=0.04)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]

    transformer = PixArtTransformer2DModel.from_pretrained(args.transformer, torch_dtype=dtype).to(dev)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=dtype).to(dev)
    redux = ReduxImageEncoder.from_pretrained(args.redux, torch_dtype=dtype).to(dev)
    with open(args.scheduler) as f:
        # tensorbake writes non-finite floats as strings ("-Infinity"): back to floats
        config = {
            k: float(v) if v in ("-Infinity", "Infinity", "NaN") else v for k, v in json.load(f).items()
        }
    scheduler = DPMSolverMultistepScheduler.from_config(config)
    pipe = PixArtAlphaPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    siglip = load_file(args.siglip)["siglip_hidden"].to(dev, dtype)
    n = args.redux_tokens
    side = 8 * transformer.config.sample_size

    def one_round():
        with torch.no_grad():
            cond = redux(siglip[None, :n]).image_embeds * args.redux_scale
            uncond = redux(torch.zeros_like(siglip[None, :n])).image_embeds * args.redux_scale
            ones = torch.ones(1, n, dtype=torch.long, device=dev)
            out = pipe(
                prompt=None,
                negative_prompt=None,
                prompt_embeds=cond,
                prompt_attention_mask=ones,
                negative_prompt_embeds=uncond,
                negative_prompt_attention_mask=ones,
                num_images_per_prompt=args.images,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=side,
                width=side,
                output_type="np",
                use_resolution_binning=False,
            )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out.images

    one_round()
    times, images = [], None
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        images = one_round()
        times.append((time.perf_counter() - t0) / args.images)
    print(json.dumps({
        "seconds_per_image_rounds": times,
        "mean_pixel": float(images.mean()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }))


if __name__ == "__main__":
    main()
