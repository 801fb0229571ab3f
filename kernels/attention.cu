// attention.cu: fused scaled dot-product attention, the FlashAttention-2 way, in float32.
//
// The plain layer (tinylm/layers.py) builds the whole T x T score matrix, softmaxes it and
// multiplies by V. That costs O(T^2) memory per head and reads/writes the big matrix several
// times. This file computes the same numbers without ever storing a T x T matrix: scores are
// made tile by tile in registers and shared memory, used, and thrown away. What survives a
// forward pass is O (the output) and one number per query row, the log-sum-exp L of its
// scores, from which the backward pass recomputes any probability it needs.
//
// tinylm/flash.py is this algorithm written in NumPy with the same tiles, the same loop order
// and the same rescaling; read it first, then come back here for how the GPU runs it.
//
// Legend (the same letters as tinylm/layers.py)
//   B batch, H heads, Tq query positions, Tk key positions, D head size.
//   q (B,H,Tq,D), k and v (B,H,Tk,D), out and dout (B,H,Tq,D), lse and delta (B,H,Tq),
//   key_padding_mask (B,Tk) bytes: nonzero = padded key that nobody may attend to, or nullptr.
//   All arrays are contiguous float32 (the Python wrapper tinylm/cuda.py checks this).
//   Causal: query i sits at absolute position i + (Tk - Tq) and sees keys j <= i + (Tk - Tq).
//   (In training Tq == Tk and this is the usual j <= i; with a KV cache Tq < Tk.)
//
// The math, for one (b, h):
//   forward    S = scale * Q K^T        scale = 1/sqrt(D), masked entries are -inf
//              P = softmax(S) row-wise  a row with no allowed key gives P = 0 (so out = 0)
//              O = P V,   L_i = log sum_j exp(S_ij)   (L_i = -inf for a row with no allowed key)
//   backward   P_ij  = exp(S_ij - L_i)          recomputed from the saved L, never stored
//              dV    = P^T dO
//              dP    = dO V^T
//              Delta_i = sum_j P_ij dP_ij = rowsum(dO_i * O_i)       (because O = P V)
//              dS_ij = P_ij (dP_ij - Delta_i)   (softmax backward)
//              dQ    = scale * dS K
//              dK    = scale * dS^T Q
//
// Three kernels, one template parameter D (head size) each:
//   flash_forward_kernel<D>         one block per (b, h, tile of 64 queries)   -> O, L
//   flash_backward_delta_kernel<D>  one thread per query row                   -> Delta
//   flash_backward_kernel<D>        one block per (b, h, tile of 64 keys)      -> dK, dV, and dQ
//                                   added into a zeroed float32 dQ with atomicAdd
//
// Why atomicAdd for dQ. The backward block owns a key tile and walks every query tile that can
// see it, so it produces a partial dQ for each of those query tiles; the partials for one query
// tile come from many blocks. The alternatives are (a) adding them with atomicAdd, or (b) a
// second kernel where each block owns a query tile and recomputes S, P and dP to get dQ. (b)
// is deterministic but does 7 tile matrix products instead of 5 (40% more arithmetic); (a)
// issues one float32 atomic per dQ element per (key tile, query tile) pair: 64*D atomics
// against 5 * 2*64*64*D flops, one atomic per 640 flops, far below what the L2 atomic units
// sustain. FlashAttention-2 makes the same choice. The price: float32 additions arrive in a
// varying order, so dQ can differ in the last bits from run to run (tests use tolerances).
//
// No T x T buffer exists anywhere: global memory is O(B*H*T*D) (q, k, v, out, the gradients)
// plus O(B*H*T) (lse, delta).
//
// ---------------------------------------------------------------------------------------------
// Tiles, threads and shared memory
//
// Both big kernels work on a 64 x 64 tile of scores (64 queries x 64 keys). A block has
// THREADS = (64 / ROWS) * 8 threads arranged as a grid of (64 / ROWS) thread-rows by 8
// thread-columns: tr = threadIdx.x / 8, tc = threadIdx.x % 8. Each thread owns
//   * ROWS rows of the score tile, the rows tr, tr + 64/ROWS, tr + 2*64/ROWS, ... (strided),
//   * 8 columns of the score tile, the columns tc, tc + 8, ..., tc + 56 (strided),
//     so ROWS x 8 scores live in its registers,
//   * for its ROWS rows, D/8 columns of the D-wide result (O in the forward, dK and dV in the
//     backward): the float4 groups starting at 4*tc, 32 + 4*tc, 64 + 4*tc, ...
// ROWS = 4 for D <= 64 (128 threads) and ROWS = 2 for D > 64 (256 threads), so that the
// accumulators fit in registers: at D = 64 the backward keeps dK and dV (2 x 4 x 8 floats), a
// score tile and a dP tile (2 x 4 x 8), and a dQ partial (4 x 8): about 160 live floats.
//
// Register tiling is what makes this fast. Computing a ROWS x 8 block of S takes, per group
// of 4 values of d, ROWS + 8 float4 loads from shared memory and ROWS*8*4 fused multiply-adds:
// 12 loads for 128 FMAs at ROWS = 4. One thread per score would need 2 loads per FMA, and
// shared memory, not arithmetic, would set the speed.
//
// The 8 threads that share a row of the score tile are 8 consecutive lanes of one warp, so the
// row max and row sum of the online softmax are reduced with three __shfl_xor_sync steps.
//
// Shared memory rows are padded so that no two lanes of a warp hit the same bank:
//   DS = D + 4 floats per row of a Q/K/V/dO tile (4 consecutive rows start 4 banks apart),
//   PS = 64 + 8 floats per row of the P / dS tile (a thread writes 8 strided columns of a
//   row, the next thread-row must start 8 banks further on).
// Budget (bytes, forward / backward): D=32 46 KB / 56 KB, D=64 71 KB / 89 KB,
// D=128 120 KB / 154 KB. Above 48 KB a kernel must opt in (cudaFuncAttributeMaxDynamic-
// SharedMemorySize; the wrapper sets it). An H100 has 227 KB per block and 228 KB per SM, so at
// D=64 three forward or two backward blocks share an SM; everything also fits an A100 (163 KB).
//
// Tiles of 64 (not 128) keep the per-thread register tile small enough to avoid spills and
// keep several blocks resident per SM; the loads of the next K/V tile of one block are then
// hidden behind the arithmetic of the other blocks on the same SM.
//
// Base-2 exponentials. exp2f is a single hardware instruction (MUFU.EX2); expf is exp2f of
// x*log2(e) plus extra work. So scores are multiplied by scale*log2(e) once and every
// exponential is exp2f; the running max m is kept in that base-2 unit and L is converted back
// to natural log when written: L = ln(2) * (m + log2(l)).
//
// Masked scores are -inf. A row can have only -inf scores so far (causal, padding, or keys past
// Tk); then its max is -inf and exp(S - max) would be exp(-inf - -inf) = NaN. The rule used
// everywhere (and in flash.py): subtract m_use = (max == -inf ? 0 : max), so every masked
// entry gives exp(-inf) = 0 and nothing is NaN.
// ---------------------------------------------------------------------------------------------

