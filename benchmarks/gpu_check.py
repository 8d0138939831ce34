"""A short GPU check: the CUDA tests, then the cost of one SGLD step (vmap against sequential chains)
against plain training steps on a small transformer LM. One line per figure.

Run from the repository root::

    python -m benchmarks.gpu_check --device cuda            # on a GPU machine (a few minutes)
    python -m benchmarks.gpu_check --device cpu --quick     # smoke run: the CUDA tests are skipped

The model is the decoder-only byte LM of ``benchmarks/bench_llc.py`` at d_model 256, 2 layers, 4 heads,
MLP 1024, context 64 (1,727,744 parameters; ``--quick``: d_model 128, MLP 512, context 32, 466,688), at its
initialization (only the time matters here), on windows of the ``json`` package's sources; batch 32 per
chain (``--quick``: 8); lr 1e-4, nβ 30, γ 300, as in that benchmark.

* **plain step**: forward, backward and a ``torch.optim.SGD`` step of a copy of the model at batch B (and
  at batch C·B, the work of C chains in one batch), the batch already on the device.
* **SGLD step**: the chain engine (``ChainRunner``, the code behind ``lp.estimate_llc``) with
  ``steps_between_draws = 1``: the time between consecutive draws is one step of all C chains (minibatch
  fetch and transfer, forward, backward, divergence check, SGMCMC step; with ``paired=True``, the default,
  also the forward at w*). ``paired=False`` is the bare step; both chain modes are timed.

Each figure is the median over ``--steps`` steps after ``--warmup`` untimed ones; on a GPU every clock
is read after ``torch.cuda.synchronize()``, and the peak of ``torch.cuda.max_memory_allocated`` of each
chain run is reported too.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_patterning as lp
from benchmarks.bench_llc import TinyLM, json_source_bytes, lm_token_losses
from lightning_patterning.sgld.batches import SampleSource
from lightning_patterning.sgld.chains import ChainRunner, DrawRecord
from lightning_patterning.sgld.restrict import resolve_param_masks

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = "tests/test_cuda.py"


@dataclass(frozen=True)
class Setting:
    """Model size and timing settings."""

    d_model: int
    d_mlp: int
    context: int
    batch_size: int
    layers: int = 2
    heads: int = 4


FULL = Setting(d_model=256, d_mlp=1024, context=64, batch_size=32)
QUICK = Setting(d_model=128, d_mlp=512, context=32, batch_size=8)


# ---------------------------------------------------------------------------------------------- tests


def run_cuda_tests() -> tuple[str, bool]:
    """Run tests/test_cuda.py in a fresh interpreter; return its one-line summary and whether it passed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", CUDA_TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else f"pytest exited with {done.returncode}"
    counts = dict(
        (kind, int(n))
        for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)
    )
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    reasons = sorted({m.group(1) for line in lines if (m := re.match(r"SKIPPED \[\d+\] \S+: (.*)", line))})
    parts = [f"{n} {kind}" for kind, n in counts.items()] or [summary]
    text = f"CUDA tests ({CUDA_TESTS}): {', '.join(parts)} in {seconds:.1f} s"
    if reasons:
        text += f" (skipped: {'; '.join(reasons)})"
    for line in failed:
        text += f"\n  {line}"
    if done.returncode not in (0, 5) and not failed:  # 5: nothing collected
        text += "\n" + "\n".join(
            f"  {line}" for line in (done.stdout + done.stderr).strip().splitlines()[-20:]
        )
    return text, done.returncode == 0


# ---------------------------------------------------------------------------------------------- timing


