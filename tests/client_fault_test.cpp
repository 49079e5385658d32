// Client faults: bad replies from a fake worker on a raw socket, workers
// dying at every stage of a call, timeouts, a client killed outright, a
// crashing interface, faults under load, hygiene, backpressure and SIGPIPE.
// See tests/RELIABILITY.md.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "anyevent_task.hpp"
#include "fault_support.hpp"
#include "test_support.hpp"

using aet::Json;
using aet_test::eventually;
using aet_test::FakeWorkers;
using aet_test::monotonic_now;
using aet_test::run_until;
using aet_test::TempDir;

namespace {

// ---- what a call ended with ----

struct Outcome {
  int results = 0;
  int errors = 0;
  Json value;
  std::string what;
  std::string kind;  // remote, timeout, checkout, other
  bool ended() const { return results + errors > 0; }
};

std::string kind_of(const std::exception& e) {
  if (dynamic_cast<const aet::RemoteError*>(&e)) return "remote";
  if (dynamic_cast<const aet::TimeoutError*>(&e)) return "timeout";
  if (dynamic_cast<const aet::CheckoutError*>(&e)) return "checkout";
  return "other";
}

// A framed callback that records into `outcome`: the result, or the error
// raised in the call's frame.
auto record_into(Outcome& outcome) {
  return aet::frame(
      [&outcome](aet::Checkout&, Json result) {
        ++outcome.results;
        outcome.value = std::move(result);
      },
      [&outcome](const std::exception& e, const std::string&) {
        ++outcome.errors;
        outcome.what = e.what();
        outcome.kind = kind_of(e);
      });
}

Json args(std::initializer_list<Json> items) { return Json::array(items); }

// ---- a real server ----

void mark_started(const std::string& dir) {
  std::string path = dir + "/started." + std::to_string(::getpid());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd >= 0) ::close(fd);
}

bool file_exists(const std::string& path) { return ::access(path.c_str(), F_OK) == 0; }

struct Rig {
  TempDir dir;
  std::string address = dir.unix_address();

  std::string started_marker(pid_t pid) const { return dir.file("started." + std::to_string(pid)); }

  aet::ServerOptions server_options() const {
    const std::string where = dir.path();
    aet::ServerOptions so;
    so.listen = address;
    so.name = "cfault";
    so.hung_worker_timeout = 10;  // a worker left running never holds a test up for long
    so.interface = aet::Methods{
        {"pid", [](const Json&) -> Json { return static_cast<std::int64_t>(::getpid()); }},
        {"echo", [](const Json& a) { return a.size() == 1 ? a[0] : a; }},
        // A millisecond of blocking work, then the argument back: paces a
        // load test so that it lasts long enough for the faults it injects.
        {"work",
         [](const Json& a) {
           std::this_thread::sleep_for(std::chrono::milliseconds(1));
           return a[0];
         }},
        {"fail", [](const Json& a) -> Json { throw std::runtime_error("failed " + a.dump()); }},
        {"crash", [](const Json&) -> Json { std::abort(); }},
        {"sleep",
         [where](const Json& a) {
           mark_started(where);
           std::this_thread::sleep_for(std::chrono::duration<double>(a[0].as_double()));
           return a.size() > 1 ? a[1] : Json("slept");
         }},
        {"big",
         [where](const Json&) {
           mark_started(where);
           return Json(std::string(16 << 20, 'b'));
         }},
    };
    return so;
  }
  aet::TaskServer start() const { return aet::fork_task_server(server_options()); }
  aet::ClientOptions client_options() const {
    aet::ClientOptions co;
    co.connect = address;
    co.name = "cfault";
    co.timeout = 10;  // a broken build fails instead of hanging
    return co;
  }
};

// The pid of the worker behind `checkout` (by a "pid" call on it).
pid_t worker_pid(aet::Loop& loop, aet::Checkout& checkout) {
  Outcome outcome;
  checkout.call("pid", {}, record_into(outcome));
  REQUIRE(run_until(loop, [&] { return outcome.ended(); }));
  REQUIRE(outcome.results == 1);
  return static_cast<pid_t>(outcome.value.as_int());
}

// ---- a fake worker pool that answers by hand ----

// Requests are ["do", {}, VERB, ARG]: "good" replies ["ok", {}, ARG];
// "reply" runs the test's scenario named ARG; "silent" never answers.
struct FakeRig {
  TempDir dir;
  std::string path = dir.file("fake.sock");
  aet::Loop loop;
  std::map<std::string, std::function<void(FakeWorkers::Connection&)>> scenarios;
  std::vector<FakeWorkers::Connection*> silent;  // connections sent a "silent" request
  FakeWorkers fake{loop, path, [this](FakeWorkers::Connection& c, const Json& request) { answer(c, request); }};

  void answer(FakeWorkers::Connection& connection, const Json& request) {
    const std::string verb = request.size() > 2 && request[2].is_string() ? request[2].as_string() : "";
    const Json arg = request.size() > 3 ? request[3] : Json();
    if (verb == "good") {
      connection.send(aet::encode_frame(args({"ok", Json::object(), arg})));
    } else if (verb == "reply") {
      scenarios.at(arg.as_string())(connection);
    } else if (verb == "silent") {
      silent.push_back(&connection);
    } else {
      connection.send(aet::encode_frame(args({"er", Json::object(), "fake: unknown verb"})));
    }
  }

