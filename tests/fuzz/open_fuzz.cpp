#include <cerrno>
// libFuzzer target: a database directory whose data.mdb is the input. The
// open and the read of every sample run in a forked child, because LMDB 0.9
// has no page checksums and may fault on a damaged file (DESIGN.md, Damage):
//   - the child exits 0 when everything it read was either right or raised a
//     torch_lmdb::Error / c10::Error (the expected outcome for damage);
//   - a fault (SIGSEGV/SIGBUS) whose program counter lies in liblmdb, or an
//     abort() called from liblmdb (a failed mdb_assert), is an LMDB finding: one line "open_fuzz: LMDB finding ..." on stderr, the
//     input saved as lmdb-fault-<n> in the artifact directory, fuzzing goes
//     on;
//   - a hang (more than kChildSeconds) is reported and saved the same way
//     (hang-<n>): it may be a loop in LMDB's tree walk or ours;
//   - anything else -- a fault in torch_lmdb or libc code, a sanitizer report,
//     another exception type -- is a torch_lmdb bug: the parent aborts, and
//     libFuzzer writes the crashing input as usual.
// The child's coverage counters are copied back to the parent through a
// pipe, so libFuzzer still sees what each input reached (the fuzz build links
// the library statically: its counters are in this executable's section).
#include <dlfcn.h>
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "torch_lmdb/errors.h"
#include "torch_lmdb/reader.h"

// This executable's coverage counters (coverage_counters.cpp).
uint8_t* coverage_counters(size_t* size);

