#!/usr/bin/env python3
"""PyTorch peer of `tensorbake bench train`: one PixArt-alpha training step in diffusers.

Run by the bench itself on the same model directory in the same run; by hand:

    python scripts/bench/pixart_train_step.py --transformer DIR --redux DIR \\
        --objective train-consumer/tests/fixtures/diffusion/make_diffusion_golden.py \\
        --mode adapter --batch 8 --steps 5 --warmup 2 --device cpu --dtype f32 \\
        --siglip 256,384 --latent 4,32,32 --redux-tokens 120

Needs torch and diffusers (measured with torch 2.15, diffusers 0.42.1). The step is
the one `tensorbake train` runs, as a PyTorch user writes it:

    z   = (mean + std * randn) * 0.18215             latents from the stored moments
    t   = randint(0, 1000, (B,));  x_t = q_sample(z, t, noise)
    y   = redux(siglip[:, :N]).image_embeds * 0.04                first N tokens through the adapter
                                                      (dropout 0.1: the black image's)
    out = PixArtTransformer2DModel(x_t, y, t)         added_cond_kwargs of the 512 model
    loss = IDDPM mse + vb (learned range)             the transcription the goldens use
    loss.backward(); clip_grad_norm_(0.01); AdamW(lr, wd 0.03, eps 1e-10).step()

Modes: `adapter` trains a fresh ReduxImageEncoder with the transformer frozen
(requires_grad False); `finetune` trains the transformer through the frozen adapter.
Parameters stay float32 (master weights); with --dtype bf16 on CUDA the forward runs
under torch.autocast(bfloat16) (AMP), as PixArt's own trainer. The batches are drawn in
memory (no store): the data side is free here, not in tensorbake's timing. Each step is
timed to a device synchronisation. Prints one JSON object with samples_per_s_steps,
trainable_tensors / trainable_params, peak_memory_bytes (CUDA: max_memory_allocated;
CPU: peak resident set during the steps, Linux only) and last_loss.
"""

import argparse
import importlib.util
import os
import sys

import torch
from diffusers import PixArtTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_timing import time_and_report  # noqa: E402


def load_objective(path):
    spec = importlib.util.spec_from_file_location("iddpm_objective", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--transformer", required=True)
    ap.add_argument("--redux", required=True)
    ap.add_argument("--objective", required=True, help="make_diffusion_golden.py (the IDDPM transcription)")
    ap.add_argument("--mode", choices=["adapter", "finetune"], required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--siglip", required=True, help="tokens,width")
    ap.add_argument("--latent", required=True, help="channels,height,width")
    ap.add_argument("--redux-tokens", type=int, default=120)
    ap.add_argument("--redux-scale", type=float, default=0.04)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    iddpm = load_objective(args.objective)

    class OnDevice(iddpm.Schedule):
        """The transcription's schedule, gathering its float64 tables on the batch's device."""

        def at(self, arr, t, like):
            v = torch.from_numpy(arr).to(like.device)[t.to(like.device)].to(like.dtype)
            return v.reshape(-1, *([1] * (like.dim() - 1)))

    sched = OnDevice(iddpm.linear_betas(1000))
    torch.manual_seed(0)

    pixart = PixArtTransformer2DModel.from_pretrained(args.transformer).to(dev)
    if args.gradient_checkpointing:
        pixart.enable_gradient_checkpointing()
    if args.mode == "adapter":
        redux = ReduxImageEncoder.from_pretrained(args.redux).to(dev)  # random weights
        pixart.requires_grad_(False)
        trained = list(redux.parameters())
    else:
        redux = ReduxImageEncoder.from_pretrained(args.redux).to(dev)
        redux.requires_grad_(False)
        trained = list(pixart.parameters())
    pixart.train()
    opt = torch.optim.AdamW(trained, lr=1e-5, weight_decay=0.03, eps=1e-10)

    st, sw = (int(x) for x in args.siglip.split(","))
    c, h, w = (int(x) for x in args.latent.split(","))
    b = args.batch
    black = torch.zeros(st, sw, device=dev)
    amp = args.dtype == "bf16"
    if amp and dev.type != "cuda":
        raise SystemExit("bf16 (AMP) is measured on CUDA only")


    def step():
        mean = torch.randn(b, c, h, w, device=dev)
        std = torch.full((b, c, h, w), 0.05, device=dev)
        siglip = torch.randn(b, st, sw, device=dev).to(torch.bfloat16).float()
        z = (mean + std * torch.randn_like(mean)) * 0.18215
        t = torch.randint(0, 1000, (b,), device=dev)
        noise = torch.randn_like(z)
        x_t = sched.q_sample(z, t, noise)
        n = args.redux_tokens
        s = siglip[:, :n]
        dropped = torch.rand(b, device=dev) < 0.1
        s = torch.where(dropped[:, None, None], black[None, :n], s)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            y = redux(s).image_embeds * args.redux_scale
            out = pixart(
                x_t, encoder_hidden_states=y, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        out = out.float()
        losses = iddpm.training_losses(sched, out, z, x_t, t, noise)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 0.01)
        opt.step()
        return loss

    time_and_report(step, trained, b, args.steps, args.warmup, dev)


if __name__ == "__main__":
    main()