  aet::ClientOptions client_options() const {
    aet::ClientOptions co;
    co.connect = "unix:" + path;
    co.name = "fake";
    co.min_workers = 2;
    co.max_workers = 4;
    co.timeout = 10;
    return co;
  }
};

// A checkout whose call gets the reply bytes `reply` (then the connection
// closed when `then_close`) fails with exactly `expected` (a prefix, when
// `prefix_only`); another checkout, busy at the same time on another
// connection, is unaffected, as are checkouts made afterwards. The bad
// connection is closed by the client, and the failure sticks to its
// checkout.
void check_bad_reply(const std::string& reply, bool then_close, const std::string& expected,
                     bool prefix_only = false) {
  FakeRig rig;
  rig.scenarios["bad"] = [&](FakeWorkers::Connection& c) {
    c.send(reply);
    if (then_close) c.finish();
  };
  aet::Client client(rig.loop, rig.client_options());
  aet::Checkout bad = client.checkout();
  aet::Checkout good = client.checkout();
  Outcome bad_outcome, good_before, good_after, later_on_bad, fresh;
  good.call("good", {1}, record_into(good_before));
  REQUIRE(run_until(rig.loop, [&] { return good_before.ended(); }));
  bad.call("reply", {"bad"}, record_into(bad_outcome));
  REQUIRE(run_until(rig.loop, [&] { return bad_outcome.ended(); }));
  good.call("good", {2}, record_into(good_after));
  REQUIRE(run_until(rig.loop, [&] { return good_after.ended(); }));

  CHECK(bad_outcome.errors == 1);
  CHECK(bad_outcome.kind == "checkout");
  if (prefix_only) {
    CHECK_THAT(bad_outcome.what, Catch::StartsWith(expected));
  } else {
    CHECK(bad_outcome.what == expected);
  }
  CHECK(good_before.value == 1);
  CHECK(good_after.value == 2);

  // The failure sticks; the bad connection is gone; new checkouts go on.
  bad.call("good", {3}, record_into(later_on_bad));
  REQUIRE(run_until(rig.loop, [&] { return later_on_bad.ended(); }));
  CHECK(later_on_bad.errors == 1);
  CHECK(later_on_bad.what == bad_outcome.what);
  client.checkout().call("good", {4}, record_into(fresh));
  REQUIRE(run_until(rig.loop, [&] { return fresh.ended(); }));
  CHECK(fresh.value == 4);
  CHECK(run_until(rig.loop, [&] {
    for (auto& c : rig.fake.connections())
      if (c->requests() > 0 && !c->open() && c->peer_closed()) return true;
    return false;
  }));
  CHECK(rig.fake.client_protocol_errors() == 0);
}

std::string ok_frame_text(const std::string& rest) { return "[\"ok\",{}," + rest + "]"; }

}  // namespace

// ---- bad replies from a fake worker, one each ----

TEST_CASE("a zero-length reply frame fails only its checkout, with a protocol error") {
  check_bad_reply(aet_test::frame_header(0), false, "protocol error: zero-length frame");
}

TEST_CASE("a reply frame announcing 0xFFFFFFFF bytes is refused at its header") {
  check_bad_reply(aet_test::frame_header(0xFFFFFFFFu), false,
                  "protocol error: frame of 4294967295 bytes exceeds the limit of 67108864");
}

TEST_CASE("a reply header cut short, then the connection closed, is a dead connection") {
  check_bad_reply(aet_test::frame_header(20).substr(0, 2), true, "worker connection suddenly died");
}

TEST_CASE("a reply body cut short, then the connection closed, is a dead connection") {
  const std::string whole = aet::encode_frame(args({"ok", Json::object(), "cut short"}));
  check_bad_reply(whole.substr(0, whole.size() - 4), true, "worker connection suddenly died");
}

TEST_CASE("invalid UTF-8 in a reply is a protocol error") {
  check_bad_reply(aet_test::raw_frame(ok_frame_text("\"\xc3\x28\"")), false, "protocol error: bad JSON in frame: ",
                  true);
}

TEST_CASE("invalid JSON in a reply is a protocol error") {
  check_bad_reply(aet_test::raw_frame("[\"ok\",{},tru"), false, "protocol error: bad JSON in frame: ", true);
}

TEST_CASE("a reply that is not an array is a protocol error") {
  check_bad_reply(aet_test::raw_frame("{\"ok\":1}"), false, "protocol error: message is not an array but object");
}

TEST_CASE("a reply with an unknown command is a protocol error") {
  check_bad_reply(aet_test::raw_frame("[\"zz\",{},1]"), false, "protocol error: unknown command \"zz\"");
}

TEST_CASE("a reply without meta is a protocol error") {
  check_bad_reply(aet_test::raw_frame("[\"ok\"]"), false, "protocol error: \"ok\" message has no meta");
}

TEST_CASE("a request command sent back to the client is a protocol error") {
  check_bad_reply(aet_test::raw_frame("[\"do\",{},\"x\"]"), false,
                  "protocol error: unexpected \"do\" message from the worker");
}

TEST_CASE("an error reply whose message is not a string is a protocol error") {
  check_bad_reply(aet_test::raw_frame("[\"er\",{},42]"), false,
                  "protocol error: \"er\" message is not a string but number");
}

