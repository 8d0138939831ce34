"""CPU time per SGLD step of ``lp.estimate_llc`` on ``bench_llc``'s MLP, for side-by-side comparisons of
two versions of the package (run it from each checkout's root, alternating, several rounds)::

    .venv/bin/python -m benchmarks.step_time --calls 5 --draws 500

Prints one JSON line: the median over ``--calls`` calls of the CPU ms per step, for the vmap path
(``paired=False`` and ``True``) and the sequential path (``paired=False``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.bench_llc import make_case, run_ours

PATHS = {"vmap": (False, "vmap"), "vmap_paired": (True, "vmap"), "sequential": (False, "sequential")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--draws", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = make_case("mlp", quick=False)
    run_ours(case, False, num_draws=20, chain_mode="vmap")  # warm-up
    out = {}
    for name, (paired, mode) in PATHS.items():
        times = []
        for _ in range(args.calls):
            start = time.process_time()
            run_ours(case, paired, num_draws=args.draws, chain_mode=mode)
            times.append((time.process_time() - start) / args.draws * 1e3)
        out[name] = round(sorted(times)[len(times) // 2], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
