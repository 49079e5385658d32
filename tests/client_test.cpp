// Client: the worker pool, checkouts, their queues, timeouts and errors,
// each against a real forked server.
#include <catch2/catch.hpp>

#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "anyevent_task.hpp"
#include "epoll_host.hpp"
#include "test_support.hpp"

using aet::Json;
using aet_test::run_until;

namespace {

std::int64_t pid_of(const Json& value) { return value.as_int(); }

// The worker side of most tests.
aet::Methods standard_methods() {
  return aet::Methods{
      {"pid", [](const Json&) -> Json { return ::getpid(); }},
      {"echo", [](const Json& args) -> Json { return args; }},
      {"fail", [](const Json& args) -> Json { throw std::runtime_error(args[0].as_string()); }},
      {"sleep",
       [](const Json& args) -> Json {
         std::this_thread::sleep_for(std::chrono::duration<double>(args[0].as_double()));
         return ::getpid();
       }},
      {"exit", [](const Json&) -> Json { ::_exit(3); }},
      {"stop_self",  // as a stopping server does: the worker replies, then exits
       [](const Json&) -> Json {
         ::kill(::getpid(), SIGTERM);
         return ::getpid();
       }},
      {"big", [](const Json& args) -> Json { return std::string(static_cast<std::size_t>(args[0].as_int()), 'y'); }},
  };
}

// A socket path of its own, a server on it and options for a client.
struct Rig {
  aet_test::TempDir dir;
  std::string address = dir.unix_address();

  aet::ServerOptions server_options(aet::Interface interface = standard_methods()) const {
    aet::ServerOptions so;
    so.listen = address;
    so.name = "client-test";
    so.hung_worker_timeout = 5;  // so that a worker left sleeping never holds up the end of a test
    so.interface = std::move(interface);
    return so;
  }
  aet::TaskServer start(aet::Interface interface = standard_methods()) const {
    return aet::fork_task_server(server_options(std::move(interface)));
  }
  aet::ClientOptions client_options() const {
    aet::ClientOptions co;
    co.connect = address;
    co.name = "tester";
    co.timeout = 10;  // a broken build fails instead of hanging
    return co;
  }
};

// What a catcher saw.
struct Caught {
  int count = 0;
  std::string what;
  std::string trace;
  std::string kind;  // remote, timeout, checkout, other
};

aet::Catcher catch_into(Caught& caught) {
  return [&caught](const std::exception& e, const std::string& trace) {
    ++caught.count;
    caught.what = e.what();
    caught.trace = trace;
    if (dynamic_cast<const aet::RemoteError*>(&e)) {
      caught.kind = "remote";
    } else if (dynamic_cast<const aet::TimeoutError*>(&e)) {
      caught.kind = "timeout";
    } else if (dynamic_cast<const aet::CheckoutError*>(&e)) {
      caught.kind = "checkout";
    } else {
      caught.kind = "other";
    }
  };
}

// Calls `method` on a fresh checkout and waits for the result; fails the
// test on an error or when nothing comes within `limit` seconds.
Json call_and_wait(aet::Loop& loop, aet::Client& client, const std::string& method, Json args = {},
                   double limit = 10) {
  std::optional<Json> result;
  Caught caught;
  aet::frame_try(
      [&] { client.checkout().call(method, std::move(args), [&](aet::Checkout&, Json r) { result = r; }); },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return result.has_value() || caught.count > 0; }, limit));
  INFO(caught.what);
  REQUIRE(caught.count == 0);
  return *result;
}

// Two checkouts through a client of one worker: the second waits for the
// worker, which is released after the first one's callback, just after its
// reply was read. Returns both results; fails the test on an error.
std::pair<Json, Json> two_checkouts_on_one_worker(aet::Loop& loop, aet::ClientOptions co,
                                                  const std::string& first_method = "m",
                                                  const std::string& second_method = "m") {
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(loop, co);
  std::optional<Json> first, second;
  Caught caught;
  aet::frame_try(
      [&] {
        client.checkout().call(first_method, {}, [&](aet::Checkout&, Json r) { first = r; });
        client.checkout().call(second_method, {}, [&](aet::Checkout&, Json r) { second = r; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return second.has_value() || caught.count > 0; }));
  INFO(caught.what);
  REQUIRE(caught.count == 0);
  return {*first, *second};
}

double now() { return aet_test::monotonic_now(); }

}  // namespace

TEST_CASE("arguments and results round trip, astral characters and nested values included") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  const Json args{1, -7, 2.5, "two", "\xF0\x9F\x98\x80 astral \xE2\x82\xAC", nullptr, true,
                  Json{Json{1, 2}, Json::object({{"k", Json{"v", 3}}})},
                  Json::object({{"nested", Json::object({{"deep", Json::array()}})}})};
  REQUIRE(call_and_wait(loop, client, "echo", args) == args);
  REQUIRE(call_and_wait(loop, client, "echo") == Json::array());
}

TEST_CASE("a catch-all interface sees the method name first for a method call and not for a plain call") {
  Rig rig;
  aet::TaskServer server = rig.start(aet::CatchAll([](const Json& args) -> Json { return args; }));
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  std::optional<Json> method_result, plain_result;
  Caught caught;
  aet::frame_try(
      [&] {
        aet::Checkout co = client.checkout();
        co.call("name", {"a", 1}, [&](aet::Checkout&, Json r) { method_result = r; });
        co({"a", 1}, [&](aet::Checkout&, Json r) { plain_result = r; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return plain_result.has_value() || caught.count > 0; }));
  REQUIRE(caught.count == 0);
  REQUIRE(*method_result == Json{"name", "a", 1});
  REQUIRE(*plain_result == Json{"a", 1});
}

TEST_CASE("a worker error reaches the catcher with the worker's message and a trace naming the call") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  bool called = false;
  aet::frame_try(
      [&] {
        client.checkout().call("fail", {"it broke \xF0\x9F\x92\xA5"},
                               [&](aet::Checkout&, Json) { called = true; });
      },
      catch_into(caught), "outer frame");
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.count == 1);
  REQUIRE_FALSE(called);
  REQUIRE(caught.kind == "remote");
  REQUIRE(caught.what == "it broke \xF0\x9F\x92\xA5");
  INFO(caught.trace);
  REQUIRE(caught.trace.find(" - tester -> fail\n") != std::string::npos);
  REQUIRE(caught.trace.find(" - outer frame\n") > caught.trace.find(" - tester -> fail\n"));
  REQUIRE(caught.trace.find("client_test.cpp:") != std::string::npos);
}

TEST_CASE("a plain call's frame is named CLIENT_NAME -> ->()") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.name = "";  // the connect string names the client
  aet::Client client(loop, co);
  REQUIRE(client.name() == rig.address);
  Caught caught;
  aet::frame_try([&] { client.checkout()({"no such method"}, [](aet::Checkout&, Json) {}); },
                 catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.what.find("no such method") != std::string::npos);
  INFO(caught.trace);
  REQUIRE(caught.trace.find(" - " + rig.address + " -> ->()\n") != std::string::npos);
}