TEST_CASE("a 100,000-deep reply is refused without exhausting the stack") {
  FakeRig rig;
  const std::string deep = aet_test::raw_frame(ok_frame_text(aet_test::nested_arrays(100000)));
  rig.scenarios["deep"] = [&](FakeWorkers::Connection& c) { c.send(deep); };
  aet::Client client(rig.loop, rig.client_options());
  Outcome deep_outcome, other;
  client.checkout().call("reply", {"deep"}, record_into(deep_outcome));
  client.checkout().call("good", {"fine"}, record_into(other));
  REQUIRE(run_until(rig.loop, [&] { return deep_outcome.ended() && other.ended(); }));
  CHECK(deep_outcome.kind == "checkout");
  CHECK_THAT(deep_outcome.what, Catch::StartsWith("protocol error: bad JSON in frame: ") &&
                                    Catch::Contains("nesting deeper than 512 levels"));
  CHECK(other.value == "fine");
}

TEST_CASE("a 10 MB reply string under the frame limit is delivered") {
  FakeRig rig;
  std::string text;
  while (text.size() < (10u << 20)) text += "ten megabytes \xe2\x82\xac\xf0\x9f\x8e\x89; ";
  const std::string frame = aet::encode_frame(args({"ok", Json::object(), text}));
  rig.scenarios["large"] = [&](FakeWorkers::Connection& c) { c.send(frame); };
  aet::Client client(rig.loop, rig.client_options());
  Outcome large, other;
  const double start = monotonic_now();
  client.checkout().call("reply", {"large"}, record_into(large));
  client.checkout().call("good", {"fine"}, record_into(other));
  REQUIRE(run_until(rig.loop, [&] { return large.ended() && other.ended(); }, 30));
  CHECK(monotonic_now() - start < 20);
  REQUIRE(large.results == 1);
  CHECK(large.value == text);
  CHECK(other.value == "fine");
}

TEST_CASE("a reply that arrived before a bad header is delivered, then the checkout fails") {
  FakeRig rig;
  // One write: a good reply, an impossible header, and more than a read's
  // worth after it, so that the client's first read stops nowhere near it.
  const std::string bytes = aet::encode_frame(args({"ok", Json::object(), "delivered"})) +
                            aet_test::frame_header(0xFFFFFFFFu) + std::string(200000, 'j');
  rig.scenarios["then bad"] = [&](FakeWorkers::Connection& c) { c.send(bytes); };
  aet::Client client(rig.loop, rig.client_options());
  aet::Checkout checkout = client.checkout();
  Outcome first, second;
  checkout.call("reply", {"then bad"}, record_into(first));
  REQUIRE(run_until(rig.loop, [&] { return first.ended(); }));
  INFO(first.what);
  REQUIRE(first.results == 1);
  CHECK(first.value == "delivered");
  checkout.call("good", {1}, record_into(second));
  REQUIRE(run_until(rig.loop, [&] { return second.ended(); }));
  CHECK(second.errors == 1);
  CHECK(second.what == "protocol error: frame of 4294967295 bytes exceeds the limit of 67108864");
}

TEST_CASE("a checkout released by the reply before a bad header never passes that worker on") {
  FakeRig rig;
  const std::string bytes = aet::encode_frame(args({"ok", Json::object(), "delivered"})) +
                            aet_test::frame_header(0xFFFFFFFFu) + std::string(200000, 'j');
  rig.scenarios["then bad"] = [&](FakeWorkers::Connection& c) { c.send(bytes); };
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(rig.loop, co);
  std::optional<aet::Checkout> first = client.checkout();
  Outcome first_outcome, waiting;
  first->call("reply", {"then bad"}, [&](aet::Checkout&, Json r) {
    ++first_outcome.results;
    first_outcome.value = r;
    first.reset();  // released from the callback: the worker must not go to `waiting`
  });
  client.checkout().call("good", {"fresh worker"}, record_into(waiting));
  REQUIRE(run_until(rig.loop, [&] { return first_outcome.ended() && waiting.ended(); }));
  CHECK(first_outcome.value == "delivered");
  INFO(waiting.what);
  CHECK(waiting.results == 1);
  CHECK(waiting.value == "fresh worker");
}

TEST_CASE("a reply trickling in a byte at a time keeps only its own checkout waiting") {
  FakeRig rig;
  const std::string frame = aet::encode_frame(args({"ok", Json::object(), "slowly"}));
  std::size_t sent = 0;
  FakeWorkers::Connection* slow_connection = nullptr;
  rig.scenarios["slow"] = [&](FakeWorkers::Connection& c) { slow_connection = &c; };
  aet::Client client(rig.loop, rig.client_options());
  Outcome slow;
  client.checkout().call("reply", {"slow"}, record_into(slow));
  REQUIRE(run_until(rig.loop, [&] { return slow_connection != nullptr; }));
  // One byte of the slow reply, then a whole call on another checkout, and
  // again: the other calls never wait for the slow one.
  int served_meanwhile = 0;
  while (sent < frame.size()) {
    slow_connection->send(frame.substr(sent++, 1));
    Outcome other;
    client.checkout().call("good", {static_cast<std::int64_t>(sent)}, record_into(other));
    REQUIRE(run_until(rig.loop, [&] { return other.ended(); }));
    if (other.value == static_cast<std::int64_t>(sent)) ++served_meanwhile;
    if (sent < frame.size()) CHECK_FALSE(slow.ended());
  }
  REQUIRE(run_until(rig.loop, [&] { return slow.ended(); }));
  CHECK(slow.value == "slowly");
  CHECK(served_meanwhile == static_cast<int>(frame.size()));
}