#define TILE 64  // queries per query tile = keys per key tile (BLOCK_M = BLOCK_N = 64)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// One compile-time description of the thread layout and shared-memory layout for head size D.
template <int D>
struct FlashConfig {
    static_assert(D % 32 == 0, "head size must be a multiple of 32");
    static constexpr int BLOCK_M = TILE;                  // queries in a query tile
    static constexpr int BLOCK_N = TILE;                  // keys in a key tile
    static constexpr int ROWS = (D <= 64) ? 4 : 2;        // score-tile rows per thread
    static constexpr int THREAD_ROWS = TILE / ROWS;       // 16 or 32 thread-rows
    static constexpr int THREADS = THREAD_ROWS * 8;       // 128 or 256 threads
    static constexpr int COLS = TILE / 8;                 // 8 score-tile columns per thread
    static constexpr int D_CHUNKS = D / 32;               // float4 groups of a D-wide row per thread
    static constexpr int DS = D + 4;                      // padded row stride of Q/K/V/dO tiles
    static constexpr int PS = TILE + 8;                   // padded row stride of P / dS tiles
    // floats of dynamic shared memory
    static constexpr int FORWARD_SMEM = 3 * TILE * DS + TILE * PS + TILE;
    static constexpr int BACKWARD_SMEM = 4 * TILE * DS + TILE * PS + 3 * TILE;
};

