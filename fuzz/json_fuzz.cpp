// libFuzzer target: Json::parse must either throw JsonParseError or return a
// value whose dump() re-parses to an equal value. Nothing else: no crash, no
// other exception, no sanitizer report.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "anyevent_task.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  aet::Json value;
  try {
    value = aet::Json::parse(text, aet::Json::ParseOptions{64});
  } catch (const aet::JsonParseError&) {
    return 0;
  }
  std::string compact = value.dump();
  if (aet::Json::parse(compact) != value) std::abort();
  if (aet::Json::parse(value.dump(2)) != value) std::abort();
  return 0;
}
