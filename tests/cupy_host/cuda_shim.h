// Just enough of CUDA for plain C++ to compile gpu_pipeline/backends/cupy_pipeline.cu and run each
// block of a grid on CPU threads, one std::thread per CUDA thread: __shared__ becomes `static` (one
// block runs at a time, so its threads share it as on the GPU), __syncthreads a std::barrier.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

extern thread_local dim3 threadIdx;
extern dim3 blockIdx, blockDim, gridDim;
extern std::barrier<>* block_barrier;  // set up by the harness for each block

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

// OR of the predicate over the block: arrive, publish, read, then clear before anyone can publish again.
inline int __syncthreads_or(int predicate)
{
    static std::atomic<int> any{0};
    block_barrier->arrive_and_wait();
    if (predicate) any.store(1);
    block_barrier->arrive_and_wait();
    const int result = any.load();
    block_barrier->arrive_and_wait();
    if (threadIdx.x == 0 && threadIdx.y == 0) any.store(0);
    return result;
}

inline unsigned atomicAdd(unsigned* address, unsigned value)
{
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

// IEEE float32 in round-to-nearest-even mode, as the _rn intrinsics (compile without -ffast-math).
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
inline float __int2float_rn(int i) { return (float)i; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
