"""The timing both training peers of `tensorbake bench train` share
(`pixart_train_step.py`, `flux_train_step.py`): warm-up steps, then each timed step to
a device synchronisation, the peak memory (CUDA: max_memory_allocated; CPU: the peak
resident set during the steps, Linux only), and the one JSON object the bench reads.
"""

import json
import time

import diffusers
import torch


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def time_and_report(step, trained, batch, steps, warmup, dev):
    """Runs `step()` (returning the loss tensor) `warmup` times, then `steps` timed times;
    prints samples_per_s_steps, trainable_tensors / trainable_params, peak_memory_bytes,
    last_loss and the versions as one JSON object."""

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step()
    sync()
    rss = dev.type == "cpu" and reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rates, loss_value = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        loss_value = loss.item()  # synchronises
        sync()
        rates.append(batch / (time.perf_counter() - t0))
    peak = None
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    elif rss:
        peak = peak_rss()
    print(json.dumps({
        "samples_per_s_steps": rates,
        "trainable_tensors": len(trained),
        "trainable_params": sum(p.numel() for p in trained),
        "peak_memory_bytes": peak,
        "last_loss": loss_value,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }))
