// Runs the flash attention kernel's CUDA source (ops/flash.rs, `KERNEL`, after the
// seam's element access) on the CPU, for a test on a machine without a GPU: each CUDA
// thread is a std::thread, a block's threads meet at `__syncthreads` on a barrier,
// a warp's at each shuffle and tensor-core product, and the blocks run one after
// another (so a `__shared__` array, a static here, is the running block's).
//
// `tb_mma_16816` is the one piece of the kernel replaced: the warp-wide
// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32, computed from the fragment layouts of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"):
//   groupID = lane >> 2, threadID_in_group = lane % 4
//   A (16x16): a0,a1 row groupID, a2,a3 row groupID+8, a4,a5 row groupID, a6,a7 row
//              groupID+8; col threadID_in_group*2 + (i & 1), + 8 for i >= 4;
//              register j holds a(2j) (low half) and a(2j+1)
//   B (16x8):  b0,b1 row threadID_in_group*2 + (i & 1), b2,b3 the same + 8;
//              col groupID
//   C/D (16x8, f32): c0,c1 row groupID, c2,c3 row groupID+8;
//              col threadID_in_group*2 + (i & 1)
//
// Usage: flash_emu DIR DP BH  (DIR holds args.bin, q.bin, k.bin, v.bin, bias.bin,
// mask.bin and gets o.bin; the buffers are raw: bf16 bits, f32 biases)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#define TB_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}

struct TbDim3 {
  unsigned int x = 1, y = 1, z = 1;
};
static TbDim3 blockIdx, blockDim, gridDim;
static thread_local TbDim3 threadIdx;

struct TbWarp {
  std::barrier<> bar{32};
  unsigned int words[32][8];
};
static std::barrier<>* tb_block_barrier;
static TbWarp* tb_warps;

inline void __syncthreads() { tb_block_barrier->arrive_and_wait(); }

inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
using std::isnan;

static TbWarp& tb_warp() { return tb_warps[threadIdx.x / 32]; }

inline float __shfl_xor_sync(unsigned int, float v, int lane_mask) {
  TbWarp& w = tb_warp();
  const unsigned int lane = threadIdx.x % 32;
  w.words[lane][0] = __float_as_uint(v);
  w.bar.arrive_and_wait();
  const float r = __uint_as_float(w.words[lane ^ lane_mask][0]);
  w.bar.arrive_and_wait();
  return r;
}

static float tb_emu_half(unsigned int word, int high) {
  return __uint_as_float((high ? word >> 16 : word & 0xffffu) << 16);
}

inline void tb_mma_16816(float* c, const unsigned int* a, const unsigned int* b) {
  TbWarp& w = tb_warp();
  const unsigned int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) w.words[lane][i] = a[i];
  w.words[lane][4] = b[0];
  w.words[lane][5] = b[1];
  w.bar.arrive_and_wait();
  // A(r, k): lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k & 1
  auto A = [&](int r, int k) {
    return tb_emu_half(w.words[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k & 1);
  };
  // B(k, n): lane n * 4 + (k % 8) / 2, register (k >= 8), half k & 1
  auto B = [&](int k, int n) {
    return tb_emu_half(w.words[n * 4 + (k % 8) / 2][4 + (k >= 8)], k & 1);
  };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[e] = sum;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

#include "kernel.cu"

template <typename F>
static void tb_emu_launch(TbDim3 grid, TbDim3 block, F kernel) {
  gridDim = grid;
  blockDim = block;
  for (unsigned int y = 0; y < grid.y; ++y) {
    for (unsigned int x = 0; x < grid.x; ++x) {
      blockIdx = TbDim3{x, y, 1};
      std::barrier<> bar(block.x);
      tb_block_barrier = &bar;
      std::unique_ptr<TbWarp[]> warps(new TbWarp[block.x / 32]);
      tb_warps = warps.get();
      std::vector<std::thread> threads;
      for (unsigned int i = 0; i < block.x; ++i) {
        threads.emplace_back([i, &kernel] {
          threadIdx = TbDim3{i, 0, 0};
          kernel();
        });
      }
      for (auto& th : threads) th.join();
    }
  }
}

static std::vector<char> tb_read(const std::string& path) {
  std::vector<char> out;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.insert(out.end(), buf, buf + n);
  std::fclose(f);
  return out;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s DIR DP BH\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int dp = std::atoi(argv[2]);
  const unsigned int bh = (unsigned int)std::atoi(argv[3]);
  std::vector<char> args_bytes = tb_read(dir + "/args.bin");
  if (args_bytes.size() != sizeof(TbFlashArgs)) {
    std::fprintf(stderr, "args.bin has %zu bytes, TbFlashArgs %zu\n", args_bytes.size(),
                 sizeof(TbFlashArgs));
    return 1;
  }
  TbFlashArgs a;
  std::memcpy(&a, args_bytes.data(), sizeof a);
  std::vector<char> q = tb_read(dir + "/q.bin"), k = tb_read(dir + "/k.bin"),
                    v = tb_read(dir + "/v.bin"), bias = tb_read(dir + "/bias.bin"),
                    mask = tb_read(dir + "/mask.bin");
  std::vector<unsigned short> o((size_t)bh * a.tq * a.d, 0x7fc0);  // NaN: unwritten
  auto qp = (const unsigned short*)q.data(), kp = (const unsigned short*)k.data(),
       vp = (const unsigned short*)v.data();
  auto bp = (const float*)bias.data(), mp = (const float*)mask.data();
  TbDim3 grid{bh, (unsigned int)((a.tq + 63) / 64), 1}, block{128, 1, 1};
  unsigned short* op = o.data();
  switch (dp) {
#define TB_EMU_CASE(DP)                                                         \
  case DP:                                                                      \
    tb_emu_launch(grid, block, [&] { tb_flash_bf16_d##DP(qp, kp, vp, op, bp, mp, a); }); \
    break;
    TB_EMU_CASE(32)
    TB_EMU_CASE(64)
    TB_EMU_CASE(80)
    TB_EMU_CASE(96)
    TB_EMU_CASE(128)
    default:
      std::fprintf(stderr, "no kernel for padded head dim %d\n", dp);
      return 1;
  }
  FILE* f = std::fopen((dir + "/o.bin").c_str(), "wb");
  if (!f || std::fwrite(o.data(), 2, o.size(), f) != o.size()) return 1;
  std::fclose(f);
  return 0;
}