TEST_CASE("an exception thrown by the user's callback goes to the same catcher") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  aet::frame_try(
      [&] {
        client.checkout().call("pid", {}, [](aet::Checkout&, Json) { throw std::runtime_error("mine"); });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.count == 1);
  REQUIRE(caught.what == "mine");
  REQUIRE(caught.kind == "other");
  REQUIRE(caught.trace.find(" - tester -> pid\n") != std::string::npos);
}

TEST_CASE("an error with no catcher propagates out of the loop") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  client.checkout().call("fail", {"nobody catches this"}, [](aet::Checkout&, Json) {});
  bool thrown = false;
  try {
    run_until(loop, [] { return false; }, 10);
  } catch (const aet::RemoteError& e) {
    thrown = std::string(e.what()) == "nobody catches this";
  }
  REQUIRE(thrown);
  // The client is still usable.
  REQUIRE(call_and_wait(loop, client, "echo", {5}) == Json{5});
}

TEST_CASE("a framed callback is used as it is, with its own frame") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  auto callback = aet::frame([](aet::Checkout&, Json) {}, catch_into(caught), "my own frame");
  client.checkout().call("fail", {"framed"}, callback);
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.what == "framed");
  INFO(caught.trace);
  REQUIRE(caught.trace.find(" - my own frame\n") != std::string::npos);
  REQUIRE(caught.trace.find("tester -> fail") == std::string::npos);
}

TEST_CASE("with dont_refork_after_error the worker is kept after errors") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  co.dont_refork_after_error = true;
  aet::Client client(loop, co);
  std::vector<std::int64_t> pids;
  Caught caught;
  aet::Checkout c = client.checkout();
  aet::frame_try(
      [&] {
        c.call("pid", {}, [&](aet::Checkout&, Json p) { pids.push_back(pid_of(p)); });
        c.call("fail", {"first"}, [](aet::Checkout&, Json) {});
      },
      [&](const std::exception& e, const std::string& t) {
        catch_into(caught)(e, t);
        // After an error reply the checkout goes on, on the same worker.
        c.call("pid", {}, [&](aet::Checkout&, Json p) {
          pids.push_back(pid_of(p));
          c = aet::Checkout();  // released when this callback returns
        });
      });
  REQUIRE(run_until(loop, [&] { return pids.size() == 2; }));
  REQUIRE(caught.what == "first");
  pids.push_back(pid_of(call_and_wait(loop, client, "pid")));  // the next checkout
  REQUIRE(pids[0] == pids[1]);
  REQUIRE(pids[1] == pids[2]);
}

TEST_CASE("without dont_refork_after_error a worker that replied with an error is replaced") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  aet::Client client(loop, co);
  std::vector<std::int64_t> pids;
  Caught caught;
  aet::frame_try(
      [&] {
        aet::Checkout c = client.checkout();
        c.call("pid", {}, [&](aet::Checkout& again, Json p) {
          pids.push_back(pid_of(p));
          again.call("fail", {"boom"}, [](aet::Checkout&, Json) {});
        });
      },
      [&](const std::exception& e, const std::string& t) {
        catch_into(caught)(e, t);
        // Still the same checkout's frame: more calls go to the same worker.
      });
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  pids.push_back(pid_of(call_and_wait(loop, client, "pid")));
  REQUIRE(pids.size() == 2);
  REQUIRE(pids[0] != pids[1]);
}

TEST_CASE("after an error the rest of that checkout's queue is discarded") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  int discarded_ran = 0, first_ran = 0;
  aet::frame_try(
      [&] {
        aet::Checkout c = client.checkout();
        c.call("echo", {1}, [&](aet::Checkout&, Json) { ++first_ran; });
        c.call("fail", {"stop here"}, [&](aet::Checkout&, Json) { ++discarded_ran; });
        c.call("echo", {2}, [&](aet::Checkout&, Json) { ++discarded_ran; });
        c({"echo", 3}, [&](aet::Checkout&, Json) { ++discarded_ran; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  // Let anything that would still come arrive: another call round trips.
  call_and_wait(loop, client, "echo", {4});
  call_and_wait(loop, client, "echo", {5});
  REQUIRE(first_ran == 1);
  REQUIRE(caught.count == 1);
  REQUIRE(caught.what == "stop here");
  REQUIRE(discarded_ran == 0);
}

TEST_CASE("throw_fatal_error aborts the call in flight and every later call fails the same way") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  bool called = false;
  aet::Checkout c = client.checkout();
  const double start = now();
  aet::frame_try(
      [&] {
        c.call("sleep", {1}, [&](aet::Checkout&, Json) { called = true; });
        c.throw_fatal_error("manual request abort");
      },
      catch_into(caught));
  REQUIRE(caught.count == 0);  // delivered from the loop, not inside throw_fatal_error()
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(now() - start < 0.8);
  REQUIRE(caught.what == "manual request abort");
  REQUIRE(caught.kind == "checkout");
  REQUIRE_FALSE(called);

  Caught later;
  aet::frame_try([&] { c.call("pid", {}, [&](aet::Checkout&, Json) { called = true; }); }, catch_into(later));
  REQUIRE(later.count == 0);  // never inside call()
  REQUIRE(run_until(loop, [&] { return later.count > 0; }));
  REQUIRE(later.what == "manual request abort");
  REQUIRE(later.kind == "checkout");
  REQUIRE_FALSE(called);
  REQUIRE(caught.count == 1);
}

TEST_CASE("a worker serves at most max_checkouts checkouts, then a new one takes over") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  co.max_checkouts = 2;
  aet::Client client(loop, co);
  std::vector<std::int64_t> pids;
  Caught caught;
  aet::frame_try(
      [&] {
        for (int i = 0; i < 5; ++i)
          client.checkout().call("pid", {}, [&](aet::Checkout&, Json p) { pids.push_back(pid_of(p)); });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return pids.size() == 5 || caught.count > 0; }));
  REQUIRE(caught.count == 0);
  REQUIRE(pids[0] == pids[1]);
  REQUIRE(pids[2] != pids[1]);
  REQUIRE(pids[2] == pids[3]);
  REQUIRE(pids[4] != pids[3]);
  REQUIRE(pids[4] != pids[1]);
}

TEST_CASE("a worker retiring at max_checkouts still runs checkout_done for its last checkout") {
  Rig rig;
  std::string journal = rig.dir.file("done.log");
  aet::ServerOptions so = rig.server_options();
  so.checkout_done = [journal] { std::ofstream(journal, std::ios::app) << ::getpid() << "\n"; };
  aet::TaskServer server = aet::fork_task_server(so);
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  co.max_checkouts = 1;
  aet::Client client(loop, co);
  std::vector<std::int64_t> pids;
  Caught caught;
  aet::frame_try(
      [&] {
        for (int i = 0; i < 2; ++i)
          client.checkout().call("pid", {}, [&](aet::Checkout&, Json p) { pids.push_back(pid_of(p)); });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return pids.size() == 2 || caught.count > 0; }));
  REQUIRE(caught.count == 0);
  REQUIRE(pids[0] != pids[1]);
  auto journal_lines = [&] {
    std::ifstream in(journal);
    std::vector<std::int64_t> lines;
    for (std::int64_t pid; in >> pid;) lines.push_back(pid);
    return lines;
  };
  REQUIRE(aet_test::eventually([&] { return journal_lines().size() == 2; }, 10));
  REQUIRE(journal_lines() == pids);
}

