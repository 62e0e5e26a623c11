"""Every Python block in the README runs as written (each as a script of its own)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_block_runs(index: int, tmp_path: Path) -> None:
    if "RedisQueue" in BLOCKS[index]:
        from redisfixtures import redis_missing

        why = redis_missing()
        if why is not None:
            pytest.skip(f"this block needs a Redis: {why}")
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=str(tmp_path),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"block {index} failed:\n{BLOCKS[index]}\n{done.stderr}"
