"""The README's solver example runs as written (on a smaller problem, same calls)."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_solver_example_runs():
    code = _block_after("## Solvers")
    # same calls, smaller arrays so that the suite stays fast
    code = code.replace("(1024, 256)", "(96, 24)").replace("(2000, 256)", "(40, 24)")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    res, codes = ns["res"], ns["codes"]
    assert res.codes.shape == (40, 96) and codes.shape == (40, 96)
    assert np.all(res.relative_gap[res.converged] <= 1e-8)
    assert res.history is not None and len(res.history) == int(res.info["iterations"])
    assert np.all(np.count_nonzero(codes, axis=1) <= 16)
