"""The C++ CPU kernels (kernels/cpu) against the torch reference, op by op.

Each op runs in two builds: the serving one (AVX2 intrinsics where the CPU has them) and
``-DZS_SCALAR`` (the portable loops every other CPU gets). Shapes cover what the models
produce: strided views of the fused qkv / gate_up outputs, GQA groups of 1 to 7, head dims
that are and are not multiples of 8, blocks shorter than the 8-key tiles, padding slots,
decode batches, chunked prefills after a cached prefix, and contexts long enough to be split
across threads and merged.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zeroserve.kernels import get_kernels
from zeroserve.kernels.base import DenseLinear
from zeroserve.kernels.cpu import build
from zeroserve.kernels.metadata import AttentionMetadata
from zeroserve.kernels.reference import ops as ref
from zeroserve.kernels.reference.backend import ReferenceKernels

if build._compiler() is None:  # a machine without g++ serves with the torch kernels (tested below)
    pytest.skip("no C++ compiler here", allow_module_level=True)
from zeroserve.kernels.cpu import ops as cpu_ops  # noqa: E402  (with a compiler, a failed build fails)
from zeroserve.kernels.cpu.backend import CpuKernels  # noqa: E402


@pytest.fixture(params=["native", "scalar"])
def ops(request, monkeypatch):
    """kernels.cpu.ops bound to one build of the library."""
    if request.param == "scalar":
        lib = build.load(("-DZS_SCALAR",))
        assert lib.zs_vectorized() == 0
        monkeypatch.setattr(cpu_ops, "_lib", lib)
        monkeypatch.setattr(cpu_ops, "_VECTORIZED", False)
    return cpu_ops


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- small ops


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm(ops, rows):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 100, generator=gen)
    x = wide[:, :90]  # a strided view, as the model's slices are
    residual, weight = torch.randn(rows, 90, generator=gen), torch.randn(90, generator=gen)
    _close(ops.rms_norm(x, weight, 1e-6), ref.rms_norm(x, weight, 1e-6))
    got, got_res = ops.rms_norm(x, weight, 1e-6, residual)
    want, want_res = ref.rms_norm(x, weight, 1e-6, residual)
    _close(got, want)
    assert torch.equal(got_res, want_res)  # the new residual is an exact fp32 add


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 16), (6, 2, 10)])
def test_rotary_on_qkv_views(ops, heads, kv_heads, dim):
    from zeroserve.gpu_worker.models.layers import build_cos_sin_cache

    tokens = 13
    gen = torch.Generator().manual_seed(dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    cache = build_cos_sin_cache(dim, 512, 10000.0, None)
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    for got, want in zip(ops.rotary(positions, q, k, cache), ref.rotary(positions, q, k, cache)):
        _close(got, want, 1e-5)
    with pytest.raises(IndexError, match="outside the cos/sin cache"):
        ops.rotary(torch.tensor([0] * 12 + [512]), q, k, cache)


def test_write_kv_skips_padding_and_rejects_bad_slots(ops):
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    slots = torch.tensor([5, -1, 17, 0, 39, -1])
    caches = [torch.zeros(5, 8, 2, 8) for _ in range(4)]
    ops.write_kv(k, v, caches[0], caches[1], slots)
    ref.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0
    with pytest.raises(IndexError, match="past the cache"):
        ops.write_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 4, 40]))


@pytest.mark.parametrize("rows,inter", [(1, 1536), (33, 100), (64, 13)])
def test_silu_and_mul(ops, rows, inter):
    x = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(rows)) * 6  # both tails of silu
    _close(ops.silu_and_mul(x), ref.silu_and_mul(x), 1e-5)


def test_argmax_rows_matches_torch(ops):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 1003, generator=gen)[:, :1001]  # strided rows, a tail after the 8-lane part
    x[1, 17] = x[1, 900] = 50.0  # a tie: the first index wins
    x[2, 5] = float("nan")  # NaN counts as the largest
    x[3, 1000] = float("nan")  # in the tail
    x[4] = float("-inf")
    x[5, :] = 1.0  # all equal
    x[6, 1000] = 99.0  # the max in the tail
    assert torch.equal(ops.argmax_rows(x), x.argmax(dim=-1))
    small = torch.tensor([[1.0, 3.0, 3.0], [float("nan"), 1.0, 2.0]])
    assert torch.equal(ops.argmax_rows(small), small.argmax(dim=-1))


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 64, 97, 200])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (7, 13), (16, 8), (33, 1536)])
def test_packed_linear_matches_f_linear(ops, rows, out_features, in_features):
    """Row blocks of 1-6 and chunks past 96 rows; panels cut short at N % 16; strided x."""
    gen = torch.Generator().manual_seed(rows * out_features)
    wide = torch.randn(rows, in_features + 3, generator=gen)
    x = wide[:, :in_features]  # rows in_features + 3 apart
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    with_bias, without = ops.PackedLinear(weight, bias), ops.PackedLinear(weight, None)
    _close(ops.linear(x, with_bias), torch.nn.functional.linear(x, weight, bias), 2e-4)
    _close(ops.linear(x, without), torch.nn.functional.linear(x, weight), 2e-4)


def test_packed_linear_edges(ops):
    packed = ops.PackedLinear(torch.randn(16, 8), None)
    assert ops.linear(torch.randn(0, 8), packed).shape == (0, 16)
    x64 = torch.randn(3, 8, dtype=torch.float64)  # converted to fp32
    torch.testing.assert_close(ops.linear(x64, packed), ops.linear(x64.float(), packed))
    with pytest.raises(ValueError, match=r"input of shape \(2, 9\)"):
        ops.linear(torch.randn(2, 9), packed)
    with pytest.raises(ValueError, match="fp32"):
        ops.PackedLinear(torch.randn(4, 4, dtype=torch.float64), None)


def test_model_linear_packs_for_the_cpu_kernels():
    from zeroserve.gpu_worker.models.layers import Linear

    layer = Linear(40, 24, CpuKernels(), bias=True)
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    for rows in (1, 64):
        x = torch.randn(rows, 40, generator=gen)
        _close(layer(x), torch.nn.functional.linear(x, weight, bias), 1e-4)
        assert layer.weight is None and isinstance(layer.handle, cpu_ops.PackedLinear)


def test_cpu_backend_leaves_other_dtypes_to_the_torch_backend():
    backend = CpuKernels()
    weight = torch.randn(8, 4, dtype=torch.float64)
    handle = backend.prepare_linear(weight, None)
    assert isinstance(handle, DenseLinear)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert torch.equal(backend.linear(x, handle), torch.nn.functional.linear(x, weight))


def test_other_dtypes_fall_back_to_the_reference(ops):
    x = torch.randn(4, 16, dtype=torch.float64)
    assert ops.silu_and_mul(x).dtype == torch.float64
    torch.testing.assert_close(ops.silu_and_mul(x), ref.silu_and_mul(x))


# --------------------------------------------------------------------------- attention


def _attention_case(query_lens, seq_lens, heads, kv_heads, dim, block_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # blocks scattered over the pool
    tables, at = [], 0
    for n in per_seq:
        tables.append(order[at : at + n])
        at += n
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, [0] * sum(query_lens))
    return q, k_cache, v_cache, meta


ATTENTION_CASES = {
    "decode batch, GQA 3": ([1] * 12, [256, 1, 17, 40, 100, 5, 16, 33, 64, 200, 9, 130], 9, 3, 64, 16),
    "one long decode (split, merged)": ([1], [1500], 8, 2, 128, 16),
    "two decodes (split)": ([1, 1], [700, 300], 4, 1, 64, 16),
    "prefill + chunk after prefix + decodes": ([20, 7, 1, 1], [20, 50, 33, 1], 6, 2, 32, 16),
    "blocks shorter than a key tile": ([3, 1, 1], [11, 19, 4], 7, 1, 16, 5),
    "head dim not a multiple of 8": ([2, 1], [9, 30], 4, 2, 20, 8),
    "MHA, group 1": ([4, 1], [4, 77], 4, 4, 64, 16),
}


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_paged_attention(ops, name, cache_dtype):
    """16-bit caches: both sides read the same stored values, widened to fp32."""
    query_lens, seq_lens, heads, kv_heads, dim, block_size = ATTENTION_CASES[name]
    q, k_cache, v_cache, meta = _attention_case(query_lens, seq_lens, heads, kv_heads, dim, block_size)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    scale = dim**-0.5
    _close(
        ops.paged_attention(q, k_cache, v_cache, meta, scale),
        ref.paged_attention(q, k_cache, v_cache, meta, scale),
    )


def test_half_cache_special_values(ops):
    """fp16 subnormals, the largest finite value, signed zeros: widened exactly (the portable
    build converts in software)."""
    special = torch.tensor([6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 0.0, -0.0, 1.5, -2.25, 1e-3])
    q, k_cache, v_cache, meta = _attention_case([1, 2], [10, 12], 2, 1, 16, 4, seed=9)
    k_cache = (k_cache * 1e-4).to(torch.float16)  # tiny keys: a well-spread softmax
    v_cache = special[
        torch.randint(0, len(special), v_cache.shape, generator=torch.Generator().manual_seed(2))
    ]
    v_cache = v_cache.to(torch.float16)
    _close(
        ops.paged_attention(q, k_cache, v_cache, meta, 1.0),
        ref.paged_attention(q, k_cache, v_cache, meta, 1.0),
        1e-3,
    )


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_write_kv_to_a_half_cache_rounds_like_torch(ops, cache_dtype):
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 48, generator=gen) * 100
    k, v = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    slots = torch.tensor([3, 9, -1, 0, 20])
    caches = [torch.zeros(3, 8, 2, 8, dtype=cache_dtype) for _ in range(4)]
    ops.write_kv(k, v, caches[0], caches[1], slots)
    ref.write_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_write_kv_rounds_edge_values_like_torch(ops, cache_dtype):
    """The kernel's own conversion (F16C in the native build, software in the portable one):
    ties to even, half subnormals and their rounding, overflow to infinity at 65520, signed
    zeros, infinities; bit for bit as torch's .to()."""
    edges = [
        0.0,
        -0.0,
        1.0 + 2**-11,
        1.0 + 3 * 2**-11,
        2**-24,
        2**-25,
        3 * 2**-25,
        2**-14 - 2**-25,
        6e-8,
        -1e-7,
    ]
    edges += [
        65504.0,
        65519.0,
        65520.0,
        -65520.0,
        1e6,
        float("inf"),
        float("-inf"),
        1e-40,
        3.0e38,
        1.00390625,
    ]
    edges += [1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)]
    rows = torch.tensor(edges + [0.5] * (-len(edges) % 8), dtype=torch.float32).view(-1, 1, 8)
    slots = torch.arange(rows.shape[0])
    caches = [torch.zeros(1, rows.shape[0], 1, 8, dtype=cache_dtype) for _ in range(4)]
    ops.write_kv(rows, rows, caches[0], caches[1], slots)
    want = rows.to(cache_dtype).view(1, -1, 1, 8)
    assert torch.equal(caches[0].view(torch.int16), want.view(torch.int16))
    assert torch.equal(caches[1].view(torch.int16), want.view(torch.int16))