// x.x, x.y, x.z, x.w by index; i is a compile-time constant after unrolling, so this is free.
__device__ __forceinline__ float component(const float4& x, int i)
{
    return i == 0 ? x.x : (i == 1 ? x.y : (i == 2 ? x.z : x.w));
}

// Copy rows [row0, row0 + TILE) of a (n_rows, D) row-major matrix into a padded shared tile
// (stride D + 4), with float4 loads; rows past n_rows are filled with zeros. Consecutive
// threads read consecutive 16-byte pieces of a row, so each warp's global load is coalesced.
template <int D, int THREADS>
__device__ __forceinline__ void load_tile(float* tile, const float* __restrict__ src, int row0,
                                          int n_rows)
{
    constexpr int VECS_PER_ROW = D / 4;
    constexpr int DS = D + 4;
    for (int i = threadIdx.x; i < TILE * VECS_PER_ROW; i += THREADS) {
        const int row = i / VECS_PER_ROW;
        const int col = 4 * (i % VECS_PER_ROW);
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row0 + row < n_rows)
            x = *reinterpret_cast<const float4*>(src + (long long)(row0 + row) * D + col);
        *reinterpret_cast<float4*>(tile + row * DS + col) = x;
    }
}

// key_bias[c] = 0 for a key that may be attended to, -inf for a padded key or a key past Tk.
// Adding it to a score applies the padding mask and the tile-edge guard in one step.
template <int THREADS>
__device__ __forceinline__ void load_key_bias(float* key_bias,
                                              const unsigned char* __restrict__ key_padding_mask,
                                              int b, int k0, int Tk)
{
    for (int c = threadIdx.x; c < TILE; c += THREADS) {
        const int j = k0 + c;
        bool allowed = j < Tk;
        if (allowed && key_padding_mask != nullptr)
            allowed = key_padding_mask[(long long)b * Tk + j] == 0;
        key_bias[c] = allowed ? 0.f : neg_inf();
    }
}

// Score-tile product, "rows times rows": acc[r][c] = sum_d A[ra][d] * B[cb][d] with
// ra = tr + THREAD_ROWS*r (this thread's rows of A) and cb = tc + 8*c (its columns = rows of B).
// Used for S = Q K^T (forward), S^T = K Q^T and dP^T = V dO^T (backward).
// Per step of 4 in d: ROWS float4 loads of A, 8 float4 loads of B, ROWS*8*4 FMAs.
// Bank check: in one load instruction a warp reads 4 consecutive rows of A (4 banks apart,
// broadcast over tc) or 8 consecutive rows of B (4 banks apart, covering all 32 banks).
template <int D>
__device__ __forceinline__ void tile_dot(const float* A, const float* B, int tr, int tc,
                                         float acc[FlashConfig<D>::ROWS][FlashConfig<D>::COLS])
{
    using C = FlashConfig<D>;
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r)
#pragma unroll
        for (int c = 0; c < C::COLS; ++c) acc[r][c] = 0.f;

#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
        float4 a[C::ROWS], bb[C::COLS];
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r)
            a[r] = *reinterpret_cast<const float4*>(A + (tr + C::THREAD_ROWS * r) * C::DS + d);
#pragma unroll
        for (int c = 0; c < C::COLS; ++c)
            bb[c] = *reinterpret_cast<const float4*>(B + (tc + 8 * c) * C::DS + d);
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r)
#pragma unroll
            for (int c = 0; c < C::COLS; ++c) {
                acc[r][c] = fmaf(a[r].x, bb[c].x, acc[r][c]);
                acc[r][c] = fmaf(a[r].y, bb[c].y, acc[r][c]);
                acc[r][c] = fmaf(a[r].z, bb[c].z, acc[r][c]);
                acc[r][c] = fmaf(a[r].w, bb[c].w, acc[r][c]);
            }
    }
}

