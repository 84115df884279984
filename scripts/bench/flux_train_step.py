#!/usr/bin/env python3
"""PyTorch peer of `tensorbake bench train --mode flux-lora|flux-full`: one Flux
flow-matching training step in diffusers, as `train_dreambooth_lora_flux.py` does it.

Run by the bench itself on the same model directory in the same run; by hand:

    python scripts/bench/flux_train_step.py --transformer DIR --mode lora \\
        --lora-targets targets.json --lora-rank 16 --batch 8 --steps 5 --warmup 2 \\
        --device cpu --dtype f32 --latent 16,32,32 --t5 256,512 --pooled 768

Needs torch, diffusers and peft (measured with torch 2.15, diffusers 0.42.1, peft
0.21.2). The step is the one `tensorbake train` runs in mode `flux_clip_image`:

    x0 = ((mean + std * randn) - 0.1159) * 0.3611        Flux-VAE latents from the moments
    s  = sigmoid(randn) shifted by mu(N)                  logit-normal, FluxPipeline's shift
    x_t = (1 - s) x0 + s noise, packed 2x2, image ids
    pooled = clip_image_embeds (dropout 0.1: the black image's); T5 = the null embedding
    v = FluxTransformer2DModel(x_t, s, T5, pooled)
    loss = mean((v - (noise - x0))^2); backward; clip_grad_norm_(0.01); AdamW step

Modes: `lora` trains a peft LoRA (rank, alpha = rank) on the module paths in
--lora-targets (tensorbake's defaults, written by the bench), Flux frozen; `full` trains
every parameter. Parameters stay float32; with --dtype bf16 on CUDA the forward runs
under torch.autocast(bfloat16). Batches are drawn in memory (no store). Each step is
timed to a device synchronisation (`train_step_timing.py`, which both peers import).
"""

import argparse
import json
import math
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_timing import time_and_report  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformer", required=True)
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--lora-targets", help="JSON list of module paths (mode lora)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--latent", required=True, help="channels,height,width")
    ap.add_argument("--t5", required=True, help="tokens,width")
    ap.add_argument("--pooled", type=int, required=True)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)

    flux = FluxTransformer2DModel.from_pretrained(args.transformer).to(dev)
    if args.gradient_checkpointing:
        flux.enable_gradient_checkpointing()
    if args.mode == "lora":
        from peft import LoraConfig

        with open(args.lora_targets) as f:
            targets = json.load(f)
        flux.requires_grad_(False)
        flux.add_adapter(
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_rank,
                target_modules=targets,
            )
        )
        trained = [p for p in flux.parameters() if p.requires_grad]
    else:
        trained = list(flux.parameters())
    flux.train()
    opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.03, eps=1e-10)

    c, h, w = (int(x) for x in args.latent.split(","))
    tl, tw = (int(x) for x in args.t5.split(","))
    b = args.batch
    t5_null = torch.randn(1, tl, tw, device=dev).to(torch.bfloat16).float().expand(b, tl, tw)
    black = torch.zeros(args.pooled, device=dev)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, torch.float32)
    txt_ids = torch.zeros(tl, 3, device=dev)
    tokens = (h // 2) * (w // 2)
    # FluxPipeline's calculate_shift (FLUX.1-dev's scheduler values)
    m = (1.15 - 0.5) / (4096 - 256)
    mu = tokens * m + (0.5 - m * 256)
    amp = args.dtype == "bf16"
    if amp and dev.type != "cuda":
        raise SystemExit("bf16 (AMP) is measured on CUDA only")


    def step():
        mean = torch.randn(b, c, h, w, device=dev)
        std = torch.full((b, c, h, w), 0.05, device=dev)
        pooled = torch.randn(b, args.pooled, device=dev).to(torch.bfloat16).float()
        x0 = ((mean + std * torch.randn_like(mean)) - 0.1159) * 0.3611
        u = torch.sigmoid(torch.randn(b, device=dev))
        s = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
        noise = torch.randn_like(x0)
        x_t = (1 - s.view(b, 1, 1, 1)) * x0 + s.view(b, 1, 1, 1) * noise
        dropped = torch.rand(b, device=dev) < 0.1
        pooled = torch.where(dropped[:, None], black[None], pooled)
        packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            v = flux(
                hidden_states=packed,
                encoder_hidden_states=t5_null,
                pooled_projections=pooled,
                timestep=s,
                img_ids=img_ids,
                txt_ids=txt_ids,
            ).sample
        loss = ((v.float() - target) ** 2).reshape(b, -1).mean(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 0.01)
        opt.step()
        return loss

    time_and_report(step, trained, b, args.steps, args.warmup, dev)


if __name__ == "__main__":
    main()