TEST_CASE("a request larger than max_frame is refused in call() and the checkout goes on") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_frame = 1000;
  aet::Client client(loop, co);
  aet::Checkout checkout = client.checkout();
  Json echoed;
  Caught caught;
  aet::frame_try(
      [&] {
        REQUIRE_THROWS_WITH(checkout.call("echo", {std::string(2000, 'x')}, [](aet::Checkout&, Json) {}),
                            Catch::Contains("exceeds the limit of 1000"));
        checkout.call("echo", {"small"}, [&](aet::Checkout&, Json r) { echoed = r; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return !echoed.is_null() || caught.count > 0; }));
  REQUIRE(caught.count == 0);
  REQUIRE(echoed == Json::array({"small"}));
}

TEST_CASE("with one worker, nested calls and new checkouts are served in exactly FIFO order") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(loop, co);
  std::vector<std::string> events;
  Caught caught;
  auto echo = [&](aet::Checkout& c, const std::string& tag, std::function<void(aet::Checkout&)> then) {
    c.call("echo", {tag}, [&events, tag, then](aet::Checkout& again, Json r) {
      events.push_back(r[0].as_string());
      if (then) then(again);
    });
  };
  aet::frame_try(
      [&] {
        aet::Checkout a = client.checkout();
        aet::Checkout b = client.checkout();
        aet::Checkout idle = client.checkout();  // never calls: blocks nobody
        echo(a, "a1", [&](aet::Checkout& again) {
          aet::Checkout d = client.checkout();  // queued behind b and c
          echo(d, "d1", nullptr);
          echo(again, "a2", [&](aet::Checkout& third) { echo(third, "a3", nullptr); });
        });
        echo(b, "b1", [&](aet::Checkout& again) { echo(again, "b2", nullptr); });
        aet::Checkout c = client.checkout();
        echo(c, "c1", nullptr);
        echo(a, "a1b", nullptr);  // queued on a behind a1
      },
      catch_into(caught));
  REQUIRE(client.pending_checkout_count() == 2);  // b and c; the one without a call is gone
  REQUIRE(events.empty());
  REQUIRE(run_until(loop, [&] { return events.size() == 8 || caught.count > 0; }));
  INFO(caught.what);
  REQUIRE(caught.count == 0);
  REQUIRE(events == std::vector<std::string>{"a1", "a1b", "a2", "a3", "b1", "b2", "c1", "d1"});
}

namespace {

// A server whose setup fails while the file `flag` exists (the message
// names the worker), and whose "info" is [pid, successful setups].
aet::ServerOptions flaky_setup_server(const Rig& rig, const std::string& flag) {
  aet::ServerOptions so = rig.server_options();
  static int setups;  // per worker process
  so.setup = [flag] {
    if (::access(flag.c_str(), F_OK) == 0)
      throw std::runtime_error("no database in " + std::to_string(::getpid()));
    ++setups;
  };
  std::get<aet::Methods>(so.interface)["info"] = [](const Json&) -> Json { return Json{::getpid(), setups}; };
  return so;
}

std::int64_t pid_in(const std::string& message) {
  return std::stoll(message.substr(message.rfind(' ') + 1));
}

}  // namespace