// Result-tile product, "score tile times value tile": acc[r][4*g + e] += sum_j P[ra][j] *
// V[j][32*g + 4*tc + e] with ra = tr + THREAD_ROWS*r, P a TILE x TILE tile (stride PS) and V a
// TILE x D tile (stride DS). Used for O += P V (forward), dV += P^T dO and dK += dS^T Q
// (backward, where the score tile is stored transposed, keys as rows).
// Per step of 4 in j: ROWS float4 loads of P, 4*D_CHUNKS float4 loads of V, ROWS*4*D/8 FMAs.
template <int D>
__device__ __forceinline__ void tile_matmul_acc(const float* P, const float* V, int tr, int tc,
                                                float acc[FlashConfig<D>::ROWS][D / 8])
{
    using C = FlashConfig<D>;
#pragma unroll 2
    for (int j = 0; j < TILE; j += 4) {
        float4 p[C::ROWS];
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r)
            p[r] = *reinterpret_cast<const float4*>(P + (tr + C::THREAD_ROWS * r) * C::PS + j);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
            float4 vv[C::D_CHUNKS];
#pragma unroll
            for (int g = 0; g < C::D_CHUNKS; ++g)
                vv[g] = *reinterpret_cast<const float4*>(V + (j + jj) * C::DS + 32 * g + 4 * tc);
#pragma unroll
            for (int r = 0; r < C::ROWS; ++r) {
                const float pj = component(p[r], jj);
#pragma unroll
                for (int g = 0; g < C::D_CHUNKS; ++g) {
                    acc[r][4 * g + 0] = fmaf(pj, vv[g].x, acc[r][4 * g + 0]);
                    acc[r][4 * g + 1] = fmaf(pj, vv[g].y, acc[r][4 * g + 1]);
                    acc[r][4 * g + 2] = fmaf(pj, vv[g].z, acc[r][4 * g + 2]);
                    acc[r][4 * g + 3] = fmaf(pj, vv[g].w, acc[r][4 * g + 3]);
                }
            }
        }
    }
}

// x[0..N) = p[0..N) with one vector load (p is 4*N-byte aligned): a float4 or a float2.
template <int N>
__device__ __forceinline__ void load_consecutive(const float* p, float (&x)[N])
{
    static_assert(N == 2 || N == 4, "ROWS is 2 or 4");
    if constexpr (N == 4) {
        const float4 t = *reinterpret_cast<const float4*>(p);
        x[0] = t.x, x[1] = t.y, x[2] = t.z, x[3] = t.w;
    } else {
        const float2 t = *reinterpret_cast<const float2*>(p);
        x[0] = t.x, x[1] = t.y;
    }
}

// Max and sum over the 8 lanes that share one row of the score tile (lanes 8*k .. 8*k+7).
__device__ __forceinline__ float row_max8(float x)
{
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
    return x;
}

