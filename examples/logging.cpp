// logging: LogDefer end to end.
//
// The client opens one LogDefer for a request and passes it to a checkout.
// Workers log into aet::logger() and time their own steps; each reply
// carries the worker's log back, and the client merges it into the
// request's log, which also times every call. When the last handle on the
// LogDefer goes, the whole request is delivered as one JSON message; this
// program prints it and draws its timers on a time axis.

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "anyevent_task.hpp"

namespace {

void busy_for(double seconds) { std::this_thread::sleep_for(std::chrono::duration<double>(seconds)); }

// A text timeline: one bar per timer, scaled to the width of the message.
void print_timeline(const aet::Json& message) {
  const aet::Json* timers = message.find("timers");
  double end = message["end"].as_double();
  if (!timers || end <= 0) return;
  const int width = 50;
  std::printf("\ntimeline (0 .. %.1f ms)\n", end * 1000);
  for (const aet::Json& t : timers->as_array()) {
    int from = static_cast<int>(t[1].as_double() / end * width);
    int to = static_cast<int>(t[2].as_double() / end * width);
    std::string bar(static_cast<std::size_t>(width + 1), ' ');
    for (int i = from; i <= to && i <= width; ++i) bar[static_cast<std::size_t>(i)] = '=';
    std::printf("%-22s |%s| %6.1f ms\n", t[0].as_string().c_str(), bar.c_str(),
                (t[2].as_double() - t[1].as_double()) * 1000);
  }
}

}  // namespace

int main() {
  char dir[] = "/tmp/logging-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  aet::ServerOptions so;
  so.listen = std::string("unix:") + dir + "/log.sock";
  so.name = "logging";
  so.interface = aet::Methods{
      {"lookup",
       [](const aet::Json& args) -> aet::Json {
         aet::logger().info("looking up", args[0]);
         {
           auto t = aet::logger().timer("db query");
           busy_for(0.02);
         }
         aet::logger().debug([&] { return "found " + args[0].as_string(); });  // built only if kept
         return "row for " + args[0].as_string();
       }},
      {"render",
       [](const aet::Json&) -> aet::Json {
         auto t = aet::logger().timer("template");
         busy_for(0.01);
         aet::logger().warn("template cache cold");
         return "<html>";
       }},
  };
  aet::TaskServer server = aet::fork_task_server(so);

  aet::Loop loop;
  aet::ClientOptions co;
  co.connect = so.listen;
  co.name = "logging";
  aet::Client client(loop, co);

  bool delivered = false;
  {
    aet::LogDefer request_log([&](const aet::Json& message) {
      std::printf("merged LogDefer message:\n%s\n", message.dump(2).c_str());
      print_timeline(message);
      delivered = true;
      loop.stop();
    });
    request_log.info("request started in the client, pid", static_cast<long long>(getpid()));
    request_log.data()["user"] = "alice";

    aet::CheckoutOptions options;
    options.log_defer = request_log;
    aet::Checkout checkout = client.checkout(options);
    checkout.call("lookup", {"alice"}, [request_log](aet::Checkout& c, aet::Json row) mutable {
      request_log.info("got", row);
      c.call("render", {row}, [request_log](aet::Checkout&, aet::Json) mutable {
        request_log.info("request done");
      });
    });
  }  // the callbacks and the checkout hold the log until the request ends

  aet::Timer deadline = loop.after(30, [&] { loop.stop(); });
  loop.run();
  server.stop();
  rmdir(dir);
  return delivered ? 0 : 1;
}