TEST_CASE("a setup error arrives as `setup exception: ...` and the next checkout gets a fresh worker") {
  Rig rig;
  const std::string flag = rig.dir.file("fail-setup");
  std::ofstream(flag) << "x";
  aet::TaskServer server = aet::fork_task_server(flaky_setup_server(rig, flag));
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  aet::Client client(loop, co);
  Caught caught;
  aet::frame_try([&] { client.checkout().call("info", {}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.what.rfind("setup exception: no database in ", 0) == 0);
  const std::int64_t failed_worker = pid_in(caught.what);
  std::remove(flag.c_str());
  std::vector<Json> infos;
  aet::frame_try(
      [&] {
        aet::Checkout c = client.checkout();
        for (int i = 0; i < 3; ++i) c.call("info", {}, [&](aet::Checkout&, Json info) { infos.push_back(info); });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return infos.size() == 3 || caught.count > 1; }));
  REQUIRE(caught.count == 1);
  infos.push_back(call_and_wait(loop, client, "info"));
  for (const Json& info : infos) {
    REQUIRE(info[0].as_int() != failed_worker);
    REQUIRE(info[0] == infos[0][0]);
    REQUIRE(info[1] == Json(1));  // setup ran once in this worker
  }
}

TEST_CASE("with dont_refork_after_error the same worker retries its setup") {
  Rig rig;
  const std::string flag = rig.dir.file("fail-setup");
  std::ofstream(flag) << "x";
  aet::TaskServer server = aet::fork_task_server(flaky_setup_server(rig, flag));
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  co.dont_refork_after_error = true;
  aet::Client client(loop, co);
  Caught caught;
  aet::frame_try([&] { client.checkout().call("info", {}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  std::remove(flag.c_str());
  const Json info = call_and_wait(loop, client, "info");
  REQUIRE(info[0].as_int() == pid_in(caught.what));
  REQUIRE(info[1] == Json(1));
}

TEST_CASE("a surge of 1000 checkouts over 5 workers is all served, none before the loop runs") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 5;
  aet::Client client(loop, co);
  int served = 0;
  std::set<std::int64_t> pids;
  Caught caught;
  aet::frame_try(
      [&] {
        for (int i = 0; i < 1000; ++i) {
          client.checkout().call("echo", {i}, [&, i](aet::Checkout&, Json r) {
            if (r == Json{i}) ++served;
          });
        }
        client.checkout().call("pid", {}, [&](aet::Checkout&, Json) { ++served; });
      },
      catch_into(caught));
  REQUIRE(served == 0);
  REQUIRE(client.worker_count() <= 5);
  REQUIRE(run_until(loop, [&] { return served == 1001 || caught.count > 0; }, 30));
  REQUIRE(caught.count == 0);
  REQUIRE(client.worker_count() == 5);
  REQUIRE(client.pending_checkout_count() == 0);
  REQUIRE(run_until(loop, [&] { return client.idle_worker_count() == 5; }));
}

TEST_CASE("with no server the checkout fails with `timed out after`") {
  Rig rig;
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.timeout = 0.3;
  aet::Client client(loop, co);
  Caught caught;
  const double start = now();
  aet::frame_try([&] { client.checkout().call("pid", {}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(now() - start >= 0.29);
  REQUIRE(caught.what == "timed out after 0.3 seconds");
  REQUIRE(caught.kind == "timeout");
  REQUIRE(client.pending_checkout_count() == 0);
}

TEST_CASE("checkouts that time out together all fail even when the first error escapes the loop") {
  Rig rig;  // no server: both wait for a worker until their timeout
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.timeout = 0.3;
  aet::Client client(loop, co);
  int results = 0;
  for (int i = 0; i < 2; ++i) client.checkout().call("pid", {}, [&](aet::Checkout&, Json) { ++results; });
  int timeouts = 0;
  const double limit = now() + 10;
  while (timeouts < 2 && now() < limit) {
    try {
      loop.run_once(0.1);
    } catch (const aet::TimeoutError& e) {
      CHECK(std::string(e.what()) == "timed out after 0.3 seconds");
      ++timeouts;
    }
  }
  REQUIRE(timeouts == 2);
  REQUIRE(results == 0);
  REQUIRE(client.pending_checkout_count() == 0);
}

TEST_CASE("a call that outlives the checkout's timeout fails with `timed out after`") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  call_and_wait(loop, client, "pid");  // the workers are up
  Caught caught;
  bool called = false;
  aet::CheckoutOptions options;
  options.timeout = 0.3;
  const double start = now();
  aet::Checkout c = client.checkout(options);
  aet::frame_try([&] { c.call("sleep", {1.5}, [&](aet::Checkout&, Json) { called = true; }); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  const double took = now() - start;
  REQUIRE(took >= 0.29);
  REQUIRE(took < 1.2);
  REQUIRE(caught.what == "timed out after 0.3 seconds");
  REQUIRE(caught.kind == "timeout");
  // Sticky, with the same type.
  Caught later;
  aet::frame_try([&] { c.call("pid", {}, [&](aet::Checkout&, Json) { called = true; }); }, catch_into(later));
  REQUIRE(run_until(loop, [&] { return later.count > 0; }));
  REQUIRE(later.what == "timed out after 0.3 seconds");
  REQUIRE(later.kind == "timeout");
  REQUIRE_FALSE(called);
  // The timed-out worker is dropped; the client still serves.
  REQUIRE(call_and_wait(loop, client, "echo", {1}) == Json{1});
}

TEST_CASE("each call gets its own timeout") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  aet::CheckoutOptions options;
  options.timeout = 0.6;
  int done = 0;
  Caught caught;
  // Three calls of 0.3 s each, each made from the previous one's callback:
  // 0.9 s in all, each well within 0.6 s.
  std::function<void(aet::Checkout&, Json)> next = [&](aet::Checkout& c, Json) {
    if (++done < 3) c.call("sleep", {0.3}, next);
  };
  aet::frame_try([&] { client.checkout(options).call("sleep", {0.3}, next); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return done == 3 || caught.count > 0; }));
  INFO(caught.what);
  REQUIRE(caught.count == 0);
}

TEST_CASE("a call's timeout runs from when it is queued, waiting behind an earlier call included") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  call_and_wait(loop, client, "pid");  // the workers are up
  aet::CheckoutOptions options;
  options.timeout = 1;
  bool first_done = false, second_done = false;
  Caught caught;
  const double start = now();
  aet::frame_try(
      [&] {
        aet::Checkout c = client.checkout(options);
        c.call("sleep", {0.7}, [&](aet::Checkout&, Json) { first_done = true; });
        c.call("sleep", {0.7}, [&](aet::Checkout&, Json) { second_done = true; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0 || second_done; }, 5));
  const double took = now() - start;
  INFO(caught.what);
  REQUIRE(first_done);
  REQUIRE_FALSE(second_done);
  REQUIRE(caught.what == "timed out after 1 seconds");
  REQUIRE(caught.kind == "timeout");
  REQUIRE(took >= 0.99);
  REQUIRE(took < 1.3);
}

TEST_CASE("with timeout aet::forever a call longer than a short default still succeeds") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  SECTION("the client's timeout") {
    aet::ClientOptions co = rig.client_options();
    co.timeout = aet::forever;
    aet::Client client(loop, co);
    REQUIRE(call_and_wait(loop, client, "sleep", {0.4}).is_int());
  }
  SECTION("the checkout's timeout, over a short client timeout") {
    aet::ClientOptions co = rig.client_options();
    co.timeout = 0.1;
    aet::Client client(loop, co);
    aet::CheckoutOptions options;
    options.timeout = aet::forever;
    std::optional<Json> result;
    Caught caught;
    aet::frame_try(
        [&] { client.checkout(options).call("sleep", {0.4}, [&](aet::Checkout&, Json r) { result = r; }); },
        catch_into(caught));
    REQUIRE(run_until(loop, [&] { return result.has_value() || caught.count > 0; }, 5));
    INFO(caught.what);
    REQUIRE(caught.count == 0);
    REQUIRE(result->is_int());
  }
}

TEST_CASE("checkouts with different timeouts each expire at their own deadline, whatever their order") {
  // The client keeps one timer for all its deadlines: a later checkout
  // with a shorter timeout must still expire first, and on time.
  Rig rig;
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();  // no server: every call waits
  co.timeout = 1.2;
  aet::Client client(loop, co);
  aet::CheckoutOptions short_timeout, mid_timeout;
  short_timeout.timeout = 0.2;
  mid_timeout.timeout = 0.6;
  std::vector<std::pair<std::string, double>> expired;  // which, when
  const double start = now();
  auto expect = [&](const std::string& which) {
    return [&, which](const std::exception& e, const std::string&) {
      expired.emplace_back(which + ": " + e.what(), now() - start);
    };
  };
  aet::frame_try([&] { client.checkout().call("pid", {}, [](aet::Checkout&, Json) {}); }, expect("default"));
  aet::frame_try([&] { client.checkout(mid_timeout).call("pid", {}, [](aet::Checkout&, Json) {}); }, expect("mid"));
  aet::frame_try([&] { client.checkout(short_timeout).call("pid", {}, [](aet::Checkout&, Json) {}); },
                 expect("short"));
  REQUIRE(run_until(loop, [&] { return expired.size() == 3; }, 5));
  REQUIRE(expired[0].first == "short: timed out after 0.2 seconds");
  REQUIRE(expired[1].first == "mid: timed out after 0.6 seconds");
  REQUIRE(expired[2].first == "default: timed out after 1.2 seconds");
  CHECK(expired[0].second >= 0.19);
  CHECK(expired[0].second < 0.5);
  CHECK(expired[1].second >= 0.59);
  CHECK(expired[1].second < 0.9);
  CHECK(expired[2].second >= 1.19);
  REQUIRE(client.pending_checkout_count() == 0);
}

TEST_CASE("a call that outlives hung_worker_timeout fails with `worker connection suddenly died`") {
  Rig rig;
  aet::ServerOptions so = rig.server_options();
  so.hung_worker_timeout = 0.3;
  aet::TaskServer server = aet::fork_task_server(so);
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  Caught caught;
  aet::frame_try([&] { client.checkout().call("sleep", {5}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.what == "worker connection suddenly died");
  REQUIRE(caught.kind == "checkout");
}

TEST_CASE("a worker that exits mid-call gives `worker connection suddenly died`, then and later") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  aet::Checkout c = client.checkout();
  Caught caught, later;
  aet::frame_try([&] { c.call("exit", {}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  REQUIRE(caught.what == "worker connection suddenly died");
  REQUIRE(caught.kind == "checkout");
  aet::frame_try([&] { c.call("pid", {}, [](aet::Checkout&, Json) {}); }, catch_into(later));
  aet::frame_try([&] { c({"pid"}, [](aet::Checkout&, Json) {}); }, catch_into(later));
  REQUIRE(later.count == 0);
  REQUIRE(run_until(loop, [&] { return later.count == 2; }));
  REQUIRE(later.what == "worker connection suddenly died");
  REQUIRE(call_and_wait(loop, client, "echo", {2}) == Json{2});
}

TEST_CASE("a worker stopped during a call replies and is handed to no other checkout") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  // The worker is exiting when the second checkout would get it.
  auto [stopped, next] = two_checkouts_on_one_worker(loop, rig.client_options(), "stop_self", "pid");
  REQUIRE(next != stopped);  // a fresh worker
}

TEST_CASE("checkouts made before the server starts are served once it is up") {
  Rig rig;
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  std::vector<std::int64_t> pids;
  Caught caught;
  aet::frame_try(
      [&] {
        for (int i = 0; i < 3; ++i)
          client.checkout().call("pid", {}, [&](aet::Checkout&, Json p) { pids.push_back(pid_of(p)); });
      },
      catch_into(caught));
  REQUIRE_FALSE(run_until(loop, [&] { return !pids.empty() || caught.count > 0; }, 0.5));
  REQUIRE(client.pending_checkout_count() == 3);
  aet::TaskServer server = rig.start();
  const double up = now();
  REQUIRE(run_until(loop, [&] { return pids.size() == 3 || caught.count > 0; }));
  REQUIRE(caught.count == 0);
  REQUIRE(now() - up < 1);  // connects are retried every 0.2 s
}

TEST_CASE("after a server restart new checkouts succeed") {
  Rig rig;
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  aet::Client client(loop, co);
  std::int64_t first = 0;
  {
    aet::TaskServer server = rig.start();
    first = pid_of(call_and_wait(loop, client, "pid"));
    server.stop();
  }
  aet::TaskServer again = rig.start();
  // At once, before the loop has seen the old workers go.
  std::int64_t second = pid_of(call_and_wait(loop, client, "pid"));
  REQUIRE(second != first);
  // And once the loop has run for a while.
  REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.3));
  REQUIRE(call_and_wait(loop, client, "echo", {3}) == Json{3});
}

TEST_CASE("connections that die straight after connect are retried every 0.2 s, not in a tight loop") {
  aet_test::TempDir dir;
  aet::Loop loop;
  // A listener that accepts and closes at once.
  const int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  REQUIRE(listener >= 0);
  sockaddr_un where{};
  where.sun_family = AF_UNIX;
  const std::string path = dir.file("closing.sock");
  std::memcpy(where.sun_path, path.data(), path.size());
  REQUIRE(::bind(listener, reinterpret_cast<sockaddr*>(&where), sizeof where) == 0);
  REQUIRE(::listen(listener, 64) == 0);
  int accepted = 0;
  aet::IoWatcher accepting = loop.io(listener, aet::io_read, [&](unsigned) {
    for (int fd; (fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC)) >= 0;) {
      ++accepted;
      ::close(fd);
    }
  });
  {
    aet::ClientOptions co;
    co.connect = "unix:" + path;
    co.min_workers = 2;
    aet::Client client(loop, co);
    REQUIRE_FALSE(run_until(loop, [] { return false; }, 1));
    // Two at start, then at most two per 0.2 s retry.
    INFO(accepted << " connections in 1 s");
    REQUIRE(accepted >= 2);
    REQUIRE(accepted <= 14);
  }
  accepting.reset();
  ::close(listener);
}

TEST_CASE("an idle worker killed with SIGKILL is replaced without any checkout failing") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(loop, co);
  const pid_t victim = static_cast<pid_t>(pid_of(call_and_wait(loop, client, "pid")));
  REQUIRE(run_until(loop, [&] { return client.idle_worker_count() == 1; }));
  REQUIRE(::kill(victim, SIGKILL) == 0);
  // The client notices while the worker is idle and connects a new one.
  REQUIRE(run_until(loop, [&] {
    std::set<pid_t> kids = aet_test::children_of(server.pid());
    kids.erase(victim);
    return !kids.empty() && client.idle_worker_count() == 1;
  }));
  REQUIRE(pid_of(call_and_wait(loop, client, "pid")) != victim);

  // And a kill the loop has not seen yet does not fail a checkout either.
  const pid_t second = static_cast<pid_t>(pid_of(call_and_wait(loop, client, "pid")));
  REQUIRE(::kill(second, SIGKILL) == 0);
  REQUIRE(aet_test::eventually([&] { return !aet_test::process_alive(second); }));
  REQUIRE(pid_of(call_and_wait(loop, client, "pid")) != second);
}

TEST_CASE("destroying the client with queued checkouts neither crashes nor leaks") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  const std::set<int> fds_before = aet_test::open_fds();
  int called = 0;
  std::vector<aet::Checkout> kept;
  {
    aet::ClientOptions co = rig.client_options();
    co.max_workers = 2;
    auto client = std::make_unique<aet::Client>(loop, co);
    for (int i = 0; i < 6; ++i) {
      aet::Checkout c = client->checkout();
      c.call("sleep", {0.2}, [&](aet::Checkout&, Json) { ++called; });
      c.call("pid", {}, [&](aet::Checkout&, Json) { ++called; });
      if (i % 2 == 0) kept.push_back(c);
    }
    kept.push_back(client->checkout());  // never served
    REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.05));
    client.reset();
  }
  REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.3));
  REQUIRE(called == 0);
  REQUIRE(aet_test::open_fds() == fds_before);
  // Handles that outlive the client are inert.
  bool threw = false;
  try {
    kept[0].call("pid", {}, [](aet::Checkout&, Json) {});
  } catch (const aet::Error& e) {
    threw = std::string(e.what()) == "client is gone";
  }
  REQUIRE(threw);
  REQUIRE_THROWS_AS(kept[1].throw_fatal_error("x"), aet::Error);
  kept.clear();
}