__device__ __forceinline__ float row_sum8(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 4);
    return x;
}

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// =============================================================================================
// Forward: O = softmax(scale * Q K^T) V and L = rowwise log-sum-exp, one query tile per block.
//
// grid  = (B*H, ceil(Tq / 64)), block = THREADS
// Block (bh, y) owns queries [q0, q0 + 64) of head bh. Under causal masking later query tiles
// see more keys, so y is reversed (the last tile is block y = 0): the longest blocks start
// first and the short ones fill the gaps at the end.
//
// Each thread keeps, for each of its ROWS query rows:
//   m   the running max of the scores seen so far (base-2 units),
//   l   the running sum of exp2(score - m),
//   acc the running, not yet normalised output row (its D/8 columns of it).
// For each key tile:  S = Q K^T (registers) -> mask -> new max m' = max(m, rowmax S)
//                     alpha = exp2(m - m')   (rescale: the old terms were relative to m)
//                     P = exp2(S - m'),  l = alpha*l + rowsum P,  acc = alpha*acc + P V
// At the end O = acc / l and L = ln2 * (m + log2 l).
// =============================================================================================
template <int D>
__global__ void __launch_bounds__(FlashConfig<D>::THREADS)
flash_forward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                     const float* __restrict__ v,
                     const unsigned char* __restrict__ key_padding_mask,  // (B, Tk) or nullptr
                     float* __restrict__ out, float* __restrict__ lse, int H, int Tq, int Tk,
                     int causal, float scale)
{
    using C = FlashConfig<D>;
    const int bh = blockIdx.x;
    const int b = bh / H;
    const int q0 = (gridDim.y - 1 - blockIdx.y) * C::BLOCK_M;  // heaviest causal tiles first
    const int offset = Tk - Tq;                                   // absolute position of query 0
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;

    extern __shared__ __align__(16) float smem[];
    float* Qs = smem;                         // [64][DS]  this block's queries, loaded once
    float* Ks = Qs + C::BLOCK_M * C::DS;      // [64][DS]  current key tile
    float* Vs = Ks + C::BLOCK_N * C::DS;      // [64][DS]  current value tile
    float* Ps = Vs + C::BLOCK_N * C::DS;      // [64][PS]  probabilities of the current tile
    float* key_bias = Ps + C::BLOCK_M * C::PS;  // [64]    0 or -inf per key of the tile

    const long long q_base = (long long)bh * Tq * D;
    const long long k_base = (long long)bh * Tk * D;
    load_tile<D, C::THREADS>(Qs, q + q_base, q0, Tq);

    float m[C::ROWS], l[C::ROWS], acc[C::ROWS][D / 8];
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r) {
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) acc[r][i] = 0.f;
    }

    // Causal: the last query of the tile sees keys up to q_last + offset, so stop there.
    int kv_end = Tk;
    if (causal) kv_end = min(Tk, min(q0 + C::BLOCK_M, Tq) - 1 + offset + 1);
    const float scale_log2 = scale * LOG2E;

    for (int k0 = 0; k0 < kv_end; k0 += C::BLOCK_N) {
        __syncthreads();  // every thread is done reading the previous K, V and P tiles
        load_tile<D, C::THREADS>(Ks, k + k_base, k0, Tk);
        load_tile<D, C::THREADS>(Vs, v + k_base, k0, Tk);
        load_key_bias<C::THREADS>(key_bias, key_padding_mask, b, k0, Tk);
        __syncthreads();  // the tiles are complete (and Q, on the first pass)

        // S = Q K^T for this thread's ROWS x 8 scores, in registers.
        float s[C::ROWS][C::COLS];
        tile_dot<D>(Qs, Ks, tr, tc, s);

#pragma unroll
        for (int r = 0; r < C::ROWS; ++r) {
            const int qi = q0 + tr + C::THREAD_ROWS * r;  // this row's query index
            // scale, padding / edge mask, causal mask; row max over this thread's 8 columns
            float tile_max = neg_inf();
#pragma unroll
            for (int c = 0; c < C::COLS; ++c) {
                const int kc = tc + 8 * c;
                float x = s[r][c] * scale_log2 + key_bias[kc];
                if (causal && k0 + kc > qi + offset) x = neg_inf();
                s[r][c] = x;
                tile_max = fmaxf(tile_max, x);
            }
            tile_max = row_max8(tile_max);  // now the max over all 64 keys of the tile

            // Online softmax: the new running max, and the factor that rescales what was
            // accumulated relative to the old max. m_use keeps fully masked rows NaN-free.
            const float m_new = fmaxf(m[r], tile_max);
            const float m_use = (m_new == neg_inf()) ? 0.f : m_new;
            const float alpha = exp2f(m[r] - m_use);
            float tile_sum = 0.f;
#pragma unroll
            for (int c = 0; c < C::COLS; ++c) {
                const float p = exp2f(s[r][c] - m_use);
                tile_sum += p;
                Ps[(tr + C::THREAD_ROWS * r) * C::PS + tc + 8 * c] = p;
            }
            tile_sum = row_sum8(tile_sum);
            l[r] = alpha * l[r] + tile_sum;
            m[r] = m_new;
#pragma unroll
            for (int i = 0; i < D / 8; ++i) acc[r][i] *= alpha;  // the rescale
        }
        __syncthreads();  // P is complete: each thread needs whole rows of it

        tile_matmul_acc<D>(Ps, Vs, tr, tc, acc);  // acc += P V
    }

    // O = acc / l; L = ln2 * (m + log2 l). A row with no allowed key has l = 0: O = 0, L = -inf.
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r) {
        const int qi = q0 + tr + C::THREAD_ROWS * r;
        if (qi >= Tq) continue;
        const float inv_l = l[r] > 0.f ? 1.f / l[r] : 0.f;
        float* out_row = out + q_base + (long long)qi * D;
#pragma unroll
        for (int g = 0; g < C::D_CHUNKS; ++g) {
            const float4 o = make_float4(acc[r][4 * g + 0] * inv_l, acc[r][4 * g + 1] * inv_l,
                                         acc[r][4 * g + 2] * inv_l, acc[r][4 * g + 3] * inv_l);
            *reinterpret_cast<float4*>(out_row + 32 * g + 4 * tc) = o;
        }
        if (tc == 0)
            lse[(long long)bh * Tq + qi] = l[r] > 0.f ? LN2 * (m[r] + log2f(l[r])) : neg_inf();
    }
}

