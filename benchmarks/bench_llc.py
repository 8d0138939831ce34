"""Benchmark ``lp.estimate_llc`` against devinterp 2.0.1's ``devinterp.slt.llc.llc``.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_llc                   # sections 1-2, 5 repeats (~30 min, 2 cores)
    .venv/bin/python -m benchmarks.bench_llc --quick           # smoke run (2 repeats, shorter chains)
    .venv/bin/python -m benchmarks.bench_llc --sections llc steps memory --json out.json
    .venv/bin/python -m benchmarks.bench_llc --models mlp --sections profile   # cProfile of estimate_llc
    .venv/bin/python -m benchmarks.bench_llc --device cuda --sections steps memory   # on a GPU

Two models, the same data and settings on both sides:

* ``mlp``: 20→64→64→1 regression MLP (5,569 parameters), n = 4096, batch 32, 4 chains × 200 draws,
  lr 1e-3, nβ = default_nbeta(32), localization 100.
* ``lm``: a decoder-only byte-level transformer in plain torch (vocab 256, d_model 128, 4 layers, 4 heads,
  MLP 640, context 64: 998,912 parameters) on 65-byte windows of the ``json`` package's sources, per-sample
  loss = mean next-token cross entropy; batch 16, 4 chains × 50 draws, lr 1e-4, nβ 30, localization 300.

Sections:

1. the time of one LLC estimate: ours (paired and unpaired) vs devinterp ``llc()``; medians over
   repeats, contestants in a rotated order each repeat; the median of the per-repeat ratios devinterp/ours.
2. the cost of one SGLD step of all C chains relative to C plain training steps (forward + backward +
   ``torch.optim.SGD`` step at the same per-chain batch size, batch already in memory), end to end
   (``estimate_llc`` time / steps, long chains) and per phase (a micro-benchmark of the engine's step).
   Every SGLD measurement is bracketed by plain-step measurements and divided by their mean, so that
   changes in machine load between measurements cancel in the ratios.
3. ``--sections memory``: peak resident memory of each contestant, each in a fresh subprocess.

Every time is recorded as process CPU time and as wall-clock time; on a shared machine the CPU time is the
more stable of the two. ``--threads`` (default 1) sets ``torch.set_num_threads``.

``--device cuda`` (default ``cpu``) puts the models and data on the GPU (training of ``w*`` stays on the
CPU) and runs devinterp there too. Every clock reading is then preceded by ``torch.cuda.synchronize()``,
wall-clock time is the figure to read (process CPU time only counts the host), and section 3 reports
``torch.cuda.max_memory_allocated`` instead of resident memory.
"""

from __future__ import annotations

import os

# devinterp draws a tqdm bar per chain; tqdm reads TQDM_* overrides when it is imported, so this must come
# before the imports below (the bars would only clutter stderr; their cost is negligible either way).
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import copy
import cProfile
import gc
import inspect
import io
import json
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import lightning_patterning as lp
from lightning_patterning.sgld.batches import SampleSource, batch_to
from lightning_patterning.sgld.chains import ChainRunner, _chain_means
from lightning_patterning.sgld.config import default_nbeta
from lightning_patterning.sgld.functional import evaluation_mode
from lightning_patterning.sgld.restrict import resolve_param_masks

CONTESTANTS = ("ours_paired", "ours_unpaired", "ours_paired_shared", "devinterp")
OURS = CONTESTANTS[:-1]
LABELS = {
    "ours_paired": "lp.estimate_llc (paired)",
    "ours_unpaired": "lp.estimate_llc (paired=False)",
    "ours_paired_shared": "lp.estimate_llc (paired, shared_batches=True: devinterp's sampling)",
    "devinterp": "devinterp llc()",
}
SEED = 0
DEVINTERP_SEED = 100  # devinterp's default init_seed
DEVICE = torch.device("cpu")  # set by --device


