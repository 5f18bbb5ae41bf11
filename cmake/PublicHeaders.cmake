# The line between the public API and the library's own headers, checked by
# ctest on an installed copy of this build (cmake/CheckPublicHeaders.cmake):
# the installed headers include neither <lmdb.h> nor a detail/ header nor a
# header that is not installed, the exported link interface of a shared
# library names no private dependency, and tests/install, a project that
# find_package()s the installed copy with nothing of the source tree on its
# include path, compiles every installed header and runs.
add_test(NAME public_headers
  COMMAND ${CMAKE_COMMAND}
    -DBUILD_DIR=${CMAKE_BINARY_DIR}
    -DSOURCE_DIR=${CMAKE_CURRENT_SOURCE_DIR}
    -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/public_headers
    -DGENERATOR=${CMAKE_GENERATOR}
    -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
    -DTorch_DIR=${Torch_DIR}
    -DSTATIC=${TORCH_LMDB_STATIC}
    -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/CheckPublicHeaders.cmake)
set_tests_properties(public_headers PROPERTIES TIMEOUT 900)
