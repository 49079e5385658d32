// The second translation unit: uses every section of the header.
#include "anyevent_task.hpp"

std::string dump_in_unit_b(const aet::Json& value) {
  aet::Loop loop;
  aet::FrameDecoder decoder;
  decoder.feed(aet::encode_frame(aet::Json{"ok", aet::Json::object(), value}));
  std::string out;
  aet::frame_try([&] { out = (*decoder.next())[2].dump(); },
                 [](const std::exception&, const std::string&) {});
  aet::LogDefer log([](const aet::Json&) {});
  log.info("unit b");
  return out;
}