def test_embedding_gathers_rows_and_checks_ids(ops):
    table = torch.randn(30, 12)
    ids = torch.tensor([0, 29, 5, 5])
    assert torch.equal(ops.embedding(ids, table), table[ids])
    assert ops.embedding(torch.tensor([], dtype=torch.int64), table).shape == (0, 12)
    for bad in ([30], [-1]):
        with pytest.raises(IndexError):
            ops.embedding(torch.tensor(bad), table)


def test_split_point_does_not_change_the_result(monkeypatch):
    """The merge of split ranges is exact up to rounding, wherever the split falls."""
    q, k_cache, v_cache, meta = _attention_case([1], [1000], 4, 2, 64, 16, seed=3)
    whole = cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.125)
    for split in (16, 100, 999):
        monkeypatch.setattr(cpu_ops, "MIN_SPLIT", split)
        _close(cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.125), whole, 1e-5)


PREFILL_TILE_CASES = {
    "prompts, a chunk after a prefix, decodes": ([200, 37, 64, 1, 1], [200, 37, 300, 50, 9], 9, 3, 64, 16),
    "a long context: the scratch budget tiles 2": ([6], [3800], 16, 2, 128, 16),
    "a longer context: a token at a time": ([4], [4200], 16, 2, 128, 16),
    "blocks of 5, head dim 24 (a half panel)": ([23, 9], [23, 40], 4, 2, 24, 5),
    "MHA, head dim 8, a prompt of 7 (one tile)": ([7, 1], [7, 12], 3, 3, 8, 16),
}


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(PREFILL_TILE_CASES))
def test_prefill_tiles_match_the_reference_and_do_not_depend_on_tiling_or_threads(
    ops, monkeypatch, name, cache_dtype
):
    """A prefill's tokens run in tiles per KV head, as matrix products (masked past each token's
    own context, zero past the sequence): the reference's values, and with the AVX2 build the
    same bits whatever the tile size or the threads (tensor-parallel ranks see the same per-head
    results too; the portable build's loops differ in the last bit between tile sizes); tile 1
    (a token per work item, as decode tokens run) is within rounding of them."""
    query_lens, seq_lens, heads, kv_heads, dim, block_size = PREFILL_TILE_CASES[name]
    q, k_cache, v_cache, meta = _attention_case(
        query_lens, seq_lens, heads, kv_heads, dim, block_size, seed=4
    )
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    want = ref.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
    tiled = ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
    _close(tiled, want)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for tile in (2, 3, 16):
                monkeypatch.setattr(ops, "QUERY_TILE", tile)
                out = ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
                if ops._VECTORIZED:
                    assert torch.equal(out, tiled), (n_threads, tile, (out - tiled).abs().max())
                _close(out, want)
            monkeypatch.setattr(ops, "QUERY_TILE", 1)
            _close(ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5), want)
    finally:
        torch.set_num_threads(threads)


