// CUDA C++ kernels of the `cupy` backend: the pipeline contract (docs/contract.md), batched.
//
// A batch is `count` images of one shape stored back to back; blockIdx.z picks the image (hysteresis
// walks a flat list of tiles instead, see there). cupy_gpu.py compiles this file with NVRTC, with
// -DTILE_SIDE=<n> and without fast-math: the equalize LUT must round exactly as OpenCV's float32 code.
//
// Rules that keep every kernel runnable on the CPU (tests/cupy_host/ runs them on CPU threads with
// any 1-D or 2-D block shape): every loop strides by blockDim, no warp intrinsics, shared memory
// declared inside the kernels, no standard headers (NVRTC has none).

#ifndef TILE_SIDE
#error "compile with -DTILE_SIDE=<n>, as cupy_gpu.py does"
#endif

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;

// Canny state of a pixel, kept in the state plane between the kernels.
#define NOT_EDGE 0
#define WEAK_EDGE 1    // a local maximum above the low threshold: an edge if connected to a strong one
#define STRONG_EDGE 2  // a local maximum above the high threshold

// Fixed-point constants of OpenCV's Canny: tan(22.5 deg) scaled by 2^15, rounded.
#define CANNY_SHIFT 15
#define TAN_22_5 13573

__device__ __forceinline__ int thread_rank() { return threadIdx.y * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int block_size() { return blockDim.x * blockDim.y; }

__device__ __forceinline__ int clamp_index(int p, int n) { return p < 0 ? 0 : (p >= n ? n - 1 : p); }

// cv::borderInterpolate with BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), also for images narrower
// than the kernel, where the reflection has to be repeated.
__device__ __forceinline__ int reflect101(int p, int n)
{
    if (n == 1) return 0;
    while (p < 0 || p >= n) p = p < 0 ? -p : 2 * (n - 1) - p;
    return p;
}

// --- gray + histogram -----------------------------------------------------------------------------

// cv2.cvtColor(RGB2GRAY) of OpenCV 5 for 8-bit: fixed-point BT.601 with 15 fractional bits, rounded
// (OpenCV 4 used 14 bits; see docs/contract.md).
__device__ __forceinline__ u8 bt601_gray(u8 r, u8 g, u8 b)
{
    return (u8)((9798u * r + 19235u * g + 3735u * b + 16384u) >> 15);
}

// Private histograms per warp spread the shared-memory atomics of flat images over 8 copies.
#define HISTOGRAM_COPIES 8

// Gray plane (written only for RGB input; a gray input is its own gray plane) and its 256-bin
// histogram, added into `histograms` (zeroed by the host), one row of 256 per image.
extern "C" __global__ void gray_histogram(
    const u8* __restrict__ images, i64 image_stride, int channels, int pixels,
    u8* __restrict__ gray_planes, i64 plane_stride, u32* __restrict__ histograms)
{
    __shared__ u32 bins[HISTOGRAM_COPIES][256];
    const int rank = thread_rank(), threads = block_size();
    for (int i = rank; i < HISTOGRAM_COPIES * 256; i += threads) bins[i / 256][i % 256] = 0;
    __syncthreads();

    const u8* image = images + blockIdx.z * image_stride;
    u32* my_bins = bins[(rank / 32) % HISTOGRAM_COPIES];
    for (int p = blockIdx.x * threads + rank; p < pixels; p += gridDim.x * threads) {
        u8 value;
        if (channels == 3) {
            const u8* rgb = image + 3 * (i64)p;
            value = bt601_gray(rgb[0], rgb[1], rgb[2]);
            gray_planes[blockIdx.z * plane_stride + p] = value;
        } else {
            value = image[p];
        }
        atomicAdd(&my_bins[value], 1u);
    }
    __syncthreads();

    for (int bin = rank; bin < 256; bin += threads) {
        u32 total = 0;
        for (int copy = 0; copy < HISTOGRAM_COPIES; ++copy) total += bins[copy][bin];
        if (total) atomicAdd(&histograms[blockIdx.z * 256 + bin], total);
    }
}

// --- equalize LUT ---------------------------------------------------------------------------------

// cv2.equalizeHist's lookup table, one block per image: scale = 255 / (pixels - h[first]) in float32,
// lut[j] = rint(float32(sum of h over (first, j]) * scale), round half to even; a constant image
// maps to itself. The explicit _rn intrinsics pin IEEE float32 rounding whatever the compile flags.
extern "C" __global__ void equalize_lut(const u32* __restrict__ histograms, int pixels, u8* __restrict__ luts)
{
    __shared__ int cumulative[256];
    __shared__ int first;  // the first non-empty bin
    const u32* hist = histograms + blockIdx.z * 256;
    u8* lut = luts + blockIdx.z * 256;
    const int rank = thread_rank(), threads = block_size();

    if (rank == 0) {  // 256 additions per image: a parallel scan would not pay off
        int sum = 0;
        first = -1;
        for (int bin = 0; bin < 256; ++bin) {
            sum += (int)hist[bin];
            cumulative[bin] = sum;
            if (first < 0 && hist[bin]) first = bin;
        }
    }
    __syncthreads();

    const int first_count = (int)hist[first];
    if (first_count == pixels) {
        for (int bin = rank; bin < 256; bin += threads) lut[bin] = (u8)first;
        return;
    }
    const float scale = __fdiv_rn(255.0f, __int2float_rn(pixels - first_count));
    for (int bin = rank; bin < 256; bin += threads) {
        int value = 0;
        if (bin > first) value = __float2int_rn(__fmul_rn(__int2float_rn(cumulative[bin] - first_count), scale));
        lut[bin] = (u8)(value > 255 ? 255 : value);
    }
}

// --- Gaussian blur + Sobel + non-maximum suppression, fused on a shared-memory tile ------------------

// OpenCV's fixed 8-bit Gaussian tables for sigma 0 (1 2 1 /4, 1 4 6 4 1 /16, 2 7 14 18 14 7 2 /64).
__device__ __forceinline__ int gaussian_tap(int radius, int i)
{
    const int d = i <= radius ? i : 2 * radius - i;  // distance from the window's end
    if (radius == 1) return d == 0 ? 1 : 2;
    if (radius == 2) return d == 0 ? 1 : (d == 1 ? 4 : 6);
    return d == 0 ? 2 : (d == 1 ? 7 : (d == 2 ? 14 : 18));
}

// log2 of the 2-D weight total: the blur is (S + 2^(shift-1)) >> shift of the exact integer sum S.
__device__ __forceinline__ int gaussian_shift(int radius) { return radius == 1 ? 4 : (radius == 2 ? 8 : 12); }

// Canny's state for a pixel of magnitude m and gradient (dx, dy), given the magnitude at offsets
// (dy, dx) of it: OpenCV's sector test with its fixed-point tangents and its asymmetric ties.
template <typename Magnitude>
__device__ __forceinline__ u8 canny_state(int m, int dx, int dy, int low, int high, const Magnitude& at)
{
    if (m <= low) return NOT_EDGE;
    const int ax = dx < 0 ? -dx : dx;
    const int ay = (dy < 0 ? -dy : dy) << CANNY_SHIFT;
    const int tg22x = ax * TAN_22_5;
    bool peak;
    if (ay < tg22x) {  // gradient near horizontal: compare left and right
        peak = m > at(0, -1) && m >= at(0, 1);
    } else {
        const int tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
        if (ay > tg67x) {  // near vertical: compare above and below
            peak = m > at(-1, 0) && m >= at(1, 0);
        } else {  // diagonal: the sign of dx * dy picks the diagonal
            const int s = (dx ^ dy) < 0 ? -1 : 1;
            peak = m > at(-1, -s) && m > at(1, s);
        }
    }
    if (!peak) return NOT_EDGE;
    return m > high ? STRONG_EDGE : WEAK_EDGE;
}

// One TILE_SIDE^2 tile of state-plane output per block iteration. Each stage reads only what the
// previous stage wrote to shared memory:
//   equalized  lut[gray], tile + (R + 2) ring, reflect-101 outside the image (GaussianBlur's border)
//   row_sums   horizontal blur sums, tile + 2 ring in x
//   blurred    vertical sums rounded; exact blur wherever the position is inside the image
//   magnitude  Sobel of blurred read at clamped positions (Canny's BORDER_REPLICATE), tile + 1 ring,
//              0 outside the image (OpenCV's zero magnitude border)
//   states     NMS + double threshold, tile only
template <int R>
__device__ __forceinline__ void blur_sobel_nms(
    const u8* __restrict__ gray_planes, i64 plane_stride, const u8* __restrict__ luts, int height, int width,
    int low, int high, int l2_gradient, u8* __restrict__ states, u8* __restrict__ equalized_planes)
{
    const int HALO = R + 2;
    const int E_SIDE = TILE_SIDE + 2 * HALO;
    const int B_SIDE = TILE_SIDE + 4;
    const int M_SIDE = TILE_SIDE + 2;
    __shared__ u8 equalized[E_SIDE][E_SIDE];
    __shared__ unsigned short row_sums[E_SIDE][B_SIDE];  // at most 255 * 64
    __shared__ u8 blurred[B_SIDE][B_SIDE];
    __shared__ int magnitude[M_SIDE][M_SIDE];

    const i64 plane_offset = blockIdx.z * plane_stride;
    const u8* gray = gray_planes + plane_offset;
    const u8* lut = luts + blockIdx.z * 256;
    const int x0 = blockIdx.x * TILE_SIDE;
    const int tiles_y = (height + TILE_SIDE - 1) / TILE_SIDE;
    const int shift = gaussian_shift(R);

    for (int tile_y = blockIdx.y; tile_y < tiles_y; tile_y += gridDim.y) {
        const int y0 = tile_y * TILE_SIDE;

        for (int r = threadIdx.y; r < E_SIDE; r += blockDim.y) {
            const i64 row = (i64)reflect101(y0 - HALO + r, height) * width;
            for (int c = threadIdx.x; c < E_SIDE; c += blockDim.x)
                equalized[r][c] = lut[gray[row + reflect101(x0 - HALO + c, width)]];
        }
        __syncthreads();

        if (equalized_planes) {
            for (int r = threadIdx.y; r < TILE_SIDE && y0 + r < height; r += blockDim.y)
                for (int c = threadIdx.x; c < TILE_SIDE && x0 + c < width; c += blockDim.x)
                    equalized_planes[plane_offset + (i64)(y0 + r) * width + x0 + c] = equalized[r + HALO][c + HALO];
        }
        for (int r = threadIdx.y; r < E_SIDE; r += blockDim.y)
            for (int c = threadIdx.x; c < B_SIDE; c += blockDim.x) {
                int sum = 0;
                for (int i = 0; i <= 2 * R; ++i) sum += gaussian_tap(R, i) * equalized[r][c + i];
                row_sums[r][c] = (unsigned short)sum;
            }
        __syncthreads();

        for (int r = threadIdx.y; r < B_SIDE; r += blockDim.y)
            for (int c = threadIdx.x; c < B_SIDE; c += blockDim.x) {
                int sum = 0;
                for (int i = 0; i <= 2 * R; ++i) sum += gaussian_tap(R, i) * row_sums[r + i][c];
                blurred[r][c] = (u8)((sum + (1 << (shift - 1))) >> shift);
            }
        __syncthreads();

        // blurred[] holds image position (y0 - 2 + r, x0 - 2 + c); clamping first gives BORDER_REPLICATE.
        auto sobel = [&](int y, int x, int& dx, int& dy) {
            const int up = clamp_index(y - 1, height) - (y0 - 2), mid = y - (y0 - 2);
            const int down = clamp_index(y + 1, height) - (y0 - 2);
            const int left = clamp_index(x - 1, width) - (x0 - 2), centre = x - (x0 - 2);
            const int right = clamp_index(x + 1, width) - (x0 - 2);
            dx = blurred[up][right] + 2 * blurred[mid][right] + blurred[down][right]
               - blurred[up][left] - 2 * blurred[mid][left] - blurred[down][left];
            dy = blurred[down][left] + 2 * blurred[down][centre] + blurred[down][right]
               - blurred[up][left] - 2 * blurred[up][centre] - blurred[up][right];
        };
        for (int r = threadIdx.y; r < M_SIDE; r += blockDim.y)
            for (int c = threadIdx.x; c < M_SIDE; c += blockDim.x) {
                const int y = y0 - 1 + r, x = x0 - 1 + c;
                int m = 0;
                if (y >= 0 && y < height && x >= 0 && x < width) {
                    int dx, dy;
                    sobel(y, x, dx, dy);
                    m = l2_gradient ? dx * dx + dy * dy : (dx < 0 ? -dx : dx) + (dy < 0 ? -dy : dy);
                }
                magnitude[r][c] = m;
            }
        __syncthreads();

        for (int r = threadIdx.y; r < TILE_SIDE && y0 + r < height; r += blockDim.y)
            for (int c = threadIdx.x; c < TILE_SIDE && x0 + c < width; c += blockDim.x) {
                int dx, dy;
                sobel(y0 + r, x0 + c, dx, dy);
                auto neighbour = [&](int oy, int ox) { return magnitude[r + 1 + oy][c + 1 + ox]; };
                states[plane_offset + (i64)(y0 + r) * width + x0 + c] =
                    canny_state(magnitude[r + 1][c + 1], dx, dy, low, high, neighbour);
            }
        __syncthreads();  // the next tile row reuses the shared arrays
    }
}

// One entry point per blur size: the radius sizes the shared tiles at compile time.
#define BLUR_SOBEL_NMS_KERNEL(NAME, RADIUS)                                                              \
    extern "C" __global__ void NAME(                                                                     \
        const u8* __restrict__ gray_planes, i64 plane_stride, const u8* __restrict__ luts, int height,   \
        int width, int low, int high, int l2_gradient, u8* __restrict__ states,                          \
        u8* __restrict__ equalized_planes)                                                               \
    {                                                                                                    \
        blur_sobel_nms<RADIUS>(gray_planes, plane_stride, luts, height, width, low, high, l2_gradient,   \
                               states, equalized_planes);                                                \
    }
BLUR_SOBEL_NMS_KERNEL(blur_sobel_nms_k3, 1)
BLUR_SOBEL_NMS_KERNEL(blur_sobel_nms_k5, 2)
BLUR_SOBEL_NMS_KERNEL(blur_sobel_nms_k7, 3)

// --- hysteresis -----------------------------------------------------------------------------------

// One pass of hysteresis as a fixed point: a weak pixel next to a strong one becomes strong. Each
// tile iterates in shared memory until it is stable, with its 1-pixel ring as read when loaded, and
// writes its promotions back. The host launches this kernel several times in a row; launch k sets
// changed_flags[k] when anything changed, and returns at once when launch k-1 changed nothing, so
// the host only checks the last flag of a round. Reading a neighbour tile while it is being written
// is harmless: states only grow, and a launch that changes nothing has seen a stable plane.
//
// Blocks walk a flat list of (image, tile) pairs, with a grid sized to the GPU: the launches after
// convergence then cost a few microseconds instead of one block per tile.
extern "C" __global__ void hysteresis(
    u8* __restrict__ states, i64 plane_stride, int height, int width, int count,
    int* __restrict__ changed_flags, int launch)
{
    if (launch > 0 && changed_flags[launch - 1] == 0) return;
    const int SIDE = TILE_SIDE + 2;
    __shared__ u8 tile[SIDE][SIDE];

    const int tiles_x = (width + TILE_SIDE - 1) / TILE_SIDE;
    const i64 tiles_per_image = (i64)tiles_x * ((height + TILE_SIDE - 1) / TILE_SIDE);
    const i64 tiles = tiles_per_image * count;
    for (i64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        u8* plane = states + (t / tiles_per_image) * plane_stride;
        const int index = (int)(t % tiles_per_image);
        const int y0 = index / tiles_x * TILE_SIDE - 1, x0 = index % tiles_x * TILE_SIDE - 1;

        for (int r = threadIdx.y; r < SIDE; r += blockDim.y)
            for (int c = threadIdx.x; c < SIDE; c += blockDim.x) {
                const int y = y0 + r, x = x0 + c;
                const bool inside = y >= 0 && y < height && x >= 0 && x < width;
                tile[r][c] = inside ? plane[(i64)y * width + x] : (u8)NOT_EDGE;
            }
        __syncthreads();

        bool tile_changed = false;
        for (;;) {
            int changed = 0;
            for (int r = 1 + threadIdx.y; r <= TILE_SIDE; r += blockDim.y)
                for (int c = 1 + threadIdx.x; c <= TILE_SIDE; c += blockDim.x) {
                    if (tile[r][c] != WEAK_EDGE) continue;
                    const bool strong_neighbour =
                        tile[r - 1][c - 1] == STRONG_EDGE || tile[r - 1][c] == STRONG_EDGE ||
                        tile[r - 1][c + 1] == STRONG_EDGE || tile[r][c - 1] == STRONG_EDGE ||
                        tile[r][c + 1] == STRONG_EDGE || tile[r + 1][c - 1] == STRONG_EDGE ||
                        tile[r + 1][c] == STRONG_EDGE || tile[r + 1][c + 1] == STRONG_EDGE;
                    if (strong_neighbour) {
                        tile[r][c] = STRONG_EDGE;
                        changed = 1;
                    }
                }
            if (!__syncthreads_or(changed)) break;
            tile_changed = true;
        }

        if (tile_changed) {
            for (int r = 1 + threadIdx.y; r <= TILE_SIDE && y0 + r < height; r += blockDim.y)
                for (int c = 1 + threadIdx.x; c <= TILE_SIDE && x0 + c < width; c += blockDim.x) {
                    u8* state = plane + (i64)(y0 + r) * width + x0 + c;
                    if (tile[r][c] == STRONG_EDGE && *state == WEAK_EDGE) *state = STRONG_EDGE;
                }
            if (thread_rank() == 0) changed_flags[launch] = 1;
        }
        __syncthreads();  // the next tile reuses `tile`
    }
}

// --- edges + edge count -----------------------------------------------------------------------------

// Edge map (0/255, written only when the caller keeps images) and the number of edge pixels per
// image: a per-thread count, summed per block in shared memory, one global atomic per block.
extern "C" __global__ void finalize_edges(
    const u8* __restrict__ states, i64 plane_stride, int pixels, u8* __restrict__ edges,
    u32* __restrict__ edge_counts)
{
    __shared__ u32 block_count;
    const int rank = thread_rank(), threads = block_size();
    if (rank == 0) block_count = 0;
    __syncthreads();

    const i64 plane_offset = blockIdx.z * plane_stride;
    u32 count = 0;
    for (int p = blockIdx.x * threads + rank; p < pixels; p += gridDim.x * threads) {
        const bool edge = states[plane_offset + p] == STRONG_EDGE;
        count += edge;
        if (edges) edges[plane_offset + p] = edge ? 255 : 0;
    }
    if (count) atomicAdd(&block_count, count);
    __syncthreads();
    if (rank == 0 && block_count) atomicAdd(&edge_counts[blockIdx.z], block_count);
}

// --- the integer CNN label model ---------------------------------------------------------------------
//
// gpu_pipeline/labels/cnn.py, specified by cpu_reference/cnn.py: integers only, so the pooled sums,
// and the labels the host takes from them, are the same bytes as on the CPU. Activations are
// (count, side, side, channels) uint8 back to back; one thread per output value, strided.

__device__ __forceinline__ int grid_rank() { return blockIdx.x * block_size() + thread_rank(); }
__device__ __forceinline__ int grid_threads() { return gridDim.x * block_size(); }

// Box-mean resample of each (height, width, channels) image to (size, size, 3): rows
// [i*height/size, max((i+1)*height/size, i*height/size + 1)), the same for columns, rounded
// (sum + count/2) / count; a gray image counts as three equal bands.
extern "C" __global__ void cnn_resample(
    const u8* __restrict__ images, int height, int width, int channels, int size, u8* __restrict__ out)
{
    const u8* image = images + (i64)blockIdx.z * height * width * channels;
    u8* resampled = out + (i64)blockIdx.z * size * size * 3;
    for (int p = grid_rank(); p < size * size; p += grid_threads()) {
        const int i = p / size, j = p % size;
        const int top = (int)((i64)i * height / size), left = (int)((i64)j * width / size);
        int bottom = (int)((i64)(i + 1) * height / size), right = (int)((i64)(j + 1) * width / size);
        bottom = bottom > top ? bottom : top + 1;
        right = right > left ? right : left + 1;
        i64 sums[3] = {0, 0, 0};
        for (int y = top; y < bottom; ++y)
            for (int x = left; x < right; ++x) {
                const u8* pixel = image + ((i64)y * width + x) * channels;
                for (int c = 0; c < 3; ++c) sums[c] += pixel[channels == 3 ? c : 0];
            }
        const i64 count = (i64)(bottom - top) * (right - left);
        for (int c = 0; c < 3; ++c) resampled[3 * p + c] = (u8)((sums[c] + count / 2) / count);
    }
}

// One block: 3x3 convolution with zero padding (int8 weights held as int, (3, 3, inputs, outputs)),
// int sums from the int32 bias, requantization (acc * multiplier + 2^(shift-1)) >> shift clipped to
// 0..255, then the 2x2 max pool (an odd last row or column is dropped). The model loader keeps every
// sum inside int and every product inside i64. A negative product clips to 0 before the shift, so
// the shift never sees a negative number.
extern "C" __global__ void cnn_block(
    const u8* __restrict__ in, int side, int inputs, const int* __restrict__ weights, const int* __restrict__ bias,
    const i64* __restrict__ multiplier, const int* __restrict__ shift, int outputs, u8* __restrict__ out)
{
    const int half = side / 2;
    const u8* x = in + (i64)blockIdx.z * side * side * inputs;
    u8* y = out + (i64)blockIdx.z * half * half * outputs;
    for (int e = grid_rank(); e < half * half * outputs; e += grid_threads()) {
        const int o = e % outputs, position = e / outputs;
        const int oy = position / half, ox = position % half;
        int best = 0;
        for (int py = 2 * oy; py < 2 * oy + 2; ++py)
            for (int px = 2 * ox; px < 2 * ox + 2; ++px) {
                int acc = bias[o];
                for (int dy = 0; dy < 3; ++dy) {
                    const int sy = py + dy - 1;
                    if (sy < 0 || sy >= side) continue;
                    for (int dx = 0; dx < 3; ++dx) {
                        const int sx = px + dx - 1;
                        if (sx < 0 || sx >= side) continue;
                        const u8* pixel = x + ((i64)sy * side + sx) * inputs;
                        const int* w = weights + (dy * 3 + dx) * inputs * outputs + o;
                        for (int c = 0; c < inputs; ++c) acc += pixel[c] * w[c * outputs];
                    }
                }
                const i64 scaled = (i64)acc * multiplier[o] + ((i64)1 << (shift[o] - 1));
                const i64 level = scaled < 0 ? 0 : scaled >> shift[o];
                const int clipped = level > 255 ? 255 : (int)level;
                best = clipped > best ? clipped : best;
            }
        y[e] = (u8)best;
    }
}

// The global sum pool: sums[image][c] over the positions of channel c.
extern "C" __global__ void cnn_sums(const u8* __restrict__ in, int positions, int channels, i64* __restrict__ sums)
{
    const u8* x = in + (i64)blockIdx.z * positions * channels;
    for (int c = grid_rank(); c < channels; c += grid_threads()) {
        i64 total = 0;
        for (int p = 0; p < positions; ++p) total += x[(i64)p * channels + c];
        sums[(i64)blockIdx.z * channels + c] = total;
    }
}