// =============================================================================================
// Backward step 1: Delta_i = sum_d dO_id * O_id, one thread per query row (B*H*Tq rows).
// Delta_i equals sum_j P_ij dP_ij (because O_i = sum_j P_ij V_j and dP_ij = dO_i . V_j); it is
// the term the softmax backward subtracts, computed once per row instead of once per tile.
// grid = ceil(rows / 256), block = 256. Tiny and memory-bound next to the main kernel.
// =============================================================================================
template <int D>
__global__ void flash_backward_delta_kernel(const float* __restrict__ dout,
                                            const float* __restrict__ out,
                                            float* __restrict__ delta, long long n_rows)
{
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n_rows) return;
    const float4* a = reinterpret_cast<const float4*>(dout + row * D);
    const float4* o = reinterpret_cast<const float4*>(out + row * D);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < D / 4; ++i) {
        const float4 x = a[i], y = o[i];
        sum += x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
    }
    delta[row] = sum;
}

// =============================================================================================
// Backward step 2: dK, dV (and dQ by atomicAdd), one key tile per block.
//
// grid  = (B*H, ceil(Tk / 64)), block = THREADS; dq must be zero on entry.
// Block (bh, y) owns keys [k0, k0 + 64) of head bh. K and V of those keys stay in shared memory,
// dK and dV accumulate in registers; the block walks the query tiles that can see its keys
// (under causal masking: from the tile holding query k0 - offset to the end). For each:
//
//   1. S^T = K Q^T, P^T_ji = exp2(S^T_ji - L_i)      P recomputed from the saved L
//   2. dP^T = V dO^T                                  (both in registers, ROWS x 8 each)
//   3. dS^T_ji = P^T_ji (dP^T_ji - Delta_i) * scale   (scale folded in for dK and dQ)
//   4. dV += P^T dO         P^T goes through shared memory (the product needs whole rows)
//   5. dK += dS^T Q         dS^T goes through the same shared buffer after P^T is used
//   6. dQ += dS K           a 64 x D partial for the query tile, added to global dQ atomically
//
// The score tile is kept transposed (keys as rows) so that steps 4 and 5 have the same shape as
// the forward's P V: this thread's rows of dK and dV are the key rows of its score registers.
// For step 6 the threads re-split the work by query rows: thread (tr, tc) owns the ROWS
// consecutive query rows ROWS*tr .. ROWS*tr + ROWS-1 and the same D/8 columns as before.
// =============================================================================================
template <int D>
__global__ void __launch_bounds__(FlashConfig<D>::THREADS)
flash_backward_kernel(const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, const float* __restrict__ dout,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      const unsigned char* __restrict__ key_padding_mask,  // (B, Tk) or nullptr
                      float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                      int H, int Tq, int Tk, int causal, float scale)
{
    using C = FlashConfig<D>;
    const int bh = blockIdx.x;
    const int b = bh / H;
    const int k0 = blockIdx.y * C::BLOCK_N;
    const int offset = Tk - Tq;
    const int tr = threadIdx.x / 8, tc = threadIdx.x % 8;

    extern __shared__ __align__(16) float smem[];
    float* Ks = smem;                          // [64][DS]  this block's keys, loaded once
    float* Vs = Ks + C::BLOCK_N * C::DS;       // [64][DS]  this block's values, loaded once
    float* Qs = Vs + C::BLOCK_N * C::DS;       // [64][DS]  current query tile
    float* dOs = Qs + C::BLOCK_M * C::DS;      // [64][DS]  current output-gradient tile
    float* Ss = dOs + C::BLOCK_M * C::DS;      // [64 keys][PS]  P^T, then dS^T
    float* key_bias = Ss + C::BLOCK_N * C::PS;   // [64]  0 or -inf per key
    float* lse_log2 = key_bias + C::BLOCK_N;     // [64]  L_i * log2(e) per query of the tile
    float* delta_s = lse_log2 + C::BLOCK_M;      // [64]  Delta_i per query of the tile

    const long long q_base = (long long)bh * Tq * D;
    const long long k_base = (long long)bh * Tk * D;
    load_tile<D, C::THREADS>(Ks, k + k_base, k0, Tk);
    load_tile<D, C::THREADS>(Vs, v + k_base, k0, Tk);
    load_key_bias<C::THREADS>(key_bias, key_padding_mask, b, k0, Tk);

    float dk_acc[C::ROWS][D / 8], dv_acc[C::ROWS][D / 8];
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) dk_acc[r][i] = dv_acc[r][i] = 0.f;

    // Causal: key k0 is first seen by query k0 - offset; start at the tile that holds it.
    int q_begin = 0;
    if (causal && k0 - offset > 0) q_begin = ((k0 - offset) / C::BLOCK_M) * C::BLOCK_M;
    const float scale_log2 = scale * LOG2E;

    for (int q0 = q_begin; q0 < Tq; q0 += C::BLOCK_M) {
        __syncthreads();  // every thread is done with the previous Q, dO, P/dS tiles
        load_tile<D, C::THREADS>(Qs, q + q_base, q0, Tq);
        load_tile<D, C::THREADS>(dOs, dout + q_base, q0, Tq);
        for (int i = threadIdx.x; i < C::BLOCK_M; i += C::THREADS) {
            const int qi = q0 + i;
            // L = -inf marks a query with no allowed key; all its scores are -inf too, and
            // subtracting 0 instead (the m_use rule of the forward) gives P = 0, not NaN.
            const float L = qi < Tq ? lse[(long long)bh * Tq + qi] : 0.f;
            lse_log2[i] = (L == neg_inf()) ? 0.f : L * LOG2E;
            delta_s[i] = qi < Tq ? delta[(long long)bh * Tq + qi] : 0.f;
        }
        __syncthreads();

        // 1-2. S^T = K Q^T and dP^T = V dO^T for this thread's ROWS keys x 8 queries.
        float p[C::ROWS][C::COLS], ds[C::ROWS][C::COLS];
        tile_dot<D>(Ks, Qs, tr, tc, p);
        tile_dot<D>(Vs, dOs, tr, tc, ds);

        // P^T = exp2(S^T * scale*log2e - L*log2e), masked entries 0 (queries past Tq too);
        // 3. dS^T = P^T (dP^T - Delta) * scale.
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r) {
            const int kr = tr + C::THREAD_ROWS * r;
#pragma unroll
            for (int c = 0; c < C::COLS; ++c) {
                const int qc = tc + 8 * c;
                const int qi = q0 + qc;
                float x = p[r][c] * scale_log2 + key_bias[kr];
                if (qi >= Tq || (causal && k0 + kr > qi + offset)) x = neg_inf();
                const float pv = exp2f(x - lse_log2[qc]);
                p[r][c] = pv;
                ds[r][c] = pv * (ds[r][c] - delta_s[qc]) * scale;
                Ss[kr * C::PS + qc] = pv;
            }
        }
        __syncthreads();  // P^T complete

        tile_matmul_acc<D>(Ss, dOs, tr, tc, dv_acc);  // 4. dV += P^T dO
        __syncthreads();  // everyone is done reading P^T; overwrite it with dS^T