TEST_CASE("a callback or catcher that destroys the client is safe") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  SECTION("a result callback") {
    auto client = std::make_unique<aet::Client>(loop, rig.client_options());
    bool done = false;
    aet::Checkout c = client->checkout();
    c.call("pid", {}, [&](aet::Checkout& again, Json) {
      client.reset();
      done = true;
      REQUIRE_THROWS_AS(again.call("pid", {}, [](aet::Checkout&, Json) {}), aet::Error);
    });
    c.call("pid", {}, [&](aet::Checkout&, Json) { FAIL("discarded with the client"); });
    REQUIRE(run_until(loop, [&] { return done; }));
    REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.2));
  }
  SECTION("a catcher") {
    auto client = std::make_unique<aet::Client>(loop, rig.client_options());
    bool done = false;
    aet::frame_try(
        [&] {
          for (int i = 0; i < 3; ++i) client->checkout().call("fail", {"x"}, [](aet::Checkout&, Json) {});
        },
        [&](const std::exception&, const std::string&) {
          REQUIRE_FALSE(done);  // the others are discarded with the client
          client.reset();
          done = true;
        });
    REQUIRE(run_until(loop, [&] { return done; }));
    REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.2));
  }
  SECTION("a timeout's catcher") {
    aet::ClientOptions co = rig.client_options();
    co.timeout = 0.1;
    auto client = std::make_unique<aet::Client>(loop, co);
    bool done = false;
    aet::frame_try([&] { client->checkout().call("sleep", {0.5}, [](aet::Checkout&, Json) {}); },
                   [&](const std::exception&, const std::string&) {
                     client.reset();
                     done = true;
                   });
    REQUIRE(run_until(loop, [&] { return done; }));
    REQUIRE_FALSE(run_until(loop, [] { return false; }, 0.2));
  }
}

