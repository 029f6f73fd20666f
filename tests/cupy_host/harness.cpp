// Runs the kernels of cupy_pipeline.cu on the CPU, for tests without a GPU. Build (the test does it):
//   g++ -std=c++20 -O1 -ffp-contract=off -shared -fPIC -pthread -DTILE_SIDE=<n>
//       -I tests/cupy_host -I gpu_pipeline/backends tests/cupy_host/harness.cpp -o harness.so
// One C entry point, launch_kernel(name, grid, block, args as 64-bit slots with their byte sizes),
// so that Python calls every kernel the way cupy.RawKernel does: blocks one after another, the
// threads of a block as std::threads meeting at std::barrier. The sizes are checked against the
// kernel's parameter types: CuPy would pass a mis-sized NumPy scalar without complaint.
#include "cuda_shim.h"

#include "cupy_pipeline.cu"

#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

thread_local dim3 threadIdx;
dim3 blockIdx, blockDim, gridDim;
std::barrier<>* block_barrier = nullptr;
// When >= 0, launches run only the block of this linear index (x fastest): the tests' emulation of
// blocks that all read memory before any block writes runs each block alone on a snapshot.
long long only_block = -1;

namespace {

template <typename T>
T from_slot(unsigned long long slot)
{
    if constexpr (std::is_pointer_v<T>)
        return reinterpret_cast<T>(slot);
    else
        return static_cast<T>(static_cast<long long>(slot));
}

template <typename... P, std::size_t... I>
void call(void (*kernel)(P...), const unsigned long long* slots, std::index_sequence<I...>)
{
    kernel(from_slot<P>(slots[I])...);
}

template <typename... P>
int run_grid(
    void (*kernel)(P...), dim3 grid, dim3 block, int argc, const unsigned long long* slots, const unsigned* sizes)
{
    if (argc != (int)sizeof...(P)) return -2;
    const unsigned expected[] = {(unsigned)sizeof(P)...};
    for (int i = 0; i < argc; ++i)
        if (sizes[i] != expected[i]) return -3 - i;
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                if (only_block >= 0 && ((long long)z * grid.y + y) * grid.x + x != only_block) continue;
                blockIdx = {x, y, z};
                std::barrier<> barrier((std::ptrdiff_t)threads);
                block_barrier = &barrier;
                auto body = [&](unsigned rank) {
                    threadIdx = {rank % block.x, rank / block.x % block.y, rank / (block.x * block.y)};
                    call(kernel, slots, std::index_sequence_for<P...>{});
                };
                if (threads == 1) {
                    body(0);
                    continue;
                }
                std::vector<std::thread> pool;
                for (unsigned rank = 0; rank < threads; ++rank) pool.emplace_back(body, rank);
                for (auto& thread : pool) thread.join();
            }
    return 0;
}

}  // namespace

extern "C" void set_only_block(long long block) { only_block = block; }

// 0 on success, -1 for an unknown kernel, -2 for a wrong number of arguments, -3 - i when argument i
// has the wrong size.
extern "C" int launch_kernel(
    const char* name, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x, unsigned block_y,
    unsigned block_z, int argc, const unsigned long long* slots, const unsigned* sizes)
{
    const dim3 grid{grid_x, grid_y, grid_z}, block{block_x, block_y, block_z};
#define KERNEL(NAME) \
    if (std::strcmp(name, #NAME) == 0) return run_grid(NAME, grid, block, argc, slots, sizes);
    KERNEL(gray_histogram)
    KERNEL(equalize_lut)
    KERNEL(blur_sobel_nms_k3)
    KERNEL(blur_sobel_nms_k5)
    KERNEL(blur_sobel_nms_k7)
    KERNEL(hysteresis)
    KERNEL(finalize_edges)
    KERNEL(cnn_resample)
    KERNEL(cnn_block)
    KERNEL(cnn_sums)
#undef KERNEL
    return -1;
}
