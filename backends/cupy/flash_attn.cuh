// FlashAttention-2 forward and backward for sm_80+ (fp16 / bf16 in, fp32 accumulate).
//
// Compiles under NVRTC (no host headers: fixed-width types are defined below) and under
// nvcc -c / --cubin. Kernels are templates over (head dim, tile sizes, warps, causal, dtype);
// backends/cupy/kernels.py emits the extern "C" entry points that instantiate them, one
// configuration per module.
//
// Tensor-core path: mma.sync.aligned.m16n8k16 (row.col, fp32 accumulate) with fragments loaded by
// ldmatrix; tiles are staged in shared memory by cp.async, K/V (forward, dq) and Q/dO (dk/dv)
// double-buffered so that the next tile's copy overlaps this tile's math.
//
// Contract (see docs/cupy.md): bottom-right causal (query i sees key j iff j <= i + Sk - Sq),
// query head h reads kv head h / group, rows that see no key give zeros and lse = -inf, lse is the
// natural log of the row sum of exp(scale * q.k), float32, contiguous (B, Hq, Sq).
//
// Variants, each a template flag (no cost when off):
// - WINDOW: query i at p = i + Sk - Sq sees key j iff p - win_left <= j <= p + win_right. The
//   bounds are run-time ints (no recompilation per window size), both >= 0: the host passes a
//   side without a bound as a value past the end of the sequence. Key blocks (forward, dQ) and
//   query blocks (dK/dV) outside every row's window are skipped, not masked.
// - SOFTCAP: the logit scale * q.k becomes c * tanh(scale * q.k / c) before masking; the
//   backward multiplies dS by the derivative 1 - tanh^2.
// - SINKS (forward): one logit per query head joins the softmax denominator and carries no value;
//   lse includes it, so a row that sees no key gives zeros and lse = sink. The backward kernels
//   need nothing of their own: P = exp(logit - lse) is already the probability with the sink.

typedef unsigned int fd_u32;
typedef unsigned short fd_u16;
typedef long long fd_i64;

struct __align__(16) fd_v4 {
    fd_u32 x, y, z, w;
};

#define FD_LOG2E 1.4426950408889634f
#define FD_LN2 0.6931471805599453f
#define FD_INF __int_as_float(0x7f800000)

// Shared-memory rows are padded by 8 elements (16 bytes) so that the 8 row addresses of one
// ldmatrix phase fall into 8 distinct 16-byte bank groups for every head dim (a plain XOR swizzle
// would need D/8 to be a power of two >= 8; 96 is not).
#define FD_PAD 8

// ---------------------------------------------------------------------------------------------
// PTX helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ fd_u32 fd_smem_addr(const void* p) {
    fd_u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte asynchronous global->shared copy; src_bytes = 0 fills the 16 bytes with zeros, which is
// how rows past the end of a sequence become zero rows without a branch around the copy.
__device__ __forceinline__ void fd_cp_async16(fd_u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes));
}

