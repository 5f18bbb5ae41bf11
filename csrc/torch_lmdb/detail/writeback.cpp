#include "torch_lmdb/detail/writeback.h"

#include <fcntl.h>

#include <system_error>

namespace torch_lmdb {
namespace detail {

EarlyWriteback::EarlyWriteback(MDB_env* env) {
#ifdef SYNC_FILE_RANGE_WRITE
  int fd = -1;
  if (mdb_env_get_fd(env, &fd) != 0 || fd < 0) return;
  try {
    thread_ = std::thread([this, fd] {
      std::unique_lock<std::mutex> lock(mutex_);
      while (!stop_.wait_for(lock, kWritebackKick, [this] { return done_; }))
        (void)::sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    });
  } catch (const std::system_error&) {
    // No thread to spare: the commit runs without the hint.
  }
#else
  (void)env;
#endif
}

EarlyWriteback::~EarlyWriteback() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
  }
  stop_.notify_one();
  thread_.join();
}

}  // namespace detail
}  // namespace torch_lmdb
