"""The code of docs/how-to/tokens-as-samples.md runs as written (its blocks form one script)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "how-to" / "tokens-as-samples.md"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_how_to_page_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # anything the script writes stays in the test's folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace: dict = {"__name__": "how_to_tokens"}
        exec(compile("\n".join(blocks), str(PAGE), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    online, data = namespace["online"], namespace["data"]
    assert [h["step"] for h in online.history] == [
        10
    ] and data.token_rule.version == 3  # set, one-off, online
    assert not torch.equal(data.token_weights, namespace["new"])  # the online update changed them
    assert "held-out r =" in capsys.readouterr().out