TEST_CASE("a reply nobody asked for drops that idle worker and fails no checkout") {
  FakeRig rig;
  rig.scenarios["twice"] = [&](FakeWorkers::Connection& c) {
    c.send(aet::encode_frame(args({"ok", Json::object(), "first"})));
  };
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(rig.loop, co);
  Outcome first;
  client.checkout().call("reply", {"twice"}, record_into(first));
  REQUIRE(run_until(rig.loop, [&] { return first.ended() && client.idle_worker_count() == 1; }));
  CHECK(first.value == "first");
  // The idle worker now speaks up unasked.
  auto& idle = *rig.fake.connections().front();
  REQUIRE(run_until(rig.loop, [&] { return idle.dones() == 1; }));
  idle.send(aet::encode_frame(args({"ok", Json::object(), "unasked"})));
  REQUIRE(run_until(rig.loop, [&] { return idle.peer_closed(); }));
  Outcome next;
  client.checkout().call("good", {"next"}, record_into(next));
  REQUIRE(run_until(rig.loop, [&] { return next.ended(); }));
  CHECK(next.value == "next");
  CHECK(rig.fake.accepted() == 2);
}

TEST_CASE("a checkout that timed out never lets its late reply reach anyone") {
  FakeRig rig;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;  // the next checkout would get the same worker, were it kept
  aet::Client client(rig.loop, co);
  Outcome late;
  client.checkout(aet::CheckoutOptions{0.2, std::nullopt}).call("silent", {}, record_into(late));
  REQUIRE(run_until(rig.loop, [&] { return late.ended(); }));
  CHECK(late.kind == "timeout");
  CHECK(late.what == "timed out after 0.2 seconds");
  REQUIRE(rig.silent.size() == 1);
  FakeWorkers::Connection& stale = *rig.silent.front();
  // The worker was dropped: its connection is closed, so the late reply
  // (sent now) has nowhere to go.
  REQUIRE(run_until(rig.loop, [&] { return stale.peer_closed(); }));
  stale.send(aet::encode_frame(args({"ok", Json::object(), "late"})));
  std::vector<Outcome> after(5);
  for (std::size_t i = 0; i < after.size(); ++i)
    client.checkout().call("good", {static_cast<std::int64_t>(i)}, record_into(after[i]));
  REQUIRE(run_until(rig.loop, [&] {
    return std::all_of(after.begin(), after.end(), [](const Outcome& o) { return o.ended(); });
  }));
  for (std::size_t i = 0; i < after.size(); ++i) CHECK(after[i].value == static_cast<std::int64_t>(i));
  CHECK(late.errors == 1);
  CHECK(late.results == 0);
}

TEST_CASE("SIGPIPE never kills the client when a worker closes in the middle of a call") {
  struct sigaction old_action {};
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  sigaction(SIGPIPE, &default_action, &old_action);
  {
    FakeRig rig;
    aet::Client client(rig.loop, rig.client_options());
    // The call is far larger than the socket buffer; the fake worker closes
    // once it has read the first piece, so the client's next write meets a
    // closed socket.
    rig.scenarios["unused"] = [](FakeWorkers::Connection&) {};
    aet::Checkout co = client.checkout();
    Outcome first, big;
    co.call("good", {1}, record_into(first));
    REQUIRE(run_until(rig.loop, [&] { return first.ended(); }));
    for (auto& c : rig.fake.connections())
      if (c->requests() == 1) c->close_on_next_bytes();
    co.call("echo", {std::string(16 << 20, 'p')}, record_into(big));
    REQUIRE(run_until(rig.loop, [&] { return big.ended(); }));
    CHECK(big.what == "worker connection suddenly died");
    // The dn of a clean release to a worker that is gone, too.
    aet::Checkout second = client.checkout();
    Outcome second_call;
    second.call("good", {2}, record_into(second_call));
    REQUIRE(run_until(rig.loop, [&] { return second_call.ended(); }));
    for (auto& c : rig.fake.connections())
      if (c->open()) c->close();
    second = aet::Checkout();
    Outcome third;
    client.checkout().call("good", {3}, record_into(third));
    REQUIRE(run_until(rig.loop, [&] { return third.ended(); }));
    CHECK(third.value == 3);
  }
  sigaction(SIGPIPE, &old_action, nullptr);
}

// ---- workers dying at every stage of a call ----

TEST_CASE("a worker killed while reading the request: `worker connection suddenly died`") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  aet::Checkout co = client.checkout();
  const pid_t pid = worker_pid(loop, co);
  // Stopped, the worker cannot drain the socket: the 8 MB request is left
  // half sent when it dies.
  REQUIRE(::kill(pid, SIGSTOP) == 0);
  REQUIRE(eventually([&] { return aet_test::process_state(pid) == 'T'; }, 5));
  Outcome outcome;
  co.call("echo", {std::string(8 << 20, 'r')}, record_into(outcome));
  REQUIRE(::kill(pid, SIGKILL) == 0);
  const double start = monotonic_now();
  REQUIRE(run_until(loop, [&] { return outcome.ended(); }, 5));
  CHECK(monotonic_now() - start < 2);
  CHECK(outcome.kind == "checkout");
  CHECK(outcome.what == "worker connection suddenly died");
}

TEST_CASE("a worker killed while running the request: `worker connection suddenly died`") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  aet::Checkout co = client.checkout();
  const pid_t pid = worker_pid(loop, co);
  Outcome outcome;
  co.call("sleep", {5}, record_into(outcome));
  REQUIRE(run_until(loop, [&] { return file_exists(rig.started_marker(pid)); }));
  REQUIRE(::kill(pid, SIGKILL) == 0);
  const double start = monotonic_now();
  REQUIRE(run_until(loop, [&] { return outcome.ended(); }, 5));
  CHECK(monotonic_now() - start < 2);
  CHECK(outcome.what == "worker connection suddenly died");
}

