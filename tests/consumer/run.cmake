# cmake -DAET_SOURCE_DIR=... -DWORK_DIR=... -DMODE=package|subdirectory -P run.cmake
# Builds and runs the consumer project against a fresh install or the source tree.
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(prefix ${WORK_DIR}/prefix)
if(MODE STREQUAL "package")
  run(${CMAKE_COMMAND} -S ${AET_SOURCE_DIR} -B ${WORK_DIR}/lib -DAET_BUILD_TESTS=OFF
      -DAET_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX=${prefix})
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/lib)
endif()
run(${CMAKE_COMMAND} -S ${AET_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/app
    -DAET_CONSUMER_MODE=${MODE} -DAET_SOURCE_DIR=${AET_SOURCE_DIR} -DCMAKE_PREFIX_PATH=${prefix})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/app)
run(${WORK_DIR}/app/consumer)