def synchronize() -> None:
    """Wait for queued GPU work, so that a clock read afterwards includes it (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ---------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Block(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention written out in plain torch ops.

    ``attention="manual"`` (default) spells out softmax(QKᵀ/√d)V; ``"sdpa"`` calls
    ``F.scaled_dot_product_attention``, which has no vmap batching rule in torch 2.13 on CPU (vmap then
    falls back to a per-chain loop with a warning).
    """

    def __init__(self, d_model: int, heads: int, d_mlp: int, context: int, attention: str) -> None:
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)
        self.register_buffer(
            "causal", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) * (d // self.heads) ** -0.5
            a = scores.masked_fill(self.causal[:t, :t], float("-inf")).softmax(dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(
        self,
        vocab: int = 256,
        d_model: int = 128,
        layers: int = 4,
        heads: int = 4,
        d_mlp: int = 640,
        context: int = 64,
        attention: str = "manual",
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(context, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads, d_mlp, context, attention) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lm_token_losses(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` next-token cross entropy of ``[B, T + 1]`` byte windows."""
    logits = model(windows[:, :-1])
    targets = windows[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return losses.reshape(targets.shape)


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model with its data, loss functions for both libraries, and the shared sampler settings."""

    name: str
    description: str
    model: nn.Module
    dataset: TensorDataset
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]  # ours: (module, batch) -> [B]
    di_dataset: Any  # HF Dataset with an input_ids column
    di_loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # devinterp: (model, ids) -> [B, k]
    settings: dict[str, Any]
    long_draws: int  # num_draws of the end-to-end per-step measurement (section 2)
    block_steps: int  # steps per timed block of the engine / plain micro-benchmarks (section 2)
    blocks: int  # engine blocks per repeat, each bracketed by plain blocks
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def config(self, paired: bool = True, **overrides: Any) -> lp.SGLDConfig:
        s = {**self.settings, **overrides}
        return lp.SGLDConfig(
            lr=s["lr"],
            nbeta=s["nbeta"],
            localization=s["localization"],
            num_chains=s["num_chains"],
            num_draws=s["num_draws"],
            num_burnin_steps=0,
            steps_between_draws=1,
            batch_size=s["batch_size"],
            method="sgld",
            seed=SEED,
            paired=paired,
            init_loss_batches=32,
            chain_mode=s.get("chain_mode", "auto"),
            shared_batches=s.get("shared_batches", False),
        )


def _hf_dataset(rows: list[list[int]]) -> Any:
    from datasets import Dataset  # devinterp's dependency; imported lazily (slow import)

    return Dataset.from_dict({"input_ids": rows}).with_format("torch")


def _train(
    model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], n: int, batch: int, steps: int
) -> float:
    """A short Adam run so that ``w*`` is a trained point rather than the initialisation."""
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    value = float("nan")
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out = loss(idx)
        out.backward()
        optimizer.step()
        value = float(out.detach())
    optimizer.zero_grad(set_to_none=True)
    return value


def make_mlp_case(quick: bool, train: bool = True) -> Case:
    n, d_in = 4096, 20
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=generator)
    teacher_w = torch.randn(d_in, 8, generator=generator) / d_in**0.5
    teacher_v = torch.randn(8, generator=generator)
    y = torch.tanh(x @ teacher_w) @ teacher_v + 0.1 * torch.randn(n, generator=generator)
    torch.manual_seed(0)
    model = MLP(d_in)
    steps = (150 if quick else 600) if train else 0
    final = _train(model, lambda i: (model(x[i]) - y[i]).square().mean(), n, 128, steps)
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return (module(inputs) - targets).square()

    def di_loss_fn(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        idx = input_ids[:, 0]
        return (module(x[idx]) - y[idx]).square().unsqueeze(1)

    settings = dict(
        lr=1e-3,
        nbeta=default_nbeta(32),
        localization=100.0,
        num_chains=4,
        num_draws=100 if quick else 200,
        batch_size=32,
    )
    return Case(
        name="mlp",
        description="MLP 20→64→64→1, n=4096",
        model=model,
        dataset=TensorDataset(x, y),
        loss_fn=loss_fn,
        di_dataset=_hf_dataset([[i, 0] for i in range(n)]),
        di_loss_fn=di_loss_fn,
        settings=settings,
        long_draws=500 if quick else 2000,
        block_steps=50 if quick else 100,
        blocks=3 if quick else 5,
        extra={"train_loss": final},
    )


def json_source_bytes() -> bytes:
    """The text of the ``json`` package's Python sources (a fixed, always-available corpus)."""
    folder = Path(inspect.getsourcefile(json)).parent  # type: ignore[arg-type]
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.py")))


def make_lm_case(quick: bool, attention: str = "manual", train: bool = True) -> Case:
    context, stride = 64, 32
    text = torch.frombuffer(bytearray(json_source_bytes()), dtype=torch.uint8).long()
    windows = text.unfold(0, context + 1, stride).contiguous()  # [N, 65]
    n = windows.shape[0]
    torch.manual_seed(0)
    model = TinyLM(context=context, attention=attention)
    steps = (30 if quick else 120) if train else 0
    final = _train(model, lambda i: lm_token_losses(model, windows[i]).mean(), n, 16, steps)
    model = model.to(DEVICE)

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        return lm_token_losses(module, batch[0]).mean(dim=1)

    settings = dict(
        lr=1e-4,
        nbeta=30.0,
        localization=300.0,
        num_chains=4,
        num_draws=20 if quick else 50,
        batch_size=16,
    )
    return Case(
        name="lm",
        description=f"byte LM d128 L4 H4 MLP640 ctx64 ({attention} attention), {n} windows",
        model=model,
        dataset=TensorDataset(windows.to(DEVICE)),
        loss_fn=loss_fn,
        di_dataset=_hf_dataset(windows.tolist()),
        di_loss_fn=lm_token_losses,
        settings=settings,
        long_draws=40 if quick else 100,
        block_steps=2 if quick else 3,
        blocks=2 if quick else 4,
        extra={"train_loss": final, "windows": n},
    )


def make_case(name: str, quick: bool, attention: str = "manual", train: bool = True) -> Case:
    return make_mlp_case(quick, train) if name == "mlp" else make_lm_case(quick, attention, train)


# ---------------------------------------------------------------------------------------------- runners


def run_ours(case: Case, paired: bool, **overrides: Any) -> float:
    result = lp.estimate_llc(case.model, case.loss_fn, case.dataset, case.config(paired, **overrides))
    return result.mean


def run_devinterp(case: Case, **overrides: Any) -> float:
    from devinterp.slt.llc import llc

    s = {**case.settings, **overrides}
    folder = tempfile.mkdtemp(prefix="bench_llc_devinterp_")
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = llc(
                model=case.model,
                dataset=case.di_dataset,
                observables={},
                loss_fn=case.di_loss_fn,
                lr=s["lr"],
                n_beta=s["nbeta"],
                localization=s["localization"],
                num_chains=s["num_chains"],
                num_draws=s["num_draws"],
                num_burnin_steps=0,
                batch_size=s["batch_size"],
                num_init_loss_batches=32,
                init_seed=DEVINTERP_SEED,
                device=str(DEVICE),
                output_path=Path(folder) / "samples.zarr",
            )
            return float(result.llc_mean)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_contestant(case: Case, contestant: str, **overrides: Any) -> float:
    if contestant == "devinterp":
        return run_devinterp(case, **overrides)
    if contestant == "ours_paired_shared":
        overrides = {"shared_batches": True, **overrides}
    return run_ours(case, paired=contestant != "ours_unpaired", **overrides)


CLOCKS = ("cpu", "wall")


def stamp() -> tuple[float, float]:
    """(process CPU seconds, wall seconds), after the GPU's queued work (``--device cuda``). CPU time counts
    every thread of this process (devinterp's zarr writer threads included) and is far less disturbed by
    other jobs on a shared machine than wall time."""
    synchronize()
    return time.process_time(), time.perf_counter()


def since(start: tuple[float, float]) -> dict[str, float]:
    cpu, wall = stamp()
    return {"cpu": cpu - start[0], "wall": wall - start[1]}


def timed(fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    gc.collect()
    start = stamp()
    value = fn()
    return since(start), value


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------- section 1


def bench_vs_devinterp(case: Case, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    for contestant in CONTESTANTS:  # warm-up: imports, first vmap trace, allocator
        run_contestant(case, contestant, num_draws=3)
    times: dict[str, list[dict[str, float]]] = {c: [] for c in CONTESTANTS}
    llcs: dict[str, float] = {}
    for r in range(repeats):
        order = CONTESTANTS[r % len(CONTESTANTS) :] + CONTESTANTS[: r % len(CONTESTANTS)]
        for contestant in order:
            seconds, value = timed(lambda c=contestant: run_contestant(case, c))
            times[contestant].append(seconds)
            llcs[contestant] = value
        log(
            f"  [{case.name}] repeat {r + 1}/{repeats} (CPU s / wall s): "
            + ", ".join(f"{c} {times[c][-1]['cpu']:.2f}/{times[c][-1]['wall']:.2f}" for c in order)
        )
    return {
        "times": times,
        "median_s": {
            clock: {c: median([t[clock] for t in ts]) for c, ts in times.items()} for clock in CLOCKS
        },
        "ratio_devinterp_over": {
            clock: {
                c: median([d[clock] / o[clock] for d, o in zip(times["devinterp"], times[c], strict=True)])
                for c in OURS
            }
            for clock in CLOCKS
        },
        "llc": llcs,
    }


# ---------------------------------------------------------------------------------------------- section 2


def _random_batches(case: Case, count: int, batch_size: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    size = len(case.dataset)
    return [
        [t[torch.randint(0, size, (batch_size,), generator=generator)] for t in case.dataset.tensors]
        for _ in range(count)
    ]


class Phases:
    """Accumulates per-phase CPU and wall seconds over the steps of a block."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.sums = {clock: dict.fromkeys(names, 0.0) for clock in CLOCKS}
        self.steps = 0

    def add(self, marks: list[tuple[float, float]]) -> None:
        for i, name in enumerate(self.names):
            self.sums["cpu"][name] += marks[i + 1][0] - marks[i][0]
            self.sums["wall"][name] += marks[i + 1][1] - marks[i][1]
        self.steps += 1

    def per_step(self) -> dict[str, dict[str, float]]:
        out = {}
        for clock, sums in self.sums.items():
            out[clock] = {k: v / self.steps for k, v in sums.items()}
            out[clock]["total"] = sum(sums.values()) / self.steps
        return out


class PlainStepper:
    """Plain training steps of a copy of the model: forward, backward, ``torch.optim.SGD`` step, on
    minibatches already in memory."""

    def __init__(self, case: Case, batch_size: int, pool: int = 64) -> None:
        self.case = case
        self.model = copy.deepcopy(case.model).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.batches = _random_batches(case, pool, batch_size)
        self.cursor = 0
        self.block(3)  # warm-up

    def block(self, steps: int) -> dict[str, dict[str, float]]:
        phases = Phases(("forward", "backward", "optimizer"))
        for _ in range(steps):
            batch = self.batches[self.cursor % len(self.batches)]
            self.cursor += 1
            t0 = stamp()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.case.loss_fn(self.model, batch).mean()
            t1 = stamp()
            loss.backward()
            t2 = stamp()
            self.optimizer.step()
            t3 = stamp()
            phases.add([t0, t1, t2, t3])
        return phases.per_step()


class EngineStepper:
    """The body of ``ChainRunner._run`` (vmap path), timed phase by phase: minibatch fetch, vmapped
    forward, backward (+ divergence check), the paired centre forward, distance and bookkeeping of a
    draw, and the SGMCMC step of all chains. The distance pass is timed at every step; the engine itself
    takes it only at the ~10 draws that sample diagnostics, so this slightly overstates its step."""

    def __init__(self, case: Case) -> None:
        config = case.config(True)
        self.model = case.model
        self.runner = ChainRunner(
            case.model,
            case.loss_fn,
            SampleSource(case.dataset),
            config,
            resolve_param_masks(case.model, None),
        )
        with evaluation_mode(self.model):
            self.runner._build("vmap")
        self.block(3)  # warm-up

    def block(self, steps: int, sample_metrics: bool = False) -> dict[str, dict[str, float]]:
        runner = self.runner
        phases = Phases(("fetch", "forward", "backward", "center_forward", "draw_record", "optimizer"))
        with evaluation_mode(self.model):
            for _ in range(steps):
                t0 = stamp()
                batch = batch_to(runner._batches.next_stacked(), runner.device)
                t1 = stamp()
                loss = _chain_means(runner._step_outputs(batch))
                t2 = stamp()
                loss.sum().backward()
                loss = loss.detach()
                bad = bool((~torch.isfinite(loss)).cpu().any())
                t3 = stamp()
                center = _chain_means(runner._center_outputs(batch))
                t4 = stamp()
                distance = runner._distance()
                record = (loss.cpu().double(), center.cpu().double(), distance.cpu().double(), bad)
                t5 = stamp()
                runner._optimizer_step(sample_metrics=sample_metrics)
                t6 = stamp()
                phases.add([t0, t1, t2, t3, t4, t5, t6])
                del record
        return phases.per_step()


E2E = {
    "e2e_unpaired": dict(paired=False),
    "e2e_paired": dict(paired=True),
    "e2e_sequential": dict(paired=False, chain_mode="sequential"),
    "e2e_vmap": dict(paired=False, chain_mode="vmap"),
    "e2e_paired_shared": dict(paired=True, shared_batches=True),
}


def bench_step_cost(case: Case, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every SGLD measurement is bracketed by plain-step measurements taken right before and after it,
    and its ratio to C plain steps is computed per repeat, so that slow drifts in machine load cancel."""
    chains = case.settings["num_chains"]
    batch = case.settings["batch_size"]
    draws = case.long_draws
    block = case.block_steps
    blocks = case.blocks
    plain = PlainStepper(case, batch)
    plain_cb = PlainStepper(case, chains * batch)
    engine = EngineStepper(case)
    run_ours(case, paired=True, num_draws=3)  # warm-up
    run_ours(case, paired=False, num_draws=3, chain_mode="sequential")

    samples: dict[str, list[dict[str, float]]] = {}  # measurement -> [{clock: seconds per step}]
    ratios: dict[str, list[dict[str, float]]] = {}  # measurement -> [{clock: ratio to C × plain}]
    phases: dict[str, list[dict[str, dict[str, float]]]] = {"plain": [], "engine": []}

    def record(key: str, per_step: dict[str, float], plain_step: dict[str, float]) -> None:
        samples.setdefault(key, []).append(per_step)
        ratios.setdefault(key, []).append({k: per_step[k] / (chains * plain_step[k]) for k in CLOCKS})

    def bracketed_plain(fn: Callable[[], dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
        before = plain.block(block)
        value = fn()
        after = plain.block(block)
        phases["plain"] += [before, after]
        plain_step = {k: (before[k]["total"] + after[k]["total"]) / 2 for k in CLOCKS}
        samples.setdefault("plain", []).append(plain_step)
        return value, plain_step

    def engine_job() -> None:
        for _ in range(blocks):
            result, plain_step = bracketed_plain(lambda: engine.block(block))
            phases["engine"].append(result)
            for key, total in (
                ("engine_paired", {k: result[k]["total"] for k in CLOCKS}),
                ("engine_unpaired", {k: result[k]["total"] - result[k]["center_forward"] for k in CLOCKS}),
            ):
                record(key, total, plain_step)
        with_metrics = engine.block(2, sample_metrics=True)
        samples.setdefault("optimizer_with_metrics", []).append(
            {k: with_metrics[k]["optimizer"] for k in CLOCKS}
        )

    def plain_cb_job() -> None:
        result, plain_step = bracketed_plain(lambda: plain_cb.block(block))
        record("plain_cb", {k: result[k]["total"] for k in CLOCKS}, plain_step)

    def e2e_job(key: str) -> None:
        options = dict(E2E[key])
        paired = options.pop("paired")
        seconds, plain_step = bracketed_plain(
            lambda: timed(lambda: run_ours(case, paired, num_draws=draws, **options))[0]
        )
        record(key, {k: seconds[k] / draws for k in CLOCKS}, plain_step)

    jobs: list[Callable[[], None]] = [engine_job, plain_cb_job, *[lambda k=key: e2e_job(k) for key in E2E]]
    for r in range(repeats):
        for job in jobs[r % len(jobs) :] + jobs[: r % len(jobs)]:
            gc.collect()
            job()
        log(
            f"  [{case.name}] step-cost repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]['cpu']:.2f}" for k, v in ratios.items())
            + " (CPU ratios to C × plain)"
        )

    out: dict[str, Any] = {"draws": draws, "block_steps": block, "blocks": blocks}
    for clock in CLOCKS:
        out[clock] = {
            "c_plain": chains * median([s[clock] for s in samples["plain"]]),
            "per_step": {k: median([s[clock] for s in v]) for k, v in samples.items()},
            "ratio_to_c_plain": {k: median([s[clock] for s in v]) for k, v in ratios.items()},
            "phases": {
                name: {p: median([run[clock][p] for run in runs]) for p in runs[0][clock]}
                for name, runs in phases.items()
            },
        }
    out["raw"] = {"samples": samples, "ratios": ratios}
    return out


# ---------------------------------------------------------------------------------------------- memory


def _status_mib(field: str) -> float:
    """A ``Vm*`` field of /proc/self/status in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _child_memory(
    case_name: str, contestant: str, state_path: str, quick: bool, threads: int, attention: str
) -> None:
    """Run one contestant once in this (fresh) process and print its peak memory as JSON. The trained
    weights come from ``state_path`` so that training does not set the peak.

    On the CPU: /proc/self/status (``VmHWM``, the peak RSS of this process image, reset through
    /proc/self/clear_refs right before the run); ``getrusage``'s ``ru_maxrss`` would be useless here because
    Linux carries it over from the parent across fork + exec. On a GPU: ``torch.cuda.max_memory_allocated``
    (reset right before the run), the peak of tensors allocated on the device."""
    torch.set_num_threads(threads)
    case = make_case(case_name, quick, attention, train=False)
    case.model.load_state_dict(torch.load(state_path, map_location=DEVICE))
    if contestant == "devinterp":
        import devinterp.slt.llc  # noqa: F401  (import cost is not the sampler's memory)
    gc.collect()
    if DEVICE.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE) / 2**20
        run_contestant(case, contestant)
        synchronize()
        print(json.dumps({"before_mib": before, "peak_mib": torch.cuda.max_memory_allocated(DEVICE) / 2**20}))
        return
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_mib("VmRSS")
    run_contestant(case, contestant)
    print(json.dumps({"before_mib": before, "peak_mib": _status_mib("VmHWM")}))


def bench_memory(case: Case, quick: bool, threads: int, attention: str) -> dict[str, dict[str, float]]:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench_llc_state_") as folder:
        state_path = str(Path(folder) / "state.pt")
        torch.save(case.model.state_dict(), state_path)
        for contestant in CONTESTANTS:
            command = [sys.executable, "-m", "benchmarks.bench_llc", "--_child-memory", case.name, contestant]
            command += [state_path, "--threads", str(threads), "--attention", attention]
            command += ["--device", str(DEVICE)]
            command += ["--quick"] if quick else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            out[contestant] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------- profile


def profile_once(case: Case, paired: bool, top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_ours(case, paired=paired, num_draws=case.long_draws)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


# ---------------------------------------------------------------------------------------------- report


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda" else ""
    return (
        f"{model}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, device {DEVICE}{gpu}"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def report(results: dict[str, Any]) -> str:
    load = "/".join(f"{x:.2f}" for x in results["load_start"])
    load_end = "/".join(f"{x:.2f}" for x in results["load_end"])
    lines = [
        f"Machine: {results['machine']}",
        f"Repeats: {results['repeats']} (medians); load average (1/5/15 min) at start {load}, "
        f"at end {load_end}",
        "Times are process CPU time and wall-clock time (CPU time is robust to other jobs on the machine).",
        "",
    ]
    if "llc" in results:
        lines += [
            "## 1. One LLC estimate: lp.estimate_llc vs devinterp llc()",
            "",
            "| model | params | chains × draws | contestant | CPU s | devinterp / ours (CPU) | wall s "
            "| devinterp / ours (wall) | LLC mean |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, res in results["llc"].items():
            info = results["cases"][name]
            for c in CONTESTANTS:
                cells = []
                for clock in CLOCKS:
                    ratio = res["ratio_devinterp_over"][clock].get(c)
                    cells += [f"{res['median_s'][clock][c]:.2f}", "" if ratio is None else f"{ratio:.2f}×"]
                lines.append(
                    f"| {name} | {info['params']:,} | {info['chains']} × {info['draws']} | {LABELS[c]} | "
                    + " | ".join(cells)
                    + f" | {res['llc'][c]:.2f} |"
                )
        lines.append("")
    if "steps" in results:
        lines += [
            "## 2. One SGLD step of C chains vs C plain training steps",
            "",
            "| model | measurement | CPU ms / step | ÷ C × plain (CPU) | wall ms / step "
            "| ÷ C × plain (wall) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        rows = (
            ("plain_cb", "1 plain SGD step at batch C·B"),
            ("e2e_unpaired", "SGLD step, end to end: estimate_llc(paired=False) / steps, chain_mode='auto'"),
            ("e2e_paired", "SGLD step, end to end: estimate_llc(paired=True) / steps"),
            ("e2e_sequential", "SGLD step, end to end: paired=False, chain_mode='sequential'"),
            ("e2e_vmap", "SGLD step, end to end: paired=False, chain_mode='vmap'"),
            ("e2e_paired_shared", "SGLD step, end to end: paired, shared_batches=True"),
            ("engine_unpaired", "engine step (fetch, fwd, bwd, SGMCMC step, distance)"),
            ("engine_paired", "engine step + paired centre forward"),
        )
        for name, res in results["steps"].items():
            info = results["cases"][name]
            cells = " | ".join(f"{ms(res[clock]['c_plain'])} | 1.00" for clock in CLOCKS)
            lines.append(
                f"| {name} | C × plain SGD step (C = {info['chains']}, B = {info['batch_size']}) | {cells} |"
            )
            for key, label in rows:
                cells = " | ".join(
                    f"{ms(res[clock]['per_step'][key])} | {res[clock]['ratio_to_c_plain'][key]:.2f}"
                    for clock in CLOCKS
                )
                lines.append(f"| {name} | {label} | {cells} |")
        lines += [
            "",
            "Ratios are medians of per-measurement ratios, each SGLD measurement divided by C × the plain "
            "step timed right before and after it. End to end: one estimate_llc call ("
            + ", ".join(f"{n}: {r['draws']} draws" for n, r in results["steps"].items())
            + ") divided by its steps; it includes validation, the vmap probe, the L(w*) batches "
            "(paired=False) and the 10 steps that sample diagnostics. Engine: the chain loop's body timed "
            "phase by phase in blocks of "
            + ", ".join(f"{n}: {r['block_steps']}" for n, r in results["steps"].items())
            + " steps.",
            "",
            "Per-step phases (CPU ms; plain = C × one chain's step):",
            "",
            "| model | | fetch | forward | backward | optimizer step | paired centre fwd "
            "| draw bookkeeping | total |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, res in results["steps"].items():
            c = results["cases"][name]["chains"]
            pl, en = res["cpu"]["phases"]["plain"], res["cpu"]["phases"]["engine"]
            lines.append(
                f"| {name} | C × plain | – | {ms(c * pl['forward'])} | {ms(c * pl['backward'])} | "
                f"{ms(c * pl['optimizer'])} | – | – | {ms(c * pl['total'])} |"
            )
            lines.append(
                f"| {name} | SGLD engine | {ms(en['fetch'])} | {ms(en['forward'])} | {ms(en['backward'])} | "
                f"{ms(en['optimizer'])} | {ms(en['center_forward'])} | {ms(en['draw_record'])} | "
                f"{ms(en['total'])} |"
            )
        lines.append("")
        lines += [
            f"SGMCMC step of the {n} engine with devinterp's diagnostics on (10 such steps per run): "
            f"{ms(r['cpu']['per_step']['optimizer_with_metrics'])} CPU ms "
            f"(vs {ms(r['cpu']['phases']['engine']['optimizer'])} without)."
            for n, r in results["steps"].items()
        ]
        lines.append("")
    if "memory" in results:
        on_gpu = results.get("device", "cpu").startswith("cuda")
        what = "torch.cuda.max_memory_allocated" if on_gpu else "RSS"
        lines += [
            f"## 3. Peak {'GPU' if on_gpu else 'resident'} memory (fresh subprocess per contestant)",
            "",
            f"| model | contestant | {what} before (MiB) | peak {what} (MiB) | added (MiB) |",
            "|---|---|---:|---:|---:|",
        ]
        for name, res in results["memory"].items():
            for c in CONTESTANTS:
                m = res[c]
                lines.append(
                    f"| {name} | {LABELS[c]} | {m['before_mib']:.0f} | {m['peak_mib']:.0f} | "
                    f"{m['peak_mib'] - m['before_mib']:.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def parse_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """``--device``: ``cpu`` or ``cuda[:index]``, refused clearly where CUDA is missing."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="short chains and training, 2 repeats")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--models", nargs="+", default=["mlp", "lm"], choices=["mlp", "lm"])
    parser.add_argument(
        "--sections", nargs="+", default=["llc", "steps"], choices=["llc", "steps", "memory", "profile"]
    )
    parser.add_argument("--attention", default="manual", choices=["manual", "sdpa"], help="LM attention")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--device", default="cpu", help="where models, data and chains live: cpu or cuda")
    parser.add_argument("--_child-memory", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = parse_device(args.device, parser)
    if args._child_memory is not None:
        _child_memory(*args._child_memory, quick=args.quick, threads=args.threads, attention=args.attention)
        return
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "quick": args.quick, "cases": {}}
    results["device"] = str(DEVICE)
    results["load_start"] = os.getloadavg()
    for name in args.models:
        log(f"building {name} ...")
        case = make_case(name, args.quick, args.attention)
        results["cases"][name] = {
            "description": case.description,
            "params": case.num_params,
            "chains": case.settings["num_chains"],
            "draws": case.settings["num_draws"],
            "batch_size": case.settings["batch_size"],
            "long_draws": case.long_draws,
            "block_steps": case.block_steps,
            "blocks": case.blocks,
            **case.extra,
        }
        log(
            f"  {case.description}: {case.num_params:,} parameters, train loss {case.extra['train_loss']:.4f}"
        )
        if "llc" in args.sections:
            results.setdefault("llc", {})[name] = bench_vs_devinterp(case, repeats, log)
        if "steps" in args.sections:
            results.setdefault("steps", {})[name] = bench_step_cost(case, repeats, log)
        if "memory" in args.sections:
            results.setdefault("memory", {})[name] = bench_memory(
                case, args.quick, args.threads, args.attention
            )
        if "profile" in args.sections:
            for paired in (False, True):
                log(f"cProfile of estimate_llc ({name}, paired={paired}, {case.long_draws} draws):")
                log(profile_once(case, paired))
    results["load_end"] = os.getloadavg()
    print(report(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