TEST_CASE("a worker killed while writing a reply larger than the socket buffer: `worker connection suddenly died`") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::Client client(loop, rig.client_options());
  aet::Checkout co = client.checkout();
  const pid_t pid = worker_pid(loop, co);
  Outcome outcome;
  co.call("big", {}, record_into(outcome));  // sent at once: the checkout holds the worker
  // The loop does not run, so nobody reads: past its handler, the worker
  // sleeps only in send(), with the socket buffer full.
  REQUIRE(eventually(
      [&] { return file_exists(rig.started_marker(pid)) && aet_test::process_state(pid) == 'S'; }, 10));
  REQUIRE(::kill(pid, SIGKILL) == 0);
  REQUIRE(run_until(loop, [&] { return outcome.ended(); }, 5));
  CHECK(outcome.what == "worker connection suddenly died");
  Outcome next;
  client.checkout().call("echo", {"after"}, record_into(next));
  REQUIRE(run_until(loop, [&] { return next.ended(); }));
  CHECK(next.value == "after");
}

TEST_CASE("a checkout that timed out on a real worker never lets its late reply reach another checkout") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  aet::Client client(loop, co);
  aet::Checkout first = client.checkout(aet::CheckoutOptions{0.3, std::nullopt});
  const pid_t slow_pid = worker_pid(loop, first);
  Outcome late;
  first.call("sleep", {0.6, "late reply"}, record_into(late));
  REQUIRE(run_until(loop, [&] { return late.ended(); }));
  CHECK(late.what == "timed out after 0.3 seconds");
  // Meanwhile and after the slow worker's reply is due, other checkouts
  // get their own answers only.
  std::vector<Outcome> others(20);
  std::size_t issued = 0;
  REQUIRE(run_until(loop, [&] {
    if (issued < others.size() && (issued == 0 || others[issued - 1].ended())) {
      client.checkout().call("sleep", {0.04, static_cast<std::int64_t>(issued)}, record_into(others[issued]));
      ++issued;
    }
    return issued == others.size() && others.back().ended() && aet_test::process_gone(slow_pid);
  }));
  for (std::size_t i = 0; i < others.size(); ++i) {
    CHECK(others[i].results == 1);
    CHECK(others[i].value == static_cast<std::int64_t>(i));
  }
  CHECK(late.results == 0);
  CHECK(late.errors == 1);
}

TEST_CASE("a client killed with SIGKILL: all its workers exit within a second") {
  Rig rig;
  aet::TaskServer server = rig.start();
  int ready[2];
  REQUIRE(::pipe2(ready, O_CLOEXEC) == 0);
  const pid_t client_pid = ::fork();
  if (client_pid == 0) {
    // The client process: four workers, two of them busy, then it waits
    // to be killed (bounded: it exits by itself after 20 s).
    try {
      aet::Loop loop;
      aet::ClientOptions co = rig.client_options();
      co.min_workers = 4;
      co.max_workers = 4;
      aet::Client client(loop, co);
      aet_test::run_until(loop, [&] { return client.idle_worker_count() == 4; }, 10);
      for (int i = 0; i < 2; ++i) client.checkout().call("sleep", {0.2}, [](aet::Checkout&, Json) {});
      char byte = 'r';
      if (::write(ready[1], &byte, 1) != 1) ::_exit(2);
      aet_test::run_until(loop, [] { return false; }, 20);
    } catch (...) {
    }
    ::_exit(1);
  }
  ::close(ready[1]);
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);
  ::close(ready[0]);
  REQUIRE(eventually([&] {
    int running = 0;
    for (pid_t pid : aet_test::children_of(server.pid())) running += file_exists(rig.started_marker(pid));
    return running == 2;
  }));
  const std::set<pid_t> workers = aet_test::children_of(server.pid());
  REQUIRE(workers.size() == 4);
  REQUIRE(::kill(client_pid, SIGKILL) == 0);
  const double killed = monotonic_now();
  int status = 0;
  REQUIRE(::waitpid(client_pid, &status, 0) == client_pid);
  CHECK(eventually(
      [&] {
        return std::all_of(workers.begin(), workers.end(), [](pid_t p) { return aet_test::process_gone(p); });
      },
      5));
  CHECK(monotonic_now() - killed < 1.0);
  CHECK(aet_test::children_of(server.pid()).empty());
}

TEST_CASE("an interface that crashes on every call, hit by 200 checkouts: 200 clear errors, no fork storm") {
  Rig rig;
  aet_test::StderrCapture log;
  aet::TaskServer server = log.redirect([&] { return rig.start(); });
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 2;
  co.max_workers = 10;
  aet::Client client(loop, co);
  std::vector<Outcome> outcomes(200);
  const double start = monotonic_now();
  for (auto& outcome : outcomes) client.checkout().call("crash", {}, record_into(outcome));
  REQUIRE(run_until(loop, [&] {
    return std::all_of(outcomes.begin(), outcomes.end(), [](const Outcome& o) { return o.ended(); });
  }, 60));
  const double took = monotonic_now() - start;
  int clear = 0;
  for (const Outcome& o : outcomes) clear += o.errors == 1 && o.what == "worker connection suddenly died";
  CHECK(clear == 200);
  CHECK(took < 30);
  // Every fork so far either crashed (and was logged) or is alive: one
  // fork per crashed call, plus the pool.
  REQUIRE(log.wait_for("killed by signal 6"));
  CHECK(eventually([&] { return log.count("killed by signal 6") == 200; }, 5));
  REQUIRE(run_until(loop, [&] { return client.idle_worker_count() == client.worker_count(); }));
  const std::size_t pool = client.worker_count();
  CHECK(pool >= co.min_workers);
  CHECK(pool <= co.max_workers);
  CHECK(eventually([&] { return aet_test::children_of(server.pid()).size() == pool; }, 5));
  // With no demand left, nothing more is forked.
  REQUIRE_FALSE(run_until(loop, [&] { return client.worker_count() != pool; }, 0.5));
  CHECK(aet_test::children_of(server.pid()).size() == pool);
  CHECK(log.count("killed by signal 6") == 200);
}

