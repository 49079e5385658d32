# cmake -DPROGRAM=path "-DARGS=a;b" "-DEXPECT=regex1;regex2" -P smoke.cmake
# An example's smoke test: it must exit 0 and print every expected line.
execute_process(COMMAND ${PROGRAM} ${ARGS} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                TIMEOUT 120)
message("${out}${err}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${PROGRAM} exited with ${rc}")
endif()
foreach(pattern IN LISTS EXPECT)
  if(NOT out MATCHES "${pattern}")
    message(FATAL_ERROR "${PROGRAM}: output lacks /${pattern}/")
  endif()
endforeach()
