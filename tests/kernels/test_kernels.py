"""Kernels against their references (reference.py). The reference tests run on CPU; the kernel
tests need CUDA and Triton and skip cleanly without them."""

import pytest
import torch

from slimtorch.kernels import reference as R

CUDA = torch.cuda.is_available()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int4_pack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = R.pack_int4(codes)
    assert packed.shape == (8, 32) and torch.equal(R.unpack_int4(packed), codes)
    assert packed[0, 0] == codes[0, 0] | (codes[0, 1] << 4)  # low nibble = even column


def test_int4_reference_is_the_dequantized_float_linear():
    torch.manual_seed(0)
    w, x = torch.randn(32, 256), torch.randn(5, 256)
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    q = R.unpack_int4(packed).float().reshape(32, 2, 128)
    wd = ((q - zero[..., None]) * scale[..., None]).reshape(32, 256)
    assert torch.allclose(R.int4_weight_only_linear_ref(x, packed, scale, zero), x @ wd.T, atol=1e-5)
    # rounding error is uniform over one step: rms = scale / sqrt(12) (a closed form for the error)
    assert rel(wd, w) == pytest.approx((scale.pow(2).mean() / 12).sqrt().item() / w.pow(2).mean().sqrt().item(),
                                       rel=0.1)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_w8a8_reference_matches_per_row_quantization_by_hand(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(3, 64)
    wq, ws = R.quantize_weight_channels(w, dtype)
    qmax = 127.0 if dtype == torch.int8 else 448.0
    assert torch.allclose(ws, w.abs().amax(1) / qmax)
    xs = x.abs().amax(1, keepdim=True) / qmax
    xq = (x / xs).round().clamp(-127, 127) if dtype == torch.int8 else (x / xs).to(dtype).float()
    assert torch.allclose(R.w8a8_linear_ref(x, wq, ws), (xq * xs) @ (wq.float() * ws[:, None]).T, atol=1e-4)
    assert rel(R.w8a8_linear_ref(x, wq, ws), x @ w.T) < 0.08




@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 100, 1024])
@pytest.mark.parametrize("k,n", [(256, 384), (4096, 11008), (11008, 4096)])
def test_int4_kernel_matches_reference(m, k, n):
    from slimtorch.kernels.int4 import int4_weight_only_linear, prepare_int4

    torch.manual_seed(m)
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    ref = R.int4_weight_only_linear_ref(x.float(), packed, scale, zero)
    kw = prepare_int4(packed, scale, zero)
    paths = ["mm", "dequant"] + (["gemv"] if m == 1 else [])
    for path in paths:
        assert rel(int4_weight_only_linear(x, kw, path=path), ref) < 1e-2, path  # bf16 output / bf16 weights in dots
    assert rel(int4_weight_only_linear(x, kw), ref) < 1e-2
    # the direct (memoised) launch gives the result of the first, JIT-dispatched one (split-K sums
    # are added atomically in any order: equal up to float32 rounding)
    assert rel(int4_weight_only_linear(x, kw), int4_weight_only_linear(x, kw)) < 1e-3


