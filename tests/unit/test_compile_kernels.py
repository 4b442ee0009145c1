"""Every Triton kernel compiles for sm_80 and sm_90 without spilling, checked on a CPU-only machine.

Runs scripts/compile_kernels.py --quick (every kernel and every constexpr variant the launchers choose,
at fewer shapes than the script's default) in a subprocess: the compiler needs the kernels defined
without TRITON_INTERPRET, which this test session sets. The compile cache (~/.cache/tandem) makes
reruns take seconds; a cold run is about a minute on two cores.
"""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def _run_without_interpreter(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


CHECK_THE_CHECK = """
import json
from kernels import compile_check as cc
sig = {"X": "*fp32", "Y": "*fp32", "BLOCK": "constexpr"}
results = [cc.compile_job(cc.Job("tests.support.spilling_kernel", "spilling_kernel", 90, sig, {(2,): block}, {},
                                 {"num_warps": 1, "enable_fp_fusion": False}, None, ["test"])) for block in (8192, 3)]
print(json.dumps([[r.error, r.registers, r.spill_stores, r.spills] for r in results] + [cc.summary(results)]))
"""


def test_spills_and_failures_are_detected():
    """The check can fail: a kernel holding 256 floats per thread spills, a block of 3 does not compile."""
    proc = _run_without_interpreter("-c", CHECK_THE_CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spilling, failing, summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert spilling[0] is None and spilling[1] >= 200 and spilling[2] > 0 and spilling[3]
    assert failing[0] and not failing[3]
    assert summary == "1 compiled, 1 failed, 1 spilling"


def test_every_kernel_compiles_for_sm80_and_sm90_without_spilling():
    proc = _run_without_interpreter(str(ROOT / "scripts" / "compile_kernels.py"), "--quick")
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
