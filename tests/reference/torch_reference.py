#!/usr/bin/env python3
"""flowgen against PyTorch eager on the same SiT network, on this machine, in one interleaved run.

For the shipped model (its own velocity.safetensors) and a SiT-S/2-shaped model with random
weights (hidden 384, depth 12, 6 heads, 32x32x4 latent, patch 2: 256 tokens), it
  1. checks that both give the same velocities (`flowgen model forward` against sit_torch.SiT),
  2. times the forward at each batch size and one training step of the velocity recipe
     (I-CFM loss with label dropout, backward, clip 1.0, AdamW, EMA) in both, alternating
     PyTorch and flowgen round by round, at the same thread count,
  3. prints the table (median over rounds, with the per-round range) and writes it as markdown
     and JSON.

A measuring tool, never a runtime dependency: `pip install -r tests/reference/requirements.txt`
into a virtual environment, build flowgen (`cargo build --release -p flowgen-cli`), then
    python tests/reference/torch_reference.py --out bench-reference
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sit_torch import SiT  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SIT_S2 = dict(input_size=32, in_channels=4, patch_size=2, hidden_size=384, depth=12, num_heads=6,
              mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1, learn_sigma=False)


def sit_s2_model(dir_: Path) -> Path:
    """A model directory with a SiT-S/2-shaped network of seeded random weights (no autoencoder)."""
    dir_.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = SiT(SIT_S2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(dir_ / "velocity.safetensors"))
    lines = ['name = "sit-s2-random"', 'description = "SiT-S/2 shape, random weights: a speed reference"',
             'label_names = [' + ", ".join(f'"{i}"' for i in range(10)) + "]", "", "[network]",
             'weights = "velocity.safetensors"', 'convention = "sit"']
    for key, value in SIT_S2.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    lines += ["", "[defaults]", 'sampler = "euler"', "steps = 8", "guidance = 1.0"]
    (dir_ / "model.toml").write_text("\n".join(lines) + "\n")
    return dir_


def load_torch(model: Path):
    cfg = tomllib.loads((model / "model.toml").read_text())["network"]
    net = SiT(cfg)
    net.load_state_dict(load_file(str(model / cfg.get("weights", "velocity.safetensors"))), strict=True)
    return net.eval(), cfg


def parity(flowgen: str, model: Path, net, cfg, work: Path) -> float:
    """Largest |flowgen - torch| velocity over a batch of 4, relative to the largest |velocity|."""
    g = torch.Generator().manual_seed(1)
    size = cfg["input_size"]
    x = torch.randn(4, cfg["in_channels"], size, size, generator=g)
    t = torch.rand(4, generator=g)
    y = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
    save_file({"x": x, "t": t, "y": y}, str(work / "inputs.safetensors"))
    subprocess.run([flowgen, "model", "forward", "--model", str(model), "--inputs", str(work / "inputs.safetensors"),
                    "--out", str(work / "velocity.safetensors")], check=True, capture_output=True)
    ours = load_file(str(work / "velocity.safetensors"))["velocity"]
    with torch.inference_mode():
        theirs = net(x, t, y.long())[:, : cfg["in_channels"]]
    return float((ours - theirs).abs().max() / theirs.abs().max())


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def torch_forward_ms(net, cfg, batch: int, warmup: int, repeats: int) -> float:
    size = cfg["input_size"]
    x = torch.randn(batch, cfg["in_channels"], size, size)
    t = torch.rand(batch)
    y = torch.arange(batch) % cfg["num_classes"]
    with torch.inference_mode():
        return median_ms(lambda: net(x, t, y), warmup, repeats)


class TorchRecipe:
    """One step of flowgen's velocity recipe in PyTorch: I-CFM, label dropout, clip, AdamW, EMA."""

    def __init__(self, cfg, batch: int):
        torch.manual_seed(0)
        self.net, self.cfg, self.batch = SiT(cfg).train(), cfg, batch
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.net.parameters()]

    def step(self):
        c, b, size = self.cfg, self.batch, self.cfg["input_size"]
        x1 = torch.randn(b, c["in_channels"], size, size)
        x0 = torch.randn_like(x1)
        s = torch.rand(b)
        y = torch.arange(b) % c["num_classes"]
        y = torch.where(torch.rand(b) < c["class_dropout_prob"], torch.full_like(y, c["num_classes"]), y)
        sc = s.view(b, 1, 1, 1)
        loss = (self.net((1 - sc) * x0 + sc * x1, s, y) - (x1 - x0)).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, list(self.net.parameters()), 1 - 0.999)


