"""``python -m recipes.parentheses fit --config recipes/parentheses/configs/base.yaml``.

Torch uses ``PARENTHESES_THREADS`` intra-op threads (default 1: the model is tiny, and more threads only
add synchronization on a shared CPU).
"""

from __future__ import annotations

import os

import torch

from recipes.parentheses.cli import main

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("PARENTHESES_THREADS", "1")))
    main()
