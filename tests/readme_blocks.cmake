# cmake -DREADME=... -DCXX=... -DINCLUDE=... -DWORK_DIR=... -P readme_blocks.cmake
# Every ```cpp block of the README is a complete translation unit: each is
# written to a file and compiled warning-free, so the README cannot drift
# from the API.
file(READ ${README} text)
# CMake lists split at ";" and treat "[" "]" specially: mask them first.
string(REPLACE ";" "@AET_SEMICOLON@" text "${text}")
string(REPLACE "[" "@AET_LBRACKET@" text "${text}")
string(REPLACE "]" "@AET_RBRACKET@" text "${text}")
string(REGEX MATCHALL "```cpp\n[^`]*```" blocks "${text}")
list(LENGTH blocks count)
if(count EQUAL 0)
  message(FATAL_ERROR "no ```cpp blocks found in ${README}")
endif()
file(MAKE_DIRECTORY ${WORK_DIR})
set(index 0)
foreach(block IN LISTS blocks)
  math(EXPR index "${index} + 1")
  string(REGEX REPLACE "^```cpp\n" "" code "${block}")
  string(REGEX REPLACE "```$" "" code "${code}")
  string(REPLACE "@AET_SEMICOLON@" ";" code "${code}")
  string(REPLACE "@AET_LBRACKET@" "[" code "${code}")
  string(REPLACE "@AET_RBRACKET@" "]" code "${code}")
  set(source ${WORK_DIR}/block${index}.cpp)
  file(WRITE ${source} "${code}")
  execute_process(COMMAND ${CXX} -std=c++17 -Wall -Wextra -Wpedantic -Werror -I${INCLUDE}
                          -c ${source} -o ${WORK_DIR}/block${index}.o
                  RESULT_VARIABLE rc ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "README block ${index} does not compile:\n${code}\n${err}")
  endif()
endforeach()
message("${count} README code blocks compile")