TEST_CASE("a client out of descriptors keeps its checkouts waiting, without spinning, until it has them again") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 2;
  aet::Client client(loop, co);
  aet::Checkout holder = client.checkout();
  worker_pid(loop, holder);  // the only worker stays held by `holder`
  // UBSan's vptr check needs a pipe the first time it meets a type: a loop
  // timer fired now, before the starving, spares it that when the retry
  // timer fires below (no call has a timer of its own to fire earlier).
  {
    bool fired = false;
    aet::Timer warm = loop.after(0, [&] { fired = true; });
    REQUIRE(run_until(loop, [&] { return fired; }));
  }
  // No new descriptor for this process: the soft limit goes down to its
  // lowest free descriptor number, so socket() fails with EMFILE.
  int lowest_free = 0;
  while (::fcntl(lowest_free, F_GETFD) != -1) ++lowest_free;
  rlimit old_limit{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &old_limit) == 0);
  rlimit starved = old_limit;
  starved.rlim_cur = static_cast<rlim_t>(lowest_free);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &starved) == 0);
  Outcome waiting;
  client.checkout().call("echo", {"waited"}, record_into(waiting));
  rusage before{}, after{};
  ::getrusage(RUSAGE_SELF, &before);
  const bool served_while_starved = run_until(loop, [&] { return waiting.ended(); }, 0.6);
  ::getrusage(RUSAGE_SELF, &after);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &old_limit) == 0);
  CHECK_FALSE(served_while_starved);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) * 1e-6; };
  const double cpu = seconds(after.ru_utime) - seconds(before.ru_utime) + seconds(after.ru_stime) - seconds(before.ru_stime);
  CHECK(cpu < 0.2);  // retries every 0.2 s; spinning would burn the whole 0.6 s
  REQUIRE(run_until(loop, [&] { return waiting.ended(); }, 5));
  CHECK(waiting.value == "waited");
}

// ---- backpressure ----

TEST_CASE("max_pending_checkouts caps the queue during an outage and frees up as checkouts are served") {
  Rig rig;  // the server starts later
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.max_pending_checkouts = 5;
  co.max_workers = 2;
  aet::Client client(loop, co);
  std::vector<Outcome> outcomes(5);
  for (auto& outcome : outcomes) client.checkout().call("sleep", {0.05, "served"}, record_into(outcome));
  int refused = 0;
  for (int i = 0; i < 10; ++i) {
    try {
      client.checkout();
    } catch (const aet::OverloadError&) {
      ++refused;
    }
  }
  CHECK(refused == 10);
  REQUIRE_FALSE(run_until(loop, [&] { return outcomes[0].ended(); }, 0.3));  // still down
  CHECK(client.pending_checkout_count() == 5);
  aet::TaskServer server = rig.start();
  REQUIRE(run_until(loop, [&] { return client.pending_checkout_count() < 5; }));
  Outcome admitted;
  client.checkout().call("echo", {"admitted"}, record_into(admitted));
  REQUIRE(run_until(loop, [&] {
    return admitted.ended() &&
           std::all_of(outcomes.begin(), outcomes.end(), [](const Outcome& o) { return o.ended(); });
  }));
  for (const Outcome& o : outcomes) CHECK(o.value == "served");
  CHECK(admitted.value == "admitted");
}

TEST_CASE("max_checkouts_jitter draws each worker's limit uniformly within its bounds") {
  std::minstd_rand random(12345);
  using aet::detail::draw_checkout_limit;
  CHECK(draw_checkout_limit(0, 0.5, random) == 0u);  // unlimited stays unlimited
  CHECK(draw_checkout_limit(10, 0, random) == 10u);
  for (int i = 0; i < 100; ++i) CHECK(draw_checkout_limit(1, 1, random) >= 1u);
  std::map<unsigned, int> seen;
  for (int i = 0; i < 10000; ++i) ++seen[draw_checkout_limit(100, 0.2, random)];
  CHECK(seen.begin()->first == 80u);
  CHECK(seen.rbegin()->first == 120u);
  CHECK(seen.size() == 41u);  // every value from 80 to 120
  for (const auto& [limit, times] : seen) CHECK(times > 10000 / 41 / 2);  // none starved: roughly uniform
  for (int i = 0; i < 1000; ++i) {
    unsigned limit = draw_checkout_limit(3, 0.9, random);
    CHECK(limit >= 1u);
    CHECK(limit <= 5u);
  }
  aet::Loop loop;
  aet::ClientOptions bad;
  bad.connect = "unix:/nonexistent/x.sock";
  for (double jitter : {-0.1, 1.5, std::nan("")}) {
    bad.max_checkouts_jitter = jitter;
    CHECK_THROWS_WITH(aet::Client(loop, bad), Catch::Contains("max_checkouts_jitter"));
  }
}

