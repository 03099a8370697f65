#!/usr/bin/env python
"""Exactness of the local-ensemble backends on the device at hand (CUDA when present, else the CPU).

Prints one line per check with the largest difference found; exits non-zero if a check fails. fp32 checks run
with TF32 off (TF32 rounds inputs of convolutions and matrix products to 10 mantissa bits, on purpose); the bf16
check compares the grouped ensemble under bf16 autocast with the fp32 reference at bf16's tolerance.

    python benchmarks/cuda_checks.py
"""

from __future__ import annotations

import copy

import torch

from ddcnn import Decomposition, LocalEnsemble, local_loss


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# backend exactness on {name}, torch {torch.__version__}")
    failures = 0

    def check(label, diff, tol):
        nonlocal failures
        ok = diff <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: max |diff| {diff:.2e} (tolerance {tol:.0e})")

    for backbone, dims, size, grid in (("vgg", 2, (32, 32), (4, 4)), ("resnet", 2, (32, 32), (2, 2)),
                                       ("vgg", 3, (16, 16, 16), (2, 2, 2))):
        d = Decomposition(size, grid)
        kw = dict(n_local=d.n_subdomains, in_channels=3, num_classes=10, backbone=backbone, width=8,
                  depth=(1, 1, 1), dims=dims, seed=0)
        grouped = LocalEnsemble(backend="grouped", **kw).to(device)
        loop = LocalEnsemble(backend="loop", **kw).to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(64, 3, *size, generator=g).to(device)
        y = torch.randint(0, 10, (64,), generator=g).to(device)
        sub = d.split(x)
        tag = f"{backbone} {dims}D grid {'x'.join(map(str, grid))}"
        for mode in ("train", "eval"):
            grouped.train(mode == "train"), loop.train(mode == "train")
            check(f"{tag} forward ({mode}) grouped vs loop, fp32", max_diff(grouped(sub), loop(sub)), 1e-4)
        # a few Adam steps: every slot equals its separately trained twin
        grouped.train(), loop.train()
        separate = [copy.deepcopy(grouped.local_model(i)) for i in range(d.n_subdomains)]
        opt = torch.optim.Adam(grouped.parameters(), lr=1e-3)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in separate]
        for _ in range(3):
            opt.zero_grad()
            local_loss(grouped(sub), y)[0].backward()
            opt.step()
            for i, (m, o) in enumerate(zip(separate, opts)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(sub[:, i]), y).backward()
                o.step()
        grouped.eval()
        out = grouped(sub)
        diff = max(max_diff(out[:, i], m.eval()(sub[:, i])) for i, m in enumerate(separate))
        check(f"{tag} after 3 Adam steps, grouped slot vs separate CNN", diff, 1e-3)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = grouped(sub)
            check(f"{tag} bf16 autocast vs fp32 (logits)", max_diff(low, out), 0.25)
    print(f"# {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