#pragma unroll
        for (int r = 0; r < C::ROWS; ++r)
#pragma unroll
            for (int c = 0; c < C::COLS; ++c)
                Ss[(tr + C::THREAD_ROWS * r) * C::PS + tc + 8 * c] = ds[r][c];
        __syncthreads();  // dS^T complete

        tile_matmul_acc<D>(Ss, Qs, tr, tc, dk_acc);  // 5. dK += dS^T Q  (scale already in dS)

        // 6. dQ[i] += sum_j dS^T[j][i] K[j] for this thread's ROWS consecutive query rows.
        float dq_acc[C::ROWS][D / 8];
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r)
#pragma unroll
            for (int i = 0; i < D / 8; ++i) dq_acc[r][i] = 0.f;
#pragma unroll 4
        for (int j = 0; j < C::BLOCK_N; ++j) {
            float dsj[C::ROWS];  // dS^T[j][ROWS*tr + r]: ROWS consecutive floats, one load
            load_consecutive<C::ROWS>(Ss + j * C::PS + C::ROWS * tr, dsj);
#pragma unroll
            for (int g = 0; g < C::D_CHUNKS; ++g) {
                const float4 kk = *reinterpret_cast<const float4*>(Ks + j * C::DS + 32 * g + 4 * tc);
#pragma unroll
                for (int r = 0; r < C::ROWS; ++r) {
                    dq_acc[r][4 * g + 0] = fmaf(dsj[r], kk.x, dq_acc[r][4 * g + 0]);
                    dq_acc[r][4 * g + 1] = fmaf(dsj[r], kk.y, dq_acc[r][4 * g + 1]);
                    dq_acc[r][4 * g + 2] = fmaf(dsj[r], kk.z, dq_acc[r][4 * g + 2]);
                    dq_acc[r][4 * g + 3] = fmaf(dsj[r], kk.w, dq_acc[r][4 * g + 3]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < C::ROWS; ++r) {
            const int qi = q0 + C::ROWS * tr + r;
            if (qi >= Tq) continue;
            float* dq_row = dq + q_base + (long long)qi * D;
#pragma unroll
            for (int g = 0; g < C::D_CHUNKS; ++g)
#pragma unroll
                for (int e = 0; e < 4; ++e) atomicAdd(dq_row + 32 * g + 4 * tc + e, dq_acc[r][4 * g + e]);
        }
    }

    // Write this block's rows of dK and dV (keys past Tk are not written).
#pragma unroll
    for (int r = 0; r < C::ROWS; ++r) {
        const int kj = k0 + tr + C::THREAD_ROWS * r;
        if (kj >= Tk) continue;
        float* dk_row = dk + k_base + (long long)kj * D;
        float* dv_row = dv + k_base + (long long)kj * D;
#pragma unroll
        for (int g = 0; g < C::D_CHUNKS; ++g) {
            *reinterpret_cast<float4*>(dk_row + 32 * g + 4 * tc) =
                make_float4(dk_acc[r][4 * g + 0], dk_acc[r][4 * g + 1], dk_acc[r][4 * g + 2],
                            dk_acc[r][4 * g + 3]);
            *reinterpret_cast<float4*>(dv_row + 32 * g + 4 * tc) =
                make_float4(dv_acc[r][4 * g + 0], dv_acc[r][4 * g + 1], dv_acc[r][4 * g + 2],
                            dv_acc[r][4 * g + 3]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instantiations. CuPy (NVRTC, which defines __CUDACC_RTC__) instantiates only the kernels it is
// asked for through name_expressions, e.g. "flash_forward_kernel<64>"; a plain nvcc build (the
// compile check in tests/test_flash.py) instantiates every supported head size here.
// ---------------------------------------------------------------------------------------------
#ifndef __CUDACC_RTC__
#define TINYLM_INSTANTIATE(D)                                                                    \
    template __global__ void flash_forward_kernel<D>(const float*, const float*, const float*,  \
                                                     const unsigned char*, float*, float*, int,  \
                                                     int, int, int, float);                      \
    template __global__ void flash_backward_delta_kernel<D>(const float*, const float*, float*, \
                                                            long long);                          \
    template __global__ void flash_backward_kernel<D>(                                          \
        const float*, const float*, const float*, const float*, const float*, const float*,     \
        const unsigned char*, float*, float*, float*, int, int, int, int, float);
TINYLM_INSTANTIATE(32)
TINYLM_INSTANTIATE(64)
TINYLM_INSTANTIATE(96)
TINYLM_INSTANTIATE(128)
#undef TINYLM_INSTANTIATE
#endif
