"""Fine-tune diffusers' PixArtTransformer2DModel from a tensorbake store, in a plain
PyTorch loop: what plugging the cache into your own trainer looks like.

The encoders never run here: VAE latent moments, T5 embeddings (text mode) or SigLIP
embeddings (Redux-adapter mode) come from the store through
``tensorbake.torch.StoreIterableDataset`` (shuffled by seed and epoch like tensorbake's
Rust loader, split by rank and DataLoader worker).

Modes
    text    PixArt-alpha conditioned on the cached T5 embeddings, ``t5_len`` as the
            attention mask; conditioning dropout swaps in the store's recorded
            empty-caption embedding (``null/t5_hidden``). PixArt is trained.
    redux   PixArt frozen; a Redux-style adapter Linear(siglip, 4*caption_channels) ->
            SiLU -> Linear(4*caption_channels, caption_channels) on ``siglip_hidden``,
            output x 0.04, the first 120 tokens as the caption tokens, is trained.

Objective (PixArt-alpha): latents ``(mean + std * eps) * 0.18215`` from ``sd_vae_mean`` /
``sd_vae_std``, DDPM with linear betas 1e-4..0.02 over 1000 steps, epsilon prediction
(MSE on the first ``in_channels`` output channels: the learned-sigma half and its VB
term are left out here), AdamW (weight decay 0.03, eps 1e-10).

The real model (PixArt-XL-2-512x512: 28 layers, 16 heads x 72, patch 2, 4 in / 8 out
channels, caption_channels 4096, sample_size 64) from the Hugging Face hub or a local
diffusers directory, on a store written at 512 px with T5-XXL@120:

    python examples/train_pixart_from_store.py --store pd12m-512.zarr --mode text \\
        --pixart PixArt-alpha/PixArt-XL-2-512x512 --subfolder transformer \\
        --device cuda --bf16 --batch-size 32 --lr 2e-5 --steps 10000 --num-workers 8 \\
        --save out/pixart-text

A tiny random PixArt sized to the store (``--tiny``), e.g. on the demo store
(``cargo run -- demo --out demo``):

    python examples/train_pixart_from_store.py --store demo/store --mode text --tiny \\
        --steps 60 --batch-size 6 --lr 1e-3 --save demo/pixart-tiny
    python examples/train_pixart_from_store.py --store demo/store --mode redux \\
        --pixart demo/pixart-tiny/transformer --steps 60 --batch-size 6 --lr 1e-2

Needs torch, diffusers and the tensorbake package (``pip install ./python``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PixArtTransformer2DModel
from torch.utils.data import DataLoader

import tensorbake
from tensorbake.torch import StoreIterableDataset

SD_SCALE = 0.18215
REDUX_SCALE = 0.04
REDUX_TOKENS = 120


class ReduxAdapter(torch.nn.Module):
    """Redux-style image-embedding adapter: ``down(silu(up(x)))`` on SigLIP tokens."""

    def __init__(self, siglip_width: int, caption_channels: int):
        super().__init__()
        self.redux_up = torch.nn.Linear(siglip_width, 4 * caption_channels)
        self.redux_down = torch.nn.Linear(4 * caption_channels, caption_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


def tiny_pixart(latent_shape, caption_channels: int) -> PixArtTransformer2DModel:
    """A small random PixArt-alpha with the store's latent size and caption width."""
    c, h, w = latent_shape
    assert h == w, f"square latents expected, got {latent_shape}"
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=c,
        out_channels=2 * c,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=h,
        patch_size=2,
        caption_channels=caption_channels,
        norm_num_groups=8,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="tensorbake store: a directory or s3://bucket/prefix")
    p.add_argument("--mode", choices=["text", "redux"], default="text")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--pixart", help="diffusers PixArtTransformer2DModel: local directory or hub id")
    g.add_argument("--tiny", action="store_true", help="a tiny random PixArt sized to the store")
    p.add_argument("--subfolder", default=None, help="subfolder of --pixart (e.g. transformer)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--cond-dropout", type=float, default=0.1, help="probability of the null condition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--save", default=None, help="directory for transformer/ (and redux_adapter.pt)")
    p.add_argument("--log-json", default=None, help="write losses and timings here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    store = tensorbake.open(args.store)
    feats = store.arrays
    latent_shape = feats["sd_vae_mean"].shape
    cond_name = "t5_hidden" if args.mode == "text" else "siglip_hidden"
    if cond_name not in feats:
        print(f"error: store {store.location} has no {cond_name} (mode {args.mode})", file=sys.stderr)
        return 2

    if args.tiny:
        caption_channels = feats["t5_hidden"].shape[-1] if "t5_hidden" in feats else feats[cond_name].shape[-1]
        model = tiny_pixart(latent_shape, caption_channels)
    else:
        model = PixArtTransformer2DModel.from_pretrained(args.pixart, subfolder=args.subfolder)
        caption_channels = model.config.caption_channels
    model.to(device)
    in_channels = model.config.in_channels

    # What to read, and the condition of "nothing" for conditioning dropout.
    arrays = ["sd_vae_mean", "sd_vae_std"]
    adapter = None
    if args.mode == "text":
        arrays += ["t5_hidden", "t5_len"]
        null = store.null_embedding("t5_hidden", as_torch=True)
        null_len = store.null_embedding("t5_len", as_torch=True) if "t5_len" in store.null_names else None
        params = list(model.parameters())
    else:
        arrays += ["siglip_hidden"]
        null = store.null_embedding("siglip_hidden", as_torch=True)  # black image, where recorded
        null_len = None
        model.requires_grad_(False)
        adapter = ReduxAdapter(feats["siglip_hidden"].shape[-1], caption_channels).to(device)
        params = list(adapter.parameters())
    if null is not None:
        null = null.to(device=device, dtype=torch.float32)

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, eps=1e-10)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    ds = StoreIterableDataset(store, arrays, batch_size=args.batch_size, seed=args.seed, drop_last=True)
    if len(ds) == 0:
        print(f"error: store {store.location} has fewer than {args.batch_size} samples", file=sys.stderr)
        return 2
    loader = DataLoader(ds, batch_size=None, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)

    def condition(batch, drop: torch.Tensor):
        """encoder_hidden_states [B, T, caption_channels] and its mask [B, T]."""
        if args.mode == "text":
            h = batch["t5_hidden"].to(device=device, dtype=torch.float32, non_blocking=True)
            lens = batch["t5_len"].to(device)
            if null is not None and drop.any():
                h = torch.where(drop[:, None, None], null.expand_as(h), h)
                if null_len is not None:
                    lens = torch.where(drop, null_len.to(device), lens)
            mask = torch.arange(h.shape[1], device=device)[None, :] < lens[:, None].clamp(min=1)
            return h, mask.to(torch.long)
        s = batch["siglip_hidden"].to(device=device, dtype=torch.float32, non_blocking=True)
        if drop.any():
            s = torch.where(drop[:, None, None], (null if null is not None else torch.zeros_like(s[0])).expand_as(s), s)
        h = adapter(s[:, :REDUX_TOKENS]) * REDUX_SCALE
        return h, torch.ones(h.shape[:2], dtype=torch.long, device=device)

    def loss_of(batch, noise, t, drop) -> torch.Tensor:
        mean = batch["sd_vae_mean"].to(device=device, dtype=torch.float32, non_blocking=True)
        std = batch["sd_vae_std"].to(device=device, dtype=torch.float32, non_blocking=True)
        eps_latent = torch.randn(mean.shape, generator=gen).to(device)
        x0 = (mean + std * eps_latent) * SD_SCALE
        x_t = sched.add_noise(x0, noise, t)
        h, mask = condition(batch, drop)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(
                x_t,
                encoder_hidden_states=h,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
        pred = out[:, :in_channels]  # learned sigma: the second half is the variance
        return F.mse_loss(pred.float(), noise)

    # A fixed evaluation: one batch, fixed noise and timesteps, before and after.
    eval_batch = store.get_batch(ds.rank_batches()[0], arrays, as_torch=True)

    def eval_loss() -> float:
        g = torch.Generator().manual_seed(12345)
        n = len(eval_batch["key"])
        noise = torch.randn((n, *latent_shape), generator=g).to(device)
        t = torch.randint(0, 1000, (n,), generator=g).to(device)
        state = gen.get_state()
        gen.manual_seed(777)
        with torch.no_grad():
            v = loss_of(eval_batch, noise, t, torch.zeros(n, dtype=torch.bool, device=device)).item()
        gen.set_state(state)
        return v

    def frozen_checksum() -> float | None:
        """Sum of the frozen PixArt's weights (redux mode): unchanged by training."""
        if adapter is None:
            return None
        with torch.no_grad():
            return float(sum(p.double().sum().item() for p in model.parameters()))

    eval_start = eval_loss()
    frozen_start = frozen_checksum()
    model.train(args.mode == "text")
    losses, step, samples, t0 = [], 0, 0, time.perf_counter()
    for epoch in range(10**9):
        ds.set_epoch(epoch)
        for batch in loader:
            n = len(batch["key"])
            noise = torch.randn((n, *latent_shape), generator=gen).to(device)
            t = torch.randint(0, 1000, (n,), generator=gen).to(device)
            drop = (torch.rand(n, generator=gen) < args.cond_dropout).to(device)
            loss = loss_of(batch, noise, t, drop)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            samples += n
            if step % 10 == 0 or step == 1 or step == args.steps:
                print(f"step {step:5d}  epoch {epoch}  loss {losses[-1]:.4f}", flush=True)
            if step >= args.steps:
                break
        if step >= args.steps:
            break
    elapsed = time.perf_counter() - t0
    model.eval()
    eval_end = eval_loss()
    k = max(1, min(10, len(losses) // 4))
    summary = {
        "mode": args.mode,
        "steps": step,
        "losses": losses,
        "first_mean": sum(losses[:k]) / k,
        "last_mean": sum(losses[-k:]) / k,
        "eval_start": eval_start,
        "eval_end": eval_end,
        "samples_per_s": samples / elapsed if elapsed > 0 else math.nan,
        "trainable_parameters": sum(
            p.numel() for m in (model, adapter) if m is not None for p in m.parameters() if p.requires_grad
        ),
        "adapter_parameters": sum(p.numel() for p in adapter.parameters()) if adapter is not None else 0,
        "frozen_checksum_start": frozen_start,
        "frozen_checksum_end": frozen_checksum(),
    }
    print(
        f"done: {step} steps, loss {summary['first_mean']:.4f} -> {summary['last_mean']:.4f} "
        f"(mean of first / last {k}), fixed-batch eval {eval_start:.4f} -> {eval_end:.4f}, "
        f"{summary['samples_per_s']:.1f} samples/s"
    )
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        model.save_pretrained(os.path.join(args.save, "transformer"))
        if adapter is not None:
            torch.save(adapter.state_dict(), os.path.join(args.save, "redux_adapter.pt"))
    if args.log_json:
        with open(args.log_json, "w") as f:
            json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
