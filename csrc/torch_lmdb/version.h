// torch_lmdb/version.h -- the one place the library version is written
// (setup.py and CMakeLists.txt read it from here).
#pragma once
#define TORCH_LMDB_VERSION "0.1.0"
