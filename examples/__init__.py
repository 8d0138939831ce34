"""Small, runnable examples that the docs include verbatim (each is run by a test)."""
