// libFuzzer target: a worker's message handling, without fork or sockets.
// The input is the byte stream a client sends to a worker. It goes through
// the worker's own path: a FrameDecoder, then WorkerRequests::handle() for
// each message, with an interface whose methods echo, throw, return values
// JSON cannot carry and log. A ProtocolError ends the stream, as it ends a
// worker's connection. Every reply must be one frame holding a well-formed
// "ok" or "er" message, and an "echo" that succeeds returns its arguments.
// The first input byte picks the interface (method table or catch-all) and
// whether setup and checkout_done throw.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "anyevent_task.hpp"

namespace {

using aet::Json;

int setup_calls = 0;

aet::Methods fuzz_methods() {
  return aet::Methods{
      {"echo", [](const Json& args) { return args; }},
      {"throw", [](const Json& args) -> Json { throw std::runtime_error(args.dump()); }},
      {"throw_text",
       [](const Json& args) -> Json {
         // Whatever bytes the client sent, as the message: may be bad UTF-8.
         std::string text;
         for (const Json& arg : args.as_array())
           if (arg.is_string()) text += arg.as_string() + "\xff";
         throw std::runtime_error(text);
       }},
      {"throw_int", [](const Json&) -> Json { throw 7; }},
      {"nan", [](const Json&) { return Json(std::nan("")); }},
      {"bad_utf8", [](const Json& args) { return Json(std::string("\xc3(") + args.dump()); }},
      {"log",
       [](const Json& args) {
         for (const Json& arg : args.as_array()) aet::logger().info(arg);
         return Json(static_cast<std::int64_t>(args.size()));
       }},
      {"log_unsendable",
       [](const Json&) {
         aet::logger().warn(Json(std::nan("")));
         return Json("logged");
       }},
      {"empty", aet::Method()},
  };
}

Json fuzz_catch_all(const Json& args) {
  if (args.size() > 0 && args[0] == "throw") throw std::runtime_error("catch-all threw");
  return args;
}

struct Setup {
  aet::ServerOptions table, catch_all;
  Setup() {
    table.name = catch_all.name = "fuzz";
    table.hung_worker_timeout = catch_all.hung_worker_timeout = 0;
    table.interface = fuzz_methods();
    catch_all.interface = aet::CatchAll(fuzz_catch_all);
    for (aet::ServerOptions* o : {&table, &catch_all}) {
      o->setup = [] {
        if (++setup_calls % 3 == 1) throw std::runtime_error("setup fails every third time");
      };
    }
    catch_all.checkout_done = [] { throw std::runtime_error("checkout_done threw"); };
  }
};

void check_reply(const Json& request, const std::string& frame, bool catch_all) {
  if (frame.empty()) std::abort();
  aet::FrameDecoder decoder;
  decoder.feed(frame);
  std::optional<Json> reply = decoder.next();  // throws (uncaught: a crash) if malformed
  if (!reply || decoder.buffered() != 0) std::abort();
  aet::check_message(*reply);
  const std::string& kind = (*reply)[0].as_string();
  if (kind != "ok" && kind != "er") std::abort();
  // A method table's echo gets the arguments after the name; the
  // catch-all echoes every argument.
  const std::size_t first = catch_all ? 2 : 3;
  if (kind == "ok" && (catch_all || (request.size() >= 3 && request[2] == "echo"))) {
    Json expected = Json::array();
    for (std::size_t i = first; i < request.size(); ++i) expected.push_back(request[i]);
    if ((*reply)[2] != expected) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Setup setup;
  if (size < 1) return 0;
  const bool use_catch_all = data[0] & 1;
  setup_calls = data[0] >> 1 & 3;
  aet::detail::server_internals::WorkerRequests requests(use_catch_all ? setup.catch_all : setup.table,
                                                         "fuzz: ", nullptr);
  // The limits a worker has, scaled down so that inputs stay small.
  aet::FrameDecoder decoder(1 << 16, 64);
  try {
    decoder.feed(reinterpret_cast<const char*>(data) + 1, size - 1);
    while (std::optional<Json> message = decoder.next()) {
      const Json request = *message;
      std::string reply = requests.handle(*message);
      if (request[0] == "do") {
        check_reply(request, reply, use_catch_all);
      } else if (!reply.empty()) {
        std::abort();  // "dn" has no reply
      }
    }
  } catch (const aet::ProtocolError&) {
  }
  return 0;
}