TEST_CASE("past max_pending_checkouts checkout() throws OverloadError at once") {
  Rig rig;  // no server: nothing is ever served
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_pending_checkouts = 3;
  aet::Client client(loop, co);
  std::vector<aet::Checkout> held;
  for (int i = 0; i < 2; ++i) {
    held.push_back(client.checkout());
    held.back().call("pid", {}, [](aet::Checkout&, Json) {});
  }
  {
    aet::Checkout unused = client.checkout();  // pending too, until its handle goes
    REQUIRE(client.pending_checkout_count() == 3);
  }
  REQUIRE(client.pending_checkout_count() == 2);
  held.push_back(client.checkout());
  bool threw = false;
  try {
    client.checkout();
  } catch (const aet::OverloadError& e) {
    threw = std::string(e.what()) == "too many pending checkouts (3)";
  }
  REQUIRE(threw);
  held.back().call("pid", {}, [](aet::Checkout&, Json) {});
  held.pop_back();  // still pending: its call keeps it
  REQUIRE(client.pending_checkout_count() == 3);
  REQUIRE_THROWS_AS(client.checkout(), aet::OverloadError);
}

TEST_CASE("max_workers 0 is refused by the Client constructor") {
  aet::Loop loop;
  aet::ClientOptions co;
  co.connect = "unix:/nonexistent/s.sock";
  co.max_workers = 0;
  try {
    aet::Client client(loop, co);
    FAIL("a client with max_workers 0 was made");
  } catch (const aet::Error& e) {
    REQUIRE(std::string(e.what()) == "aet::Client: max_workers must be at least 1");
  }
}

TEST_CASE("the pool opens min_workers at start and never more than max_workers") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 3;
  co.max_workers = 4;
  aet::Client client(loop, co);
  REQUIRE(client.worker_count() == 3);
  REQUIRE(run_until(loop, [&] { return client.idle_worker_count() == 3; }));
  int done = 0;
  for (int i = 0; i < 10; ++i) client.checkout().call("sleep", {0.05}, [&](aet::Checkout&, Json) { ++done; });
  REQUIRE(client.worker_count() == 4);
  REQUIRE(run_until(loop, [&] { return done == 10; }));
  REQUIRE(client.worker_count() == 4);

  aet::ClientOptions capped = rig.client_options();
  capped.min_workers = 5;
  capped.max_workers = 2;
  aet::Client small(loop, capped);
  REQUIRE(small.worker_count() == 2);
}

TEST_CASE("a client connects over TCP, IPv4 and IPv6") {
  aet::Loop loop;
  for (std::string listen : {"tcp:127.0.0.1:0", "tcp:[::1]:0"}) {
    aet::ServerOptions so;
    so.listen = listen;
    so.interface = standard_methods();
    std::optional<aet::TaskServer> server;
    try {
      server.emplace(aet::fork_task_server(so));
    } catch (const aet::ServerError& e) {
      if (listen.find("::1") == std::string::npos) throw;
      WARN("no IPv6 loopback here: " << e.what());
      continue;
      throw;
    }
    INFO(server->address());
    aet::ClientOptions co;
    co.connect = server->address();
    co.timeout = 10;
    aet::Client client(loop, co);
    REQUIRE(call_and_wait(loop, client, "echo", {"over tcp"}) == Json{"over tcp"});
  }
}

TEST_CASE("the client and the server accept and refuse the same addresses, for the same reason") {
  // What follows `PREFIX "ADDRESS": `, or "accepted".
  auto reason = [](const std::string& what, std::string address) {
    for (std::size_t nul; (nul = address.find('\0')) != std::string::npos;) address.replace(nul, 1, "\\0");
    const std::string quoted = "\"" + address + "\": ";
    const std::size_t at = what.find(quoted);
    return at == std::string::npos ? "unexpected message: " + what : what.substr(at + quoted.size());
  };
  auto server_says = [&](const std::string& address) {
    try {
      aet::ServerOptions so;
      so.listen = address;
      so.interface = standard_methods();
      aet::Server server(so);
    } catch (const aet::ServerError& e) {
      return reason(e.what(), address);
    }
    return std::string("accepted");
  };
  aet::Loop loop;
  auto client_says = [&](const std::string& address) {
    try {
      aet::ClientOptions co;
      co.connect = address;
      aet::Client client(loop, co);
    } catch (const aet::Error& e) {
      return reason(e.what(), address);
    }
    return std::string("accepted");
  };
  const std::vector<std::string> refused = {
      "nonsense", "", "unix:", "unix:/tmp/" + std::string(200, 'x'), std::string("unix:/tmp/a\0b", 13),
      "tcp:127.0.0.1", "tcp:::1:7000", "tcp::::1:80", "tcp:127.0.0.1:99999", "tcp:127.0.0.1:http",
      "tcp::80", "tcp:[::1:80", "tcp:[]:80", "tcp:127.0.0.1:", "udp:127.0.0.1:80",
  };
  for (const std::string& address : refused) {
    INFO("address: " << address);
    const std::string server = server_says(address);
    CHECK(server != "accepted");
    CHECK(server.rfind("unexpected", 0) != 0);
    CHECK(client_says(address) == server);
  }
  aet_test::TempDir dir;
  for (const std::string& address : {dir.unix_address(), std::string("tcp:127.0.0.1:0")}) {
    INFO("address: " << address);
    CHECK(server_says(address) == "accepted");
    CHECK(client_says(address) == "accepted");
  }
}

namespace {

// Runs `body` in a forked child, returns its exit status (-1 if it did not
// end within `limit` seconds; it is killed then).
int exit_status_of_child(const std::function<int()>& body, double limit) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 99;
    try {
      code = body();
    } catch (...) {
      code = 98;
    }
    ::_exit(code);
  }
  int status = 0;
  if (!aet_test::eventually([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, limit)) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_CASE("a host name with IPv6 and IPv4 addresses reaches a server on either family") {
  // The name comes from a private /etc/hosts, bind-mounted in a mount
  // namespace of the child's own: it resolves to ::1 and to 127.0.0.1.
  aet_test::TempDir dir;
  const std::string hosts = dir.file("hosts");
  std::ofstream(hosts) << "::1 aet-dual-stack.test\n127.0.0.1 aet-dual-stack.test\n";
  const int status = exit_status_of_child(
      [&] {
        if (::unshare(CLONE_NEWNS) != 0) return 77;
        if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return 77;
        if (::mount(hosts.c_str(), "/etc/hosts", nullptr, MS_BIND, nullptr) != 0) return 77;
        int served = 0;
        for (const char* listen : {"tcp:127.0.0.1:0", "tcp:[::1]:0"}) {
          aet::ServerOptions so;
          so.listen = listen;
          so.interface = standard_methods();
          std::optional<aet::TaskServer> server;
          try {
            server.emplace(aet::fork_task_server(so));
          } catch (const aet::ServerError&) {
            continue;  // no IPv6 loopback here
          }
          aet::Loop loop;
          aet::ClientOptions co;
          co.connect = "tcp:aet-dual-stack.test:" + std::to_string(server->port());
          co.min_workers = 1;
          co.timeout = 5;
          aet::Client client(loop, co);
          std::optional<Json> result;
          bool failed = false;
          aet::frame_try(
              [&] { client.checkout().call("echo", {listen}, [&](aet::Checkout&, Json r) { result = r; }); },
              [&](const std::exception&, const std::string&) { failed = true; });
          if (!run_until(loop, [&] { return result.has_value() || failed; }, 8)) return 2;
          if (failed || *result != Json{listen}) return 3;
          ++served;
        }
        return served >= 1 ? 0 : 4;
      },
      30);
  if (status == 77) {
    WARN("no private mount namespace here (needs root): the dual-stack name is not tested");
    return;
  }
  REQUIRE(status == 0);
}

TEST_CASE("a large call and reply go through partial writes") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  std::string big(8 * 1024 * 1024, 'x');
  for (std::size_t i = 0; i < big.size(); i += 4099) big[i] = static_cast<char>('a' + i % 26);
  REQUIRE(call_and_wait(loop, client, "echo", {big}) == Json{big});
}

