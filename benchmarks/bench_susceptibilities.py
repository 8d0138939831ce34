"""Benchmark ``lp.estimate_susceptibilities`` against devinterp 2.0.1's ``susceptibilities()``.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_susceptibilities            # reference case (~45 min on 1 core)
    .venv/bin/python -m benchmarks.bench_susceptibilities --quick    # smoke run (~1 min)
    .venv/bin/python -m benchmarks.bench_susceptibilities --draws 200 --json out.json
    .venv/bin/python -m benchmarks.bench_susceptibilities --device cuda    # models and chains on a GPU

Reference case (the issue "Susceptibilities"): ``recipes.induction.InductionLM`` (2-layer attention-only
byte LM, 8 heads per layer, d_model 64, context 32, 68,736 parameters), trained for 300 AdamW steps on byte
windows first (weights cached in a temporary file for the run); SGLD on 4,096 windows of 33 bytes of the
Python standard library (32 predicted positions; both sides see the same windows); a probe of 1,024
repeated-halves sequences; weight restrictions "full" plus the 16 heads (``lp.attention.head_restrictions``,
the same masks on both sides); lr 1e-3, nβ 30, γ 300, batch 32, 4 chains × ``--draws`` draws.

* devinterp: ``observables = {"pretrain": (windows, 3), "probe": (probe, 32)}`` (3 × 32 fixed windows for
  ``L``, all 1,024 probe sequences at every draw), ``sampling_task="pretrain"``, per-token losses; its
  per-token χ averaged over the 32 positions is the comparable per-sequence quantity.
* ours: ``observables = head_restrictions(model)``, ``probe`` = the 1,024 sequences with per-sample loss =
  mean per-token cross entropy, ``loss_batches=3``, ``probe_batch_size=64``. Variants: the same draws and
  steps as devinterp (k = ``steps_between_draws`` = 1), and the same number of SGLD steps with the probe
  evaluated only every k-th step (k = 2, 4: half and a quarter of the draws, which also shows that peak
  memory does not grow with the number of draws).

Each contestant runs in a fresh subprocess (``torch.set_num_threads(--threads)``, default 1) that reports
wall and CPU time of the estimate alone and its peak resident memory (``ru_maxrss``, plus the resident
memory just before the estimate, so imports and data are visible separately). Agreement with devinterp is
per head: the correlation across the 1,024 probe sequences of our row with devinterp's row, and the ratio
of their standard deviations. Because both rows are Monte-Carlo estimates, ``--noise-reference`` also runs
ours k = 1 with another seed: ours-vs-ours agreement is the level that MC error allows. Before the runs, the
integrated autocorrelation time of the draw series (``L`` and probe losses, full chains and two heads) is
measured: thinning by k ≲ τ drops draws that carry little independent information.

``--device cuda`` (default ``cpu``) runs both contestants and the autocorrelation chains with the model on
the GPU (the short training of ``w*`` stays on the CPU); clocks are read after ``torch.cuda.synchronize()``
and the memory columns are ``torch.cuda.max_memory_allocated`` (and the allocation just before the
estimate) instead of resident memory.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp draws one bar per chain

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

SETTINGS: dict[str, Any] = dict(
    lr=1e-3,
    nbeta=30.0,
    localization=300.0,
    num_chains=4,
    batch_size=32,
    windows=4096,
    probe=1024,
    context=32,  # predicted positions; windows hold context + 1 bytes
    loss_batches=3,  # ours loss_batches == devinterp's batches_per_draw of the sampling task
    train_steps=300,
    probe_batch_size=64,  # fastest on the 2-core benchmark machine (L2-sized activations); 256 is the default
)
QUICK: dict[str, Any] = dict(windows=512, probe=128, train_steps=50)
DATA_SEED, PROBE_SEED, TRAIN_SEED = 0, 1, 0


@dataclass
class Job:
    """One subprocess: a contestant and its sampler settings."""

    name: str
    contestant: str  # "ours" or "devinterp"
    draws: int
    steps_between_draws: int = 1
    seed: int = 0
    probe_batch_size: int | None = None

    @property
    def steps(self) -> int:
        return self.draws * self.steps_between_draws


# ------------------------------------------------------------------------------------------------ data


def make_data(settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling windows ``[n, context + 1]`` and the probe sequences ``[N, context + 1]``."""
    from recipes.induction.data import byte_windows, repeated_halves

    length = settings["context"] + 1
    windows = byte_windows(settings["windows"], length, DATA_SEED)
    probe = repeated_halves(settings["probe"], length, PROBE_SEED)
    return windows, probe


