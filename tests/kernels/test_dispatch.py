"""Backend dispatch, the torch path without the interpreter or without triton, and a GPU compile check.

These run child Python processes, because TRITON_INTERPRET is read when triton.jit decorates the
kernels (at import), and this pytest process was started with it set.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kernels.kernel_utils import HAS_TRITON

REPO = Path(__file__).resolve().parents[2]


def run_child(code: str, block_triton: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU decision is what is under test
    prelude = "import sys; sys.modules['triton'] = None\n" if block_triton else ""  # makes `import triton` fail
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


TORCH_PATH = """
    import torch, torch.nn.functional as F
    import minirlhf.kernels as K
    from minirlhf.kernels import _use_triton
    q = torch.randn(2, 4, 9, 8, requires_grad=True); kv = torch.randn(2, 2, 9, 8)
    doc = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    for backend in ("torch", "auto"):
        out = K.attention(q, kv, kv, document_ids=doc, backend=backend)
        out.sum().backward()
        assert torch.isfinite(q.grad).all()
    h = torch.randn(6, 8, requires_grad=True); w = torch.randn(11, 8); y = torch.tensor([1, 2, -100, 4, 5, 10])
    loss = K.linear_cross_entropy(h, w, y, backend="auto")
    assert torch.allclose(loss, F.cross_entropy(h @ w.T, y), rtol=1e-6, atol=0)  # the chunked torch path
    lp = K.linear_logprobs(h, w, y, temperature=0.5, backend="torch")
    (loss + lp.sum()).backward()
    assert _use_triton("auto", torch.device("cpu"), "attention") is False
    try:
        K.attention(q, kv, kv, backend="triton")
    except RuntimeError as e:
        print("raised:", e)
    print("triton imported:", sys.modules.get("triton") is not None)
"""


def test_torch_path_without_interpreter():
    out = run_child("import sys\n" + textwrap.dedent(TORCH_PATH))
    assert "needs CUDA tensors or TRITON_INTERPRET=1" in out


def test_torch_path_without_triton_installed():
    out = run_child("import sys\n" + textwrap.dedent(TORCH_PATH), block_triton=True)
    assert "backend='triton' but triton is not installed" in out
    assert "triton imported: False" in out


COMPILE_SM90 = """
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    A = importlib.import_module("minirlhf.kernels.flash_attention")
    X = importlib.import_module("minirlhf.kernels.fused_cross_entropy")
    ints = {"H", "HK", "T", "T_BUCKET", "V", "ignore_index"}
    ptrs = {n: "*bf16" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LOGITS")}
    ptrs.update(LSE="*fp32", DELTA="*fp32", ROW_SCALE="*fp32", LOGPROB="*fp32", DOC="*i32", KV_START="*i32",
                Q_END="*i32", LABELS="*i64")

    def build(fn, const, num_warps, overrides={}):
        sig = {n: "constexpr" if n in const else ptrs.get(n, "i32" if n.startswith("stride") or n in ints else "fp32")
               for n in fn.arg_names}
        sig.update(overrides)
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 3})

    for has_docs in (True, False):
        base = dict(GROUP=2, HEAD_DIM=64, BLOCK_D=64, HAS_DOCS=has_docs, DOT_PRECISION="tf32")
        for name, fn, blocks in [("fwd", A._attn_fwd, (128, 64)), ("dkdv", A._attn_bwd_dkdv, (32, 128)),
                                 ("dq", A._attn_bwd_dq, (128, 32))]:
            k = build(fn, {**base, "BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}, 8 if name == "fwd" else 4)
            assert k.metadata.shared <= 228 * 1024, (name, k.metadata.shared)
            print(name, "documents" if has_docs else "causal", "shared", k.metadata.shared)
    build(A._attn_bwd_delta, dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64), 4)
    for compute_lse, write_grad in [(True, True), (True, False), (False, True)]:
        build(X._ce_rows_kernel, dict(BLOCK_V=4096, COMPUTE_LSE=compute_lse, WRITE_GRAD=write_grad), 8, {"V": "i32"})
    print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_kernels_compile_for_h100():
    """The interpreter accepts programs the compiler rejects: compile every kernel to an sm_90 cubin
    (no GPU needed, Triton's bundled ptxas) for bf16, head dim 64, with and without documents, and
    check that the shared memory fits an H100's 228 KB."""
    pytest.importorskip("triton.backends.nvidia")
    out = run_child(COMPILE_SM90)
    assert "compiled" in out
