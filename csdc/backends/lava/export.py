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
  logits, predictions, spike counts (and trains), max |v| per population and timings;
- ``requirements.txt``: the Lava environment it runs in (lava-nc 0.10.0 and its dependencies);
- ``manifest.json`` (format version, schedule summary, SHA-256 of every file, checked by
  ``run_lava.py``) and ``README.md``.

:class:`csdc.backends.lava.LavaBackend` runs exactly such a bundle in the Lava environment.

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

from csdc.backends.lava.plan import Plan, hardware_report, make_plan
from csdc.errors import CsdcError
from csdc.ir.graph import Network

BUNDLE_FORMAT = "csdc-lava-bundle"
BUNDLE_VERSION = 2
RUNTIME_FILES = ("_hook.py", "processes.py", "builder.py")

_RUNNER = '''#!/usr/bin/env python3
"""Run a csdc Lava deployment bundle: ``python run_lava.py input.npz -o readouts.npz``.

Input: an .npz with the float32 batch (n, *input_shape) under key ``x`` (or its only array).
Output: an .npz with ``readout`` (n, classes) int64, ``logits`` float32, ``predictions`` int64,
``counts/<population>`` spike counts (signed for a ternary population, whose ``events/<population>``
counts spikes of both signs), ``max_abs_v/<population>`` and timings (``trains/<population>``
with --trains). Needs the packages of requirements.txt (lava-nc 0.10 and its dependencies) only.
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


def run(x: np.ndarray | None = None, keep_trains: bool = False, *, levels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Run the bundle on a float batch ``x`` (or on integer input ``levels``, already encoded);
    returns readout, logits, predictions, counts, trains (with ``keep_trains``), the largest
    membrane potential per neuron population (max_abs_v) and timings."""
    plan, arrays = load_bundle()
    if levels is None:
        enc = next(p for p in plan["processes"] if p["kind"] == "encode")["params"]
        levels = builder.encode_levels(x, enc["scale"], enc["lo"], enc["hi"])
    t0 = time.perf_counter()
    graph = builder.build_graph(plan, arrays, np.asarray(levels, dtype=np.int64), keep_trains=keep_trains)
    t1 = time.perf_counter()
    out = builder.run_graph(graph)
    ro = next(p for p in plan["processes"] if p["kind"] == "readout")
    logits = builder.readout_logits(out.readout, arrays[ro["arrays"]["scale"]], arrays[ro["arrays"]["offset"]])
    res = {{"readout": out.readout, "logits": logits, "predictions": logits.argmax(axis=1).astype(np.int64),
            "steps": np.int64(out.steps), "seconds_build": np.float64(t1 - t0),
            "seconds_run": np.float64(out.seconds_run), "seconds_fetch": np.float64(out.seconds_fetch)}}
    for name, c in out.counts.items():
        res[f"counts/{{name}}"] = c
    for name, t in out.trains.items():
        res[f"trains/{{name}}"] = t
    for name, v in out.max_abs_v.items():
        res[f"max_abs_v/{{name}}"] = np.int64(v)
    for name, e in out.events.items():  # ternary populations: spikes of both signs (their counts are signed)
        res[f"events/{{name}}"] = e
    for name, c in out.mbe_spikes.items():  # MBE populations: spikes of all bases and steps per element
        res[f"mbe_spikes/{{name}}"] = c
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", help=".npz with the float32 input batch under key 'x' (or integer input levels under 'levels')")
    ap.add_argument("-o", "--output", required=True, help="where to write the readouts (.npz)")
    ap.add_argument("--key", default=None, help="array name in the input .npz (default: levels if present, else x)")
    ap.add_argument("--trains", action="store_true", help="also write spike trains (trains/<population>)")
    args = ap.parse_args(argv)
    with np.load(args.input, allow_pickle=False) as z:
        key = args.key or ("levels" if "levels" in z.files else "x")
        if key not in z.files:
            key = z.files[0] if args.key is None and len(z.files) == 1 else None
        if key is None:
            raise SystemExit(f"error: {{args.input}} has no array '{{args.key or 'x'}}' (arrays: {{z.files}})")
        data = z[key]
    t0 = time.perf_counter()
    if key == "levels":
        res = run(keep_trains=args.trains, levels=data)
    else:
        res = run(data, keep_trains=args.trains)
    seconds = time.perf_counter() - t0
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **res)
    tmp.replace(out)
    print(f"{{len(data)}} samples in {{seconds:.2f}} s ({{int(res['steps'])}} Lava time steps); readouts written to {{args.output}}")
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
`predictions`, `counts/<population>` (spike counts), `max_abs_v/<population>` (largest
membrane potential) and timings; `--trains` adds spike trains (`trains/<population>`,
samples x T x shape). An input with integer `levels` instead of `x` skips the input encoding.
From Python: `import run_lava; run_lava.run(x)`; to embed the processes in your own Lava
application use `csdc_lava_runtime.builder.build_graph(plan, arrays, levels)` (see
`run_lava.load_bundle`), which returns the source, every process and the sink.

## Lava environment

The bundle needs the packages of `requirements.txt` only (lava-nc 0.10.0 with numpy < 2 and
networkx <= 2.8.7), not csdc. lava-nc 0.10.0 declares Python < 3.11; on Python 3.10:

    python3.10 -m venv lava-env
    lava-env/bin/pip install -r requirements.txt
    lava-env/bin/python run_lava.py input.npz -o readouts.npz

With Python 3.11 only, install lava-nc without its Python pin (the other lines of
requirements.txt normally, then `pip install --no-deps --ignore-requires-python lava-nc==0.10.0`):
`csdc_lava_runtime/_hook.py` then makes lava importable on 3.11 without modifying it (it
rewrites, at import time and in memory only, the mutable dataclass defaults of
`lava.magma.compiler.var_model` that Python 3.11 rejects).

## Files

- `plan.json`, `arrays.npz` (no pickle), `manifest.json` (SHA-256 of every file, checked at run time),
  `requirements.txt` (the Lava environment)
- `csdc_lava_runtime/`: the custom fixed-point Lava processes (DIF neurons, in one or two 24-bit
  words, TDEC max-pool, encoder, readout, delay lines) and the graph builder
- `hardware.json`: per process, what it would need on Loihi 2
"""


def _runtime_dir() -> Path:
    return Path(__file__).resolve().parent


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_bundle(net: Network, out_dir: str | os.PathLike, plan: Plan | None = None, *,
                  with_hardware_report: bool = True) -> Path:
    """Write the deployment bundle of ``net`` to ``out_dir`` (created; an existing csdc bundle
    there is replaced; any other non-empty directory is an error). Written atomically: on any
    error nothing is left behind. Returns the bundle path.

    ``plan`` (default ``make_plan(net, 1)``) fixes the process mapping; the number of samples
    is whatever the bundle is run on. ``with_hardware_report=False`` leaves out
    ``hardware.json`` (the Lava backend's own run bundles do not need it)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise CsdcError(f"export target {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / "manifest.json").exists():
            raise CsdcError(f"export target {out} is a non-empty directory that is not a csdc Lava bundle; "
                            "choose an empty or new directory")
    plan = plan if plan is not None else make_plan(net, 1)
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
        shutil.copyfile(_runtime_dir() / "requirements.txt", tmp / "requirements.txt")
        if with_hardware_report:
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