TEST_CASE("with max_checkouts_jitter, workers recycle after different numbers of checkouts") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  aet::ClientOptions co = rig.client_options();
  co.min_workers = 1;
  co.max_workers = 1;
  co.max_checkouts = 4;
  co.max_checkouts_jitter = 0.5;  // each worker serves 2 to 6 checkouts
  aet::Client client(loop, co);
  std::vector<pid_t> served_by;
  for (int i = 0; i < 120; ++i) {
    aet::Checkout c = client.checkout();
    served_by.push_back(worker_pid(loop, c));
  }
  // Runs of the same worker; the last may be cut short by the end of the test.
  std::vector<int> runs{1};
  for (std::size_t i = 1; i < served_by.size(); ++i) {
    if (served_by[i] == served_by[i - 1]) {
      ++runs.back();
    } else {
      runs.push_back(1);
    }
  }
  runs.pop_back();
  REQUIRE(runs.size() >= 15);
  std::set<int> lengths(runs.begin(), runs.end());
  CHECK(*lengths.begin() >= 2);
  CHECK(*lengths.rbegin() <= 6);
  CHECK(lengths.size() >= 3);  // spread out, not one fixed number (by chance below 1e-5)
  std::set<pid_t> distinct(served_by.begin(), served_by.end());
  CHECK(distinct.size() == runs.size() + 1);  // a worker is never reused after its run
}

// ---- hygiene and load ----

TEST_CASE("bad replies of every kind leave no descriptor behind in the client") {
  FakeRig rig;
  const std::vector<std::pair<std::string, bool>> replies = {
      {aet_test::frame_header(0), false},
      {aet_test::frame_header(0xFFFFFFFFu), false},
      {aet_test::frame_header(9).substr(0, 3), true},
      {aet_test::raw_frame("[\"ok\",{},tr"), false},
      {aet_test::raw_frame("[\"zz\",{},1]"), false},
      {aet_test::raw_frame("[\"ok\"]"), false},
      {aet_test::raw_frame("[\"er\",{},1]"), false},
  };
  for (std::size_t i = 0; i < replies.size(); ++i) {
    rig.scenarios[std::to_string(i)] = [&replies, i](FakeWorkers::Connection& c) {
      c.send(replies[i].first);
      if (replies[i].second) c.finish();
    };
  }
  const std::set<int> baseline = aet_test::open_fds();
  {
    aet::Client client(rig.loop, rig.client_options());
    for (int round = 0; round < 5; ++round) {
      std::vector<Outcome> bad(replies.size()), good(replies.size());
      for (std::size_t i = 0; i < replies.size(); ++i) {
        client.checkout().call("reply", {std::to_string(i)}, record_into(bad[i]));
        client.checkout().call("good", {static_cast<std::int64_t>(i)}, record_into(good[i]));
      }
      REQUIRE(run_until(rig.loop, [&] {
        for (std::size_t i = 0; i < replies.size(); ++i)
          if (!bad[i].ended() || !good[i].ended()) return false;
        return true;
      }));
      for (std::size_t i = 0; i < replies.size(); ++i) {
        CHECK(bad[i].errors == 1);
        CHECK(good[i].value == static_cast<std::int64_t>(i));
      }
      CHECK(client.worker_count() <= 4);
    }
  }
  REQUIRE(run_until(rig.loop, [&] { return rig.fake.open_connections() == 0; }));
  rig.fake.connections().clear();
  CHECK(aet_test::open_fds() == baseline);
}

TEST_CASE("10,000 checkouts with 10% failing calls leave descriptors and children at baseline", "[soak]") {
  Rig rig;
  aet::TaskServer server = rig.start();
  aet::Loop loop;
  const std::set<int> baseline_fds = aet_test::open_fds();
  REQUIRE(aet_test::children_of(server.pid()).empty());
  const int total = 10000, in_flight = 40;
  int started = 0, results = 0, remote_errors = 0, other_errors = 0;
  std::size_t most_workers = 0;
  {
    aet::ClientOptions co = rig.client_options();
    co.max_workers = 10;
    aet::Client client(loop, co);
    std::function<void()> start_one = [&] {
      const int id = started++;
      const bool failing = id % 10 == 0;
      client.checkout().call(failing ? "fail" : "echo", {id},
                             aet::frame(
                                 [&, id](aet::Checkout&, Json r) {
                                   results += r == id ? 1 : 0;
                                   if (started < total) start_one();
                                 },
                                 [&](const std::exception& e, const std::string&) {
                                   if (kind_of(e) == "remote") {
                                     ++remote_errors;
                                   } else {
                                     ++other_errors;
                                   }
                                   if (started < total) start_one();
                                 }));
    };
    for (int i = 0; i < in_flight; ++i) start_one();
    REQUIRE(run_until(loop, [&] {
      most_workers = std::max(most_workers, client.worker_count());
      return results + remote_errors + other_errors == total;
    }, 240));
    CHECK(results == total - total / 10);
    CHECK(remote_errors == total / 10);
    CHECK(other_errors == 0);
    CHECK(most_workers <= co.max_workers);
    // A worker the client let go exits once it reads EOF, a moment later.
    CHECK(eventually([&] { return aet_test::children_of(server.pid()).size() <= co.max_workers; }, 10));
  }
  CHECK(aet_test::open_fds() == baseline_fds);
  CHECK(eventually([&] { return aet_test::children_of(server.pid()).empty(); }, 10));
}

