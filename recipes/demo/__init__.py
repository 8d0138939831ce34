"""Demo: train a small teacher–student MLP with ``LLCCallback`` and watch the LLC in TensorBoard."""
