"""The parentheses studies: which algorithm a transformer learns, and how re-weighting moves it."""
