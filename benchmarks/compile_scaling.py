"""Compile time and peak memory of randomly initialised CSDformers on 224x224x3 inputs
(196 tokens), from small to CSDformer-8-768 (about 66 M parameters) (issue 5).

    .venv/bin/python benchmarks/compile_scaling.py [--sizes 8-384,8-576,8-768] [--output FILE]

Each model is built with random weights, calibrated on two random images, exported as
QCDQ ONNX into a temporary directory and compiled and written as a .sir in a child process
(see ``benchmarks/run.py``: wall time, and the compile's own peak RSS above the RSS after
imports). Prints one markdown table; the targets are < 60 s and peak < 3x the ONNX size
for CSDformer-8-768, and time linear in the parameter count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import compile_model


def export(depth: int, dim: int, path: Path) -> int:
    import torch

    from csdc.training.transformer import (
        build_csdformer,
        calibrate,
        export_csdformer_onnx,
    )

    stages = ((dim // 8, True), (dim // 4, True), (dim // 2, True), (dim, True), (dim, False))  # 224 -> 14x14
    model = build_csdformer(0, img_size=224, in_chans=3, num_classes=1000, dim=dim, depth=depth, heads=dim // 64,
                            levels=4, mlp_ratio=4.0, weight_bits=8, tokenizer=stages,
                            input_step=1.0 / 255.0, input_levels=255)
    gen = torch.Generator().manual_seed(0)
    calibrate(model, torch.round(torch.rand(2, 3, 224, 224, generator=gen) * 255) / 255)
    export_csdformer_onnx(model, path)
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4-192,8-384,8-576,8-768", help="comma-separated depth-dim list")
    p.add_argument("--output", help="append the table to this markdown file")
    args = p.parse_args()
    head = ("| model | parameters | ONNX | export | compile (incl. writing the .sir) | .sir | compile peak memory "
            "(above RSS after imports) | peak / ONNX | s per M parameters |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            depth, dim = (int(v) for v in size.split("-"))
            path = Path(tmp) / f"csdformer_{depth}_{dim}.onnx"
            t0 = time.perf_counter()
            params = export(depth, dim, path)
            t_export = time.perf_counter() - t0
            sir = Path(tmp) / "net.sir"
            c = compile_model(path, sir)
            extra = c["peak_rss_mib"] - c["base_rss_mib"]
            line = (f"| CSDformer-{depth}-{dim} (224x224, 196 tokens) | {params / 1e6:.1f} M | {c['onnx_mib']:.0f} MiB "
                    f"| {t_export:.0f} s | {c['seconds']:.1f} s | {sir.stat().st_size / 2**20:.0f} MiB | {extra:.0f} MiB "
                    f"| {extra / c['onnx_mib']:.1f}x | {c['seconds'] / (params / 1e6):.2f} |")
            print(line, flush=True)
            lines.append(line)
            path.unlink()
    print("\n".join(lines))
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
