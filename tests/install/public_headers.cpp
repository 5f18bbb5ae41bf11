// Compiled against the installed package alone (tests/install/CMakeLists.txt):
// every installed header, then a Reader of a missing database.
#include "all_headers.h"

#include <cstdio>

int main() {
  try {
    torch_lmdb::Reader reader("no such database.lmdb");
  } catch (const torch_lmdb::NotFoundError&) {
    std::printf("torch_lmdb %s: the installed headers compile and link\n", TORCH_LMDB_VERSION);
    return 0;
  }
  std::fprintf(stderr, "Reader opened a database that does not exist\n");
  return 1;
}