TEST_CASE("long string arguments of a queued call are sent from the call's own copy") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  aet::Client client(loop, co);
  std::string escaped(300000, 'e');
  escaped[150000] = '\n';
  std::string utf8;
  while (utf8.size() < 200000) utf8 += "\xc3\xa9t\xc3\xa9 ";
  const Json expected{std::string(100000, 'p'), escaped, Json::object({{"deep", Json::array({utf8})}})};
  std::optional<Json> echoed;
  bool slept = false;
  Caught caught;
  aet::frame_try(
      [&] {
        client.checkout().call("sleep", {0.1}, [&](aet::Checkout&, Json) { slept = true; });
        Json args = expected;  // gone before the call is sent: the worker is busy
        client.checkout().call("echo", std::move(args), [&](aet::Checkout&, Json r) { echoed = r; });
      },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return echoed.has_value() || caught.count > 0; }));
  INFO(caught.what);
  REQUIRE(caught.count == 0);
  REQUIRE(slept);
  REQUIRE(*echoed == expected);
}

TEST_CASE("a call that times out half sent takes its worker, and the client goes on") {
  Rig rig;
  aet::ServerOptions so = rig.server_options();
  // The worker reads nothing while checkout_done runs, so the next
  // checkout's 16 MiB request stops part way, far past its timeout.
  so.checkout_done = [] { std::this_thread::sleep_for(std::chrono::seconds(2)); };
  aet::TaskServer server = aet::fork_task_server(so);
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_workers = 1;
  aet::Client client(loop, co);
  const Json first_pid = call_and_wait(loop, client, "pid");  // released: "dn" goes out
  aet::CheckoutOptions short_timeout;
  short_timeout.timeout = 0.3;
  Caught caught;
  aet::frame_try(
      [&] { client.checkout(short_timeout).call("echo", {std::string(16 << 20, 'h')}, [](aet::Checkout&, Json) {}); },
      catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }, 5));
  REQUIRE(caught.kind == "timeout");
  const Json next_pid = call_and_wait(loop, client, "pid");
  REQUIRE(next_pid != first_pid);  // a fresh worker: the half-sent one was dropped
}

