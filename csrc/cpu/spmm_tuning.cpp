// S2H_SPMM_* read once (csrc/cpu/spmm_tuning.h).
#include "cpu/spmm_tuning.h"

#include <atomic>
#include <cstdlib>

namespace s2h::spmm {
namespace {

// The value of an integer variable, or nullopt when unset or empty (any other text: atoll's value).
std::optional<int64_t> env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::atoll(v);
}

SpmmTuning from_environment() {
  SpmmTuning t;
  t.tile_v = env_int("S2H_SPMM_TILE_V");
  t.pmin = env_int("S2H_SPMM_PMIN");
  t.l1 = env_int("S2H_SPMM_L1").value_or(t.l1);
  t.partials = env_int("S2H_SPMM_PARTIALS").value_or(t.partials);
  t.work = env_int("S2H_SPMM_WORK").value_or(t.work);
  t.sell_work = env_int("S2H_SPMM_SELL_WORK").value_or(t.sell_work);
  t.sell_loads = env_int("S2H_SPMM_SELL_LOADS").value_or(t.sell_loads);
  t.chunks = env_int("S2H_SPMM_CHUNKS").value_or(t.chunks);
  t.align = env_int("S2H_SPMM_ALIGN").value_or(t.align);
  t.tail_dot = env_int("S2H_SPMM_TAIL_DOT").value_or(t.tail_dot);
  t.tail_x = env_int("S2H_SPMM_TAIL_X").value_or(t.tail_x);
  t.stream = env_int("S2H_SPMM_STREAM").value_or(t.stream);
  t.keep_scratch = env_int("S2H_SPMM_KEEP_SCRATCH").value_or(t.keep_scratch);
  t.conv_static = env_int("S2H_SPMM_CONV_STATIC").value_or(1) != 0;
  return t;
}

// Never freed: a kernel running on another thread may still read the struct a reload replaced.
std::atomic<const SpmmTuning*> g_tuning{nullptr};

}  // namespace

const SpmmTuning& tuning() {
  const SpmmTuning* t = g_tuning.load(std::memory_order_acquire);
  if (t == nullptr) {
    const SpmmTuning* fresh = new SpmmTuning(from_environment());
    if (g_tuning.compare_exchange_strong(t, fresh, std::memory_order_acq_rel)) t = fresh;
    else delete fresh;  // another thread was first; t holds its struct
  }
  return *t;
}

void reload_tuning() { g_tuning.store(new SpmmTuning(from_environment()), std::memory_order_release); }

}  // namespace s2h::spmm
