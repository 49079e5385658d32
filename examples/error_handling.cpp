// error_handling: frames carry error handlers across callbacks.
//
// A top-level frame bails out of a request cleanly whatever goes wrong. Inside
// it, each request runs in a frame with a frame-local request id, so every
// log line says which request it belongs to, even in callbacks that run much
// later from the event loop. An inner handler retries a failed call once on a
// fresh checkout; a second failure goes on to the outer handler.

#include <cstdio>
#include <functional>
#include <string>

#include "anyevent_task.hpp"

namespace {

aet::FrameLocal<std::string> request_id;

void log_line(const std::string& text) {
  std::printf("[%s] %s\n", request_id.value_or("no request").c_str(), text.c_str());
}

}  // namespace

int main() {
  char dir[] = "/tmp/error_handling-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  aet::ServerOptions so;
  so.listen = std::string("unix:") + dir + "/err.sock";
  so.name = "flaky";
  // "flaky" fails on its first call in each worker, then works; "broken" always fails.
  so.interface = aet::Methods{
      {"flaky",
       [](const aet::Json& args) -> aet::Json {
         static int calls = 0;
         if (++calls == 1) throw std::runtime_error("flaky failed (first call in this worker)");
         return "flaky ok for " + args[0].as_string();
       }},
      {"broken", [](const aet::Json&) -> aet::Json { throw std::runtime_error("broken is always broken"); }},
  };
  aet::TaskServer server = aet::fork_task_server(so);

  aet::Loop loop;
  aet::ClientOptions co;
  co.connect = so.listen;
  co.name = "flaky-client";
  co.dont_refork_after_error = true;  // keep the worker, so the retry finds it warmed up
  co.max_workers = 1;
  aet::Client client(loop, co);
  int finished = 0, bailed_out = 0, succeeded = 0;
  auto request_finished = [&] {
    if (++finished == 2) loop.stop();
  };

  // Calls `method`; after a first failure, retries once on a new checkout.
  std::function<void(const std::string&, int)> attempt = [&](const std::string& method, int number) {
    aet::frame_try(
        [&] {
          client.checkout().call(method, {request_id.value_or("")}, [&](aet::Checkout&, aet::Json r) {
            log_line("success: " + r.as_string());
            ++succeeded;
            request_finished();
          });
        },
        [&, method, number](const std::exception& e, const std::string&) {
          // Throwing from a handler hands the error to the next handler out.
          if (number > 1) throw aet::Error(std::string("retry failed too: ") + e.what());
          log_line(std::string("attempt 1 failed (") + e.what() + "), retrying");
          attempt(method, number + 1);
        },
        "retry once");
  };

  for (std::string method : {"flaky", "broken"}) {
    // The request id is bound outermost, so that even the bail-out handler
    // (which runs in the frame around its own) logs with it.
    request_id.bind("req-" + method, [&] {
      aet::frame_try(
          [&] {
            log_line("calling " + method);
            attempt(method, 1);
          },
          [&](const std::exception& e, const std::string& trace) {
            log_line(std::string("bail out: ") + e.what());
            std::printf("trace:\n%s\n", trace.c_str());
            ++bailed_out;
            request_finished();
          },
          "request req-" + method);
    });
  }
  log_line("both requests started");

  aet::Timer deadline = loop.after(30, [&] { loop.stop(); });
  loop.run();
  server.stop();
  rmdir(dir);
  std::printf("%d succeeded after a retry, %d bailed out\n", succeeded, bailed_out);
  return succeeded == 1 && bailed_out == 1 ? 0 : 1;
}