def test_a_prompts_last_token_alone_comes_out_as_in_its_prompt(ops):
    """A prompt cached but for its last token runs that token alone (a full prefix hit): flagged
    as a prompt token it is attended as in the prompt's tile, to the bit (so greedy answers do
    not change with the cache), where a decode token's path rounds differently."""
    query_lens, seq_lens, heads, kv_heads, dim, block_size = [45], [45], 9, 3, 64, 16
    q, k_cache, v_cache, meta = _attention_case(
        query_lens, seq_lens, heads, kv_heads, dim, block_size, seed=6
    )
    k_cache, v_cache = k_cache.to(torch.float16), v_cache.to(torch.float16)
    whole = ops.paged_attention(q, k_cache, v_cache, meta, dim**-0.5)
    table = meta.block_tables[0].tolist()
    last = q[-1:]
    alone = AttentionMetadata.build([1], [45], [table], [0], prompt=[True])
    assert alone.one_token_prompts is not None
    decode = AttentionMetadata.build([1], [45], [table], [0], prompt=[False])
    assert decode.one_token_prompts is None
    as_prompt = ops.paged_attention(last, k_cache, v_cache, alone, dim**-0.5)
    as_decode = ops.paged_attention(last, k_cache, v_cache, decode, dim**-0.5)
    if ops._VECTORIZED:
        assert torch.equal(as_prompt, whole[-1:])
    _close(as_prompt, whole[-1:])
    _close(as_decode, whole[-1:])


