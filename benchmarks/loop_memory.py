"""Section 6, the loop's peak memory: one whole loop (configs/smoke.yaml) as main.py runs it, against the same loop
with glibc malloc's defaults (``GLIBC_TUNABLES=``: what main.py does not override, see srlm/allocator.py).

Each loop is its own ``main.py`` process in a fresh run folder, one after the other (defaults first); its peak
resident memory is the kernel's (``wait4``'s ``ru_maxrss``), its wall time includes start-up. `make loop`'s own peak
(configs/loop.yaml) is measured with ``/usr/bin/time -v`` in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixtures import ROOT
from harness import Result, Sizes, ratio, say


def run_loop(model_path: str, run_dir: Path, env: dict) -> dict:
    cmd = [sys.executable, "main.py", "loop", "--config", "configs/smoke.yaml", "--run_dir", str(run_dir),
           "--model.init_args.backbone.model_name_or_path", model_path]
    log = run_dir.with_suffix(".log")  # a file, not a pipe: progress bars would fill a pipe nobody reads during wait4
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's maximum
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds}  # Linux: KiB


def section_loop(model_path: str, sizes: Sizes) -> Result:
    res = Result()
    base_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="srlm-loop-") as tmp:
        for name, env in (("glibc_defaults", {**base_env, "GLIBC_TUNABLES": ""}), ("srlm", base_env)):
            say("loop", f"configs/smoke.yaml, malloc: {name}")
            runs[name] = run_loop(model_path, Path(tmp) / name, env)
            say("loop", f"peak {runs[name]['peak_rss_mb']:.0f} MiB, {runs[name]['seconds']:.0f} s")
    d, s = runs["glibc_defaults"], runs["srlm"]
    res.add("loop", "peak RSS of the smoke loop (MiB): glibc defaults vs main.py", d["peak_rss_mb"], s["peak_rss_mb"],
            ratio(d["peak_rss_mb"], s["peak_rss_mb"]), note="ratio = defaults / srlm (> 1: srlm uses less)")
    res.add("loop", "wall time of the smoke loop (s): glibc defaults vs main.py", d["seconds"], s["seconds"],
            ratio(d["seconds"], s["seconds"]), note="ratio = defaults / srlm (< 1: srlm is slower)")
    res.details = runs
    return res