TEST_CASE("20,000 calls over 20 workers under SIGKILLs every 50 ms and a server restart all end exactly once",
          "[soak]") {
  Rig rig;
  // Workers orphaned by the server's death become ours, so that we can
  // kill them too and reap them; put back at the end.
  REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
  aet::TaskServer server = rig.start();
  std::set<pid_t> server_pids{server.pid()};
  aet::Loop loop;
  std::set<int> baseline_fds = aet_test::open_fds();
  const int total = 20000, in_flight = 60, calls_per_checkout = 5;
  std::vector<int> ended(total, 0), wrong(total, 0);
  std::map<std::string, int> errors;
  int started = 0, finished = 0, kills = 0, restarts = 0;
  std::size_t unaccepted = 0;  // the client's connections the dead server never accepted
  std::mt19937 random(20000);

  auto orphans = [&] {
    std::set<pid_t> mine = aet_test::children_of(::getpid());
    for (pid_t p : server_pids) mine.erase(p);
    return mine;
  };
  auto reap_orphans = [&](const std::set<pid_t>& pids) {
    for (pid_t p : pids) ::waitpid(p, nullptr, WNOHANG);
  };
  {
    aet::ClientOptions co = rig.client_options();
    co.min_workers = 20;
    co.max_workers = 20;
    aet::Client client(loop, co);
    std::function<void(aet::Checkout, int)> next_call;
    std::function<void()> start_checkout;
    auto end_call = [&](int id) {
      ++ended[static_cast<std::size_t>(id)];
      ++finished;
    };
    next_call = [&](aet::Checkout checkout, int left) {
      if (started >= total) return;
      const int id = started++;
      if (started == total / 2) {
        // The server dies outright and comes back on the same path. A
        // connection still waiting in its backlog dies with it, and so
        // does a call sent on it: count them.
        std::size_t accepted = 0;
        for (pid_t p : aet_test::children_of(server.pid())) accepted += aet_test::process_zombie(p) ? 0 : 1;
        unaccepted = client.worker_count() > accepted ? client.worker_count() - accepted : 0;
        ::kill(server.pid(), SIGKILL);
        const std::set<int> before = aet_test::open_fds();
        server.stop();
        server = rig.start();
        server_pids.insert(server.pid());
        // The new handle's descriptor replaces the old one's in the baseline.
        const std::set<int> after = aet_test::open_fds();
        for (int fd : before)
          if (!after.count(fd)) baseline_fds.erase(fd);
        for (int fd : after)
          if (!before.count(fd)) baseline_fds.insert(fd);
        ++restarts;
      }
      checkout.call("work", {id},
                    aet::frame(
                        [&, id, left](aet::Checkout& c, Json r) {
                          if (r != id) ++wrong[static_cast<std::size_t>(id)];
                          end_call(id);
                          if (left > 1) {
                            next_call(c, left - 1);
                          } else {
                            start_checkout();
                          }
                        },
                        [&, id](const std::exception& e, const std::string&) {
                          ++errors[kind_of(e) + ": " + e.what()];
                          end_call(id);
                          start_checkout();  // that checkout failed for good
                        }));
    };
    start_checkout = [&] { next_call(client.checkout(), calls_per_checkout); };
    for (int i = 0; i < in_flight; ++i) start_checkout();

    aet::Timer killer = loop.every(0.05, [&] {
      std::set<pid_t> lost = orphans();
      reap_orphans(lost);
      std::vector<pid_t> victims;
      for (pid_t p : aet_test::children_of(server.pid())) victims.push_back(p);
      for (pid_t p : orphans()) victims.push_back(p);
      if (victims.empty()) return;
      ::kill(victims[random() % victims.size()], SIGKILL);
      ++kills;
    });
    const double start = monotonic_now();
    REQUIRE(run_until(loop, [&] { return finished == total; }, 240));
    killer.reset();
    WARN("20,000 calls took " << monotonic_now() - start << " s with " << kills << " kills; failed: "
         << [&] { int n = 0; for (const auto& e : errors) n += e.second; return n; }());
    CHECK(started == total);
    CHECK(restarts == 1);
    CHECK(kills > 10);
  }
  // Every call ended exactly once, with its own result or a named error.
  int never = 0, twice = 0, mismatched = 0, failed = 0;
  for (int i = 0; i < total; ++i) {
    never += ended[static_cast<std::size_t>(i)] == 0;
    twice += ended[static_cast<std::size_t>(i)] > 1;
    mismatched += wrong[static_cast<std::size_t>(i)];
  }
  CHECK(never == 0);
  CHECK(twice == 0);
  CHECK(mismatched == 0);
  for (const auto& [what, times] : errors) {
    INFO(what << " x" << times);
    CHECK((what == "checkout: worker connection suddenly died" || what == "timeout: timed out after 10 seconds"));
    failed += times;
  }
  // A kill fails at most the one call in flight on that worker, and so
  // does a connection the server died before accepting.
  CHECK(failed <= kills + static_cast<int>(unaccepted));
  // Everything goes back: the client's descriptors, the server's children,
  // the orphaned workers of the first server.
  CHECK(aet_test::open_fds() == baseline_fds);
  CHECK(eventually([&] { return aet_test::children_of(server.pid()).empty(); }, 10));
  CHECK(eventually([&] {
    reap_orphans(orphans());
    return orphans().empty();
  }, 10));
  ::prctl(PR_SET_CHILD_SUBREAPER, 0);
}
