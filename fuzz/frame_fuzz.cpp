// libFuzzer target: the frame decoder, fed the input in chunks whose sizes
// come from the input itself. It may yield messages or throw ProtocolError;
// every message it yields passes check_message and re-encodes to a frame
// that decodes to the same message.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "anyevent_task.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  std::size_t chunk = 1 + data[0] % 17;
  const char* bytes = reinterpret_cast<const char*>(data) + 1;
  std::size_t left = size - 1;
  aet::FrameDecoder decoder(1 << 16, 64);
  try {
    while (left > 0) {
      std::size_t n = chunk < left ? chunk : left;
      decoder.feed(bytes, n);
      bytes += n;
      left -= n;
      while (std::optional<aet::Json> message = decoder.next()) {
        aet::check_message(*message);
        aet::FrameDecoder again;
        again.feed(aet::encode_frame(*message));
        std::optional<aet::Json> copy = again.next();
        if (!copy || *copy != *message) std::abort();
      }
    }
  } catch (const aet::ProtocolError&) {
  }
  return 0;
}
