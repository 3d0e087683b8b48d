// The CUDA execution simulator's runtime: the fiber scheduler behind every launch, warp shuffles,
// the access checks and the guarded CPU allocator. The contract is in sim.h.
#include "sim.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

namespace ek {
namespace sim {
namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 128 * 1024;  // per emulated thread; a PROT_NONE page below catches overflow
constexpr size_t kPage = 4096;
constexpr size_t kGuardBytes = 256;         // before and after every guarded allocation
constexpr unsigned char kGuardByte = 0xA5;
constexpr unsigned char kFreshByte = 0xFF;  // NaN in float32, float16 and bfloat16

int g_fault = 0;
bool g_race_checks = true;

std::vector<LaunchRecord> g_log;
std::mutex g_late_mu;
std::string g_late;

// ---- guarded allocator --------------------------------------------------------------------------

struct Alloc {
  size_t size;
};

std::mutex g_reg_mu;
std::map<uintptr_t, Alloc>& registry() {  // data pointer -> size; never destroyed (tensors may outlive exit)
  static auto* r = new std::map<uintptr_t, Alloc>();
  return *r;
}

size_t round64(size_t n) { return (n + 63) / 64 * 64; }

// First corrupted guard byte of an allocation: -1 none; else the offset from the data start
// (negative: before it).
bool guard_damage(uintptr_t data, size_t size, int64_t* where) {
  const auto* pre = reinterpret_cast<const unsigned char*>(data - kGuardBytes);
  for (size_t i = 0; i < kGuardBytes; ++i)
    if (pre[i] != kGuardByte) { *where = static_cast<int64_t>(i) - static_cast<int64_t>(kGuardBytes); return true; }
  const auto* post = reinterpret_cast<const unsigned char*>(data + size);
  const size_t n_post = round64(size) - size + kGuardBytes;
  for (size_t i = 0; i < n_post; ++i)
    if (post[i] != kGuardByte) { *where = static_cast<int64_t>(size + i); return true; }
  return false;
}

void fill_guards(uintptr_t data, size_t size) {
  std::memset(reinterpret_cast<void*>(data - kGuardBytes), kGuardByte, kGuardBytes);
  std::memset(reinterpret_cast<void*>(data + size), kGuardByte, round64(size) - size + kGuardBytes);
}

std::string damage_text(int64_t where, size_t size) {
  std::ostringstream s;
  if (where < 0) s << "byte " << -where << " before";
  else s << "byte " << where - static_cast<int64_t>(size) << " past the end of";
  s << " a " << size << "-byte tensor allocation was written";
  return s.str();
}

void guarded_free(void* ctx) {
  const auto data = reinterpret_cast<uintptr_t>(ctx);
  size_t size = 0;
  {
    std::lock_guard<std::mutex> lk(g_reg_mu);
    auto it = registry().find(data);
    if (it != registry().end()) { size = it->second.size; registry().erase(it); }
  }
  int64_t where;
  if (guard_damage(data, size, &where)) {
    std::lock_guard<std::mutex> lk(g_late_mu);
    g_late += "freed tensor: " + damage_text(where, size) + "\n";
  }
  std::free(reinterpret_cast<void*>(data - kGuardBytes));
}

void delete_nothing(void*) {}

struct GuardedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &delete_nothing, c10::Device(c10::DeviceType::CPU)};
    void* raw = std::aligned_alloc(64, kGuardBytes + round64(n) + kGuardBytes);
    TORCH_CHECK(raw, "CUDA simulator: out of memory allocating ", n, " bytes");
    const auto data = reinterpret_cast<uintptr_t>(raw) + kGuardBytes;
    std::memset(reinterpret_cast<void*>(data), kFreshByte, n);
    fill_guards(data, n);
    {
      std::lock_guard<std::mutex> lk(g_reg_mu);
      registry()[data] = Alloc{n};
    }
    void* p = reinterpret_cast<void*>(data);
    return {p, p, &guarded_free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

GuardedAllocator& guarded() {
  static auto* a = new GuardedAllocator();
  return *a;
}
c10::Allocator* g_prev_alloc = nullptr;

// ---- fibers -------------------------------------------------------------------------------------

enum class St { Ready, Waiting, Done, Faulted };

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  int lane = 0;
  St st = St::Ready;
  // at a shuffle
  uint64_t val = 0, res = 0;
  unsigned mask = 0;
  int lane_mask = 0, width = kWarpSize;
};

struct Run {
  const char* kernel;
  dim3 grid, block;
  uint3 bid;
  int64_t block_linear = 0, nthreads = 0;
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
  LaunchRecord rec;
  std::unordered_map<uintptr_t, int64_t> writer;  // 2-byte unit -> global thread index
};

thread_local Run* g_run = nullptr;

std::vector<char*>& stack_pool() {
  thread_local std::vector<char*> pool;
  return pool;
}

char* stack_for(size_t i) {
  auto& pool = stack_pool();
  while (pool.size() <= i) {
    void* m = mmap(nullptr, kStackBytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "CUDA simulator: cannot map a thread stack");
    mprotect(m, kPage, PROT_NONE);  // below the stack: an overflow faults instead of corrupting memory
    pool.push_back(static_cast<char*>(m) + kPage);
  }
  return pool[i];
}

std::string where_text(const Run& r, const uint3& bid, const uint3& tid) {
  std::ostringstream s;
  s << "kernel " << r.kernel << " (grid " << r.grid.x << "x" << r.grid.y << "x" << r.grid.z << ", block "
    << r.block.x << "x" << r.block.y << "x" << r.block.z << "), block (" << bid.x << ", " << bid.y << ", " << bid.z
    << "), thread (" << tid.x << ", " << tid.y << ", " << tid.z << ")";
  return s.str();
}

std::string thread_text(const Run& r, int64_t gid) {
  const int64_t b = gid / r.nthreads, t = gid % r.nthreads;
  const uint3 bid{static_cast<unsigned>(b % r.grid.x), static_cast<unsigned>((b / r.grid.x) % r.grid.y),
                  static_cast<unsigned>(b / (static_cast<int64_t>(r.grid.x) * r.grid.y))};
  const uint3 tid{static_cast<unsigned>(t % r.block.x), static_cast<unsigned>((t / r.block.x) % r.block.y),
                  static_cast<unsigned>(t / (static_cast<int64_t>(r.block.x) * r.block.y))};
  std::ostringstream s;
  s << "block (" << bid.x << ", " << bid.y << ", " << bid.z << ") thread (" << tid.x << ", " << tid.y << ", " << tid.z
    << ")";
  return s.str();
}

// A fault inside a fiber: recorded, and the fiber never runs again (nothing on its stack needs
// unwinding: kernels hold only trivially destructible locals).
[[noreturn]] void fault(const std::string& what) {
  Run* r = g_run;
  if (!r || !r->cur) TORCH_CHECK(false, "CUDA simulator: ", what);
  if (r->error.empty()) r->error = what + "\n  at " + where_text(*r, r->bid, r->cur->tid);
  r->cur->st = St::Faulted;
  swapcontext(&r->cur->ctx, &r->sched);
  std::abort();  // a faulted fiber is never resumed
}

void fiber_entry() {
  Run* r = g_run;
  (*r->body)();
  r->cur->st = St::Done;  // returns to uc_link, the scheduler
}

std::string hex(uintptr_t v) {
  char b[32];
  std::snprintf(b, sizeof(b), "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

// Lanes of one warp waiting at a shuffle: release every group whose mask is complete. A mask
// that names a lane which cannot arrive sets r.error (on the scheduler's stack, not a fiber's).
// Returns whether any lane was released.
bool resolve_warp(Run& r, int64_t first, int64_t count) {
  auto error = [&](const Fiber& f, const std::string& what) {
    r.error = what + "\n  at " + where_text(r, r.bid, f.tid);
    return false;
  };
  bool released = false;
  std::vector<bool> done(count, false);
  for (int64_t i = 0; i < count; ++i) {
    Fiber& f = r.fibers[first + i];
    if (f.st != St::Waiting || done[i]) continue;
    const unsigned m = f.mask;
    if (!((m >> i) & 1u)) return error(f, "__shfl_xor_sync: lane " + std::to_string(i) + " is not in its own mask " + hex(m));
    for (int j = 0; j < kWarpSize; ++j) {
      if (!((m >> j) & 1u)) continue;
      if (j >= count)
        return error(f, "__shfl_xor_sync: mask " + hex(m) + " names lane " + std::to_string(j) +
                            ", which this block (" + std::to_string(r.nthreads) + " threads) does not have");
      const Fiber& g = r.fibers[first + j];
      if (g.st == St::Done)
        return error(f, "__shfl_xor_sync: mask " + hex(m) + " names lane " + std::to_string(j) +
                            ", which has exited (undefined on the device: it may hang or read garbage)");
      if (g.st != St::Waiting || g.mask != m)
        return error(f, "__shfl_xor_sync: lanes " + std::to_string(i) + " and " + std::to_string(j) +
                            " wait with different masks (" + hex(m) + ", " + hex(g.mask) + "): a divergent warp");
    }
    for (int j = 0; j < count; ++j) {
      if (!((m >> j) & 1u)) continue;
      Fiber& g = r.fibers[first + j];
      const unsigned w = static_cast<unsigned>(g.width);
      const unsigned src = static_cast<unsigned>(j) ^ static_cast<unsigned>(g.lane_mask);
      const unsigned max_lane = static_cast<unsigned>(j) / w * w + w - 1;  // the end of the caller's segment
      if (src > max_lane) {
        g.res = g.val;  // a later segment (or past the warp): the caller's own value, as the hardware does
      } else if (!((m >> src) & 1u)) {
        return error(g, "__shfl_xor_sync: lane " + std::to_string(j) + " reads lane " + std::to_string(src) +
                            ", which is not in the mask " + hex(m));
      } else {
        g.res = r.fibers[first + src].val;
      }
      done[j] = true;
    }
    for (int j = 0; j < count; ++j)
      if (((m >> j) & 1u)) r.fibers[first + j].st = St::Ready;
    released = true;
  }
  return released;
}

// One block: every thread a fiber, run until all have exited. Sets r.error on a fault.
void run_block(Run& r) {
  const int64_t n = r.nthreads;
  r.fibers.resize(n);
  for (int64_t t = 0; t < n; ++t) {
    Fiber& f = r.fibers[t];
    f = Fiber{};
    f.tid = uint3{static_cast<unsigned>(t % r.block.x), static_cast<unsigned>((t / r.block.x) % r.block.y),
                  static_cast<unsigned>(t / (static_cast<int64_t>(r.block.x) * r.block.y))};
    f.lane = static_cast<int>(t % kWarpSize);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_for(t);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    bool live = false;
    for (int64_t t = 0; t < n; ++t) {
      Fiber& f = r.fibers[t];
      if (f.st != St::Ready) continue;
      r.cur = &f;
      swapcontext(&r.sched, &f.ctx);
      if (!r.error.empty()) return;
    }
    for (int64_t t = 0; t < n; ++t) live = live || r.fibers[t].st == St::Waiting;
    if (!live) return;  // every thread has exited
    bool released = false;
    for (int64_t w = 0; w < n; w += kWarpSize) {
      released = resolve_warp(r, w, std::min<int64_t>(kWarpSize, n - w)) || released;
      if (!r.error.empty()) return;
    }
    if (!released) {
      r.error = "deadlock: every live thread waits at __shfl_xor_sync and no mask can complete\n  at " +
                where_text(r, r.bid, r.fibers[0].tid);
      return;
    }
  }
}

void check_config(const char* kernel, dim3 g, dim3 b) {
  const int64_t threads = static_cast<int64_t>(b.x) * b.y * b.z;
  std::ostringstream s;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0) s << "a zero grid or block dimension";
  else if (g.x > 2147483647u) s << "grid.x " << g.x << " > 2^31 - 1";
  else if (g.y > 65535u || g.z > 65535u) s << "grid.y " << g.y << " or grid.z " << g.z << " > 65535";
  else if (b.x > 1024u || b.y > 1024u || b.z > 64u) s << "block " << b.x << "x" << b.y << "x" << b.z
                                                      << " exceeds 1024 x 1024 x 64";
  else if (threads > 1024) s << threads << " threads per block > 1024";
  else return;
  TORCH_CHECK(false, "CUDA simulator: invalid configuration argument launching ", kernel, " with grid ", g.x, "x",
              g.y, "x", g.z, " and block ", b.x, "x", b.y, "x", b.z, ": ", s.str());
}

void check_guards_after(const Run& r) {
  std::lock_guard<std::mutex> lk(g_reg_mu);
  for (auto& [data, a] : registry()) {
    int64_t where;
    if (guard_damage(data, a.size, &where)) {
      fill_guards(data, a.size);  // reported once
      TORCH_CHECK(false, "CUDA simulator: out-of-bounds store by kernel ", r.kernel, ": ", damage_text(where, a.size));
    }
  }
}

}  // namespace

// ---- public -------------------------------------------------------------------------------------

bool broken(int fault_id) { return g_fault == fault_id; }
void set_fault(int fault_id) { g_fault = fault_id; }
void set_race_checks(bool on) { g_race_checks = on; }
bool guard_on() { return g_prev_alloc != nullptr; }

void set_guard(bool on) {
  if (on == guard_on()) return;
  if (on) {
    g_prev_alloc = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&guarded(), 0);
  } else {
    c10::SetCPUAllocator(g_prev_alloc, 0);
    g_prev_alloc = nullptr;
  }
}