def flowgen_run(flowgen: str, model: Path, batches, threads: int, repeats: int, train: bool, work: Path):
    out = work / "engine.json"
    cmd = [flowgen, "bench", "engine", "--model", str(model), "--threads", str(threads), "--repeats", str(repeats),
           "--json", str(out)]
    if train:
        cmd += ["--train-only", "--train-batch", str(batches[0])]
    else:
        cmd += ["--network-only", "--batch", ",".join(map(str, batches))]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    if train:
        return {batches[0]: report["train"]["step"]["median_ms"]}
    return {row["batch"]: row["forward"]["median_ms"] for row in report["forward"] if row["path"] == "fused"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flowgen", default=str(ROOT / "target/release/flowgen"))
    ap.add_argument("--model", default=str(ROOT / "models/default"))
    ap.add_argument("--batches", default="1,64", help="forward batch sizes of the shipped model")
    ap.add_argument("--s2-batches", default="1,8", help="forward batch sizes of the SiT-S/2 shape")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-s2", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="bench-reference")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flowgen-reference-"))
    models = [("shipped default", Path(args.model), [int(b) for b in args.batches.split(",")])]
    if not args.no_s2:
        models.append(("SiT-S/2 shape, random", sit_s2_model(out / "sit-s2-random"), [int(b) for b in args.s2_batches.split(",")]))

    rows, checks = [], {}
    for name, model, batches in models:
        net, cfg = load_torch(model)
        checks[name] = parity(args.flowgen, model, net, cfg, work)
        print(f"{name}: max |flowgen - torch| / max |v| = {checks[name]:.2e}", flush=True)
        cases = [("forward", b) for b in batches] + ([] if args.no_train or name != "shipped default" else [("train", args.train_batch)])
        samples = {case: ([], []) for case in cases}
        recipe = None
        for r in range(args.rounds):
            # One round: PyTorch, then flowgen, on every case; the next round starts over.
            for kind, b in cases:
                if kind == "forward":
                    samples[(kind, b)][0].append(torch_forward_ms(net, cfg, b, 5, args.repeats))
                else:
                    recipe = recipe or TorchRecipe(cfg, b)
                    samples[(kind, b)][0].append(median_ms(recipe.step, 3, max(5, args.repeats // 3)))
            fwd = [b for kind, b in cases if kind == "forward"]
            for b, ms in flowgen_run(args.flowgen, model, fwd, args.threads, args.repeats, False, work).items():
                samples[("forward", b)][1].append(ms)
            if ("train", args.train_batch) in samples:
                got = flowgen_run(args.flowgen, model, [args.train_batch], args.threads, max(5, args.repeats // 3), True, work)
                samples[("train", args.train_batch)][1].append(got[args.train_batch])
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        for (kind, b), (theirs, ours) in samples.items():
            ratios = [t / o for t, o in zip(theirs, ours)]
            rows.append(dict(network=name, what=kind, batch=b, torch_ms=statistics.median(theirs),
                             flowgen_ms=statistics.median(ours), speed=statistics.median(ratios),
                             speed_min=min(ratios), speed_max=max(ratios)))

    lines = [f"flowgen against PyTorch {torch.__version__} eager, {args.threads} threads each, "
             f"{args.rounds} interleaved rounds (medians of {args.repeats} repeats per round)", "",
             "| network | measured | batch | PyTorch ms/image | flowgen ms/image | flowgen speed vs PyTorch (range over rounds) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        per = r["batch"] if r["what"] == "forward" else 1
        unit = "" if r["what"] == "forward" else " (ms/step)"
        lines.append(f"| {r['network']} | {r['what']}{unit} | {r['batch']} | {r['torch_ms'] / per:.3f} | "
                     f"{r['flowgen_ms'] / per:.3f} | **{r['speed']:.2f}x** ({r['speed_min']:.2f}-{r['speed_max']:.2f}) |")
    lines += ["", "Velocity parity (max |flowgen - torch| / max |v|): "
              + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "reference.md").write_text(text)
    (out / "reference.json").write_text(json.dumps(dict(rows=rows, parity=checks, threads=args.threads,
                                                        torch=torch.__version__), indent=2))
    bad = [k for k, v in checks.items() if v > 1e-4]
    if bad:
        sys.exit(f"velocities differ beyond 1e-4 on: {', '.join(bad)}")


if __name__ == "__main__":
    main()
