"""Export a spiking network as a self-contained Lava deployment bundle.

The bundle (a directory) holds:

- ``plan.json``: processes, wiring and the global-clock schedule (see
  :mod:`csdc.backends.lava.plan`); ``arrays.npz``: every integer parameter (weights,
  thresholds, ...) and the readout's float dequantization, saved with ``allow_pickle=False``;
- ``csdc_lava_runtime/``: plain-source copies of csdc's own ``_hook.py`` (the Python 3.11
  import fix), ``processes.py`` (the custom fixed-point Lava processes) and ``builder.py``
  (plan -> Lava process graph). They import numpy, scipy and lava-nc only, never csdc;
- ``run_lava.py``: ``python run_lava.py input.npz -o readouts.npz`` builds the processes with
  lava-nc, runs them under ``Loihi2SimCfg(select_tag="fixed_pt")`` and writes readouts,
  logits and predictions;
- ``manifest.json`` (format version, schedule summary, SHA-256 of every file, checked by
  ``run_lava.py``) and ``README.md``.

The backend and a bundle build the same process graph from the same plan with the same code,
so the bundle reproduces :class:`csdc.backends.lava.LavaBackend`'s readouts exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from csdc.backends.lava.plan import hardware_report, make_plan
from csdc.errors import CsdcError
from csdc.ir.graph import Network

BUNDLE_FORMAT = "csdc-lava-bundle"
BUNDLE_VERSION = 1
RUNTIME_FILES = ("_hook.py", "processes.py", "builder.py")

_RUNNER = '''#!/usr/bin/env python3
"""Run a csdc Lava deployment bundle: ``python run_lava.py input.npz -o readouts.npz``.

Input: an .npz with the float32 batch (n, *input_shape) under key ``x`` (or its only array).
Output: an .npz with ``readout`` (n, classes) int64, ``logits`` float32, ``predictions`` int64,
and ``counts/<population>`` spike counts. Needs numpy, scipy and lava-nc 0.10 only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from csdc_lava_runtime import builder  # noqa: E402  (installs the Python 3.11 import hook first)


def _check_manifest() -> dict:
    manifest = json.loads((HERE / "manifest.json").read_text())
    if manifest.get("format") != "{fmt}" or manifest.get("version") != {ver}:
        raise SystemExit(f"error: not a supported csdc Lava bundle: {{manifest.get('format')}} v{{manifest.get('version')}}")
    for rel, digest in manifest["sha256"].items():
        if hashlib.sha256((HERE / rel).read_bytes()).hexdigest() != digest:
            raise SystemExit(f"error: bundle file {{rel}} is corrupted or was modified (SHA-256 mismatch)")
    return manifest


def load_bundle() -> tuple[dict, dict]:
    """The plan and its arrays (no pickle)."""
    _check_manifest()
    plan = json.loads((HERE / "plan.json").read_text())
    with np.load(HERE / "arrays.npz", allow_pickle=False) as z:
        arrays = {{k: z[k] for k in z.files}}
    return plan, arrays


