"""PyTorch's side of `tensorbake bench encode`: one encoder's forward pass, eager and
torch.compile, with random weights in the config the Rust side wrote.

The models are the reference implementations the encoders are checked against:
diffusers' AutoencoderKL (`encode(x).latent_dist.parameters`, the posterior moments:
encoder and quant_conv), transformers' SiglipVisionModel (`last_hidden_state`, no
pooling head: the Redux adapter reads the hidden states), CLIPVisionModelWithProjection
(`image_embeds`), T5EncoderModel (`last_hidden_state`, with the attention mask) and
CLIPTextModel (`last_hidden_state`). Attention is transformers' default (SDPA).
Weights are drawn by the libraries' own initialisers, built on the device, cast to the
dtype. On CUDA the VAE runs channels-last (the layout cuDNN and Inductor are fastest
in); the transformer models keep theirs.

Timing as on the Rust side: `--warmup` untimed calls, then `--rounds` rounds of
`--iters` calls, each round ended by a synchronisation; the median round's items/s.
torch.compile's first call (compilation, autotuning) is timed apart.

Prints one JSON object: {"eager": items/s, "compile": items/s, "compile_s": s,
"versions": {...}}; a mode that fails gives "error" and the other's figure.
"""

import argparse
import json
import statistics
import sys
import time

import torch


def build(args, cfg, device, dtype):
    kind = args.encoder.split("@")[0]
    if kind in ("sd_vae", "flux_vae"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(cfg)
        vae.decoder = None
        vae.post_quant_conv = None
        model = VaeMoments(vae)
        x = torch.rand(args.batch, 3, args.side, args.side) * 2 - 1
        inputs = (x,)
    elif kind == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        c = SiglipVisionConfig(**cfg)
        c.vision_use_head = False
        model = Output(SiglipVisionModel(c), "last_hidden_state")
        inputs = (torch.rand(args.batch, 3, args.side, args.side) * 2 - 1,)
    elif kind == "clip_vision":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        model = Output(CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)), "image_embeds")
        inputs = (torch.rand(args.batch, 3, args.side, args.side) * 2 - 1,)
    elif kind == "t5":
        from transformers import T5Config, T5EncoderModel

        model = Output(T5EncoderModel(T5Config(**cfg)), "last_hidden_state")
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.tokens))
        inputs = (ids, torch.ones(args.batch, args.tokens, dtype=torch.long))
    elif kind == "clip_text":
        from transformers import CLIPTextConfig, CLIPTextModel

        model = Output(CLIPTextModel(CLIPTextConfig(**cfg)), "last_hidden_state")
        inputs = (torch.randint(0, cfg["vocab_size"], (args.batch, args.tokens)),)
    else:
        raise SystemExit(f"unknown encoder {args.encoder}")
    model = model.to(device=device, dtype=dtype).eval()
    channels_last = kind.endswith("_vae") and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    moved = []
    for t in inputs:
        t = t.to(device)
        if t.is_floating_point():
            t = t.to(dtype)
            if channels_last:
                t = t.contiguous(memory_format=torch.channels_last)
        moved.append(t)
    return model, tuple(moved)


class VaeMoments(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.parameters


class Output(torch.nn.Module):
    def __init__(self, model, field):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, *inputs):
        return getattr(self.model(*inputs), self.field)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, inputs, args, device):
    for _ in range(args.warmup):
        fn(*inputs)
    sync(device)
    rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn(*inputs)
        sync(device)
        rates.append(args.batch * args.iters / (time.perf_counter() - t0))
    return statistics.median(rates)


def versions():
    out = {"torch": torch.__version__}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            pass
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--encoder", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--side", type=int, default=0)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--compile-mode", default="default")
    args = p.parse_args()

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with open(args.config) as f:
        cfg = json.load(f)
    with torch.device(device):
        model, inputs = build(args, cfg, device, dtype)
    out = {"versions": versions()}
    errors = []
    modes = [m for m in args.modes.split(",") if m]
    with torch.inference_mode():
        if "eager" in modes:
            try:
                out["eager"] = rate(model, inputs, args, device)
            except Exception as e:  # noqa: BLE001 - reported in the row
                errors.append(f"eager: {type(e).__name__}: {e}")
        if "compile" in modes:
            try:
                compiled = torch.compile(model, mode=args.compile_mode)
                t0 = time.perf_counter()
                compiled(*inputs)
                sync(device)
                out["compile_s"] = time.perf_counter() - t0
                out["compile"] = rate(compiled, inputs, args, device)
            except Exception as e:  # noqa: BLE001 - reported in the row
                errors.append(f"compile: {type(e).__name__}: {str(e)[:300]}")
    if errors:
        out["error"] = "; ".join(errors)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