std::vector<LaunchRecord>& launch_log() { return g_log; }

std::string take_late_errors() {
  std::lock_guard<std::mutex> lk(g_late_mu);
  std::string s;
  s.swap(g_late);
  return s;
}

const uint3& cur_tid() { return g_run->cur->tid; }
const uint3& cur_bid() { return g_run->bid; }
const dim3& cur_block_dim() { return g_run->block; }
const dim3& cur_grid_dim() { return g_run->grid; }

void kernel_assert(bool ok, const char* what) {
  if (!ok) fault(std::string("device-side assertion failed: ") + what);
}

uint64_t shuffle_xor(uint64_t bits, unsigned mask, int lane_mask, int width) {
  Run* r = g_run;
  TORCH_CHECK(r && r->cur, "CUDA simulator: __shfl_xor_sync outside a kernel");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)))
    fault("__shfl_xor_sync: width " + std::to_string(width) + " is not a power of two in [1, 32]");
  Fiber& f = *r->cur;
  f.val = bits;
  f.mask = mask;
  f.lane_mask = lane_mask;
  f.width = width;
  f.st = St::Waiting;
  ++r->rec.shuffles;
  swapcontext(&f.ctx, &r->sched);
  return f.res;
}

void access(const void* p, size_t bytes, bool write) {
  Run* r = g_run;
  if (!r || !r->cur) return;  // host code
  const auto a = reinterpret_cast<uintptr_t>(p);
  const char* kind = write ? "store" : "load";
  r->rec.max_access_bytes = std::max<int>(r->rec.max_access_bytes, static_cast<int>(bytes));
  if (a % bytes != 0)
    fault(std::string("misaligned ") + kind + " of " + std::to_string(bytes) + " bytes at " + hex(a) +
          " (a " + std::to_string(bytes) + "-byte access needs an address that is a multiple of " +
          std::to_string(bytes) + ")");
  if (guard_on()) {
    // The message is built under the lock and the fault raised after it is released: a faulted
    // fiber never returns, so nothing it holds is ever unlocked.
    std::string err;
    {
      std::lock_guard<std::mutex> lk(g_reg_mu);
      auto& reg = registry();
      auto it = reg.upper_bound(a);
      bool inside = false;
      if (it != reg.begin()) {
        auto pv = std::prev(it);
        const uintptr_t lo = pv->first, hi = pv->first + pv->second.size;
        if (a >= lo && a + bytes <= hi) inside = true;
        else if (a < hi + kGuardBytes)
          err = std::string("out-of-bounds ") + kind + ": bytes [" + std::to_string(static_cast<int64_t>(a - lo)) +
                ", " + std::to_string(static_cast<int64_t>(a - lo + bytes)) + ") of a " +
                std::to_string(pv->second.size) + "-byte tensor allocation";
      }
      if (!inside && err.empty()) {
        if (it != reg.end() && a + kGuardBytes >= it->first)
          err = std::string("out-of-bounds ") + kind + ": " + std::to_string(it->first - a) + " bytes before a " +
                std::to_string(it->second.size) + "-byte tensor allocation";
        else
          err = std::string(kind) + " of " + std::to_string(bytes) + " bytes at " + hex(a) +
                ", which is in no tensor allocation";
      }
    }
    if (!err.empty()) fault(err);
  }
  if (!g_race_checks) return;
  const int64_t gid = r->block_linear * r->nthreads + (r->cur - r->fibers.data());
  for (uintptr_t u = a >> 1; u < (a + bytes + 1) >> 1; ++u) {
    auto it = r->writer.find(u);
    if (write) {
      if (it == r->writer.end()) r->writer.emplace(u, gid);
      else if (it->second != gid)
        fault("two threads store to one element at " + hex(a) + ": this one and " + thread_text(*r, it->second) +
              " (each element has one writer per launch)");
    } else if (it != r->writer.end() && it->second != gid) {
      fault("load at " + hex(a) + " of an element that " + thread_text(*r, it->second) +
            " stored in this launch (nothing orders the two)");
    }
  }
}

void run_grid(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& body) {
  check_config(kernel, grid, block);
  TORCH_CHECK(!g_run, "CUDA simulator: a kernel launch inside a kernel (", kernel, ")");
  Run r;
  r.kernel = kernel;
  r.grid = grid;
  r.block = block;
  r.body = &body;
  r.nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  r.rec.kernel = kernel;
  r.rec.grid = grid;
  r.rec.block = block;
  g_run = &r;
  for (unsigned z = 0; z < grid.z && r.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && r.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && r.error.empty(); ++x) {
        r.bid = uint3{x, y, z};
        r.block_linear = x + static_cast<int64_t>(grid.x) * (y + static_cast<int64_t>(grid.y) * z);
        run_block(r);
        r.rec.threads += r.nthreads;
      }
  g_run = nullptr;
  g_log.push_back(r.rec);
  TORCH_CHECK(r.error.empty(), "CUDA simulator: ", r.error);
  if (guard_on()) check_guards_after(r);
}

}  // namespace sim
}  // namespace ek
