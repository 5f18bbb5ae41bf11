#include "torch_lmdb/detail/fault_guard.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>
#include <mutex>

namespace torch_lmdb {
namespace detail {
namespace {

struct MapSlot {
  std::atomic<uintptr_t> base{0};
  std::atomic<size_t> bytes{0};
  std::atomic<std::atomic<uint64_t>*> faults{nullptr};
};
constexpr size_t kSlots = 1024;  // maps registered at once (one per open data file)
MapSlot g_slots[kSlots];

struct sigaction g_previous_bus, g_previous_segv;
std::mutex g_install_mutex;
thread_local sigjmp_buf* t_guard = nullptr;
// TORCH_LMDB_FAULT_GUARD=0 in the environment turns the guard off (to
// measure what it costs: benchmarks/run.py --no-fault-guard).
const bool g_enabled = [] {
  const char* v = std::getenv("TORCH_LMDB_FAULT_GUARD");
  return v == nullptr || std::string(v) != "0";
}();

// The slot of the map holding `addr`, or nullptr.
MapSlot* slot_of(uintptr_t addr) noexcept {
  for (MapSlot& s : g_slots) {
    const uintptr_t base = s.base.load(std::memory_order_acquire);
    if (base != 0 && addr >= base && addr - base < s.bytes.load(std::memory_order_relaxed)) return &s;
  }
  return nullptr;
}

void chain(int sig, siginfo_t* info, void* context) noexcept {
  const struct sigaction& previous = sig == SIGBUS ? g_previous_bus : g_previous_segv;
  if ((previous.sa_flags & SA_SIGINFO) && previous.sa_sigaction != nullptr) {
    previous.sa_sigaction(sig, info, context);
    return;
  }
  if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
    return;
  }
  // The default action: restore it; a fault then repeats when the handler
  // returns and ends the process as it would have; a signal sent by kill()
  // is sent again.
  signal(sig, SIG_DFL);
  if (info == nullptr || info->si_code <= 0) raise(sig);
}

void on_fault(int sig, siginfo_t* info, void* context) {
  const int saved_errno = errno;
  if (info != nullptr && info->si_code > 0) {  // raised by the kernel for an access
    const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
    if (MapSlot* slot = slot_of(addr)) {
      const uintptr_t page = addr & ~(static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE)) - 1);
      void* zeros = ::mmap(reinterpret_cast<void*>(page), static_cast<size_t>(::sysconf(_SC_PAGESIZE)), PROT_READ,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (zeros != MAP_FAILED) {
        if (std::atomic<uint64_t>* faults = slot->faults.load(std::memory_order_acquire))
          faults->fetch_add(1, std::memory_order_relaxed);
        errno = saved_errno;
        return;  // the access is repeated and reads zeros
      }
    }
    if (t_guard != nullptr) siglongjmp(*t_guard, 1);
  }
  errno = saved_errno;
  chain(sig, info, context);
}

bool ours(int sig) noexcept {
  struct sigaction current {};
  return sigaction(sig, nullptr, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
         current.sa_sigaction == on_fault;
}

}  // namespace

void install_fault_handler() noexcept {
  if (!g_enabled || (ours(SIGBUS) && ours(SIGSEGV))) return;
  std::lock_guard<std::mutex> lock(g_install_mutex);
  struct sigaction action {};
  action.sa_sigaction = on_fault;
  // SA_NODEFER: a siglongjmp out of the handler leaves the signal unblocked.
  action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&action.sa_mask);
  for (int sig : {SIGBUS, SIGSEGV}) {
    if (ours(sig)) continue;
    struct sigaction& previous = sig == SIGBUS ? g_previous_bus : g_previous_segv;
    struct sigaction replaced {};
    if (sigaction(sig, &action, &replaced) == 0) previous = replaced;
  }
}

bool register_map(const void* base, size_t bytes, std::atomic<uint64_t>* faults) noexcept {
  if (!g_enabled || base == nullptr || bytes == 0) return false;
  for (MapSlot& s : g_slots) {
    // Claim a free slot: its base is set last (the handler reads base first).
    std::atomic<uint64_t>* none = nullptr;
    if (!s.faults.compare_exchange_strong(none, faults)) continue;
    s.bytes.store(bytes, std::memory_order_relaxed);
    s.base.store(reinterpret_cast<uintptr_t>(base), std::memory_order_release);
    return true;
  }
  return false;
}

void unregister_map(const void* base) noexcept {
  for (MapSlot& s : g_slots) {
    if (s.base.load(std::memory_order_acquire) == reinterpret_cast<uintptr_t>(base) && base != nullptr) {
      s.base.store(0, std::memory_order_release);
      s.bytes.store(0, std::memory_order_relaxed);
      s.faults.store(nullptr, std::memory_order_release);
      return;
    }
  }
}

namespace {
// Runs `call` (one LMDB C function: no C++ object lives across it) with this
// thread's guard set; a contained fault or assertion inside it comes back
// here through siglongjmp as MDB_CORRUPTED. The guard nests (outer restored).
template <typename Call>
int guarded(Call call) noexcept {
  if (!g_enabled) return call();
  sigjmp_buf buffer;
  sigjmp_buf* outer = t_guard;
  if (sigsetjmp(buffer, 0) != 0) {
    t_guard = outer;
    return MDB_CORRUPTED;
  }
  t_guard = &buffer;
  const int rc = call();
  t_guard = outer;
  return rc;
}
}  // namespace

int guarded_get(MDB_txn* txn, MDB_dbi dbi, MDB_val* key, MDB_val* value) noexcept {
  return guarded([=] { return mdb_get(txn, dbi, key, value); });
}

int guarded_cursor_get(MDB_cursor* cursor, MDB_val* key, MDB_val* value, MDB_cursor_op op) noexcept {
  return guarded([=] { return mdb_cursor_get(cursor, key, value, op); });
}

int guarded_stat(MDB_txn* txn, MDB_dbi dbi, MDB_stat* stat) noexcept {
  return guarded([=] { return mdb_stat(txn, dbi, stat); });
}

void on_lmdb_assert(MDB_env*, const char*) noexcept {
  if (t_guard != nullptr) siglongjmp(*t_guard, 2);
}

}  // namespace detail
}  // namespace torch_lmdb
