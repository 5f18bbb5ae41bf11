// torch_lmdb/detail/fault_guard.h -- faults on mapped database files become errors
// (internal; not installed).
//
// Contract
// - A file shrunk (truncate, a copy over it) under a reader's map makes the
//   next access to a page past its new end raise SIGBUS. After
//   install_fault_handler(), a SIGBUS or SIGSEGV whose address lies inside a
//   map given to register_map() does not end the process: the handler maps
//   a page of zeros over the faulting page, counts the fault in the map's
//   counter and returns, so the access completes (reading zeros). Whoever
//   reads through that map checks the counter before handing out what it
//   read (Env::faulted(), Reader): the read raises CorruptedError, never
//   returns the zeros. The map stays poisoned: it is reopened, not reused.
// - A fault outside every registered map while the thread is inside
//   guarded_get() / guarded_cursor_get() (LMDB's page walk over a damaged
//   B-tree), and an LMDB assertion there (mdb_env_set_assert), make that call
//   return MDB_CORRUPTED instead (siglongjmp over LMDB's C frames only, which
//   hold no lock and no heap memory in a read transaction).
// - Every other fault goes to the handler that was installed before ours
//   (Python's faulthandler, a sanitizer's, or the default action: the
//   process dies as it would have). A handler installed after ours takes
//   precedence until install_fault_handler() runs again (every Env::open).
// - Cost: nothing per access; one sigsetjmp per guarded LMDB lookup.
//   TORCH_LMDB_FAULT_GUARD=0 in the environment (read once) turns it all
//   off: faults then end the process as LMDB's always did.
// - Async-signal safety: the handler uses mmap(2), atomics and siglongjmp.
#pragma once

#include <lmdb.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace torch_lmdb {
namespace detail {

/// Installs the SIGBUS/SIGSEGV handler (idempotent; re-installs, chaining,
/// when another handler replaced it).
void install_fault_handler() noexcept;

/// Faults inside [base, base + bytes) are contained and counted in `*faults`
/// (which must outlive the registration). False when every slot is taken
/// (the map's faults are then not contained).
bool register_map(const void* base, size_t bytes, std::atomic<uint64_t>* faults) noexcept;
/// Ends the registration of the map at `base` (before it is unmapped).
void unregister_map(const void* base) noexcept;

/// mdb_get / mdb_cursor_get, returning MDB_CORRUPTED for a contained fault
/// or LMDB assertion inside the call.
int guarded_get(MDB_txn* txn, MDB_dbi dbi, MDB_val* key, MDB_val* value) noexcept;
int guarded_cursor_get(MDB_cursor* cursor, MDB_val* key, MDB_val* value, MDB_cursor_op op) noexcept;
/// mdb_stat, likewise (a named table's first use in a transaction searches
/// its root page: Env::read_txn() does it under the guard).
int guarded_stat(MDB_txn* txn, MDB_dbi dbi, MDB_stat* stat) noexcept;

/// For mdb_env_set_assert: inside a guarded call, abandons it (see above);
/// elsewhere returns, and LMDB aborts as it would have.
void on_lmdb_assert(MDB_env* env, const char* message) noexcept;

}  // namespace detail
}  // namespace torch_lmdb