__device__ __forceinline__ void fd_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void fd_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void fd_ldsm_x4(fd_u32 addr, fd_u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void fd_ldsm_x4_t(fd_u32 addr, fd_u32 (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a (16x16, row) * b (16x8, col)
template <bool BF16>
__device__ __forceinline__ void fd_mma(float (&c)[4], const fd_u32 (&a)[4], fd_u32 b0, fd_u32 b1) {
    if constexpr (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats -> one register of two 16-bit values, `lo` in the low half (the element with the
// smaller column index in every mma fragment).
template <bool BF16>
__device__ __forceinline__ fd_u32 fd_pack(float lo, float hi) {
    fd_u32 r;
    if constexpr (BF16) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

template <bool BF16>
__device__ __forceinline__ float fd_to_float(fd_u16 x) {
    if constexpr (BF16) {
        return __int_as_float(((fd_u32)x) << 16);
    } else {
        float f;
        asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(x));
        return f;
    }
}

__device__ __forceinline__ float fd_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float fd_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Logit softcap on a raw score s (the logit is x = scale * s): returns c * tanh(x / c) / scale, in
// the raw score's units, so that the softmax code after it is the same with and without the cap;
// `dtanh` gets 1 - tanh^2(x / c). in2 = 2 * log2(e) * scale / c, out = c / scale.
// tanh(y) = 1 - 2r with r = 1 / (exp(2y) + 1), through ex2 and rcp: absolute error about 1e-7
// (tanh.approx.f32's relative 2^-11 would move a saturated logit of c = 50 by 0.02), saturating
// cleanly (exp2 -> inf gives r = 0, tanh = 1; exp2 -> 0 gives r = 1, tanh = -1), and
// 1 - tanh^2 = 4r(1 - r) without cancellation near |tanh| = 1.
__device__ __forceinline__ float fd_softcap(float s, float in2, float out, float& dtanh) {
    const float r = fd_rcp(fd_exp2(s * in2) + 1.f);
    dtanh = 4.f * r * (1.f - r);
    return out * fmaf(-2.f, r, 1.f);
}

// Window test of key `col` for a query at bottom-right position `p` (= row + Sk - Sq).
__device__ __forceinline__ bool fd_outside_window(int col, int p, int win_left, int win_right) {
    return col < p - win_left || col > p + win_right;
}

__device__ __forceinline__ float fd_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float fd_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Tile movement
// ---------------------------------------------------------------------------------------------

// ROWS x D tile of a (seq, D) matrix with row stride `stride` (elements) into padded shared
// memory, asynchronously. Rows at or past `valid` are zero-filled.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void fd_load_tile(fd_u16* s, const fd_u16* g, fd_i64 stride, int row0,
                                             int valid, int tid) {
    constexpr int LD = D + FD_PAD;
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int TOTAL = ROWS * CPR;
    constexpr int ITERS = (TOTAL + THREADS - 1) / THREADS;
    if constexpr (THREADS % CPR == 0) {
        // Every pass moves the same column chunk THREADS / CPR rows further down: one base
        // address and one row step per thread instead of an address per pass (registers that the
        // forward's accumulators need).
        constexpr int RSTEP = THREADS / CPR;
        const int r0 = tid / CPR, ch = tid - r0 * CPR;
        const fd_u16* src = g + (fd_i64)(row0 + r0) * stride + ch * 8;
        const fd_i64 step = (fd_i64)RSTEP * stride;
        fd_u32 dst = fd_smem_addr(s + r0 * LD + ch * 8);
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            if (TOTAL % THREADS == 0 || r0 + it * RSTEP < ROWS) {
                const bool ok = row0 + r0 + it * RSTEP < valid;
                fd_cp_async16(dst, ok ? src : g, ok ? 16 : 0);
            }
            src += step;
            dst += RSTEP * LD * 2;
        }
    } else {
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            const int c = it * THREADS + tid;
            if (TOTAL % THREADS == 0 || c < TOTAL) {
                const int r = c / CPR;
                const int ch = c - r * CPR;
                const int grow = row0 + r;
                const bool ok = grow < valid;
                const fd_u16* src = g + (fd_i64)(ok ? grow : 0) * stride + ch * 8;
                fd_cp_async16(fd_smem_addr(s + r * LD + ch * 8), src, ok ? 16 : 0);
            }
        }
    }
}

// A warp's ROWS x D accumulator (already scaled, in registers as mma C fragments) -> shared
// memory rows of this warp -> global memory with 16-byte stores. `s` points at the warp's first
// row; rows at or past `valid` (global index) are not written.
template <int MT, int D, bool BF16>
__device__ __forceinline__ void fd_store_rows(const float (&acc)[MT][D / 8][4], fd_u16* s,
                                              fd_u16* g, fd_i64 stride, int row0, int valid,
                                              int lane) {
    constexpr int LD = D + FD_PAD;
    const int gr = lane >> 2, tc = (lane & 3) * 2;
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            const int col = dt * 8 + tc;
            *reinterpret_cast<fd_u32*>(s + (mt * 16 + gr) * LD + col) =
                fd_pack<BF16>(acc[mt][dt][0], acc[mt][dt][1]);
            *reinterpret_cast<fd_u32*>(s + (mt * 16 + gr + 8) * LD + col) =
                fd_pack<BF16>(acc[mt][dt][2], acc[mt][dt][3]);
        }
    }
    __syncwarp();
    constexpr int CPR = D / 8;
    constexpr int TOTAL = MT * 16 * CPR;
#pragma unroll
    for (int it = 0; it < (TOTAL + 31) / 32; ++it) {
        const int c = it * 32 + lane;
        if (TOTAL % 32 == 0 || c < TOTAL) {
            const int r = c / CPR;
            const int ch = c - r * CPR;
            if (row0 + r < valid) {
                *reinterpret_cast<fd_v4*>(g + (fd_i64)(row0 + r) * stride + ch * 8) =
                    *reinterpret_cast<const fd_v4*>(s + r * LD + ch * 8);
            }
        }
    }
}

// Zero rows [row0, min(row0 + ROWS, valid)) of a (seq, D) matrix (blocks whose rows see no key).
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void fd_zero_rows(fd_u16* g, fd_i64 stride, int row0, int valid,
                                             int tid) {
    constexpr int CPR = D / 8;
    for (int c = tid; c < ROWS * CPR; c += THREADS) {
        const int r = c / CPR;
        const int ch = c - r * CPR;
        if (row0 + r < valid) {
            fd_v4 z = {0u, 0u, 0u, 0u};
            *reinterpret_cast<fd_v4*>(g + (fd_i64)(row0 + r) * stride + ch * 8) = z;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fragment products shared by the kernels. All operate on one warp's 16*MT rows.
//
// Notation: "A rows" is a (rows, K) tile read as the mma A operand (ldmatrix, no transpose);
// "B rows" a (n, K) tile read as the col-major B operand (ldmatrix, no transpose): C = A * B^T;
// "B cols" a (K, n) tile read through ldmatrix.trans: C = A * B.
// ---------------------------------------------------------------------------------------------

// acc[MT][N/8] += A(16*MT x K, shared, rows a_row0..) * B(N x K, shared)^T
template <int MT, int N, int K, bool BF16>
__device__ __forceinline__ void fd_gemm_abt(float (&acc)[MT][N / 8][4], const fd_u16* sa,
                                            const fd_u16* sb, int lane) {
    constexpr int LD = K + FD_PAD;
    // ldmatrix lane -> row address: A: rows lane%16, column half lane/16;
    // B (two n-tiles of 8 at once): row (lane%8) + 8*(lane/16), column half (lane/8)%2.
    const int a_r = lane & 15, a_c = (lane >> 4) * 8;
    const int b_r = (lane & 7) + ((lane >> 4) << 3), b_c = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kc = 0; kc < K / 16; ++kc) {
        fd_u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            fd_ldsm_x4(fd_smem_addr(sa + (mt * 16 + a_r) * LD + kc * 16 + a_c), a[mt]);
#pragma unroll
        for (int n2 = 0; n2 < N / 16; ++n2) {
            fd_u32 b[4];
            fd_ldsm_x4(fd_smem_addr(sb + (n2 * 16 + b_r) * LD + kc * 16 + b_c), b);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                fd_mma<BF16>(acc[mt][2 * n2], a[mt], b[0], b[1]);
                fd_mma<BF16>(acc[mt][2 * n2 + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// acc[MT][N/8] += P(16*MT x K, registers as C fragments of K/8 n-tiles) * B(K x N, shared rows)
template <int MT, int K, int N, bool BF16>
__device__ __forceinline__ void fd_gemm_pb(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                           const fd_u16* sb, int lane) {
    constexpr int LD = N + FD_PAD;
    const int b_r = lane & 15, b_c = (lane >> 4) * 8;
#pragma unroll
    for (int kc = 0; kc < K / 16; ++kc) {
        // C fragments of n-tiles 2kc and 2kc+1 are exactly the A fragment of k-chunk kc.
        fd_u32 a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = fd_pack<BF16>(p[mt][2 * kc][0], p[mt][2 * kc][1]);
            a[mt][1] = fd_pack<BF16>(p[mt][2 * kc][2], p[mt][2 * kc][3]);
            a[mt][2] = fd_pack<BF16>(p[mt][2 * kc + 1][0], p[mt][2 * kc + 1][1]);
            a[mt][3] = fd_pack<BF16>(p[mt][2 * kc + 1][2], p[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int n2 = 0; n2 < N / 16; ++n2) {
            fd_u32 b[4];
            fd_ldsm_x4_t(fd_smem_addr(sb + (kc * 16 + b_r) * LD + n2 * 16 + b_c), b);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                fd_mma<BF16>(acc[mt][2 * n2], a[mt], b[0], b[1]);
                fd_mma<BF16>(acc[mt][2 * n2 + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

template <int MT, int N>
__device__ __forceinline__ void fd_zero(float (&acc)[MT][N][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
}

// ---------------------------------------------------------------------------------------------
// Forward: grid (ceil(Sq / BM), Hq, B), WARPS * 32 threads, each warp owns BM / WARPS query rows.
// Shared memory: Q [BM][D+8], then K and V [2 stages][BN][D+8] each.
// ---------------------------------------------------------------------------------------------

template <int D, int BM, int BN, int WARPS, bool CAUSAL, bool BF16, bool WINDOW = false,
          bool SOFTCAP = false, bool SINKS = false>
__device__ __forceinline__ void fd_attn_fwd(
    fd_u16* smem, const fd_u16* __restrict__ Q, const fd_u16* __restrict__ K,
    const fd_u16* __restrict__ V, fd_u16* __restrict__ O, float* __restrict__ LSE, fd_i64 q_sb,
    fd_i64 q_sh, fd_i64 q_ss, fd_i64 k_sb, fd_i64 k_sh, fd_i64 k_ss, fd_i64 v_sb, fd_i64 v_sh,
    fd_i64 v_ss, fd_i64 o_sb, fd_i64 o_sh, fd_i64 o_ss, int Sq, int Sk, int Hq, int group,
    float scale, int win_left, int win_right, float softcap, const float* __restrict__ sinks) {
    constexpr int THREADS = WARPS * 32;
    constexpr int MT = BM / (16 * WARPS);
    constexpr int LD = D + FD_PAD;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    static_assert(MT >= 1 && BM % (16 * WARPS) == 0, "BLOCK_M must be a multiple of 16 * WARPS");
    static_assert(BN % 16 == 0 && D % 16 == 0, "BLOCK_N and D must be multiples of 16");

    fd_u16* sQ = smem;
    fd_u16* sK = sQ + BM * LD;
    fd_u16* sV = sK + 2 * BN * LD;

    // Heaviest query blocks (causal: the last ones) first, so the tail of the grid is light.
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = m_block * BM;
    const int off = Sk - Sq;
    const float scale_log2 = scale * FD_LOG2E;

    const fd_u16* Qp = Q + b * q_sb + h * q_sh;
    const fd_u16* Kp = K + b * k_sb + hk * k_sh;
    const fd_u16* Vp = V + b * v_sb + hk * v_sh;
    fd_u16* Op = O + b * o_sb + h * o_sh;
    float* Lp = LSE + ((fd_i64)b * Hq + h) * Sq;

    int n_end = (Sk + BN - 1) / BN;
    if (CAUSAL) {
        const int last_key = min(q0 + BM, Sq) - 1 + off;  // the last key the block's last row sees
        n_end = last_key < 0 ? 0 : min(n_end, last_key / BN + 1);
    }
    int n_begin = 0;
    if (WINDOW) {  // keys [first row's p - left, last row's p + right]: blocks outside are skipped
        const int last_key = min(q0 + BM, Sq) - 1 + off + win_right;
        n_end = last_key < 0 ? 0 : min(n_end, last_key / BN + 1);
        const int first_key = q0 + off - win_left;
        n_begin = first_key <= 0 ? 0 : first_key / BN;
    }
    const float sink = SINKS ? sinks[h] : 0.f;
    // (WINDOW only: `n_end <= 0` in place of `n_end == 0` changes how the plain kernels' loop is
    // analysed, and with it the register allocation of configs at the 255-register limit)
    if (WINDOW ? n_end <= n_begin : n_end == 0) {  // no row of this block sees a key
        fd_zero_rows<BM, D, THREADS>(Op, o_ss, q0, Sq, tid);
        for (int r = tid; r < BM; r += THREADS)
            if (q0 + r < Sq) Lp[q0 + r] = SINKS ? sink : -FD_INF;
        return;
    }
    const float cap_in2 = SOFTCAP ? 2.f * FD_LOG2E * scale / softcap : 0.f;
    const float cap_out = SOFTCAP ? softcap / scale : 0.f;

    fd_load_tile<BM, D, THREADS>(sQ, Qp, q_ss, q0, Sq, tid);
    fd_load_tile<BN, D, THREADS>(sK, Kp, k_ss, n_begin * BN, Sk, tid);
    fd_load_tile<BN, D, THREADS>(sV, Vp, v_ss, n_begin * BN, Sk, tid);
    fd_cp_async_commit();

    float o[MT][DT][4];
    fd_zero(o);
    float m_i[MT][2], l_i[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_i[mt][0] = m_i[mt][1] = -FD_INF;
        l_i[mt][0] = l_i[mt][1] = 0.f;
    }
    const fd_u16* sQw = sQ + warp * (MT * 16) * LD;
    const int row_base = q0 + warp * MT * 16 + (lane >> 2);

    for (int j = n_begin; j < n_end; ++j) {
        const int st = (j - n_begin) & 1;
        if (j + 1 < n_end) {
            fd_load_tile<BN, D, THREADS>(sK + (st ^ 1) * BN * LD, Kp, k_ss, (j + 1) * BN, Sk, tid);
            fd_load_tile<BN, D, THREADS>(sV + (st ^ 1) * BN * LD, Vp, v_ss, (j + 1) * BN, Sk, tid);
            fd_cp_async_commit();
            fd_cp_async_wait<1>();
        } else {
            fd_cp_async_wait<0>();
        }
        __syncthreads();

        // -- S = Q K^T
        float s[MT][NT][4];
        fd_zero(s);
        fd_gemm_abt<MT, BN, D, BF16>(s, sQw, sK + st * BN * LD, lane);

        // -- softcap, in raw-score units (before masking)
        if constexpr (SOFTCAP) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float unused;
                        s[mt][nt][e] = fd_softcap(s[mt][nt][e], cap_in2, cap_out, unused);
                    }
        }

        // -- mask: keys past Sk, keys right of the causal diagonal, keys outside the window
        const int k0 = j * BN;
        if (k0 + BN > Sk || (CAUSAL && k0 + BN - 1 > q0 + off) ||
            (WINDOW && (k0 < q0 + BM - 1 + off - win_left || k0 + BN - 1 > q0 + off + win_right))) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = row_base + mt * 16 + (e >> 1) * 8;
                        const int col = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                        if (col >= Sk || (CAUSAL && col > row + off) ||
                            (WINDOW && fd_outside_window(col, row + off, win_left, win_right)))
                            s[mt][nt][e] = -FD_INF;
                    }
        }

        // -- online softmax (base 2); a row that has seen only masked keys keeps m = -inf and
        // subtracts 0 instead, so exp2 gives 0 rather than NaN. Its O and l are still 0, so its
        // rescale factor is exactly 0: exp2(0 - m_new) would overflow to +inf once the first max
        // it sees is a large negative logit (m_new < -128), and 0 * inf is NaN.
        float alpha[MT][2];
        bool grew = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                float mx = -FD_INF;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
                mx = fd_quad_max(mx);
                // The running max m_i is kept in scaled units, RN(max score * scale * log2 e) (scale > 0:
                // rounding is monotone, so the max of the rounded values is the rounded max), and alpha
                // is exp2 of a difference of two stored values: exactly 1 where the max did not move.
                // Kept in raw units and scaled again each block (m_i * scale_log2 - m_new), the compiler
                // fused that into an FMA whose product was unrounded: alpha differed from 1 by up to half
                // a unit of the scaled max (5e-4 at logits of 1e4) on rows whose max did not move; l took
                // that alpha every block while O, rescaled only when a row of the warp grew, did not, so
                // O / l drifted by it per block (on an H100, O 3.5x further from exact than the Triton
                // kernel's at x100 inputs, 11% of elements off the correctly rounded value with an
                // outlier channel).
                const float m_run = fmaxf(m_i[mt][hr], __fmul_rn(mx, scale_log2));
                const float m_new = (m_run == -FD_INF) ? 0.f : m_run;
                alpha[mt][hr] = (m_i[mt][hr] == -FD_INF) ? 0.f : fd_exp2(m_i[mt][hr] - m_new);
                grew |= m_run != m_i[mt][hr];
                m_i[mt][hr] = m_run;
                float rs = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    // fp16: the score is scaled with its own rounding, so that the row's largest score
                    // gets exactly p = 1; one FMA (unrounded product, rounded m) would leave it
                    // exp2(residual) in l (docs/design.md, "fp16 softmax keeps the row max in score
                    // units"). bf16: one FMA.
                    const float p0 = BF16 ? fd_exp2(fmaf(s[mt][nt][2 * hr], scale_log2, -m_new))
                                          : fd_exp2(__fmul_rn(s[mt][nt][2 * hr], scale_log2) - m_new);
                    const float p1 = BF16 ? fd_exp2(fmaf(s[mt][nt][2 * hr + 1], scale_log2, -m_new))
                                          : fd_exp2(__fmul_rn(s[mt][nt][2 * hr + 1], scale_log2) - m_new);
                    s[mt][nt][2 * hr] = p0;
                    s[mt][nt][2 * hr + 1] = p1;
                    rs += p0 + p1;
                }
                // l stays a per-thread partial sum (one quad shares alpha); reduced at the end.
                l_i[mt][hr] = l_i[mt][hr] * alpha[mt][hr] + rs;
            }
        }
        // Rescaling O costs MT * D / 2 multiplies per thread per key block; once the row maxima
        // settle (most blocks of a long sequence) no row of the warp moved and alpha is exactly 1.
        if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    o[mt][dt][0] *= alpha[mt][0];
                    o[mt][dt][1] *= alpha[mt][0];
                    o[mt][dt][2] *= alpha[mt][1];
                    o[mt][dt][3] *= alpha[mt][1];
                }
        }

        // -- O += P V
        fd_gemm_pb<MT, BN, D, BF16>(o, s, sV + st * BN * LD, lane);
        __syncthreads();  // stage st is refilled by the next iteration's prefetch
    }

    // -- epilogue: O / l, lse = m * ln(2) + ln(l) (m in scaled log2 units)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float l = fd_quad_sum(l_i[mt][hr]);
            float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = row_base + mt * 16 + hr * 8;
            if constexpr (SINKS) {
                // lse' = logaddexp(lse, sink) and O shrinks by exp(lse - lse'); a row that saw no
                // key keeps O = 0 and gets lse' = sink
                float lse = sink;
                if (l > 0.f) {
                    const float lse_k = m_i[mt][hr] * FD_LN2 + logf(l);
                    lse = fmaxf(lse_k, sink) + log1pf(expf(-fabsf(lse_k - sink)));
                    inv *= expf(lse_k - lse);
                }
                if ((lane & 3) == 0 && row < Sq) Lp[row] = lse;
            } else {
                if ((lane & 3) == 0 && row < Sq)
                    Lp[row] = l > 0.f ? m_i[mt][hr] * FD_LN2 + logf(l) : -FD_INF;
            }
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[mt][dt][2 * hr] *= inv;
                o[mt][dt][2 * hr + 1] *= inv;
            }
        }
    }
    // Each warp reuses its own Q rows as the staging buffer: no other warp reads them.
    fd_store_rows<MT, D, BF16>(o, sQ + warp * MT * 16 * LD, Op, o_ss, q0 + warp * MT * 16, Sq,
                               lane);
}

// ---------------------------------------------------------------------------------------------
// Backward preprocessing: delta = rowsum(dO * O) and lse2 = lse * log2(e) (+inf for rows that saw
// no key, so that exp2(s * scale * log2e - lse2) is 0 for them). One thread group of D/8 threads
// per row; rows indexed over (B, Hq, Sq). delta and lse2 are contiguous (B, Hq, Sq).
// ---------------------------------------------------------------------------------------------

template <int D, bool BF16>
__device__ __forceinline__ void fd_attn_bwd_prep(const fd_u16* __restrict__ O,
                                                 const fd_u16* __restrict__ dO,
                                                 const float* __restrict__ LSE,
                                                 float* __restrict__ delta, float* __restrict__ lse2,
                                                 fd_i64 o_sb, fd_i64 o_sh, fd_i64 o_ss, fd_i64 do_sb,
                                                 fd_i64 do_sh, fd_i64 do_ss, int Hq, int Sq,
                                                 fd_i64 rows) {
    constexpr int TPR = D / 8;  // threads per row, each one 16-byte chunk
    const fd_i64 row = ((fd_i64)blockIdx.x * blockDim.x + threadIdx.x) / TPR;
    const int ch = threadIdx.x % TPR;
    float acc = 0.f;
    int s = 0, h = 0;
    fd_i64 b = 0;
    if (row < rows) {
        s = (int)(row % Sq);
        const fd_i64 bh = row / Sq;
        h = (int)(bh % Hq);
        b = bh / Hq;
        const fd_v4 ov = *reinterpret_cast<const fd_v4*>(O + b * o_sb + h * o_sh + s * o_ss + ch * 8);
        const fd_v4 gv = *reinterpret_cast<const fd_v4*>(dO + b * do_sb + h * do_sh + s * do_ss + ch * 8);
        const fd_u32 ow[4] = {ov.x, ov.y, ov.z, ov.w};
        const fd_u32 gw[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc += fd_to_float<BF16>((fd_u16)(ow[i] & 0xffffu)) * fd_to_float<BF16>((fd_u16)(gw[i] & 0xffffu));
            acc += fd_to_float<BF16>((fd_u16)(ow[i] >> 16)) * fd_to_float<BF16>((fd_u16)(gw[i] >> 16));
        }
    }
    // TPR is a power of two dividing 32 for D in {32, 64, 128, 256}; D = 96 gives 12, handled by
    // grouping 12 lanes at arbitrary offsets, so reduce through shared memory instead of shuffles.
    __shared__ float red[256];
    red[threadIdx.x] = acc;
    __syncthreads();
    if (ch == 0 && row < rows) {
        float t = 0.f;
#pragma unroll
        for (int i = 0; i < TPR; ++i) t += red[threadIdx.x + i];
        delta[row] = t;
        const float l = LSE[row];
        lse2[row] = (l == -FD_INF) ? FD_INF : l * FD_LOG2E;
    }
}

// ---------------------------------------------------------------------------------------------
// Backward dQ: grid (ceil(Sq / BM), Hq, B); each warp owns BM / WARPS query rows and walks the key
// tiles it can see, recomputing P from lse2: dS = P * (dP - delta), dQ = scale * dS K.
// Shared memory: Q, dO [BM][D+8]; K, V [2 stages][BN][D+8].
// ---------------------------------------------------------------------------------------------

template <int D, int BM, int BN, int WARPS, bool CAUSAL, bool BF16, bool WINDOW = false,
          bool SOFTCAP = false>
__device__ __forceinline__ void fd_attn_bwd_dq(
    fd_u16* smem, const fd_u16* __restrict__ Q, const fd_u16* __restrict__ K,
    const fd_u16* __restrict__ V, const fd_u16* __restrict__ dO, const float* __restrict__ lse2,
    const float* __restrict__ delta, fd_u16* __restrict__ dQ, fd_i64 q_sb, fd_i64 q_sh,
    fd_i64 q_ss, fd_i64 k_sb, fd_i64 k_sh, fd_i64 k_ss, fd_i64 v_sb, fd_i64 v_sh, fd_i64 v_ss,
    fd_i64 do_sb, fd_i64 do_sh, fd_i64 do_ss, fd_i64 dq_sb, fd_i64 dq_sh, fd_i64 dq_ss, int Sq,
    int Sk, int Hq, int group, float scale, int win_left, int win_right, float softcap) {
    constexpr int THREADS = WARPS * 32;
    constexpr int MT = BM / (16 * WARPS);
    constexpr int LD = D + FD_PAD;
    constexpr int NT = BN / 8;
    constexpr int DT = D / 8;
    static_assert(MT >= 1 && BM % (16 * WARPS) == 0, "BLOCK_M must be a multiple of 16 * WARPS");
    static_assert(BN % 16 == 0 && D % 16 == 0, "BLOCK_N and D must be multiples of 16");

    fd_u16* sQ = smem;
    fd_u16* sdO = sQ + BM * LD;
    fd_u16* sK = sdO + BM * LD;
    fd_u16* sV = sK + 2 * BN * LD;

    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / group;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = m_block * BM;
    const int off = Sk - Sq;
    const float scale_log2 = scale * FD_LOG2E;

    const fd_u16* Qp = Q + b * q_sb + h * q_sh;
    const fd_u16* Kp = K + b * k_sb + hk * k_sh;
    const fd_u16* Vp = V + b * v_sb + hk * v_sh;
    const fd_u16* dOp = dO + b * do_sb + h * do_sh;
    fd_u16* dQp = dQ + b * dq_sb + h * dq_sh;
    const fd_i64 rowoff = ((fd_i64)b * Hq + h) * Sq;

    int n_end = (Sk + BN - 1) / BN;
    if (CAUSAL) {
        const int last_key = min(q0 + BM, Sq) - 1 + off;
        n_end = last_key < 0 ? 0 : min(n_end, last_key / BN + 1);
    }
    int n_begin = 0;
    if (WINDOW) {  // as in the forward
        const int last_key = min(q0 + BM, Sq) - 1 + off + win_right;
        n_end = last_key < 0 ? 0 : min(n_end, last_key / BN + 1);
        const int first_key = q0 + off - win_left;
        n_begin = first_key <= 0 ? 0 : first_key / BN;
    }
    if (WINDOW ? n_end <= n_begin : n_end == 0) {  // (see the forward)
        fd_zero_rows<BM, D, THREADS>(dQp, dq_ss, q0, Sq, tid);
        return;
    }
    const float cap_in2 = SOFTCAP ? 2.f * FD_LOG2E * scale / softcap : 0.f;
    const float cap_out = SOFTCAP ? softcap / scale : 0.f;

    fd_load_tile<BM, D, THREADS>(sQ, Qp, q_ss, q0, Sq, tid);
    fd_load_tile<BM, D, THREADS>(sdO, dOp, do_ss, q0, Sq, tid);
    fd_load_tile<BN, D, THREADS>(sK, Kp, k_ss, n_begin * BN, Sk, tid);
    fd_load_tile<BN, D, THREADS>(sV, Vp, v_ss, n_begin * BN, Sk, tid);
    fd_cp_async_commit();

    const int row_base = q0 + warp * MT * 16 + (lane >> 2);
    float rl[MT][2], rd[MT][2];  // lse2 and delta of this thread's rows
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int row = row_base + mt * 16 + hr * 8;
            rl[mt][hr] = row < Sq ? lse2[rowoff + row] : FD_INF;
            rd[mt][hr] = row < Sq ? delta[rowoff + row] : 0.f;
        }

    float dq[MT][DT][4];
    fd_zero(dq);
    const fd_u16* sQw = sQ + warp * MT * 16 * LD;
    const fd_u16* sdOw = sdO + warp * MT * 16 * LD;

    for (int j = n_begin; j < n_end; ++j) {
        const int st = (j - n_begin) & 1;
        if (j + 1 < n_end) {
            fd_load_tile<BN, D, THREADS>(sK + (st ^ 1) * BN * LD, Kp, k_ss, (j + 1) * BN, Sk, tid);
            fd_load_tile<BN, D, THREADS>(sV + (st ^ 1) * BN * LD, Vp, v_ss, (j + 1) * BN, Sk, tid);
            fd_cp_async_commit();
            fd_cp_async_wait<1>();
        } else {
            fd_cp_async_wait<0>();
        }
        __syncthreads();
        const fd_u16* sKs = sK + st * BN * LD;
        const fd_u16* sVs = sV + st * BN * LD;

        // -- S = Q K^T, dP = dO V^T
        float s[MT][NT][4], dp[MT][NT][4];
        fd_zero(s);
        fd_zero(dp);
        fd_gemm_abt<MT, BN, D, BF16>(s, sQw, sKs, lane);
        fd_gemm_abt<MT, BN, D, BF16>(dp, sdOw, sVs, lane);

        // -- P = exp2(S * scale * log2e - lse2), masked; dS = P * (dP - delta)
        // (softcap: S capped first, dS times 1 - tanh^2)
        const int k0 = j * BN;
        const bool need_mask = k0 + BN > Sk || (CAUSAL && k0 + BN - 1 > q0 + off) ||
            (WINDOW && (k0 < q0 + BM - 1 + off - win_left || k0 + BN - 1 > q0 + off + win_right));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int hr = e >> 1;
                    float dtanh = 1.f;
                    if constexpr (SOFTCAP) s[mt][nt][e] = fd_softcap(s[mt][nt][e], cap_in2, cap_out, dtanh);
                    float p = fd_exp2(fmaf(s[mt][nt][e], scale_log2, -rl[mt][hr]));
                    if (need_mask) {
                        const int row = row_base + mt * 16 + hr * 8;
                        const int col = k0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                        if (col >= Sk || (CAUSAL && col > row + off) ||
                            (WINDOW && fd_outside_window(col, row + off, win_left, win_right)))
                            p = 0.f;
                    }
                    if constexpr (SOFTCAP) p *= dtanh;
                    s[mt][nt][e] = p * (dp[mt][nt][e] - rd[mt][hr]);
                }

        // -- dQ += dS K
        fd_gemm_pb<MT, BN, D, BF16>(dq, s, sKs, lane);
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[mt][dt][e] *= scale;
    fd_store_rows<MT, D, BF16>(dq, sQ + warp * MT * 16 * LD, dQp, dq_ss, q0 + warp * MT * 16, Sq,
                               lane);
}

// ---------------------------------------------------------------------------------------------
// Backward dK, dV: grid (ceil(Sk / BN), Hkv, B); each warp owns BN / WARPS key rows and walks,
// for every query head of its GQA group in a fixed order (deterministic sum, no atomics), the
// query tiles that see its keys:
//   P^T = exp2(K Q^T * scale * log2e - lse2), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T * (dP^T - delta), dK += scale * dS^T Q.
// Shared memory: K, V [BN][D+8]; Q, dO [2 stages][BM][D+8]; lse2, delta [2 stages][BM] floats.
// ---------------------------------------------------------------------------------------------

template <int D, int BM, int BN, int WARPS, bool CAUSAL, bool BF16, bool WINDOW = false,
          bool SOFTCAP = false>
__device__ __forceinline__ void fd_attn_bwd_dkdv(
    fd_u16* smem, const fd_u16* __restrict__ Q, const fd_u16* __restrict__ K,
    const fd_u16* __restrict__ V, const fd_u16* __restrict__ dO, const float* __restrict__ lse2,
    const float* __restrict__ delta, fd_u16* __restrict__ dK, fd_u16* __restrict__ dV,
    fd_i64 q_sb, fd_i64 q_sh, fd_i64 q_ss, fd_i64 k_sb, fd_i64 k_sh, fd_i64 k_ss, fd_i64 v_sb,
    fd_i64 v_sh, fd_i64 v_ss, fd_i64 do_sb, fd_i64 do_sh, fd_i64 do_ss, fd_i64 dk_sb,
    fd_i64 dk_sh, fd_i64 dk_ss, fd_i64 dv_sb, fd_i64 dv_sh, fd_i64 dv_ss, int Sq, int Sk, int Hq,
    int group, float scale, int win_left, int win_right, float softcap) {
    constexpr int THREADS = WARPS * 32;
    constexpr int MT = BN / (16 * WARPS);  // key m-tiles per warp
    constexpr int LD = D + FD_PAD;
    constexpr int NT = BM / 8;             // query n-tiles
    constexpr int DT = D / 8;
    static_assert(MT >= 1 && BN % (16 * WARPS) == 0, "BLOCK_N must be a multiple of 16 * WARPS");
    static_assert(BM % 16 == 0 && D % 16 == 0, "BLOCK_M and D must be multiples of 16");

    fd_u16* sK = smem;
    fd_u16* sV = sK + BN * LD;
    fd_u16* sQ = sV + BN * LD;
    fd_u16* sdO = sQ + 2 * BM * LD;
    float* sL = reinterpret_cast<float*>(sdO + 2 * BM * LD);
    float* sD = sL + 2 * BM;

    const int n_block = gridDim.x - 1 - blockIdx.x;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int k0 = n_block * BN;
    const int off = Sk - Sq;
    const float scale_log2 = scale * FD_LOG2E;

    const fd_u16* Kp = K + b * k_sb + hk * k_sh;
    const fd_u16* Vp = V + b * v_sb + hk * v_sh;
    fd_u16* dKp = dK + b * dk_sb + hk * dk_sh;
    fd_u16* dVp = dV + b * dv_sb + hk * dv_sh;

    // Query i sees key k0 (the block's first) iff i >= k0 - off.
    int m_first = CAUSAL ? max(0, k0 - off) / BM : 0;
    int n_m = m_first * BM < Sq ? (Sq + BM - 1) / BM - m_first : 0;
    if (WINDOW) {  // queries [k0 - off - right, last key - off + left]: tiles outside are skipped
        m_first = max(m_first, max(0, k0 - off - win_right) / BM);
        const int last_query = min(k0 + BN, Sk) - 1 - off + win_left;
        const int m_end = last_query < 0 ? 0 : min((Sq + BM - 1) / BM, last_query / BM + 1);
        n_m = m_first < m_end ? m_end - m_first : 0;
    }
    const int total = n_m * group;
    const float cap_in2 = SOFTCAP ? 2.f * FD_LOG2E * scale / softcap : 0.f;
    const float cap_out = SOFTCAP ? softcap / scale : 0.f;
    if (total == 0) {
        fd_zero_rows<BN, D, THREADS>(dKp, dk_ss, k0, Sk, tid);
        fd_zero_rows<BN, D, THREADS>(dVp, dv_ss, k0, Sk, tid);
        return;
    }

    fd_load_tile<BN, D, THREADS>(sK, Kp, k_ss, k0, Sk, tid);
    fd_load_tile<BN, D, THREADS>(sV, Vp, v_ss, k0, Sk, tid);

    // Step t covers query head hk * group + t / n_m, query tile m_first + t % n_m.
    auto issue = [&](int t, int stage) {
        const int h = hk * group + t / n_m;
        const int q0 = (m_first + t % n_m) * BM;
        const fd_u16* Qp = Q + b * q_sb + h * q_sh;
        const fd_u16* dOp = dO + b * do_sb + h * do_sh;
        fd_load_tile<BM, D, THREADS>(sQ + stage * BM * LD, Qp, q_ss, q0, Sq, tid);
        fd_load_tile<BM, D, THREADS>(sdO + stage * BM * LD, dOp, do_ss, q0, Sq, tid);
        const fd_i64 rowoff = ((fd_i64)b * Hq + h) * Sq;
        for (int r = tid; r < BM; r += THREADS) {
            const int row = q0 + r;
            // rows past Sq: lse2 = +inf makes P = 0
            sL[stage * BM + r] = row < Sq ? lse2[rowoff + row] : FD_INF;
            sD[stage * BM + r] = row < Sq ? delta[rowoff + row] : 0.f;
        }
    };
    issue(0, 0);
    fd_cp_async_commit();

    float dk[MT][DT][4], dv[MT][DT][4];
    fd_zero(dk);
    fd_zero(dv);
    const fd_u16* sKw = sK + warp * MT * 16 * LD;
    const fd_u16* sVw = sV + warp * MT * 16 * LD;
    const int key_base = k0 + warp * MT * 16 + (lane >> 2);

    for (int t = 0; t < total; ++t) {
        const int st = t & 1;
        if (t + 1 < total) {
            issue(t + 1, st ^ 1);
            fd_cp_async_commit();
            fd_cp_async_wait<1>();
        } else {
            fd_cp_async_wait<0>();
        }
        __syncthreads();
        const int q0 = (m_first + t % n_m) * BM;
        const fd_u16* sQs = sQ + st * BM * LD;
        const fd_u16* sdOs = sdO + st * BM * LD;
        const float* sLs = sL + st * BM;
        const float* sDs = sD + st * BM;

        // -- S^T = K Q^T (rows: keys, cols: queries)
        float s[MT][NT][4];
        fd_zero(s);
        fd_gemm_abt<MT, BM, D, BF16>(s, sKw, sQs, lane);

        // Softcap: dS^T needs 1 - tanh^2 of each score, so dP^T is computed before P^T and both
        // come out of one pass (dS^T in dp, P^T in s): no third array of registers. Without
        // softcap dP^T waits until dV is done, as it always has.
        float dp[MT][NT][4];
        if constexpr (SOFTCAP) {
            fd_zero(dp);
            fd_gemm_abt<MT, BM, D, BF16>(dp, sVw, sdOs, lane);
        }

        // -- P^T, masked where the query does not see the key (causal, window); rows past Sq
        // have lse2 = +inf
        const bool need_mask = (CAUSAL && k0 + BN - 1 > q0 + off) ||
            (WINDOW && (k0 + BN - 1 > q0 + off + win_right || k0 < q0 + BM - 1 + off - win_left));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qc = nt * 8 + (lane & 3) * 2 + (e & 1);
                    float dtanh = 1.f;
                    if constexpr (SOFTCAP) s[mt][nt][e] = fd_softcap(s[mt][nt][e], cap_in2, cap_out, dtanh);
                    float p = fd_exp2(fmaf(s[mt][nt][e], scale_log2, -sLs[qc]));
                    if (need_mask) {
                        const int key = key_base + mt * 16 + (e >> 1) * 8;
                        if ((CAUSAL && key > q0 + qc + off) ||
                            (WINDOW && fd_outside_window(key, q0 + qc + off, win_left, win_right)))
                            p = 0.f;
                    }
                    s[mt][nt][e] = p;
                    if constexpr (SOFTCAP) dp[mt][nt][e] = p * dtanh * (dp[mt][nt][e] - sDs[qc]);
                }

        // -- dV += P^T dO
        fd_gemm_pb<MT, BM, D, BF16>(dv, s, sdOs, lane);

        if constexpr (SOFTCAP) {
            // -- dK += dS^T Q
            fd_gemm_pb<MT, BM, D, BF16>(dk, dp, sQs, lane);
        } else {
            // -- dP^T = V dO^T; dS^T = P^T * (dP^T - delta)
            fd_zero(dp);
            fd_gemm_abt<MT, BM, D, BF16>(dp, sVw, sdOs, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int qc = nt * 8 + (lane & 3) * 2 + (e & 1);
                        s[mt][nt][e] *= dp[mt][nt][e] - sDs[qc];
                    }

            // -- dK += dS^T Q
            fd_gemm_pb<MT, BM, D, BF16>(dk, s, sQs, lane);
        }
        __syncthreads();
    }

#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[mt][dt][e] *= scale;
    fd_store_rows<MT, D, BF16>(dk, sK + warp * MT * 16 * LD, dKp, dk_ss, k0 + warp * MT * 16, Sk,
                               lane);
    fd_store_rows<MT, D, BF16>(dv, sV + warp * MT * 16 * LD, dVp, dv_ss, k0 + warp * MT * 16, Sk,
                               lane);
}
