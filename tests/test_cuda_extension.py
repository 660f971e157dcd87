"""The optional csrc extension: it compiles, its row code is right (host and GPU), the backends use it.

Without a GPU the extension's kernels cannot run, but its functions take on_host=True and run the
very same row code (permute_rows.cuh) on the CPU, so the CPU tests below check the indexing, the
16-byte and scalar paths and the float32 accumulation that the GPU runs. The extension used is
the installed one when it is newer than csrc/ (as after CI's `pip install -e .`), else one
compiled here by CMake into a temporary folder. test_extension_compiles always compiles (one
architecture without a GPU: about a minute on two cores).
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

from switch_dit_kernels import _cuda, expert_linear, expert_mlp, permute_ops
from switch_dit_kernels import reference as ref
from switch_dit_kernels.routing import build_routing_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")


def _compile(out_dir):
    """Configure and build CMakeLists.txt into out_dir; return the loaded module."""
    pybind11 = pytest.importorskip("pybind11")
    build = os.path.join(out_dir, "build")
    lib = os.path.join(out_dir, "lib")
    configure = ["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib}"]
    if not torch.cuda.is_available():
        configure.append("-DSWITCH_DIT_CUDA_ARCHS=80")  # one architecture keeps the CPU build short
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    for cmd in (configure, ["cmake", "--build", build, "--parallel", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = [os.path.join(lib, f) for f in os.listdir(lib) if f.startswith("_C")]
    # The module's init symbol is PyInit__C: any dotted name ending in "_C" loads it.
    spec = importlib.util.spec_from_file_location("sdk_test_build._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built_ext(tmp_path_factory):
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("needs nvcc and cmake")
    return _compile(str(tmp_path_factory.mktemp("switch_dit_ext")))


def _installed_is_current(module):
    """True when the installed module is newer than every source it is built from."""
    sources = [os.path.join(ROOT, "CMakeLists.txt")] + [
        os.path.join(ROOT, "csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc"))]
    return os.path.getmtime(module.__file__) >= max(os.path.getmtime(f) for f in sources)


@pytest.fixture(scope="module")
def ext(request):
    """The installed extension when it is built from the current sources (CI's `pip install -e .`
    builds it), else one compiled here, else a stale installed one, else skip."""
    module = _cuda.load_extension()
    if module is not None and _installed_is_current(module):
        return module
    if shutil.which("nvcc") and shutil.which("cmake"):
        return request.getfixturevalue("built_ext")
    if module is None:
        pytest.skip("the extension is not built and cannot be compiled here (no nvcc/cmake)")
    return module


@pytest.fixture
def use_ext(ext, monkeypatch):
    """Make switch_dit_kernels use `ext` as its compiled extension."""
    monkeypatch.setattr(_cuda, "load_extension", lambda: ext)
    return ext


def test_extension_compiles(built_ext):
    for name in ("permute", "unpermute", "permute_backward", "unpermute_backward", "vectorized"):
        assert callable(getattr(built_ext, name))
    assert built_ext.cuda_archs  # the architectures it was built for, e.g. "80"
    assert built_ext.vectorized(1152, "bfloat16", 4096, 8192)        # 2304-byte rows, aligned
    assert not built_ext.vectorized(1152, "bfloat16", 4096, 8194)    # src 2 bytes off 16
    assert not built_ext.vectorized(37, torch.float32, 4096, 8192)   # 148-byte rows
    assert built_ext.vectorized(4, 0, 4096, 8192, 0)                 # one float4 per row
    with pytest.raises(ValueError, match="dtype"):
        built_ext.vectorized(8, "float64")


def test_import_needs_no_extension():
    # A fresh interpreter: importing the package leaves _C alone; with _C unimportable the
    # package still imports, reports it, and backend="cuda" explains how to build it.
    code = (
        "import sys\n"
        "import switch_dit_kernels as s\n"
        "assert 'switch_dit_kernels._C' not in sys.modules\n"
        "sys.modules['switch_dit_kernels._C'] = None\n"
        "assert s.cuda_extension_available() is False\n"
        "import torch\n"
        "x = torch.randn(4, 8); w = torch.randn(3, 8, 8)\n"
        "g = torch.ones(4, 1); ids = torch.zeros(4, 1, dtype=torch.long)\n"
        "try:\n"
        "    s.expert_linear(x, w, None, g, ids, backend='cuda')\n"
        "except RuntimeError as e:\n"
        "    assert 'not built' in str(e) and 'SWITCH_DIT_BUILD_CUDA' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cuda_backend_without_extension_raises(monkeypatch):
    monkeypatch.setattr(_cuda, "load_extension", lambda: None)
    x, w1, w2 = torch.randn(6, 8), torch.randn(3, 8, 16), torch.randn(3, 16, 8)
    g, ids = torch.rand(6, 2), torch.randint(0, 3, (6, 2))
    with pytest.raises(RuntimeError, match="not built.*pip install"):
        expert_linear(x, w1, None, g, ids, backend="cuda")
    with pytest.raises(RuntimeError, match="not built"):
        expert_mlp(x, w1, None, w2, None, g, ids, backend="cuda")
    meta = build_routing_metadata(ids, 3)
    with pytest.raises(RuntimeError, match="not built"):
        permute_ops.permute_tokens(x, meta, impl="csrc")
    # "auto" falls back to torch without the extension
    assert torch.equal(permute_ops.permute_tokens(x, meta), x[meta.sorted_row_sources()])


def test_grouped_mm_backend_on_cpu_raises():
    x, w = torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(3, 8, 8, dtype=torch.bfloat16)
    g, ids = torch.rand(6, 2), torch.randint(0, 3, (6, 2))
    with pytest.raises(RuntimeError, match="grouped_mm.*CUDA"):
        expert_linear(x, w, None, g, ids, backend="grouped_mm")


def test_cuda_backend_rejects_float64(use_ext):
    x, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(3, 8, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        expert_linear(x, w, None, torch.rand(6, 2), torch.randint(0, 3, (6, 2)), backend="cuda")


# ----------------------------------------------------------------------------------------------
# The raw kernels against torch, run on the host (CPU) or the GPU
# ----------------------------------------------------------------------------------------------

# (R, k, N, E, D, dtype, index dtype): the edge each case covers.
KERNEL_CASES = [
    (7, 2, 1, 5, 1152, torch.bfloat16, torch.int32),  # the benchmark's row: 144 packs, 2 strides/lane
    (5, 3, 4, 3, 40, torch.float16, torch.int64),     # k = E, N > 1, int64, 5 packs: groups of 8
    (6, 1, 3, 7, 37, torch.float32, torch.int32),     # k = 1, odd D: scalar path, prime E
    (1, 2, 1, 2, 24, torch.float32, torch.int64),     # T = 1, 96-byte rows: 6 float4 packs
    (4, 2, 2, 5, 8, torch.bfloat16, torch.int32),     # one 16-byte pack per row (a group of 1)
    (9, 2, 1, 4, 13, torch.float16, torch.int64),     # 26-byte rows: scalar half path
]


def _routing(num_routes, k, num_experts, device):
    """Random top-k ids [R, k], distinct within a row as route_topk gives them."""
    return torch.stack([torch.randperm(num_experts)[:k] for _ in range(num_routes)]).to(device)


def _args(meta, dim, dtype, index, device):
    return dict(num_routes=meta.num_routes, k=meta.k, tokens_per_route=meta.tokens_per_route,
                dim=dim, dtype=str(dtype), index_dtype=str(index.dtype),
                stream=torch.cuda.current_stream().cuda_stream if device == "cuda" else 0,
                on_host=device == "cpu")


def _check_kernels(ext, num_routes, k, n, num_experts, dim, dtype, index_dtype, device):
    ids = _routing(num_routes, k, num_experts, device)
    meta = build_routing_metadata(ids, num_experts, tokens_per_route=n)
    p2s = meta.pair_to_sorted.to(index_dtype)
    args = _args(meta, dim, dtype, p2s, device)
    x = torch.randn(num_routes * n, dim, device=device).to(dtype)
    sources = meta.sorted_row_sources()

    # permute: an exact copy of the source rows; NaN poison shows any unwritten row.
    out = torch.full((meta.num_sorted_rows, dim), NAN, device=device, dtype=dtype)
    ext.permute(out.data_ptr(), x.data_ptr(), p2s.data_ptr(), **args)
    assert torch.equal(out, x[sources])

    # permute_backward: dx = sum of the k copies' gradients, fp32 accumulation in slot order.
    dout = torch.randn_like(out)
    dx = torch.full_like(x, NAN)
    ext.permute_backward(dx.data_ptr(), dout.data_ptr(), p2s.data_ptr(), **args)
    rows = meta.pair_to_sorted.long().view(num_routes, k, 1) * n + torch.arange(n, device=device)
    per_slot = dout.float()[rows.reshape(-1)].view(num_routes, k, n, dim)
    want = per_slot[:, 0]
    for j in range(1, k):
        want = want + per_slot[:, j]
    assert torch.equal(dx, want.to(dtype).view_as(dx))

    # unpermute: y = sum_j w * h in fp32 (j order), then one rounding to dtype.
    w = torch.rand(num_routes, k, device=device)
    y = torch.full_like(x, NAN)
    ext.unpermute(y.data_ptr(), dout.data_ptr(), p2s.data_ptr(), w.data_ptr(), **args)
    want = w[:, 0, None, None] * per_slot[:, 0]
    for j in range(1, k):
        want = want + w[:, j, None, None] * per_slot[:, j]
    want64 = (w.double()[:, :, None, None] * per_slot.double()).sum(1).view_as(y)
    err = (y.double() - want64).abs().max().item()
    assert not y.isnan().any()
    # fp32 sum then one rounding to dtype: within half an ulp of dtype (+ the fp32 sum's error).
    eps = torch.finfo(dtype).eps
    assert err <= (0.5 * eps + 4 * torch.finfo(torch.float32).eps) * want64.abs().max().item() + 1e-30
    if device == "cpu":  # the host has no FMA contraction: bitwise equal to the same fp32 sum
        assert torch.equal(y, want.to(dtype).view_as(y))

    # unpermute_backward: dh = w * dy into the sorted rows (exact), dweights = <dy, h> per pair.
    dy = torch.randn_like(x)
    h = torch.randn_like(out)
    dh = torch.full_like(out, NAN)
    partial = torch.full((meta.num_sorted_rows,), NAN, device=device)
    ext.unpermute_backward(dh.data_ptr(), partial.data_ptr(), dy.data_ptr(), h.data_ptr(),
                           p2s.data_ptr(), w.data_ptr(), **args)
    pair_of_sorted = meta.sorted_pairs.long()
    w_sorted = w.reshape(-1)[pair_of_sorted].repeat_interleave(n)[:, None]
    assert torch.equal(dh, (w_sorted * dy[sources].float()).to(dtype))
    h_pairs = h.double()[rows.reshape(-1)].view(num_routes, k, n, dim)
    dots64 = (dy.double().view(num_routes, 1, n, dim) * h_pairs).sum(-1)
    scale = (dy.double().view(num_routes, 1, n, dim) * h_pairs).abs().sum(-1)
    err = (partial.double().view(num_routes, k, n) - dots64).abs()
    assert (err <= 1e-5 * scale + 1e-6).all(), err.max().item()

    # Without dweights the same call leaves h alone and writes only dh.
    dh2 = torch.full_like(out, NAN)
    ext.unpermute_backward(dh2.data_ptr(), 0, dy.data_ptr(), 0, p2s.data_ptr(), w.data_ptr(), **args)
    assert torch.equal(dh2, dh)


@pytest.mark.parametrize("num_routes,k,n,num_experts,dim,dtype,index_dtype", KERNEL_CASES)
def test_kernels_on_host(ext, num_routes, k, n, num_experts, dim, dtype, index_dtype):
    _check_kernels(ext, num_routes, k, n, num_experts, dim, dtype, index_dtype, "cpu")


def test_host_scalar_fallback_on_misaligned_rows(ext):
    # The same 16-byte-multiple rows, 4 bytes off alignment: the scalar path must give the same.
    num_routes, k, n, dim = 5, 2, 2, 64
    meta = build_routing_metadata(_routing(num_routes, k, 3, "cpu"), 3, tokens_per_route=n)
    args = _args(meta, dim, torch.float32, meta.pair_to_sorted, "cpu")
    storage = torch.randn(num_routes * n * dim + 1)
    x = storage[1:].view(num_routes * n, dim)
    out = torch.full((meta.num_sorted_rows, dim), NAN)
    assert not ext.vectorized(dim, "float32", out.data_ptr(), x.data_ptr())
    ext.permute(out.data_ptr(), x.data_ptr(), meta.pair_to_sorted.data_ptr(), **args)
    assert torch.equal(out, x[meta.sorted_row_sources()])


def test_kernels_empty_and_bad_arguments(ext):
    # R = 0 moves nothing (null pointers allowed); bad sizes and tags raise ValueError.
    ext.permute(0, 0, 0, num_routes=0, k=2, tokens_per_route=1, dim=8, dtype=0, on_host=True)
    with pytest.raises(ValueError, match="k must be"):
        ext.permute(16, 16, 16, num_routes=1, k=0, tokens_per_route=1, dim=8, dtype=0, on_host=True)
    with pytest.raises(ValueError, match="index_dtype"):
        ext.permute(16, 16, 16, num_routes=1, k=1, tokens_per_route=1, dim=8, dtype=0,
                    index_dtype="int16", on_host=True)
    with pytest.raises(ValueError, match="null"):
        ext.permute(0, 16, 16, num_routes=1, k=1, tokens_per_route=1, dim=8, dtype=0, on_host=True)


# ----------------------------------------------------------------------------------------------
# Autograd and the expert layers through backend "cuda" (CPU tensors: the host path)
# ----------------------------------------------------------------------------------------------

def _assert_close(name, got, want64, want_same, atol):
    """Flash-attention's rule: error vs float64 <= 2x torch's same-dtype error + atol."""
    err = (got.double() - want64).abs().max().item()
    base = (want_same.double() - want64).abs().max().item()
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x {base:.3g} + {atol}"


def _run(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None and t.is_floating_point()
              else t for t in inputs]
    y = fn(*leaves)
    diff = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, diff, grad_out.to(y.dtype))
    return [y.detach()] + list(grads)


def _compare(fn_fast, fn_ref, inputs, grad_out, atol, names):
    got = _run(fn_fast, inputs, grad_out)
    want64 = _run(fn_ref, [t.double() if t is not None and t.is_floating_point() else t
                           for t in inputs], grad_out.double())
    same = _run(fn_ref, inputs, grad_out)
    assert len(got) == len(names)
    for name, g, w64, s in zip(names, got, want64, same):
        assert g.dtype == s.dtype and g.shape == s.shape, name
        _assert_close(name, g, w64, s, atol)


# (R, k, N, E): the edge each case covers (routing for the layer tests).
LAYER_CASES = [
    (37, 2, 1, 5),   # token routing, odd T, prime E
    (3, 3, 4, 3),    # k = E, four tokens per route (Switch-DiT-style units)
    (1, 1, 1, 2),    # T = 1, k = 1: an expert with no rows
    (6, 1, 2, 4),    # every unit on expert 2 (set below): three empty experts
]


def _layer_routing(num_routes, k, num_experts, device="cpu"):
    ids = _routing(num_routes, k, num_experts, device)
    if (num_routes, k, num_experts) == (6, 1, 4):
        ids = torch.full_like(ids, 2)
    return torch.rand(num_routes, k, device=device), ids


@pytest.mark.parametrize("num_routes,k,n,num_experts", LAYER_CASES)
def test_permutation_autograd_on_host(use_ext, num_routes, k, n, num_experts):
    g, ids = _layer_routing(num_routes, k, num_experts)
    meta = build_routing_metadata(ids, num_experts, tokens_per_route=n)
    x = torch.randn(num_routes * n, 24)

    def roundtrip(impl):
        def fn(x, g):
            xs = permute_ops.permute_tokens(x, meta, impl=impl)
            return permute_ops.unpermute_tokens(xs * xs, meta, g, impl=impl)
        return fn
    _compare(roundtrip("csrc"), roundtrip("torch"), [x, g], torch.randn(x.shape), 1e-5,
             ["y", "dx", "dweights"])
    # Weights without a gradient: h is not kept for dweights, dx still flows.
    xr = x.clone().requires_grad_(True)
    y = permute_ops.unpermute_tokens(permute_ops.permute_tokens(xr, meta, impl="csrc"), meta, g,
                                     impl="csrc")
    (dx,) = torch.autograd.grad(y.sum(), xr)
    torch.testing.assert_close(dx, g.sum(1).repeat_interleave(n)[:, None].expand_as(x))


@pytest.mark.parametrize("num_routes,k,n,num_experts", LAYER_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_expert_linear_cuda_backend_on_host(use_ext, num_routes, k, n, num_experts, with_bias):
    g, ids = _layer_routing(num_routes, k, num_experts)
    x, w = torch.randn(num_routes * n, 24), torch.randn(num_experts, 24, 40) / 5
    b = torch.randn(num_experts, 40) if with_bias else None

    def fast(x, w, b, g):
        return expert_linear(x, w, b, g, ids, tokens_per_route=n, backend="cuda")

    def slow(x, w, b, g):
        return ref.expert_linear(x, w, b, g, ids, tokens_per_route=n)
    names = ["y", "dx", "dw"] + (["db"] if with_bias else []) + ["dweights"]
    _compare(fast, slow, [x, w, b, g], torch.randn(num_routes * n, 40), 1e-5, names)


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("num_routes,k,n,num_experts", LAYER_CASES[:2])
def test_expert_mlp_cuda_backend_on_host(use_ext, activation, num_routes, k, n, num_experts):
    g, ids = _layer_routing(num_routes, k, num_experts)
    hidden = 32 * (2 if activation == "swiglu" else 1)
    x = torch.randn(num_routes * n, 24)
    w1, b1 = torch.randn(num_experts, 24, hidden) / 5, torch.randn(num_experts, hidden)
    w2, b2 = torch.randn(num_experts, 32, 16) / 6, torch.randn(num_experts, 16)

    def fast(x, w1, b1, w2, b2, g):
        return expert_mlp(x, w1, b1, w2, b2, g, ids, activation=activation, tokens_per_route=n,
                          backend="cuda")

    def slow(x, w1, b1, w2, b2, g):
        return ref.expert_mlp(x, w1, b1, w2, b2, g, ids, activation=activation, tokens_per_route=n)
    _compare(fast, slow, [x, w1, b1, w2, b2, g], torch.randn(num_routes * n, 16), 1e-5,
             ["y", "dx", "dw1", "db1", "dw2", "db2", "dweights"])


def test_grouped_mm_path_logic_on_host(use_ext, monkeypatch):
    # torch._grouped_mm runs (slowly) on the CPU in recent torch: check the offsets and layout the
    # grouped_mm backend feeds it, with the availability check lifted.
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    monkeypatch.setattr(permute_ops, "grouped_mm_unavailable", lambda x, dims: None)
    num_routes, k, n, num_experts = 5, 2, 3, 5
    g, ids = _layer_routing(num_routes, k, num_experts)
    x = torch.randn(num_routes * n, 24)
    w1, b1 = torch.randn(num_experts, 24, 32) / 5, torch.randn(num_experts, 32)
    w2, b2 = torch.randn(num_experts, 32, 16) / 6, torch.randn(num_experts, 16)
    try:
        torch._grouped_mm(x[:2], w1[:1], offs=torch.tensor([2], dtype=torch.int32))
    except RuntimeError:
        pytest.skip("this torch's _grouped_mm does not run on the CPU")

    def fast(x, w1, b1, w2, b2, g):
        return expert_mlp(x, w1, b1, w2, b2, g, ids, activation="gelu_tanh", tokens_per_route=n,
                          backend="grouped_mm")

    def slow(x, w1, b1, w2, b2, g):
        return ref.expert_mlp(x, w1, b1, w2, b2, g, ids, activation="gelu_tanh", tokens_per_route=n)
    _compare(fast, slow, [x, w1, b1, w2, b2, g], torch.randn(num_routes * n, 16), 1e-5,
             ["y", "dx", "dw1", "db1", "dw2", "db2", "dweights"])


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("num_routes,k,n,num_experts,dim,dtype,index_dtype", KERNEL_CASES + [
    (4096, 2, 1, 8, 1152, torch.bfloat16, torch.int32),  # many rows: several blocks, grid stride
    (16, 2, 256, 3, 1152, torch.bfloat16, torch.int64),  # Switch-DiT: 256 tokens per sample
])
def test_kernels_on_gpu(ext, num_routes, k, n, num_experts, dim, dtype, index_dtype):
    _check_kernels(ext, num_routes, k, n, num_experts, dim, dtype, index_dtype, "cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_kernels_deterministic_and_stream_ordered(use_ext):
    num_routes, k, n, dim = 512, 2, 4, 1152
    meta = build_routing_metadata(_routing(num_routes, k, 7, "cuda"), 7, tokens_per_route=n)
    h = torch.randn(meta.num_sorted_rows, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(num_routes, k, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # launches must go to the current (side) stream
        y1 = permute_ops.unpermute_rows(h, meta.pair_to_sorted, w, k, n)
        y2 = permute_ops.unpermute_rows(h, meta.pair_to_sorted, w, k, n)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y1, y2)
    # The GPU fuses w * h + acc into one FMA: within an ulp of torch's separate multiply and add.
    twin = permute_ops.unpermute_rows_torch(h, meta.pair_to_sorted, w, k, n)
    torch.testing.assert_close(y1.float(), twin.float(), rtol=1e-2, atol=1e-6)


def _check_layers(impl, num_routes, k, n, num_experts, device, dtype=torch.bfloat16):
    """expert_linear and a SwiGLU expert_mlp through `impl`, every gradient."""
    bf = dict(device=device, dtype=dtype)
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    x = torch.randn(num_routes * n, 64, **bf)
    g, ids = _layer_routing(num_routes, k, num_experts, device)
    w, b = torch.randn(num_experts, 64, 48, **bf) / 8, torch.randn(num_experts, 48, **bf)
    grad = torch.randn(num_routes * n, 48, device=device)

    def fast_lin(x, w, b, g):
        return expert_linear(x, w, b, g, ids, tokens_per_route=n, backend=impl)

    def ref_lin(x, w, b, g):
        return ref.expert_linear(x, w, b, g, ids, tokens_per_route=n)
    _compare(fast_lin, ref_lin, [x, w, b, g], grad, atol, ["y", "dx", "dw", "db", "dweights"])

    w1, b1 = torch.randn(num_experts, 64, 64, **bf) / 8, torch.randn(num_experts, 64, **bf)
    w2, b2 = torch.randn(num_experts, 32, 48, **bf) / 6, torch.randn(num_experts, 48, **bf)

    def fast_mlp(x, w1, b1, w2, b2, g):
        return expert_mlp(x, w1, b1, w2, b2, g, ids, activation="swiglu", tokens_per_route=n,
                          backend=impl)

    def ref_mlp(x, w1, b1, w2, b2, g):
        return ref.expert_mlp(x, w1, b1, w2, b2, g, ids, activation="swiglu", tokens_per_route=n)
    _compare(fast_mlp, ref_mlp, [x, w1, b1, w2, b2, g], grad, atol,
             ["y", "dx", "dw1", "db1", "dw2", "db2", "dweights"])


GPU_LAYER_CASES = [
    (129, 2, 1, 5),   # token routing, odd T, prime E
    (8, 2, 256, 3),   # Switch-DiT XL-style: 256 tokens per sample, E = 3
    (3, 3, 8, 3),     # k = E
    (6, 1, 2, 4),     # every unit on expert 2: empty experts
]


@pytest.mark.parametrize("num_routes,k,n,num_experts", GPU_LAYER_CASES[:2])
def test_bf16_layers_cuda_backend_on_host(use_ext, num_routes, k, n, num_experts):
    # bfloat16 on the CPU is fine here (no Triton): the bias gradients must round once, as the
    # reference's do, not once per unit.
    _check_layers("cuda", num_routes, k, n, num_experts, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda", "grouped_mm"])
@pytest.mark.parametrize("num_routes,k,n,num_experts", GPU_LAYER_CASES)
def test_expert_layers_on_gpu(use_ext, impl, num_routes, k, n, num_experts):
    x = torch.empty(1, 64, device="cuda", dtype=torch.bfloat16)
    reason = permute_ops.grouped_mm_unavailable(x, (64,))
    if impl == "grouped_mm" and reason is not None:
        pytest.skip(reason)
    _check_layers(impl, num_routes, k, n, num_experts, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("num_routes,k,n,num_experts", GPU_LAYER_CASES[:2])
def test_expert_layers_float32_on_gpu(use_ext, num_routes, k, n, num_experts):
    # float32: backend "cuda" takes the per-expert torch.mm path (one host sync) on the GPU.
    _check_layers("cuda", num_routes, k, n, num_experts, "cuda", torch.float32)