def test_extreme_scores_stay_finite():
    """Softmax subtracts the row max: huge logits neither overflow nor underflow to NaN."""
    q, k_cache, v_cache, meta = _attention_case([1, 3], [40, 3], 2, 1, 16, 8, seed=5)
    out = cpu_ops.paged_attention(q * 1e3, k_cache * 10, v_cache, meta, 1.0)
    assert torch.isfinite(out).all()
    _close(out, ref.paged_attention(q * 1e3, k_cache * 10, v_cache, meta, 1.0), 1e-4)


# --------------------------------------------------------------------------- build and selection


def test_cpu_is_the_default_backend_on_cpu():
    assert type(get_kernels(None, "cpu")) is CpuKernels
    assert type(get_kernels("torch", "cpu")) is ReferenceKernels


def test_threads_follow_torch():
    lib = build.load()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lib.zs_max_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert lib.zs_max_threads() == before


def _fresh_python(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_without_a_compiler_the_torch_kernels_serve_with_a_warning(tmp_path):
    """No g++ anywhere (empty PATH, empty cache): get_kernels falls back and says why."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
        "from zeroserve.kernels import get_kernels\n"
        "print(get_kernels(None, 'cpu').name)\n"
    )
    result = _fresh_python(
        code, {"PATH": str(tmp_path), "CXX": "", "ZEROSERVE_CACHE_DIR": str(tmp_path / "cache")}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    assert "no C++ compiler" in result.stderr and "torch kernels" in result.stderr


def test_a_failing_compiler_is_reported(tmp_path):
    fake = tmp_path / "broken-g++"
    fake.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = (
        "from zeroserve.kernels.cpu import build\n"
        "try:\n    build.load()\nexcept build.CpuKernelsUnavailable as exc:\n    print('ERR', exc)\n"
    )
    result = _fresh_python(code, {"CXX": str(fake), "ZEROSERVE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "ERR compiling " in result.stdout and "cpu_ops.cpp" in result.stdout
    assert "failed" in result.stdout and "this compiler is broken" in result.stdout


def test_concurrent_first_builds_all_load(tmp_path):
    """Several processes building into one empty cache at once (workers starting together)."""
    code = (
        "import torch\nfrom zeroserve.kernels.cpu import build\n"
        "lib = build.load(); print(lib.zs_abi_version())\n"
    )
    env = {**os.environ, "ZEROSERVE_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert [out.strip() for out, _ in results] == [str(build.ABI_VERSION)] * 3
    built = list((tmp_path / "cache" / "cpu_kernels").glob("*/*"))
    assert [p.name for p in built] == ["libzeroserve_cpu.so"]  # no temporary files left behind