TEST_CASE("a reply above max_frame is a protocol error on that checkout") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_frame = 1000;
  aet::Client client(loop, co);
  Caught caught;
  aet::Checkout c = client.checkout();
  aet::frame_try([&] { c.call("big", {5000}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
  INFO(caught.what);
  REQUIRE(caught.what.rfind("protocol error: ", 0) == 0);
  REQUIRE(caught.kind == "checkout");
  Caught later;
  aet::frame_try([&] { c.call("pid", {}, [](aet::Checkout&, Json) {}); }, catch_into(later));
  REQUIRE(run_until(loop, [&] { return later.count > 0; }));
  REQUIRE(later.what == caught.what);
  REQUIRE(call_and_wait(loop, client, "echo", {1}) == Json{1});
}

TEST_CASE("a value JSON cannot carry fails in call() itself") {
  Rig rig;
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 0;
  aet::Client client(loop, co);
  aet::Checkout c = client.checkout();
  REQUIRE_THROWS_AS(c.call("echo", {std::string("\xFF\xFE")}, [](aet::Checkout&, Json) {}), aet::JsonError);
  REQUIRE_THROWS_AS(aet::Client(loop, [] {
                      aet::ClientOptions bad;
                      bad.connect = "carrier-pigeon:coop";
                      return bad;
                    }()),
                    aet::Error);
}

TEST_CASE("an empty Checkout handle throws") {
  aet::Checkout empty;
  REQUIRE_FALSE(empty);
  REQUIRE_THROWS_AS(empty.call("x", {}, [](aet::Checkout&, Json) {}), aet::Error);
}

TEST_CASE("a client hosted on the epoll adapter serves calls, timeouts and a restart") {
  Rig rig;
  aet_test::EpollHost host;
  aet::ClientOptions co = rig.client_options();
  co.timeout = 0.3;
  aet::Client client(host, co);
  Caught caught;
  // No server yet: a timeout, from an epoll timer.
  aet::frame_try([&] { client.checkout().call("pid", {}, [](aet::Checkout&, Json) {}); }, catch_into(caught));
  REQUIRE(run_until(host, [&] { return caught.count > 0; }));
  REQUIRE(caught.what == "timed out after 0.3 seconds");
  // The server comes up: the connect retries find it.
  aet::TaskServer server = rig.start();
  std::optional<Json> result;
  aet::frame_try(
      [&] {
        aet::CheckoutOptions options;
        options.timeout = 10;
        aet::Checkout c = client.checkout(options);
        c.call("echo", {"via epoll"}, [&](aet::Checkout& again, Json) {
          again({"echo", "nested"}, [&](aet::Checkout&, Json r) { result = r; });
        });
      },
      catch_into(caught));
  REQUIRE(run_until(host, [&] { return result.has_value() || caught.count > 1; }));
  REQUIRE(caught.count == 1);
  REQUIRE(*result == Json{"nested"});
  REQUIRE(run_until(host, [&] { return client.idle_worker_count() == 2; }));
}

namespace {

// A fake worker pool in this process, on the test's loop: it accepts
// connections and answers each request frame with `reply(request)` (raw
// bytes), or sends `greeting` as soon as a connection is accepted.
class FakeServer {
 public:
  FakeServer(aet::Loop& loop, const std::string& path) : loop_(loop) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strncpy(address.sun_path, path.c_str(), sizeof(address.sun_path) - 1);
    REQUIRE(::bind(listener_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0);
    REQUIRE(::listen(listener_, 16) == 0);
    accepting_ = loop.io(listener_, aet::io_read, [this](unsigned) { accept_one(); });
  }
  ~FakeServer() {
    connections_.clear();
    accepting_.reset();
    ::close(listener_);
  }
  std::function<std::string(const Json& request)> reply;
  std::string greeting;
  bool close_after_reply = false;  // the end of the connection right behind the reply
  int accepted = 0;

 private:
  struct Connection {
    explicit Connection(int descriptor) : fd(descriptor) {}
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;
    int fd;
    aet::FrameDecoder decoder;
    aet::IoWatcher watcher;
    ~Connection() {
      watcher.reset();
      ::close(fd);
    }
  };
  void accept_one() {
    const int fd = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) return;
    ++accepted;
    auto connection = std::make_unique<Connection>(fd);
    Connection* c = connection.get();
    c->watcher = loop_.io(fd, aet::io_read, [this, c](unsigned) { serve(*c); });
    if (!greeting.empty()) REQUIRE(::send(fd, greeting.data(), greeting.size(), MSG_NOSIGNAL) > 0);
    connections_.push_back(std::move(connection));
  }
  void serve(Connection& c) {
    char buffer[4096];
    const ssize_t n = ::recv(c.fd, buffer, sizeof(buffer), 0);
    if (n <= 0) {
      c.watcher.reset();
      return;
    }
    c.decoder.feed(buffer, static_cast<std::size_t>(n));
    while (std::optional<Json> request = c.decoder.next()) {
      if ((*request)[0] == Json("dn") || !reply) continue;
      const std::string bytes = reply(*request);
      REQUIRE(::send(c.fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
      if (close_after_reply) ::shutdown(c.fd, SHUT_WR);
    }
  }
  aet::Loop& loop_;
  int listener_ = -1;
  aet::IoWatcher accepting_;
  std::vector<std::unique_ptr<Connection>> connections_;
};

aet::ClientOptions fake_client_options(const std::string& socket_path) {
  aet::ClientOptions co;
  co.connect = "unix:" + socket_path;
  co.timeout = 10;
  return co;
}

std::string raw_frame(const std::string& body) {
  const auto n = static_cast<std::uint32_t>(body.size());
  std::string frame{static_cast<char>(n >> 24), static_cast<char>(n >> 16), static_cast<char>(n >> 8),
                    static_cast<char>(n)};
  return frame + body;
}

}  // namespace

TEST_CASE("a worker that breaks the protocol fails its checkout with `protocol error: ...`") {
  aet_test::TempDir dir;
  aet::Loop loop;
  FakeServer fake(loop, dir.file("fake.sock"));
  std::string expected;
  SECTION("bad JSON") {
    fake.reply = [](const Json&) { return raw_frame("[\"ok\", {}, tru"); };
    expected = "protocol error: bad JSON in frame";
  }
  SECTION("a message a worker never sends") {
    fake.reply = [](const Json&) { return aet::encode_frame(Json{"do", Json::object(), 1}); };
    expected = "protocol error: unexpected \"do\" message from the worker";
  }
  SECTION("a message of a bad shape") {
    fake.reply = [](const Json&) { return aet::encode_frame(Json{"ok", 1, 2}); };
    expected = "protocol error: ";
  }
  SECTION("two replies to one call") {
    fake.reply = [](const Json&) {
      return aet::encode_frame(Json{"ok", Json::object(), 1}) + aet::encode_frame(Json{"ok", Json::object(), 2});
    };
    expected = "protocol error: a reply with no call in flight";
  }
  aet::ClientOptions co;
  co.connect = "unix:" + dir.file("fake.sock");
  co.min_workers = 1;
  co.max_workers = 1;
  co.timeout = 10;
  aet::Client client(loop, co);
  Caught caught;
  std::optional<Json> result;
  aet::Checkout c = client.checkout();
  aet::frame_try([&] { c.call("m", {}, [&](aet::Checkout&, Json r) { result = r; }); }, catch_into(caught));
  if (expected.find("no call in flight") != std::string::npos) {
    // The first reply is fine; the second, read with it, finds nothing in
    // flight: the checkout fails for good, with nothing to deliver to yet.
    REQUIRE(run_until(loop, [&] { return result.has_value(); }));
    REQUIRE(caught.count == 0);
    caught.what = expected;
  } else {
    REQUIRE(run_until(loop, [&] { return caught.count > 0; }));
    INFO(caught.what);
    REQUIRE(caught.what.rfind(expected, 0) == 0);
    REQUIRE(caught.kind == "checkout");
    REQUIRE_FALSE(result);
  }
  Caught later;
  aet::frame_try([&] { c.call("m", {}, [](aet::Checkout&, Json) {}); }, catch_into(later));
  REQUIRE(run_until(loop, [&] { return later.count > 0; }));
  REQUIRE(later.what == caught.what);
}

TEST_CASE("a stray reply read together with a reply never answers the next checkout's call") {
  aet_test::TempDir dir;
  aet::Loop loop;
  FakeServer fake(loop, dir.file("fake.sock"));
  // Every request is answered twice, in one write: 1, then a stray 2.
  fake.reply = [](const Json&) {
    return aet::encode_frame(Json{"ok", Json::object(), 1}) + aet::encode_frame(Json{"ok", Json::object(), 2});
  };
  auto [first, second] = two_checkouts_on_one_worker(loop, fake_client_options(dir.file("fake.sock")));
  REQUIRE(first == Json(1));
  REQUIRE(second == Json(1));  // from a fresh worker, not the stray 2
  REQUIRE(fake.accepted >= 2);
}

TEST_CASE("a worker whose connection ended right behind its reply is not handed to the next checkout") {
  aet_test::TempDir dir;
  aet::Loop loop;
  FakeServer fake(loop, dir.file("fake.sock"));
  // Large enough (over two 64 KiB reads) that the client reads on to the
  // end of the connection before it delivers the reply (after a short read
  // it stops reading, and the next call sent finds the end: see the README).
  const std::string big(200000, 'r');
  fake.reply = [big](const Json&) { return aet::encode_frame(Json{"ok", Json::object(), big}); };
  fake.close_after_reply = true;
  auto [first, second] = two_checkouts_on_one_worker(loop, fake_client_options(dir.file("fake.sock")));
  REQUIRE(first == Json(big));
  REQUIRE(second == Json(big));  // from a fresh worker
  REQUIRE(fake.accepted >= 2);
}

TEST_CASE("an idle worker that sends stray bytes is dropped and replaced, failing no checkout") {
  aet_test::TempDir dir;
  aet::Loop loop;
  FakeServer fake(loop, dir.file("fake.sock"));
  fake.greeting = aet::encode_frame(Json{"ok", Json::object(), "unasked"});
  aet::ClientOptions co;
  co.connect = "unix:" + dir.file("fake.sock");
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(loop, co);
  // Each new connection is greeted with a stray reply, so the client keeps
  // replacing its worker.
  REQUIRE(run_until(loop, [&] { return fake.accepted >= 3; }));
  REQUIRE(client.worker_count() == 1);
}

TEST_CASE("unknown meta keys in a worker's reply are ignored") {
  aet_test::TempDir dir;
  aet::Loop loop;
  FakeServer fake(loop, dir.file("fake.sock"));
  fake.reply = [](const Json&) {
    return aet::encode_frame(Json{"ok", Json::object({{"zz", 1}, {"ld2", Json::array({1, 2})}}), 5});
  };
  aet::ClientOptions co;
  co.connect = "unix:" + dir.file("fake.sock");
  co.min_workers = 1;
  co.max_workers = 1;
  co.timeout = 10;
  aet::Client client(loop, co);
  REQUIRE(call_and_wait(loop, client, "m") == 5);
  REQUIRE(call_and_wait(loop, client, "m") == 5);  // the same worker, still in step
  REQUIRE(fake.accepted == 1);
}