def make_model() -> Any:
    from recipes.induction.model import InductionLM

    return InductionLM(context=SETTINGS["context"])


def train(settings: dict[str, Any], path: Path) -> float:
    """Train ``InductionLM`` briefly with AdamW on the sampling windows; save the weights; final loss."""
    torch.manual_seed(TRAIN_SEED)
    windows, _ = make_data(settings)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    loss = torch.tensor(float("nan"))
    for _ in range(settings["train_steps"]):
        batch = windows[torch.randint(len(windows), (64,), generator=generator)]
        loss = model.per_sample_loss(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), path)
    return float(loss.detach())


def load_model(path: Path, device: str = "cpu") -> Any:
    model = make_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.to(device)


# --------------------------------------------------------------------------------------------- workers


def _rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Meter:
    """Wall and CPU seconds and memory of one estimate on ``device``: resident memory on the CPU (the RSS
    before it and the process's peak), ``torch.cuda.memory_allocated`` before it and
    ``torch.cuda.max_memory_allocated`` during it on a GPU; clocks read after ``torch.cuda.synchronize``."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_kb = torch.cuda.memory_allocated(self.device) // 1024
        else:
            self.before_kb = _rss_kb()
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def stop(self) -> dict[str, Any]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu
        peak = torch.cuda.max_memory_allocated(self.device) // 1024 if self.cuda else _peak_kb()
        return dict(wall=wall, cpu=cpu, peak_kb=peak, rss_before_kb=self.before_kb)


def run_ours(job: Job, settings: dict[str, Any], weights: Path, device: str) -> dict[str, Any]:
    import lightning_patterning as lp
    from lightning_patterning.attention import head_restrictions

    model = load_model(weights, device)
    windows, probe = make_data(settings)
    # the unrestricted ("full") chains run inside: every restricted row needs them (devinterp reports
    # only the 16 restricted rows too)
    observables = head_restrictions(model)
    config = lp.SGLDConfig(
        lr=settings["lr"],
        nbeta=settings["nbeta"],
        localization=settings["localization"],
        num_chains=settings["num_chains"],
        num_draws=job.draws,
        steps_between_draws=job.steps_between_draws,
        batch_size=settings["batch_size"],
        seed=job.seed,
    )

    def loss_fn(module: Any, batch: Any) -> torch.Tensor:
        return module.per_sample_loss(batch)

    meter = Meter(device)
    meter.start()
    chi = lp.estimate_susceptibilities(
        model,
        loss_fn,
        TensorDataset(windows),
        config,
        observables,
        TensorDataset(probe),
        loss_batches=settings["loss_batches"],
        probe_batch_size=job.probe_batch_size or settings["probe_batch_size"],
    )
    return dict(
        **meter.stop(),
        names=list(chi.names),
        rows=chi.matrix.double(),
        stderr=chi.stderr.double(),
    )


def run_devinterp(job: Job, settings: dict[str, Any], weights: Path, device: str) -> dict[str, Any]:
    import numpy as np
    import xarray as xr
    from datasets import Dataset
    from devinterp.slt.observables import DeterministicShuffledSampler
    from devinterp.slt.susceptibilities import susceptibilities

    from lightning_patterning.attention import head_restrictions

    model = load_model(weights, device)
    windows, probe = make_data(settings)
    heads = head_restrictions(model)
    restrictions: dict[str, Any] = {"full": None}
    restrictions.update({h.name: {n: m.float() for n, m in h.masks.items()} for h in heads})
    sampling = Dataset.from_dict({"input_ids": windows.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe.tolist()}).with_format("torch")
    batch = settings["batch_size"]
    observables = {
        "pretrain": (sampling, settings["loss_batches"]),
        "probe": (probe_ds, len(probe) // batch),
    }

    def loss_fn(module: Any, input_ids: torch.Tensor) -> torch.Tensor:
        return module.per_token_loss(input_ids)

    folder = Path(tempfile.mkdtemp(prefix="bench_sus_devinterp_"))
    try:
        meter = Meter(device)
        meter.start()
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = susceptibilities(
                model,
                sampling,
                observables,
                restrictions,
                sampling_task="pretrain",
                lr=settings["lr"],
                n_beta=settings["nbeta"],
                loss_fn=loss_fn,
                num_chains=settings["num_chains"],
                num_draws=job.draws,
                num_steps_bw_draws=job.steps_between_draws,
                batch_size=batch,
                localization=settings["localization"],
                init_seed=100 + job.seed,
                device=device,
                output_path=folder / "samples.zarr",
            )
            sus = tree["susceptibilities"]["sus"].values  # [N × positions, wr], probe only
            wr_names = [str(w) for w in tree["susceptibilities"]["wr"].values]
        measured = meter.stop()

        # devinterp evaluates the probe in DeterministicShuffledSampler order: map rows back to probe order.
        order = DeterministicShuffledSampler(probe_ds, len(probe), seed=1337).indices
        per_sequence = torch.as_tensor(sus).double().reshape(len(probe), settings["context"], -1).mean(dim=1)
        rows = torch.empty(len(wr_names), len(probe), dtype=torch.float64)
        rows[:, torch.as_tensor(order)] = per_sequence.T
        ids = torch.as_tensor(tree["context"]["input_ids"].values).reshape(-1, settings["context"] + 1)
        assert torch.equal(ids[: len(probe)], probe[torch.as_tensor(order)]), "probe order mismatch"

        # The same estimator with our convention for L(w*): the loss at w* on the fixed "pretrain" windows
        # (devinterp subtracts the mean of 32 random minibatches instead, a per-row constant c that enters
        # as c·(E_C[L − ℓ_z] − E_full[L − ℓ_z])).
        rows_same_center, stderr_same_center, check = _devinterp_rows_recomputed(
            folder, wr_names, model, order, len(probe), xr, np
        )
        # the recomputation with devinterp's own init_loss must reproduce its output
        assert torch.allclose(check, rows, rtol=1e-3, atol=1e-4 * float(rows.abs().max())), "recomputation"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return dict(
        **measured,
        names=wr_names,
        rows=rows,
        rows_same_center=rows_same_center,
        stderr_same_center=stderr_same_center,
    )


def _devinterp_rows_recomputed(
    folder: Path, names: list[str], model: Any, order: list[int], size: int, xr: Any, np: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """devinterp's per-sequence rows recomputed from its saved samples, with our L(w*) convention.

    Returns ``(rows, stderr, check)``: the rows with ``L(w*)`` = the loss at w* on the fixed windows, their
    leave-one-chain-out jackknife standard errors (a chain left out of the restriction's and the full
    chains alike, as in our estimator), and the rows with devinterp's own ``init_loss`` (must reproduce its
    output).
    """

    def data(name: str) -> Any:
        return xr.open_datatree(
            str(folder / f"samples_{name}.zarr"), engine="zarr", consolidated=False
        ).dataset

    full = data("full")
    ids = torch.as_tensor(full["input_ids_pretrain"].values).to(next(model.parameters()).device)
    with torch.no_grad():
        center = float(model.per_token_loss(ids).double().mean())
    native_center = float(full["init_loss"].values.mean())
    full_loss = full["loss_pretrain"].values.astype(np.float64).mean(axis=(-2, -1))  # [chain, draw]
    full_probe = full["loss_probe"].values.astype(np.float64).mean(axis=-1)  # [chain, draw, N]
    chains = full_loss.shape[0]

    def chi(loss: Any, probe: Any, keep: list[int], c: float) -> Any:
        full_delta = full_loss[keep].mean() - full_probe[keep].mean(axis=(0, 1))
        g, lo, pr = loss[keep] - c, loss[keep], probe[keep]
        return (g * lo).mean() - (g[..., None] * pr).mean(axis=(0, 1)) - g.mean() * full_delta

    out, stderr, check = (torch.empty(len(names), size, dtype=torch.float64) for _ in range(3))
    where = torch.as_tensor(order)
    everything = list(range(chains))
    for i, name in enumerate(names):
        ds = data(name)
        loss = ds["loss_pretrain"].values.astype(np.float64).mean(axis=(-2, -1))  # [chain, draw]
        probe = ds["loss_probe"].values.astype(np.float64).mean(axis=-1)  # [chain, draw, N]
        out[i, where] = torch.as_tensor(chi(loss, probe, everything, center))
        check[i, where] = torch.as_tensor(chi(loss, probe, everything, native_center))
        leave_out = np.stack(
            [chi(loss, probe, [k for k in everything if k != j], center) for j in everything]
        )
        variance = (chains - 1) / chains * ((leave_out - leave_out.mean(axis=0)) ** 2).sum(axis=0)
        stderr[i, where] = torch.as_tensor(np.sqrt(variance))
    print(
        f"devinterp: L(w*) on the fixed windows {center:.4f}, its init_loss {native_center:.4f}", flush=True
    )
    return out, stderr, check


def autocorrelation(
    settings: dict[str, Any], weights: Path, steps: int, probe_columns: int = 64, device: str = "cpu"
) -> dict[str, Any]:
    """Integrated autocorrelation time (in SGLD steps) of the draw series that enter the estimator.

    Runs the unrestricted chains and two head restrictions (``l0h0``, ``l1h0``) for ``steps`` steps with a
    draw at every step and records ``L(w_t)`` on the fixed windows and ``ℓ_z(w_t)`` on the first
    ``probe_columns`` probe sequences. τ = 1 + 2·Σ ρ(t) (Sokal's window: stop at t ≥ 5τ), per chain, averaged.
    Thinning by k ≲ τ removes draws that carry little independent information.
    """
    from lightning_patterning.attention import head_restrictions
    from lightning_patterning.estimators.susceptibilities import restriction_masks
    from lightning_patterning.sgld.batches import SampleSource, reference_batches
    from lightning_patterning.sgld.chains import ChainRunner
    from lightning_patterning.sgld.config import SGLDConfig
    from lightning_patterning.sgld.restrict import resolve_param_masks

    model = load_model(weights, device)
    windows, probe = make_data(settings)
    config = SGLDConfig(
        lr=settings["lr"],
        nbeta=settings["nbeta"],
        localization=settings["localization"],
        num_chains=settings["num_chains"],
        num_draws=steps,
        batch_size=settings["batch_size"],
        paired=False,
    )
    source = SampleSource(TensorDataset(windows))
    fixed = reference_batches(source, settings["batch_size"], settings["loss_batches"], 0, 0)
    columns = [probe[:probe_columns]]
    heads = {h.name: h for h in head_restrictions(model)}
    restrictions = {
        "full": resolve_param_masks(model, None),
        "l0h0": restriction_masks(model, heads["l0h0"]),
        "l1h0": restriction_masks(model, heads["l1h0"]),
    }

    def loss_fn(module: Any, batch: Any) -> torch.Tensor:
        return module.per_sample_loss(batch)

    out: dict[str, Any] = {}
    for index, (name, masks) in enumerate(restrictions.items()):
        series_loss: list[torch.Tensor] = []
        series_probe: list[torch.Tensor] = []

        def record(draw: Any, series_loss: list = series_loss, series_probe: list = series_probe) -> None:
            series_loss.append(torch.stack([draw.per_sample_losses(b).mean(1) for b in fixed]).mean(0).cpu())
            series_probe.append(draw.per_sample_losses(columns).double().cpu())

        ChainRunner(model, loss_fn, source, config, masks, run=index).run(record)
        loss = torch.stack(series_loss, dim=1).double()  # [chains, draws]
        per_probe = torch.stack(series_probe, dim=1)  # [chains, draws, columns]
        out[name] = dict(
            tau_L=_tau(loss),
            tau_probe_median=float(
                torch.tensor([_tau(per_probe[..., j]) for j in range(probe_columns)]).median()
            ),
        )
    return out


def _tau(series: torch.Tensor) -> float:
    """Mean over chains of the integrated autocorrelation time of ``series`` ``[chains, draws]``."""
    taus = []
    for x in series:
        x = x - x.mean()
        n = len(x)
        var = float((x * x).mean())
        if var == 0:
            continue
        tau = 1.0
        for t in range(1, n // 2):
            tau += 2 * float((x[:-t] * x[t:]).mean()) / var
            if t >= 5 * tau:
                break
        taus.append(tau)
    return sum(taus) / max(len(taus), 1)


def worker(arguments: argparse.Namespace) -> None:
    torch.set_num_threads(arguments.threads)
    job = Job(**json.loads(arguments.worker))
    settings = json.loads(arguments.settings)
    run = run_devinterp if job.contestant == "devinterp" else run_ours
    result = run(job, settings, Path(arguments.weights), arguments.device)
    torch.save(result, arguments.out)


# ------------------------------------------------------------------------------------------------ main


def spawn(
    job: Job, settings: dict[str, Any], weights: Path, folder: Path, threads: int, device: str
) -> dict[str, Any]:
    out = folder / f"{job.name}.pt"
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_susceptibilities",
        "--worker",
        json.dumps(asdict(job)),
        "--settings",
        json.dumps(settings),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--device",
        device,
    ]
    subprocess.run(command, check=True)
    return torch.load(out, weights_only=False)


def agreement(ours: dict[str, Any], reference: dict[str, Any], key: str = "rows") -> dict[str, Any]:
    """Per head: correlation across probe sequences and ratio of standard deviations (ours / reference)."""
    index = {n: i for i, n in enumerate(reference["names"])}
    corr, ratio = [], []
    for i, name in enumerate(ours["names"]):
        a, b = ours["rows"][i], reference[key][index[name]]
        corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
        ratio.append(float(a.std() / b.std()))
    return dict(names=list(ours["names"]), corr=corr, ratio=ratio)


def z_scores(
    ours: dict[str, Any], reference: dict[str, Any], key: str = "rows_same_center"
) -> dict[str, float]:
    """``z = (χ_ours − χ_devinterp) / √(se_ours² + se_devinterp²)`` over every (row, probe sequence) entry.

    devinterp's rows are recomputed with our L(w*) convention and their jackknife errors from its samples
    (``_devinterp_rows_recomputed``). With 4 chains each error has 3 degrees of freedom, so even two
    identical estimators give heavier tails than a normal: ``|z| > 2`` for ≈ 9 % of entries (t with ~6
    degrees of freedom) rather than 4.6 %, and a median ``|z|`` ≈ 0.72 rather than 0.67.
    """
    index = torch.as_tensor([reference["names"].index(n) for n in ours["names"]])
    error_key = key.replace("rows", "stderr")
    diff = ours["rows"] - reference[key][index]
    scale = (ours["stderr"] ** 2 + reference[error_key][index] ** 2).sqrt()
    z = (diff / scale).flatten().abs()
    return dict(
        median_abs_z=float(z.median()),
        frac_above_2=float((z > 2).double().mean()),
        frac_above_3=float((z > 3).double().mean()),
        entries=z.numel(),
    )


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.3f} [{ordered[0]:.3f}, {ordered[-1]:.3f}]"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small data, 10 draws")
    parser.add_argument(
        "--draws", type=int, default=None, help="draws of devinterp and ours k=1 (default 100)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker")
    parser.add_argument("--device", default="cpu", help="where the model and chains live: cpu or cuda")
    parser.add_argument("--only", nargs="*", default=None, help="run only these jobs (names)")
    parser.add_argument("--noise-reference", action="store_true", help="also run ours k=1 with a second seed")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier --json of the same settings: its jobs are loaded instead of run again (e.g. add "
        "--noise-reference to a finished run with --only ours_k1_seed1)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {arguments.device!r}")
    if arguments.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    if arguments.worker:
        worker(arguments)
        return

    settings = {**SETTINGS, **(QUICK if arguments.quick else {})}
    draws = arguments.draws or (8 if arguments.quick else 100)
    jobs = [
        Job("devinterp", "devinterp", draws),
        Job("ours_k1", "ours", draws),
        Job("ours_k2", "ours", draws // 2, steps_between_draws=2),
        Job("ours_k4", "ours", draws // 4, steps_between_draws=4),
    ]
    if arguments.noise_reference:
        jobs.append(Job("ours_k1_seed1", "ours", draws, seed=1))
    earlier = _load_json(arguments.reuse) if arguments.reuse else None
    if earlier is not None and earlier["settings"] != settings:
        raise ValueError(f"--reuse {arguments.reuse}: it was run with other settings")
    if arguments.only:
        reused = set(earlier["results"]) if earlier is not None else set()
        jobs = [j for j in jobs if j.name in arguments.only or j.name == "devinterp" or j.name in reused]

    folder = Path(tempfile.mkdtemp(prefix="bench_sus_"))
    try:
        weights = folder / "weights.pt"
        torch.set_num_threads(arguments.threads)
        start = time.perf_counter()
        final_loss = train(settings, weights)
        print(
            f"trained {settings['train_steps']} AdamW steps in {time.perf_counter() - start:.1f} s: "
            f"loss {final_loss:.3f}",
            flush=True,
        )
        taus = (
            earlier["autocorrelation"]
            if earlier is not None
            else autocorrelation(settings, weights, steps=draws, probe_columns=32, device=arguments.device)
        )
        for name, t in taus.items():
            print(
                f"autocorrelation time ({name} chains, steps): L {t['tau_L']:.1f}, "
                f"probe losses (median over 32) {t['tau_probe_median']:.1f}",
                flush=True,
            )
        results: dict[str, dict[str, Any]] = {}
        loads: dict[str, str] = {}
        for job in jobs:
            if earlier is not None and job.name in earlier["results"]:
                loads[job.name] = earlier["loads"][job.name]
                results[job.name] = earlier["results"][job.name]
                print(f"{job.name}: reused from {arguments.reuse}", flush=True)
                continue
            loads[job.name] = _load()
            results[job.name] = spawn(job, settings, weights, folder, arguments.threads, arguments.device)
            r = results[job.name]
            print(
                f"{job.name:<20} draws {job.draws:>4} steps {job.steps:>4}: wall {r['wall']:7.1f} s, "
                f"cpu {r['cpu']:7.1f} s, peak {_memory(arguments.device)} {r['peak_kb'] / 1024:6.0f} MiB "
                f"(before {r['rss_before_kb'] / 1024:.0f} MiB); load before {loads[job.name]}",
                flush=True,
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    report = report_markdown(jobs, results, loads, settings, arguments, taus)
    print(report)
    if arguments.json is not None:
        payload = {
            "settings": settings,
            "device": arguments.device,
            "machine": machine(arguments.device),
            "jobs": [asdict(j) for j in jobs],
            "results": {
                n: {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
                for n, r in results.items()
            },
            "loads": loads,
            "autocorrelation": taus,
            "agreement": {
                n: agreement(r, results["devinterp"]) for n, r in results.items() if n != "devinterp"
            },
            "z_scores": {
                n: z_scores(r, results["devinterp"]) for n, r in results.items() if n != "devinterp"
            },
        }
        arguments.json.write_text(json.dumps(payload, indent=1))


def _load_json(path: Path) -> dict[str, Any]:
    """An earlier ``--json`` output, with its rows and errors as float64 tensors again."""
    payload = json.loads(path.read_text())
    for result in payload["results"].values():
        for key, value in result.items():
            if key.startswith(("rows", "stderr")):
                result[key] = torch.tensor(value, dtype=torch.float64)
    return payload


def _memory(device: str) -> str:
    """What the memory columns measure on ``device``."""
    return "cuda max_memory_allocated" if device.startswith("cuda") else "RSS"


def machine(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}, "
        f"device {device}{gpu}"
    )


def report_markdown(
    jobs: list[Job],
    results: dict[str, dict[str, Any]],
    loads: dict[str, str],
    settings: dict[str, Any],
    arguments: argparse.Namespace,
    taus: dict[str, Any],
) -> str:
    base = results["devinterp"]
    lines = [
        f"machine: {machine(arguments.device)}; threads {arguments.threads}",
        "",
        "Integrated autocorrelation time in SGLD steps (k = 1 draws, "
        + ", ".join(
            f"{n}: L {t['tau_L']:.1f}, ℓ_z median {t['tau_probe_median']:.1f}" for n, t in taus.items()
        )
        + ")",
        "",
        "| run | draws | SGLD steps | wall s | CPU s | speed-up (wall) "
        f"| peak {_memory(arguments.device)} MiB | peak − before MiB "
        "| corr vs devinterp, median [min, max] | scale ratio | load before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for job in jobs:
        r = results[job.name]
        if job.name == "devinterp":
            corr = scale = "—"
        else:
            a = agreement(r, base)
            corr, scale = _summary(a["corr"]), _summary(a["ratio"])
        lines.append(
            f"| {job.name} | {job.draws} | {job.steps} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{base['wall'] / r['wall']:.2f}× | {r['peak_kb'] / 1024:.0f} | "
            f"{(r['peak_kb'] - r['rss_before_kb']) / 1024:.0f} | {corr} | {scale} | {loads[job.name]} |"
        )
    extra = []
    for name, r in results.items():
        if name == "devinterp":
            continue
        a = agreement(r, base, key="rows_same_center")
        extra.append(f"| {name} | {_summary(a['corr'])} | {_summary(a['ratio'])} |")
    lines += [
        "",
        "Against devinterp's samples recomputed with our L(w*) (loss at w* on the fixed windows):",
        "",
        "| run | corr, median [min, max] | scale ratio |",
        "|---|---|---|",
        *extra,
        "",
        "Entry-wise z = (ours − devinterp) / √(se_ours² + se_devinterp²), both jackknife errors over chains",
        "(for two estimators of the same quantity with 4 chains each: median |z| ≈ 0.72, |z| > 2 ≈ 9 %):",
        "",
        "| run | entries | median abs z | frac abs z > 2 | frac abs z > 3 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name != "devinterp":
            z = z_scores(r, base)
            lines.append(
                f"| {name} | {z['entries']} | {z['median_abs_z']:.3f} | {z['frac_above_2']:.3f} | "
                f"{z['frac_above_3']:.3f} |"
            )
    if "ours_k1_seed1" in results:
        noise = agreement(results["ours_k1_seed1"], results["ours_k1"])
        noise_z = z_scores(results["ours_k1_seed1"], results["ours_k1"], key="rows")
        lines += [
            "",
            f"MC noise reference, ours k=1 seed 1 vs seed 0: corr {_summary(noise['corr'])}, "
            f"scale ratio {_summary(noise['ratio'])}, median abs z {noise_z['median_abs_z']:.3f}, "
            f"frac abs z > 2 {noise_z['frac_above_2']:.3f}",
        ]
        for name in ("ours_k2", "ours_k4"):
            if name in results:
                a = agreement(results[name], results["ours_k1_seed1"])
                z = z_scores(results[name], results["ours_k1_seed1"], key="rows")
                lines.append(
                    f"{name} vs ours k=1 seed 1: corr {_summary(a['corr'])}, median abs z "
                    f"{z['median_abs_z']:.3f}, frac abs z > 2 {z['frac_above_2']:.3f}"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