namespace {

constexpr unsigned kChildSeconds = 10;
constexpr int kLmdbFault = 70, kUnexpectedException = 71;

std::string& workdir() {
  static std::string dir = [] {
    const char* base = getenv("TMPDIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/open_fuzz-XXXXXX";
    if (mkdtemp(&tmpl[0]) == nullptr) std::abort();
    return tmpl;
  }();
  return dir;
}

void on_fault(int sig, siginfo_t*, void* context) {
  const auto* uc = static_cast<const ucontext_t*>(context);
  void* pc = reinterpret_cast<void*>(uc->uc_mcontext.gregs[REG_RIP]);
  Dl_info info{};
  if (dladdr(pc, &info) != 0 && info.dli_fname != nullptr && std::strstr(info.dli_fname, "liblmdb") != nullptr) {
    char line[256];
    const int n = std::snprintf(line, sizeof line, "open_fuzz: LMDB finding: signal %d at %s+0x%lx\n", sig,
                                info.dli_fname,
                                (unsigned long)(static_cast<char*>(pc) - static_cast<char*>(info.dli_fbase)));
    (void)!write(2, line, static_cast<size_t>(std::max(n, 0)));
    _exit(kLmdbFault);
  }
  // Ours: say where (the faulting frame and its callers), then die of it;
  // the parent turns that into a crash.
  char line[256];
  const int n = std::snprintf(line, sizeof line, "open_fuzz: signal %d at %p in %s; stack:\n", sig, pc,
                              info.dli_fname ? info.dli_fname : "?");
  (void)!write(2, line, static_cast<size_t>(std::max(n, 0)));
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

// abort() called from inside liblmdb (a failed mdb_assert, whose message
// LMDB printed just before) is an LMDB finding too.
void on_abort(int sig) {
  void* frames[16];
  const int n = backtrace(frames, 16);
  for (int i = 0; i < n; ++i) {
    Dl_info info{};
    if (dladdr(frames[i], &info) != 0 && info.dli_fname != nullptr && std::strstr(info.dli_fname, "liblmdb")) {
      static const char line[] = "open_fuzz: LMDB finding: abort() in liblmdb (assertion)\n";
      (void)!write(2, line, sizeof line - 1);
      _exit(kLmdbFault);
    }
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

// The child: open, read every sample (bounded), report.
void read_everything(const std::string& dir, bool own_fault_handler = true) {
  if (own_fault_handler) {
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    signal(SIGABRT, on_abort);
  }
  try {
    torch_lmdb::ReaderOptions o;
    o.lock = 0;  // no lock.mdb: the directory holds just the input
    o.verify = true;
    o.warn = [](const std::string&) {};
    torch_lmdb::Reader reader(dir, o);
    const size_t n = std::min<size_t>(reader.size(), 64);
    for (size_t i = 0; i < n; ++i) {
      try {
        (void)reader.get(i);
      } catch (const torch_lmdb::Error&) {
      } catch (const c10::Error&) {
      }
    }
    std::vector<size_t> all(n);
    for (size_t i = 0; i < n; ++i) all[i] = i;
    torch_lmdb::BatchOptions bo;
    bo.pad = true;
    try {
      (void)reader.read_batch(all, bo);
    } catch (const torch_lmdb::Error&) {
    } catch (const c10::Error&) {
    }
    try {
      // The lookups ahead of a cold stream; the first also walks the B-tree's
      // branch pages for its leaves (detail/tree_pages.h).
      (void)reader.request_pages(all);
    } catch (const torch_lmdb::Error&) {
    } catch (const c10::Error&) {
    }
    (void)reader.metadata_json();
  } catch (const torch_lmdb::Error&) {
  } catch (const c10::Error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "open_fuzz: unexpected exception (not torch_lmdb::Error): %s\n", e.what());
    _exit(kUnexpectedException);
  }
}

void save(const char* kind, const uint8_t* data, size_t size) {
  static unsigned count = 0;
  const char* prefix = getenv("OPEN_FUZZ_FINDINGS");
  const std::string file = std::string(prefix ? prefix : "./") + kind + "-" + std::to_string(count++);
  FILE* f = std::fopen(file.c_str(), "wb");
  if (f) {
    std::fwrite(data, 1, size, f);
    std::fclose(f);
  }
  std::fprintf(stderr, "open_fuzz: %s saved as %s\n", kind, file.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = workdir();
  const std::string file = dir + "/data.mdb";
  const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || write(fd, data, size) != static_cast<ssize_t>(size)) std::abort();
  ::close(fd);

  // OPEN_FUZZ_IN_PROCESS=1 (reproducing a finding: fuzz_open FILE) runs the
  // child's work in this process, so ASan/gdb see the fault where it happens.
  static const bool in_process = getenv("OPEN_FUZZ_IN_PROCESS") != nullptr;
  if (in_process) {
    read_everything(dir, /*own_fault_handler=*/false);
    return 0;
  }
  size_t counters = 0;
  uint8_t* const counter = coverage_counters(&counters);
  int pipefd[2];
  if (pipe(pipefd) != 0) std::abort();
  const pid_t pid = fork();
  if (pid < 0) std::abort();
  if (pid == 0) {
    // First of all the child's time limit: SIGALRM back to its default
    // action (libFuzzer's own handler, inherited, ignores it) and armed.
    signal(SIGALRM, SIG_DFL);
    alarm(kChildSeconds);
    signal(SIGPIPE, SIG_IGN);  // a parent that stopped reading is not a finding
    close(pipefd[0]);
    read_everything(dir);
    // Coverage of this child, back to the parent (a pipe write of up to a
    // few MB; the parent reads concurrently).
    size_t done = 0;
    while (done < counters) {
      const ssize_t w = write(pipefd[1], counter + done, counters - done);
      if (w <= 0) break;
      done += size_t(w);
    }
    _exit(0);
  }
  close(pipefd[1]);
  std::vector<uint8_t> child(counters);
  size_t got = 0;
  for (;;) {
    const ssize_t r = read(pipefd[0], child.data() + got, counters - got);
    if (r < 0 && errno == EINTR) continue;  // libFuzzer's timer signals interrupt the read
    if (r <= 0) break;
    got += size_t(r);
    if (got == counters) break;
  }
  close(pipefd[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  if (got == counters)
    for (size_t i = 0; i < counters; ++i) counter[i] |= child[i];

  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 0;
  if (WIFEXITED(status) && WEXITSTATUS(status) == kLmdbFault) {
    save("lmdb-fault", data, size);
    return 0;
  }
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) {
    std::fprintf(stderr, "open_fuzz: finding: the child hung (> %u s)\n", kChildSeconds);
    save("hang", data, size);
    return 0;
  }
  std::fprintf(stderr, "open_fuzz: torch_lmdb bug: the child %s %d (its report is above)\n",
               WIFSIGNALED(status) ? "died of signal" : "exited with", WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
  std::abort();
}