class Clock:
    """Wall-clock seconds, read after the device's queued work has finished."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None


@dataclass
class Workload:
    model: nn.Module
    dataset: TensorDataset
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    description: str

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def make_workload(setting: Setting, device: torch.device) -> Workload:
    text = torch.frombuffer(bytearray(json_source_bytes()), dtype=torch.uint8).long()
    windows = text.unfold(0, setting.context + 1, setting.context // 2).contiguous()
    torch.manual_seed(0)
    model = TinyLM(
        d_model=setting.d_model,
        layers=setting.layers,
        heads=setting.heads,
        d_mlp=setting.d_mlp,
        context=setting.context,
    ).to(device)

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        return lm_token_losses(module, batch[0]).mean(dim=1)

    description = (
        f"byte LM d_model {setting.d_model}, {setting.layers} layers, {setting.heads} heads, "
        f"MLP {setting.d_mlp}, context {setting.context}"
    )
    return Workload(model, TensorDataset(windows.to(device)), loss_fn, description)


def plain_step_seconds(work: Workload, batch_size: int, steps: int, warmup: int, clock: Clock) -> list[float]:
    """Per-step seconds of forward + backward + SGD step of a copy of the model (batches on the device)."""
    model = copy.deepcopy(work.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    (tokens,) = work.dataset.tensors
    batches = [(tokens[torch.randint(len(tokens), (batch_size,), generator=generator)],) for _ in range(8)]
    times = []
    last = clock()
    for step in range(warmup + steps):
        optimizer.zero_grad(set_to_none=True)
        work.loss_fn(model, batches[step % len(batches)]).mean().backward()
        optimizer.step()
        now = clock()
        if step >= warmup:
            times.append(now - last)
        last = now
    return times


def sgld_step_seconds(
    work: Workload,
    chains: int,
    batch_size: int,
    mode: str,
    paired: bool,
    steps: int,
    warmup: int,
    clock: Clock,
) -> tuple[list[float], str]:
    """Per-step seconds of all chains in the chain engine (times between consecutive draws), and the mode
    the engine used.

    The run is set up for ten times the draws needed and stopped (by an exception from the draw hook) once
    enough are timed: the engine samples its diagnostics (a distance pass and devinterp's update norms) at
    every ``num_draws // 10``-th draw, so only draw 0, inside the warm-up, carries them here, as in a run
    of many draws.
    """
    needed = warmup + steps + 1
    config = lp.SGLDConfig(
        lr=1e-4,
        nbeta=30.0,
        localization=300.0,
        num_chains=chains,
        num_draws=10 * needed,
        batch_size=batch_size,
        chain_mode=mode,
        paired=paired,
        seed=0,
    )
    runner = ChainRunner(
        work.model, work.loss_fn, SampleSource(work.dataset), config, resolve_param_masks(work.model, None)
    )
    stamps: list[float] = []

    def on_draw(record: DrawRecord) -> None:
        stamps.append(clock())
        if len(stamps) == needed:
            raise _Enough

    try:
        runner.run(on_draw)
    except _Enough:
        pass
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return gaps[warmup:], runner.mode


class _Enough(Exception):
    """Raised by the draw hook to end a timing run early."""


# ---------------------------------------------------------------------------------------------- main


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def machine(device: torch.device) -> str:
    where = f"{torch.cuda.get_device_name(device)} ({device})" if device.type == "cuda" else "CPU"
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (
        f"device: {where}; torch {torch.__version__}{cuda}, Python {platform.python_version()}, "
        f"torch threads {torch.get_num_threads()}"
    )


def parse_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="a smaller LM, batch 8, 4 chains, 8 steps")
    parser.add_argument("--chains", type=int, nargs="+", default=None, help="chain counts (default 4 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per figure (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3, >= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip-tests", action="store_true", help="only the step benchmark")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    device = parse_device(args.device, parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    chain_counts = args.chains or ([4] if args.quick else [4, 16])
    steps = args.steps or (8 if args.quick else 20)
    if min(chain_counts) < 1 or steps < 1 or args.warmup < 1:
        parser.error("--chains, --steps and --warmup must be >= 1")

    figures: dict[str, Any] = {"device": str(device), "quick": args.quick}

    def say(line: str) -> None:
        print(line, flush=True)

    say(machine(device))
    tests_ok = True
    if not args.skip_tests:
        line, tests_ok = run_cuda_tests()
        figures["cuda_tests"] = line
        say(line)

    clock = Clock(device)
    work = make_workload(setting, device)
    batch = setting.batch_size
    say(f"model: {work.description}; {work.parameters:,} parameters; batch {batch} per chain")
    figures["parameters"] = work.parameters

    def median(times: list[float]) -> float:
        return statistics.median(times)

    plain: dict[int, float] = {}
    for size in sorted({batch, *(c * batch for c in chain_counts)}):
        plain[size] = median(plain_step_seconds(work, size, steps, args.warmup, clock))
        say(f"plain step, batch {size}: {ms(plain[size])} ms (median of {steps})")
    figures["plain_ms"] = {size: 1e3 * t for size, t in plain.items()}
    figures["sgld"] = []
    for chains in chain_counts:
        per_mode: dict[str, float] = {}
        for mode, paired in (("vmap", False), ("sequential", False), ("vmap", True)):
            clock.reset_peak()
            times, used = sgld_step_seconds(work, chains, batch, mode, paired, steps, args.warmup, clock)
            value = median(times)
            peak = clock.peak_mib()
            label = f"{used}{', paired (default)' if paired else ''}"
            per_mode[label] = value
            ratio = value / (chains * plain[batch])
            say(
                f"sgld step, {label}, {chains} chains: {ms(value)} ms (median of {len(times)}) "
                f"= {ratio:.2f} × {chains} plain steps"
                + (f"; peak GPU memory {peak:.0f} MiB" if peak is not None else "")
            )
            figures["sgld"].append(
                dict(chains=chains, mode=used, paired=paired, ms=1e3 * value, ratio=ratio, peak_mib=peak)
            )
        if "vmap" in per_mode and "sequential" in per_mode:
            say(
                f"sgld step, {chains} chains, sequential / vmap: "
                f"{per_mode['sequential'] / per_mode['vmap']:.2f}× (vmap is this many times faster)"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
