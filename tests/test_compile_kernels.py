"""Every Triton kernel compiles for sm_80 and sm_90 without spilling, checked on a CPU-only machine.

Runs scripts/compile_kernels.py --quick (every kernel and every constexpr variant the launchers choose,
at fewer shapes than the script's default) in a subprocess: the compiler needs the kernels defined
without TRITON_INTERPRET, which this test session sets. The compile cache (~/.cache/tandem) makes
reruns take seconds; a cold run is about a minute on two cores.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(\d+) compiled, (\d+) failed, (\d+) spilling$")


def _is_triton_jit(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(node, ast.Attribute) and node.attr == "jit" and getattr(node.value, "id", None) == "triton"


def triton_kernels() -> set[str]:
    """Module-level @triton.jit functions in kernels/ that no other @triton.jit function calls: the
    kernels launchers launch (the rest are device helpers, compiled inside their callers)."""
    found = set()
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        jit = [f for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(_is_triton_jit, f.decorator_list))]
        calls = (n for f in jit for n in ast.walk(f) if isinstance(n, ast.Call))
        called = {c.func.id for c in calls if isinstance(c.func, ast.Name)}
        found |= {f.name for f in jit} - called
    return found


def test_kernel_discovery_finds_kernels_not_helpers():
    kernels = triton_kernels()
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_blocked_kernel", "_ce_stats_kernel", "_rotary_kernel"} <= kernels
    assert "_load_sum" not in kernels and "_store_normed" not in kernels


def test_every_kernel_compiles_for_sm80_and_sm90_without_spilling():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    summary = SUMMARY.match(lines[-1])
    assert summary, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled, failed, spilling = map(int, summary.groups())
    assert (failed, spilling) == (0, 0), proc.stdout
    assert proc.returncode == 0, proc.stdout  # also: no launcher assumes more resident programs than fit
    rows = [line.split() for line in lines[1:-2]]
    assert len(rows) == compiled
    for kernel in triton_kernels():
        for target in ("sm_80", "sm_90"):
            assert [kernel, target] in [row[:2] for row in rows], f"{kernel} was not compiled for {target}"