def test_int4_kernel_layout_holds_code_k_of_channel_n_where_the_kernels_read_it():
    from slimtorch.kernels.int4_layout import prepare_int4

    torch.manual_seed(0)
    n, k = 48, 512
    packed, scale, zero = R.quantize_int4_weight(torch.randn(n, k), 128)
    w = prepare_int4(packed, scale, zero)
    assert (w.words.shape, w.a.shape, w.group, w.n, w.k) == ((3, 64, 16), (3, 4, 16), 128, n, k)
    codes = R.unpack_int4(packed).long()
    ch, kk = torch.meshgrid(torch.arange(n), torch.arange(k), indexing="ij")
    # channel n, position k: block n // 16, word k // 8 of that block's row, lane n % 16, nibble k % 8
    word = w.words[ch // 16, kk // 8, ch % 16].long() & 0xFFFFFFFF
    assert torch.equal((word >> (4 * (kk % 8))) & 15, codes)
    g = kk[:, ::128] // 128
    assert torch.equal(w.a[ch[:, ::128] // 16, g, ch[:, ::128] % 16], 16 * scale)
    assert torch.equal(w.b[ch[:, ::128] // 16, g, ch[:, ::128] % 16], scale * zero)


def test_int4_kernels_take_power_of_two_groups_from_128():
    from slimtorch.kernels.int4_layout import supported

    assert supported(4096, 4096, 128) and supported(11008, 4096, 256) and supported(32, 1024, 1024)
    # groups of 64 (a K = 8 tensor-core product), not a power of two, not dividing K, N not in blocks of 16
    assert not any([supported(32, 1024, 64), supported(32, 1152, 384), supported(32, 1152, 256),
                    supported(40, 1024, 128)])


def _emulate_int4_mma(x: torch.Tensor, w) -> torch.Tensor:
    """What the tensor-core kernel computes, lane by lane, with mma.m16n8k16's fragments as PTX's ISA guide
    documents them (lane = 4 g + t; A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
    B: b0 (2t..2t+1, col g), b1 (2t+8.., col g); C: (g or g+8, cols 2t, 2t+1)) and the kernel's bit
    operations on the words: an oracle for the layout that needs no GPU."""
    nbs, units = w.words.shape[:2]
    m = x.shape[0]
    y = torch.zeros(m, nbs * 16, dtype=torch.float64)
    for nb in range(nbs):
        for u in range(units):
            meta = w.meta[nb, u * 128 // w.group]
            s = meta[:, :2].contiguous().view(torch.float32).double()
            zb = meta[:, 2:] & 0xFFFF  # bf16 bits of -(128 + zero)
            zb = torch.where(zb >= 2**15, zb - 2**16, zb).to(torch.int16).view(torch.bfloat16).double()
            for mt in range(-(-m // 8)):
                c = torch.zeros(16, 8, dtype=torch.float64)
                for j in range(8):
                    a, b = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
                    for lane in range(32):
                        g, t = divmod(lane, 4)
                        word = int(w.words[nb, u, t >> 1, j // 4, 2 * g + (t & 1), j % 4]) & 0xFFFFFFFF
                        for reg, (row, col, shift, z) in enumerate([(g, 2 * t, 0, zb[g, 0]), (g + 8, 2 * t, 4, zb[g, 1]),
                                                                    (g, 2 * t + 8, 8, zb[g, 0]),
                                                                    (g + 8, 2 * t + 8, 12, zb[g, 1])]):
                            pair = (word >> shift) & 0x000F000F  # lop3: two codes into bf16 128 + q
                            a[row, col], a[row, col + 1] = 128 + (pair & 15) + z, 128 + (pair >> 16) + z
                        tok, base = min(mt * 8 + g, m - 1), u * 128 + 32 * t + 4 * j
                        b[2 * t:2 * t + 2, g] = x[tok, base:base + 2]
                        b[2 * t + 8:2 * t + 10, g] = x[tok, base + 2:base + 4]
                    c += a @ b
                for tok in range(mt * 8, min(mt * 8 + 8, m)):
                    y[tok, nb * 16:nb * 16 + 8] += s[:, 0] * c[:8, tok - mt * 8]
                    y[tok, nb * 16 + 8:nb * 16 + 16] += s[:, 1] * c[8:, tok - mt * 8]
    return y


@pytest.mark.parametrize("group", [128, 256])
def test_int4_mma_layout_round_trips_and_its_fragments_compute_the_linear(group):
    from slimtorch.kernels.int4_mma import prepare_int4_mma, unpack_int4_mma

    torch.manual_seed(group)
    n, k = 32, 512
    packed, scale, zero = R.quantize_int4_weight(torch.randn(n, k), group)
    w = prepare_int4_mma(packed, scale, zero)
    assert (w.words.shape, w.meta.shape, w.n, w.k, w.group) == ((2, 4, 2, 2, 16, 4), (2, k // group, 8, 4), n, k,
                                                                  group)
    codes, s2, z2 = unpack_int4_mma(w)
    assert torch.equal(codes, R.unpack_int4(packed)) and torch.equal(s2, scale) and torch.equal(z2, zero)
    x = torch.randn(10, k).to(torch.bfloat16).float()  # 10 rows: two tiles of 8, the second partly empty
    ref = R.int4_weight_only_linear_ref(x, packed, scale, zero)  # float32
    assert rel(_emulate_int4_mma(x, w), ref) < 1e-6


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte (sel >> 4 i) & 7 of {b, a}."""
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def test_int4_gemm_gathers_the_wgmma_fragments_from_the_mma_layout():
    """The wgmma kernel's reads, emulated: for half h of a unit, the 512 bytes of a block of 16 channels at
    words[nb, u, h] (as the TMA copies them to shared memory); for lane (g, t) and step jj the 16 bytes at
    (jj % 2) 256 + g 32 + (jj // 2) 16, words t // 2 and t // 2 + 2 of them, one prmt. The nibbles must be the
    codes of wgmma's A fragment: channels g (nibbles 0, 4, 2, 6) and g + 8 (1, 5, 3, 7) at inputs
    16 j + 2 t + (0, 1, 8, 9), j = 4 h + jj."""
    from slimtorch.kernels.int4_mma import prepare_int4_mma

    torch.manual_seed(3)
    n, k = 32, 256
    packed, scale, zero = R.quantize_int4_weight(torch.randn(n, k), 128)
    codes = R.unpack_int4(packed)
    words = prepare_int4_mma(packed, scale, zero).words.reshape(n // 16, k // 128, 2, 128).tolist()
    expected = {0: (0, 0), 4: (0, 1), 2: (0, 8), 6: (0, 9), 1: (8, 0), 5: (8, 1), 3: (8, 8), 7: (8, 9)}
    checked = 0
    for nb in range(n // 16):
        for u in range(k // 128):
            for h in range(2):
                block = [v & 0xFFFFFFFF for v in words[nb][u][h]]  # one stage's 512 bytes as 128 words
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    sel = 0x7351 if t & 1 else 0x6240
                    for jj in range(4):
                        base = ((jj & 1) * 256 + g * 32 + (jj >> 1) * 16) // 4
                        word = _prmt(block[base + (t >> 1)], block[base + (t >> 1) + 2], sel)
                        j = 4 * h + jj
                        for nib, (dr, dk) in expected.items():
                            got = (word >> (4 * nib)) & 15
                            assert got == codes[16 * nb + g + dr, 128 * u + 16 * j + 2 * t + dk], (nb, u, lane, j, nib)
                            checked += 1
    assert checked == n * k


def test_int4_gemm_config_and_its_shared_memory():
    from slimtorch.kernels.int4_gemm import MAX_SMEM, GemmConfig, gemm_config

    assert gemm_config(1) == gemm_config(128) == GemmConfig(128, 8)
    assert gemm_config(129) == gemm_config(8192) == GemmConfig(256, 4)
    # per stage 32 KB of x (256 rows x 64 inputs), 4 KB of words and 1 KB of scales/zeros, 16 B of mbarriers;
    # 64 KB of output tile and 1 KB of alignment: 4 stages fit the 226 KB that int4_gemm allows, 5 do not
    assert GemmConfig(256, 4).smem_bytes == 4 * (32768 + 4096 + 1024 + 16) + 65536 + 1024 == 218176 <= MAX_SMEM
    assert GemmConfig(256, 5).smem_bytes > MAX_SMEM == 226 * 1024


def test_int4_gemm_rejects_bad_configs_with_one_clear_error():
    from slimtorch.kernels.int4_gemm import GemmConfig, int4_gemm
    from slimtorch.kernels.int4_mma import prepare_int4_mma

    wm = prepare_int4_mma(*R.quantize_int4_weight(torch.randn(256, 256), 128))
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at least 3"):
        int4_gemm(x, wm, GemmConfig(256, 2))  # the consumers hold two slots: 2 would leave the producer none
    with pytest.raises(ValueError, match="NT 96"):
        int4_gemm(x, wm, GemmConfig(96, 4))
    with pytest.raises(ValueError, match="bf16 x"):
        int4_gemm(x.float(), wm)


def test_int4_gemm_schedule_cuts_only_a_partial_last_round():
    from slimtorch.kernels.int4_gemm import schedule

    assert schedule(344, 32, 66) == (330, 14, 66)  # 4096 x 11008, M = 2048 (tiles of 2 x 128 channels): 14 left
    assert schedule(432, 40, 66) == (432, 0, 0)  # 5120 x 13824: a 7th round 55% full is left whole
    assert schedule(16, 32, 66) == (0, 16, 66)  # 4096 x 4096, M = 128: fewer tiles than clusters
    assert schedule(43, 32, 66) == (43, 0, 0)  # 4096 x 11008, M = 128: 65% of a round
    assert schedule(16, 4, 132) == (16, 0, 0)  # 4 units per share would leave each block one tile anyway
    assert schedule(3, 8, 132) == (0, 3, 6)  # each share has at least 4 units
    assert schedule(264, 32, 132) == (264, 0, 0)  # whole rounds


@pytest.mark.parametrize("tiles,units,sms", [(344, 32, 66), (16, 32, 66), (3, 8, 132), (29, 37, 12), (5, 9, 4),
                                             (70, 7, 64)])
def test_int4_gemm_pieces_cover_every_unit_once(tiles, units, sms):
    """The blocks' pieces (as the kernel walks them) cover each (tile, unit) exactly once, and when every block
    takes a share of the tail their work is equal within a unit; a part's `parts` is its tile's number of
    pieces, its slot is its own, and the slot the last part computes for each other block of the tile (first
    share piece: 2 b, else 2 b + 1) is that block's."""
    from slimtorch.kernels.int4_gemm import pieces, schedule

    whole, tail, sk = schedule(tiles, units, sms)
    grid = max(min(sms, whole), sk)
    seen = torch.zeros(tiles, units, dtype=torch.int32)
    by_tile: dict[int, list] = {}
    work = []
    for b in range(grid):
        ps = pieces(b, grid, 1, units, whole, tail, sk)
        work.append(sum(p["u1"] - p["u0"] for p in ps))
        for p in ps:
            seen[p["tile"], p["u0"]:p["u1"]] += 1
            if p["tt"] >= 0:
                by_tile.setdefault(p["tt"], []).append((b, p))
    assert bool((seen == 1).all())
    if sk == grid:  # every block takes a share: equal work to within a unit
        assert max(work) - min(work) <= 1
    slots = [p["slot"] for parts in by_tile.values() for _, p in parts]
    assert len(slots) == len(set(slots))
    w = tail * units
    for tt, parts in by_tile.items():
        assert all(p["parts"] == len(parts) for _, p in parts)
        first = (sk * (tt * units + 1) - 1) // w
        assert [b for b, _ in parts] == list(range(first, first + len(parts)))
        for b, p in parts:
            assert p["slot"] == 2 * b + (tt != w * b // sk // units)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("k,n", [(1024, 384), (4096, 11008)])
def test_int4_gemm_matches_reference(k, n):
    from slimtorch.kernels.dispatch import int4_linear
    from slimtorch.kernels.int4_gemm import (
        GemmConfig,
        gemm_supported,
        int4_gemm,
        schedule,
    )
    from slimtorch.kernels.int4_mma import prepare_int4_mma

    assert gemm_supported(torch.device("cuda", torch.cuda.current_device()))
    torch.manual_seed(k)
    w = torch.randn(n, k, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for group in (128, 256):
        packed, scale, zero = R.quantize_int4_weight(w, group)
        wm = prepare_int4_mma(packed, scale, zero)
        for m, nt, stages in ((33, 64, 6), (77, 128, 4), (300, 256, 4), (513, 128, 6), (2048, 256, 3), (700, 192, 6)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.int4_weight_only_linear_ref(x.float(), packed, scale, zero).float()
            split = schedule((n // 128) * -(-m // nt), k // 128, sms)[2] > 0
            for cluster in (None, 1) if n % 256 == 0 else (None,):  # clusters of 2 blocks where N allows
                for _ in range(2):  # a split launch leaves its counters at zero for the next
                    y = int4_gemm(x, wm, GemmConfig(nt, stages), cluster=cluster)
                    assert not y.isnan().any() and rel(y, ref) < 4e-3, (m, nt, stages, split, cluster)  # bf16 weights
        x = torch.randn(3, 100, k, device="cuda", dtype=torch.bfloat16)
        assert rel(int4_linear(x, wm), R.int4_weight_only_linear_ref(x.float(), packed, scale, zero)) < 4e-3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("m", [1024, 4096])  # tiles cut over K (stream-K) at 1024 rows, whole rounds at 4096
def test_int4_gemm_chained_launches_read_their_input_after_it_is_written(m):
    """Each launch (a programmatic dependent launch by default) may start while the one before it on the stream
    ends: in a chain y_i+1 = y_i @ w^T, every link must match the reference on the input it was given."""
    from slimtorch.kernels.int4_gemm import int4_gemm
    from slimtorch.kernels.int4_mma import prepare_int4_mma

    torch.manual_seed(m)
    k = 2048
    packed, scale, zero = R.quantize_int4_weight(torch.randn(k, k, device="cuda") / k**0.5, 128)
    wm = prepare_int4_mma(packed, scale, zero)
    for pdl in (True, False):
        ys = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16)]
        for _ in range(6):  # queued back to back, nothing waits on the host in between
            ys.append(int4_gemm(ys[-1], wm, pdl=pdl))
        for y_in, y_out in zip(ys, ys[1:]):
            ref = R.int4_weight_only_linear_ref(y_in.float(), packed, scale, zero).float()
            assert rel(y_out, ref) < 4e-3, pdl


def test_int4_mma_layout_needs_integer_zeros_and_its_shapes():
    from slimtorch.kernels.int4_mma import layout_supported, prepare_int4_mma

    z = torch.tensor([[0.0, 15.0]])
    assert layout_supported(4096, 4096, 128, z) and layout_supported(32, 1024, 512)
    assert not any([layout_supported(32, 1024, 128, z + 0.5), layout_supported(32, 1024, 128, z + 1),
                    layout_supported(40, 1024, 128), layout_supported(32, 1152, 384), layout_supported(32, 1024, 64)])
    packed, scale, zero = R.quantize_int4_weight(torch.randn(32, 256), 128)
    with pytest.raises(ValueError, match="integer zero-points"):
        prepare_int4_mma(packed, scale, zero + 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(256, 384), (4096, 11008), (11008, 4096)])
def test_int4_mma_kernel_matches_reference(k, n):
    from slimtorch.kernels.dispatch import int4_linear
    from slimtorch.kernels.int4_mma import (
        MAX_M,
        MMAConfig,
        dequantize_int4_mma,
        int4_mma_linear,
        mma_supported,
        prepare_int4_mma,
    )

    if torch.cuda.get_device_capability()[0] >= 8:  # NVRTC compiles it, so QuantLinear dispatches to it
        assert mma_supported(torch.device("cuda", torch.cuda.current_device()))
    torch.manual_seed(k)
    w = torch.randn(n, k, device="cuda")
    for group in (128, 256):
        packed, scale, zero = R.quantize_int4_weight(w, group)
        wm = prepare_int4_mma(packed, scale, zero)
        q = R.unpack_int4(packed).float().reshape(n, -1, group)
        wd = ((q - zero[..., None]) * scale[..., None]).reshape(n, k)
        assert rel(dequantize_int4_mma(wm), wd) < 3e-3  # bf16 rounding of each weight
        hopper = torch.cuda.get_device_capability()[0] >= 9
        for m in (1, 5, 9, 16, 17, MAX_M):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = R.int4_weight_only_linear_ref(x.float(), packed, scale, zero).float()
            y = int4_linear(x, wm)
            assert not y.isnan().any() and rel(y, ref) < 3e-3  # float32 sums, one bf16 rounding of the output
            mt = -(-m // 8) if m <= 16 else 4
            for cfg in (MMAConfig(nb=2, mt=mt, warps=4, pf=0, ks=1, pdl=False),
                        MMAConfig(nb=1, mt=mt, warps=16, pf=1, ks=3 if hopper else 1, pdl=hopper)):
                assert rel(int4_mma_linear(x, wm, cfg), ref) < 3e-3, cfg
        x = torch.randn(2, 50, k, device="cuda", dtype=torch.bfloat16)  # 100 rows: the wgmma GEMM or dequantize
        assert rel(int4_linear(x, wm), x.float() @ wd.T) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("group", [256, 512])
def test_int4_kernels_take_groups_other_than_128(group):
    """The GEMV's groups-per-step must divide K / group (K = 1024, groups of 256: 4 groups), or its
    loop would skip the tail of K."""  # groups of 512: 2 per row, GEMV falls back to the tiled kernel
    from slimtorch.kernels.int4 import int4_weight_only_linear, prepare_int4

    torch.manual_seed(group)
    w = torch.randn(64, 1024, device="cuda")
    packed, scale, zero = R.quantize_int4_weight(w, group)
    kw = prepare_int4(packed, scale, zero)
    for m in (1, 5, 40):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel(int4_weight_only_linear(x, kw), R.int4_weight_only_linear_ref(x.float(), packed, scale, zero)) < 1e-2


@pytest.mark.gpu
def test_int4_dequantize_kernel_matches_the_float_dequantization():
    from slimtorch.kernels.int4 import dequantize_int4, prepare_int4

    w = torch.randn(384, 512, device="cuda")
    packed, scale, zero = R.quantize_int4_weight(w, 128)
    q = R.unpack_int4(packed).float().reshape(384, 4, 128)
    ref = ((q - zero[..., None]) * scale[..., None]).reshape(384, 512)
    # s*(q - z) computed as 16s*(1 + q/16) - (16s + s*z): a few float32 roundings of 16s
    assert torch.allclose(dequantize_int4(prepare_int4(packed, scale, zero), torch.float32).T, ref, rtol=0,
                          atol=1e-6 * scale.max().item() * 16)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["W4A16-g128", "W4A8-int4-only", "W8A8-dynamic", "FP8", "W4A8"])
def test_quantlinear_dispatches_to_the_kernel_on_cuda(preset):
    """The module's CUDA forward (kernel) against its own reference forward (use_kernels off)."""
    from slimtorch.quant.modules import QuantLinear
    from slimtorch.quant.recipe import get_preset
    from slimtorch.spec import PerGroup, QuantSpec

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, device="cuda")
    if preset == "W4A8-int4-only":  # signed int4 groups, weight only
        wspec, act = QuantSpec("int4", PerGroup(128)), None
    else:
        r = get_preset(preset)
        wspec, act = r.weight, r.act
    mod = QuantLinear.from_float(lin, wspec, act)
    assert mod.kernel() is not None
    for m in (1, 16, 300):
        x = torch.randn(3, m, 1024, device="cuda", dtype=torch.bfloat16)
        y = mod(x)
        assert torch.equal(y, mod.kernel()(x) + mod.bias.to(y.dtype))  # the module runs the kernel
        mod.use_kernels = False
        ref = mod(x.float())
        mod.use_kernels = True
        # W4A8 at 3 rows runs weight-only (bf16 activations): it differs from its reference by the
        # activations' int8 rounding error, about 1% here
        assert y.shape == ref.shape and rel(y, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("m", [1, 16, 32, 33, 333, 2048])
def test_w8a8_kernels_match_reference(dtype, m):
    from slimtorch.kernels.w8a8 import fp8_linear, int8_linear

    torch.manual_seed(m)
    k, n = 4096, 1024
    w = torch.randn(n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wq, ws = R.quantize_weight_channels(w, dtype)
    fn = int8_linear if dtype == torch.int8 else fp8_linear
    y = fn(x, wq, ws)
    assert rel(y, R.w8a8_linear_ref(x.float(), wq, ws)) < 1e-2
    x2 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # a second call launches the tuned kernel directly
    assert rel(fn(x2, wq, ws), R.w8a8_linear_ref(x2.float(), wq, ws)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("k, n", [(4, 256), (256, 4), (24, 40)])
def test_w8a8_kernels_take_widths_that_are_not_multiples_of_16(dtype, k, n):
    # before: fp8 at 2,048 rows of a DiT's 2x2x1 patch embedding (K = 4) failed in torch._scaled_mm
    from slimtorch.kernels.w8a8 import fp8_linear, int8_linear

    torch.manual_seed(k)
    wq, ws = R.quantize_weight_channels(torch.randn(n, k, device="cuda"), dtype)
    x = torch.randn(2048, k, device="cuda", dtype=torch.bfloat16)
    fn = int8_linear if dtype == torch.int8 else fp8_linear
    assert rel(fn(x, wq, ws), R.w8a8_linear_ref(x.float(), wq, ws)) < 2e-2


def test_kernel_kind_follows_the_specs():
    from slimtorch.kernels.dispatch import kernel_kind
    from slimtorch.quant.recipe import get_preset

    kinds = {name: kernel_kind(get_preset(name).weight, get_preset(name).act)
             for name in ("W4A16-g128", "W8A8-dynamic", "FP8", "W8A8", "W3A16-g128", "W4A8")}
    # static activation scales and 3-bit have no kernel: they keep the reference path
    assert kinds == {"W4A16-g128": "int4", "W8A8-dynamic": "int8", "FP8": "fp8", "W8A8": None, "W3A16-g128": None,
                     "W4A8": "w4a8"}


def test_quantlinear_on_cpu_has_no_kernel_and_runs_the_reference():
    from slimtorch.quant.modules import QuantLinear
    from slimtorch.quant.recipe import get_preset

    r = get_preset("W4A16-g128")
    lin = torch.nn.Linear(256, 32)
    mod = QuantLinear.from_float(lin, r.weight, r.act)
    x = torch.randn(4, 256)
    assert mod.kernel() is None
    assert torch.allclose(mod(x), x @ mod.weight().T + lin.bias, atol=1e-5)


def test_w4a8_packing_round_trips_and_puts_inputs_j_and_j_plus_64_in_one_byte():
    from slimtorch.kernels.w4a8 import pack_w4a8, unpack_w4a8

    codes = torch.randint(-8, 8, (16, 384), dtype=torch.int8)
    packed = pack_w4a8(codes)
    assert packed.shape == (16, 192) and packed.dtype == torch.int8
    assert torch.equal(unpack_w4a8(packed), codes)
    byte = int(packed[3, 64 + 5]) & 0xFF  # second unit of 128, byte 5: inputs 133 (low) and 197 (high)
    lo, hi = byte & 15, byte >> 4
    assert (lo - 16 if lo > 7 else lo, hi - 16 if hi > 7 else hi) == (int(codes[3, 133]), int(codes[3, 197]))


def test_w4a8_reference_is_int8_rows_times_the_dequantized_weight():
    from slimtorch.kernels.w4a8 import pack_w4a8, w4a8_linear_ref

    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (8, 256), dtype=torch.int8)
    scale = torch.rand(8, 2) + 0.5
    x = torch.randn(3, 256)
    xs = x.abs().amax(1, keepdim=True) / 127
    w = codes.float() * scale.repeat_interleave(128, dim=1)
    want = ((x / xs).round() * xs) @ w.T
    assert torch.allclose(w4a8_linear_ref(x, pack_w4a8(codes), scale), want, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [33, 64, 300, 2048])
@pytest.mark.parametrize("k,n,group", [(4096, 11008, 128), (1024, 768, 256)])
def test_w4a8_kernel_matches_reference(m, k, n, group):
    from slimtorch.kernels.w4a8 import pack_w4a8, w4a8_linear, w4a8_linear_ref

    torch.manual_seed(m)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, k // group, device="cuda") * 0.01 + 0.001
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    packed = pack_w4a8(codes)
    y = w4a8_linear(x, packed, scale)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    assert rel(y, w4a8_linear_ref(x, packed, scale)) < 5e-3  # int32 sums are exact; bf16 output rounding
    x2 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # a second call launches the tuned kernel directly
    assert rel(w4a8_linear(x2, packed, scale), w4a8_linear_ref(x2, packed, scale)) < 5e-3


def test_progressive_scales_are_integer_multiples_of_the_row_scale_and_never_below_the_float_ones():
    from slimtorch.kernels.w4a8 import S2_MAX, progressive_scales

    scale = torch.tensor([[1.0, 0.5, 0.26, 0.001], [3.0, 3.0, 3.0, 3.0]])
    s1, s2 = progressive_scales(scale)
    assert s2.dtype == torch.int8 and int(s2.min()) >= 1 and int(s2.max()) <= S2_MAX
    assert torch.allclose(s1, torch.tensor([1 / 16, 3 / 16]))
    # rounded up to a multiple of s1: 1.0 -> 16, 0.5 -> 8, 0.26 -> 5 (0.3125), 0.001 -> 1 (the floor of 1)
    assert s2.tolist() == [[16, 8, 5, 1], [16, 16, 16, 16]]
    assert bool((s1[:, None] * s2.float() >= scale - 1e-6).all())


def test_progressive_weights_lose_little_against_float_group_scales():
    # rounding each group's scale up to a multiple of max / 16 coarsens the step of small groups only: on
    # Gaussian rows the weight error grows by a few percent (measured 0.9% at this seed), not by a bit's 2x
    from slimtorch.kernels.w4a8 import quantize_progressive

    torch.manual_seed(0)
    w = torch.randn(64, 1024) * 0.02
    codes, s1, s2 = quantize_progressive(w, 128)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    wp = (codes.float().reshape(64, 8, 128) * (s1[:, None] * s2.float())[..., None]).reshape(64, 1024)
    sc = w.reshape(64, 8, 128).abs().amax(-1, keepdim=True) / 7.5
    wf = (torch.round(w.reshape(64, 8, 128) / sc).clamp(-8, 7) * sc).reshape(64, 1024)
    assert rel(wp, w) < 1.05 * rel(wf, w)


@pytest.mark.gpu
@pytest.mark.parametrize("asm", [True, False])
@pytest.mark.parametrize("m", [33, 300, 2048])
@pytest.mark.parametrize("k,n,group", [(4096, 11008, 128), (1024, 768, 256)])
def test_progressive_w4a8_kernel_matches_reference(m, k, n, group, asm):
    from slimtorch.kernels.w4a8 import pack_w4a8, quantize_progressive, w4a8p_linear, w4a8p_linear_ref

    torch.manual_seed(m)
    w = torch.randn(n, k, device="cuda") * 0.02
    codes, s1, s2 = quantize_progressive(w, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    packed = pack_w4a8(codes)
    for _ in range(2):  # the second call runs the autotuner's choice
        y = w4a8p_linear(x, packed, s1, s2, asm=asm)
        assert y.shape == (m, n) and y.dtype == torch.bfloat16
        assert rel(y, w4a8p_linear_ref(x, packed, s1, s2)) < 5e-3  # int32 sums are exact; bf16 output rounding


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_static_activation_ptq_of_a_gpu_model_keeps_its_scales_on_the_gpu():
    # a regression: quantizers made on the CPU froze their scales there and failed under CUDA inputs
    from slimtorch.api import apply_
    from slimtorch.quantize import PTQConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).cuda()
    x = torch.randn(32, 64, device="cuda")
    want = model(x)
    apply_(model, PTQConfig("W8A8", "rtn"), [(x,)])
    scales = [m.scale for m in model.modules() if type(m).__name__ == "ActQuant"]
    assert scales and all(s.is_cuda for s in scales)
    assert rel(model(x), want) < 0.05
