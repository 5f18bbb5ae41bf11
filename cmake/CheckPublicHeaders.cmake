# cmake -DBUILD_DIR= -DSOURCE_DIR= -DWORK_DIR= -DGENERATOR= -DCXX_COMPILER= -DTorch_DIR= -DSTATIC= -P CheckPublicHeaders.cmake
#
# Installs the build at BUILD_DIR into WORK_DIR/prefix (afresh), then fails
# when an installed header includes <lmdb.h>, a detail/ header or a
# torch_lmdb header that is not installed; when a detail/ header is
# installed; when a shared library's exported targets name LMDB; or when
# tests/install does not build against the installed copy alone and run.
set(_prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${_prefix}")
execute_process(COMMAND ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${_prefix}"
                OUTPUT_QUIET RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} failed (${_rc})")
endif()

set(_include "${_prefix}/include")
file(GLOB_RECURSE _headers RELATIVE "${_include}" "${_include}/*")
if(NOT _headers)
  message(FATAL_ERROR "no header installed under ${_include}")
endif()
set(_errors "")
foreach(_header IN LISTS _headers)
  if(_header MATCHES "(^|/)detail/")
    string(APPEND _errors "  ${_header}: an internal header is installed\n")
  endif()
  file(STRINGS "${_include}/${_header}" _lines REGEX "^[ \t]*#[ \t]*include")
  foreach(_line IN LISTS _lines)
    if(_line MATCHES "[<\"]lmdb\\.h[>\"]")
      string(APPEND _errors "  ${_header}: ${_line} (LMDB is a private dependency)\n")
    elseif(_line MATCHES "[<\"](torch_lmdb/)?detail/")
      string(APPEND _errors "  ${_header}: ${_line} (detail/ headers are internal)\n")
    elseif(_line MATCHES "[<\"](torch_lmdb/[^>\"]+)[>\"]" AND NOT EXISTS "${_include}/${CMAKE_MATCH_1}")
      string(APPEND _errors "  ${_header}: ${_line} (not installed)\n")
    endif()
  endforeach()
endforeach()
if(NOT STATIC)
  file(GLOB _targets "${_prefix}/lib*/cmake/TorchLMDB/TorchLMDBTargets*.cmake")
  foreach(_file IN LISTS _targets)
    file(STRINGS "${_file}" _lines REGEX "LMDB::|PkgConfig::")
    foreach(_line IN LISTS _lines)
      string(APPEND _errors "  ${_file}: ${_line} (a private dependency in a shared library's interface)\n")
    endforeach()
  endforeach()
endif()
if(_errors)
  message(FATAL_ERROR "The installed package crosses the line of the public API:\n${_errors}")
endif()
list(LENGTH _headers _count)
message(STATUS "${_count} installed headers include no internal or LMDB header")

set(_consumer "${WORK_DIR}/consumer")
file(REMOVE_RECURSE "${_consumer}")
execute_process(
  COMMAND ${CMAKE_COMMAND} -S "${SOURCE_DIR}/tests/install" -B "${_consumer}" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_PREFIX_PATH=${_prefix}" "-DTorch_DIR=${Torch_DIR}"
  RESULT_VARIABLE _rc)
if(_rc EQUAL 0)
  execute_process(COMMAND ${CMAKE_COMMAND} --build "${_consumer}" RESULT_VARIABLE _rc)
endif()
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "tests/install did not build against the installed package at ${_prefix}")
endif()
execute_process(COMMAND "${_consumer}/public_headers" RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "${_consumer}/public_headers failed (${_rc})")
endif()