def run(x: np.ndarray, keep_trains: bool = False) -> dict[str, np.ndarray]:
    """Run the bundle on a float batch; returns readout, logits, predictions, counts."""
    plan, arrays = load_bundle()
    enc = next(p for p in plan["processes"] if p["kind"] == "encode")["params"]
    levels = builder.encode_levels(x, enc["scale"], enc["lo"], enc["hi"])
    graph = builder.build_graph(plan, arrays, levels, keep_trains=keep_trains)
    out = builder.run_graph(graph)
    ro = next(p for p in plan["processes"] if p["kind"] == "readout")
    logits = builder.readout_logits(out.readout, arrays[ro["arrays"]["scale"]], arrays[ro["arrays"]["offset"]])
    res = {{"readout": out.readout, "logits": logits, "predictions": logits.argmax(axis=1).astype(np.int64)}}
    for name, c in out.counts.items():
        res[f"counts/{{name}}"] = c
    for name, t in out.trains.items():
        res[f"trains/{{name}}"] = t
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help=".npz with the float32 input batch under key 'x'")
    ap.add_argument("-o", "--output", required=True, help="where to write the readouts (.npz)")
    ap.add_argument("--key", default="x", help="array name in the input .npz (default x)")
    ap.add_argument("--trains", action="store_true", help="also write spike trains (trains/<population>)")
    args = ap.parse_args(argv)
    with np.load(args.input, allow_pickle=False) as z:
        key = args.key if args.key in z.files else (z.files[0] if len(z.files) == 1 else None)
        if key is None:
            raise SystemExit(f"error: {{args.input}} has no array '{{args.key}}' (arrays: {{z.files}})")
        x = z[key]
    t0 = time.perf_counter()
    res = run(x, keep_trains=args.trains)
    seconds = time.perf_counter() - t0
    tmp = Path(args.output + ".tmp.npz")
    np.savez(tmp, **res)
    tmp.replace(args.output)
    print(f"{{len(x)}} samples in {{seconds:.2f}} s; readouts written to {{args.output}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''

_README = """# csdc Lava deployment bundle

Network: T = {T}, neuron delays {delays}, {n_proc} Lava processes, end-to-end latency
{latency} time steps per sample (global clock), one new sample every {period} steps when
samples are pipelined.

## Run

    python run_lava.py input.npz -o readouts.npz          # input: float32 x (n, {shape})

`readouts.npz` holds `readout` (int64 accumulated readout currents), `logits` (float32),
`predictions` and `counts/<population>` (spike counts); `--trains` adds spike trains.
From Python: `import run_lava; run_lava.run(x)`; to embed the processes in your own Lava
application use `csdc_lava_runtime.builder.build_graph(plan, arrays, levels)` (see
`run_lava.load_bundle`), which returns the source, every process and the sink.

## Lava environment

The bundle needs numpy < 2, scipy, networkx <= 2.8.7, scikit-learn, asteval and lava-nc 0.10.0.
lava-nc 0.10.0 declares Python < 3.11; on Python 3.10 install it normally
(`pip install lava-nc==0.10.0`). On Python 3.11:

    python3.11 -m venv lava-env && . lava-env/bin/activate
    pip install "numpy>=1.24.4,<2" "networkx<=2.8.7" "scipy>=1.10.1,<2" "scikit-learn>=1.5,<2" "asteval>=0.9.31,<0.10"
    pip install --no-deps --ignore-requires-python lava-nc==0.10.0

`csdc_lava_runtime/_hook.py` then makes lava importable on 3.11 without modifying it (it
rewrites, at import time and in memory only, the mutable dataclass defaults of
`lava.magma.compiler.var_model` that Python 3.11 rejects). The bundle does not need csdc.

## Files

- `plan.json`, `arrays.npz` (no pickle), `manifest.json` (SHA-256 of every file, checked at run time)
- `csdc_lava_runtime/`: the custom fixed-point Lava processes (DIF neurons, TDEC max-pool,
  encoder, readout, delay lines) and the graph builder
- `hardware.json`: per process, what it would need on Loihi 2
"""


def _runtime_dir() -> Path:
    return Path(__file__).resolve().parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(net: Network, out_dir: str | os.PathLike) -> Path:
    """Write the deployment bundle of ``net`` to ``out_dir`` (created; an existing csdc bundle
    there is replaced; any other non-empty directory is an error). Written atomically: on any
    error nothing is left behind. Returns the bundle path."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise CsdcError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "manifest.json").exists():
            raise CsdcError(f"export target {out} is a non-empty directory that is not a csdc Lava bundle; "
                            "choose an empty or new directory")
    plan = make_plan(net, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "plan.json").write_text(json.dumps(plan.to_json(), indent=1))
        np.savez(tmp / "arrays.npz", **plan.arrays)
        rt = tmp / "csdc_lava_runtime"
        rt.mkdir()
        (rt / "__init__.py").write_text('"""csdc Lava runtime (copied from csdc.backends.lava; imports no csdc)."""\n')
        for name in RUNTIME_FILES:
            shutil.copyfile(_runtime_dir() / name, rt / name)
        (tmp / "run_lava.py").write_text(_RUNNER.format(fmt=BUNDLE_FORMAT, ver=BUNDLE_VERSION))
        (tmp / "hardware.json").write_text(json.dumps(hardware_report(net, plan), indent=1))
        delays = sorted({net.op(n).delay for n in net.neurons()})
        (tmp / "README.md").write_text(_README.format(
            T=net.T, delays=delays, n_proc=len(plan.processes), latency=plan.meta["latency"],
            period=plan.meta["period"], shape=", ".join(str(s) for s in net.input_shape)))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "T": net.T, "delays": delays,
            "latency_steps": plan.meta["latency"], "period_steps": plan.meta["period"],
            "input_shape": list(net.input_shape), "num_classes": net.num_classes,
            "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "export_bundle"]
