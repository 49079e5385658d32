// LogDefer: the Log::Defer message format, levels, verbosity, lazy items,
// timers, data, merge, delivery, and the per-request logger() of a worker.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "anyevent_task.hpp"
#include "test_support.hpp"

#include "allocation_counter.hpp"

using aet_test::allocations;

namespace {

// A LogDefer whose delivered messages land in `delivered`.
aet::LogDefer collecting(std::vector<aet::Json>& delivered) {
  return aet::LogDefer([&delivered](const aet::Json& message) { delivered.push_back(message); });
}

bool whole_microseconds(double seconds) {
  double micro = seconds * 1e6;
  return std::fabs(micro - std::round(micro)) < 1e-3;
}

// Waits (on the clock, not for an event) until `seconds` have passed.
void let_time_pass(double seconds) {
  const double until = aet_test::monotonic_now() + seconds;
  while (aet_test::monotonic_now() < until) {
  }
}

std::vector<std::string> keys_of(const aet::Json& object) {
  std::vector<std::string> keys;
  for (const auto& member : object.as_object()) keys.push_back(member.first);
  return keys;
}

}  // namespace

TEST_CASE("a message has start, end, logs, timers and data in the Log::Defer format") {
  std::vector<aet::Json> delivered;
  const double before = std::chrono::duration<double>(
                            std::chrono::system_clock::now().time_since_epoch()).count();
  {
    aet::LogDefer log = collecting(delivered);
    log.info("hello", 1);
    { auto t = log.timer("work"); }
    log.data()["user"] = "bob";
  }
  REQUIRE(delivered.size() == 1);
  const aet::Json& m = delivered[0];
  REQUIRE(keys_of(m) == std::vector<std::string>{"start", "end", "logs", "timers", "data"});
  REQUIRE(m["start"].is_double());
  REQUIRE(m["start"].as_double() >= std::floor(before) - 1);
  REQUIRE(m["start"].as_double() <= before + 60);
  REQUIRE(whole_microseconds(m["start"].as_double()));
  REQUIRE(m["end"].as_double() >= 0);

  REQUIRE(m["logs"].size() == 1);
  const aet::Json& entry = m["logs"][0];
  REQUIRE(entry.size() == 4);
  REQUIRE(entry[0].as_double() >= 0);
  REQUIRE(entry[0].as_double() <= m["end"].as_double());
  REQUIRE(entry[1] == aet::Json(30));
  REQUIRE(entry[2] == aet::Json("hello"));
  REQUIRE(entry[3] == aet::Json(1));

  REQUIRE(m["timers"].size() == 1);
  const aet::Json& timer = m["timers"][0];
  REQUIRE(timer.size() == 3);
  REQUIRE(timer[0] == aet::Json("work"));
  REQUIRE(timer[1].as_double() <= timer[2].as_double());
  REQUIRE(timer[2].as_double() <= m["end"].as_double());

  REQUIRE(m["data"] == aet::Json::object({{"user", "bob"}}));
  REQUIRE(aet::Json::parse(m.dump()) == m);
}

TEST_CASE("empty parts are left out of the message") {
  std::vector<aet::Json> delivered;
  { aet::LogDefer log = collecting(delivered); log.data(); }
  REQUIRE(delivered.size() == 1);
  REQUIRE(keys_of(delivered[0]) == std::vector<std::string>{"start", "end"});
}

TEST_CASE("times are relative to start and rounded to microseconds") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    log.info("first");
    let_time_pass(0.003);
    log.info("second");
    auto t = log.timer("t");
    let_time_pass(0.001);
  }
  const aet::Json& m = delivered.at(0);
  double first = m["logs"][0][0].as_double();
  double second = m["logs"][1][0].as_double();
  REQUIRE(first >= 0);
  REQUIRE(first < 0.003);
  REQUIRE(second - first >= 0.0029);
  REQUIRE(m["end"].as_double() >= second + 0.0009);
  for (double t : {first, second, m["end"].as_double(), m["timers"][0][1].as_double(),
                   m["timers"][0][2].as_double()}) {
    REQUIRE(whole_microseconds(t));
  }
}

TEST_CASE("levels are error 10, warn 20, info 30, debug 40, and add_log takes any level") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    log.error("e");
    log.warn("w");
    log.info("i");
    log.debug("d");
    log.add_log(35, {"custom", aet::Json::object({{"k", true}})});
  }
  const aet::Json& logs = delivered.at(0)["logs"];
  REQUIRE(logs.size() == 5);
  std::vector<std::int64_t> levels;
  for (const aet::Json& e : logs.as_array()) levels.push_back(e[1].as_int());
  REQUIRE(levels == std::vector<std::int64_t>{10, 20, 30, 40, 35});
  REQUIRE(logs[0][2] == aet::Json("e"));
  REQUIRE(logs[4][2] == aet::Json("custom"));
  REQUIRE(logs[4][3] == aet::Json::object({{"k", true}}));
  REQUIRE(aet::LogDefer::error_level == 10);
  REQUIRE(aet::LogDefer::debug_level == 40);
}

TEST_CASE("items of every kind become JSON values") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    std::string text = "text";
    log.info(text, std::string_view("view"), 42, -7L, 2.5, true, nullptr, aet::Json{1, 2});
  }
  const aet::Json& entry = delivered.at(0)["logs"][0];
  REQUIRE(entry.size() == 10);
  REQUIRE(entry[2] == aet::Json("text"));
  REQUIRE(entry[3] == aet::Json("view"));
  REQUIRE(entry[4] == aet::Json(42));
  REQUIRE(entry[5] == aet::Json(-7));
  REQUIRE(entry[6] == aet::Json(2.5));
  REQUIRE(entry[7] == aet::Json(true));
  REQUIRE(entry[8].is_null());
  REQUIRE(entry[9] == aet::Json{1, 2});
}

TEST_CASE("entries above the verbosity are dropped") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    REQUIRE(log.verbosity() == aet::LogDefer::debug_level);
    log.verbosity(aet::LogDefer::warn_level);
    REQUIRE(log.verbosity() == 20);
    REQUIRE(log.enabled(aet::LogDefer::error_level));
    REQUIRE(log.enabled(aet::LogDefer::warn_level));
    REQUIRE(!log.enabled(aet::LogDefer::info_level));
    log.error("kept");
    log.warn("kept too");
    log.info("dropped");
    log.debug("dropped");
    log.add_log(25, {"dropped"});
  }
  const aet::Json& logs = delivered.at(0)["logs"];
  REQUIRE(logs.size() == 2);
  REQUIRE(logs[0][2] == aet::Json("kept"));
  REQUIRE(logs[1][2] == aet::Json("kept too"));
}

TEST_CASE("a lazy item is built only when its level passes the verbosity") {
  std::vector<aet::Json> delivered;
  int built = 0;
  {
    aet::LogDefer log = collecting(delivered);
    log.verbosity(aet::LogDefer::info_level);
    log.debug([&] { ++built; return std::string("expensive"); });
    REQUIRE(built == 0);
    log.info([&] { ++built; return aet::Json::object({{"cost", 3}}); });
    REQUIRE(built == 1);
  }
  const aet::Json& logs = delivered.at(0)["logs"];
  REQUIRE(logs.size() == 1);
  REQUIRE(logs[0].size() == 3);
  REQUIRE(logs[0][2] == aet::Json::object({{"cost", 3}}));
}

TEST_CASE("filtered-out logging does not allocate") {
  std::vector<aet::Json> delivered;
  aet::LogDefer log = collecting(delivered);
  log.verbosity(aet::LogDefer::error_level);
  std::string long_text(200, 'x');
  long before = allocations.load();
  for (int i = 0; i < 100; ++i) {
    log.debug("some text that is long enough not to fit any small buffer", i, 1.5);
    log.info(long_text);
    log.warn([] { return std::string(300, 'y'); });
  }
  REQUIRE(allocations.load() == before);
}

TEST_CASE("a timer ends when its guard goes or at finish()") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    auto early = log.timer("early");
    {
      auto scoped = log.timer("scoped");
      let_time_pass(0.002);
    }
    early.finish();
    let_time_pass(0.002);
    early.finish();  // a second finish changes nothing
  }
  const aet::Json& m = delivered.at(0);
  REQUIRE(m["timers"].size() == 2);
  const aet::Json& early = m["timers"][0];
  const aet::Json& scoped = m["timers"][1];
  REQUIRE(early[0] == aet::Json("early"));
  REQUIRE(scoped[0] == aet::Json("scoped"));
  REQUIRE(scoped[2].as_double() - scoped[1].as_double() >= 0.0019);
  REQUIRE(early[2].as_double() >= scoped[2].as_double());
  REQUIRE(m["end"].as_double() - early[2].as_double() >= 0.0019);
}

TEST_CASE("a timer still running at delivery ends at the delivery time, and its guard may outlive the log") {
  std::vector<aet::Json> delivered;
  std::optional<aet::LogDefer::Timer> running;
  {
    aet::LogDefer log = collecting(delivered);
    running.emplace(log.timer("still running"));
    let_time_pass(0.001);
  }
  REQUIRE(delivered.size() == 1);
  const aet::Json& m = delivered[0];
  REQUIRE(m["timers"][0][2] == m["end"]);
  running->finish();
  running.reset();
  REQUIRE(delivered.size() == 1);
}

TEST_CASE("a moved timer guard ends the timer once") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    auto first = log.timer("a");
    auto moved = std::move(first);
    auto other = log.timer("b");
    other = std::move(moved);  // ends "b" now; "a" lives on in `other`
    let_time_pass(0.002);
  }
  const aet::Json& timers = delivered.at(0)["timers"];
  REQUIRE(timers.size() == 2);
  REQUIRE(timers[1][0] == aet::Json("b"));
  REQUIRE(timers[0][2].as_double() - timers[1][2].as_double() >= 0.0019);
}

TEST_CASE("data is a free-form object") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    REQUIRE(log.data().is_object());
    log.data()["user"] = "alice";
    log.data()["counts"] = aet::Json{1, 2, 3};
    log.data()["user"] = "bob";
  }
  REQUIRE(delivered.at(0)["data"] ==
          aet::Json::object({{"user", "bob"}, {"counts", aet::Json{1, 2, 3}}}));
}

TEST_CASE("merge shifts the other message onto this time axis and keeps logs in time order") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    log.info("mine");
    const double start = log.message()["start"].as_double();
    double mine_t = log.message()["logs"][0][0].as_double();
    REQUIRE(mine_t < 0.5);

    aet::Json later = aet::Json::object(
        {{"start", start + 1.5},
         {"end", 0.5},
         {"logs", aet::Json{aet::Json{0.25, 30, "later one"}, aet::Json{0.5, 20, "later two"}}},
         {"timers", aet::Json::array({aet::Json{"remote", 0.1, 0.4}})},
         {"data", aet::Json::object({{"remote_key", 1}, {"shared", "theirs"}})}});
    aet::Json earlier = aet::Json::object(
        {{"start", start - 2.0}, {"end", 3.0}, {"logs", aet::Json::array({aet::Json{1.0, 40, "earlier"}})}});
    log.data()["shared"] = "mine";
    log.data()["own"] = true;
    log.merge(later);
    log.merge(earlier);
  }
  const aet::Json& m = delivered.at(0);
  const aet::Json& logs = m["logs"];
  REQUIRE(logs.size() == 4);
  REQUIRE(logs[0][2] == aet::Json("earlier"));
  REQUIRE(logs[0][0].as_double() == Approx(-1.0).margin(1e-9));
  REQUIRE(logs[1][2] == aet::Json("mine"));
  REQUIRE(logs[2][2] == aet::Json("later one"));
  REQUIRE(logs[2][0].as_double() == Approx(1.75).margin(1e-9));
  REQUIRE(logs[2][1] == aet::Json(30));
  REQUIRE(logs[2].size() == 3);
  REQUIRE(logs[3][0].as_double() == Approx(2.0).margin(1e-9));
  for (const aet::Json& e : logs.as_array()) REQUIRE(whole_microseconds(e[0].as_double()));

  REQUIRE(m["timers"].size() == 1);
  REQUIRE(m["timers"][0][0] == aet::Json("remote"));
  REQUIRE(m["timers"][0][1].as_double() == Approx(1.6).margin(1e-9));
  REQUIRE(m["timers"][0][2].as_double() == Approx(1.9).margin(1e-9));

  REQUIRE(m["data"]["own"] == aet::Json(true));
  REQUIRE(m["data"]["remote_key"] == aet::Json(1));
  REQUIRE(m["data"]["shared"] == aet::Json("theirs"));
}

TEST_CASE("merging a message with a pid appends {\"pid\": N} to each of its entries") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    log.info("local");
    aet::Json worker = aet::Json::object({{"start", log.message()["start"]},
                                          {"end", 0.001},
                                          {"pid", 4242},
                                          {"logs", aet::Json::array({aet::Json{0.0, 30, "a", "b"}})}});
    log.merge(worker);
  }
  const aet::Json& logs = delivered.at(0)["logs"];
  REQUIRE(logs.size() == 2);
  const aet::Json* local = &logs[0];
  const aet::Json* remote = &logs[1];
  if ((*local)[2] != aet::Json("local")) std::swap(local, remote);
  REQUIRE(local->size() == 3);
  REQUIRE(remote->size() == 5);
  REQUIRE((*remote)[2] == aet::Json("a"));
  REQUIRE((*remote)[3] == aet::Json("b"));
  REQUIRE((*remote)[4] == aet::Json::object({{"pid", 4242}}));
}

TEST_CASE("a malformed message is refused by merge and adds nothing") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer log = collecting(delivered);
    aet::Json bad = aet::Json::object(
        {{"start", 1.0}, {"logs", aet::Json{aet::Json{0.1, 30, "fine"}, aet::Json{"no time"}}}});
    REQUIRE_THROWS_AS(log.merge(bad), aet::JsonError);
    REQUIRE_THROWS_AS(log.merge(aet::Json{1, 2}), aet::JsonError);
    REQUIRE_THROWS_AS(log.merge(aet::Json::object({{"timers", aet::Json::array({aet::Json{"t", 1}})}})),
                      aet::JsonError);
  }
  REQUIRE(keys_of(delivered.at(0)) == std::vector<std::string>{"start", "end"});
}

TEST_CASE("the message is delivered exactly once, when the last copy goes") {
  int deliveries = 0;
  std::optional<aet::LogDefer> kept;
  {
    aet::LogDefer log([&](const aet::Json&) { ++deliveries; });
    aet::LogDefer copy = log;
    kept.emplace(std::move(copy));
    aet::LogDefer assigned([&](const aet::Json&) { deliveries += 100; });
    assigned = log;  // the other log loses its last handle here
    REQUIRE(deliveries == 100);
    log.info("through one handle");
  }
  REQUIRE(deliveries == 100);
  REQUIRE(kept->message()["logs"].size() == 1);
  kept.reset();
  REQUIRE(deliveries == 101);
}

TEST_CASE("message() shows the message as it is now, without delivering it") {
  int deliveries = 0;
  aet::LogDefer log([&](const aet::Json&) { ++deliveries; });
  log.warn("now");
  auto t = log.timer("open");
  aet::Json now = log.message();
  REQUIRE(deliveries == 0);
  REQUIRE(now["logs"].size() == 1);
  REQUIRE(now["timers"][0][2] == now["end"]);
}

TEST_CASE("a callback that throws is reported on stderr and does not escape the destructor") {
  aet_test::TempDir dir;
  const std::string path = dir.file("stderr.txt");
  std::fflush(stderr);
  int saved = dup(2);
  REQUIRE(saved >= 0);
  std::FILE* capture = std::fopen(path.c_str(), "w");
  REQUIRE(capture);
  dup2(fileno(capture), 2);
  bool escaped = false;
  try {
    aet::LogDefer log([](const aet::Json&) { throw std::runtime_error("callback failure"); });
    log.info("x");
  } catch (...) {
    escaped = true;
  }
  std::fflush(stderr);
  dup2(saved, 2);
  close(saved);
  std::fclose(capture);
  REQUIRE(!escaped);
  std::FILE* in = std::fopen(path.c_str(), "r");
  REQUIRE(in);
  char buffer[512] = {};
  std::size_t n = std::fread(buffer, 1, sizeof buffer - 1, in);
  std::fclose(in);
  std::string text(buffer, n);
  REQUIRE(text.find("callback failure") != std::string::npos);
  REQUIRE(std::count(text.begin(), text.end(), '\n') == 1);
}

TEST_CASE("outside a request logger() goes nowhere, cheaply and without allocating") {
  aet::LogDefer& log = aet::logger();
  REQUIRE(!log.enabled(aet::LogDefer::error_level));
  log.verbosity(aet::LogDefer::debug_level);
  REQUIRE(!log.enabled(aet::LogDefer::error_level));
  int built = 0;
  log.data();  // the first call may set up the scratch object
  long before = allocations.load();
  for (int i = 0; i < 100; ++i) {
    log.error("nowhere", i);
    log.info([&] { ++built; return 1; });
    log.add_log(10, {});
    auto t = log.timer("t");
    log.data();
  }
  REQUIRE(allocations.load() == before);
  REQUIRE(built == 0);
  log.data()["x"] = 1;
  REQUIRE(log.data().empty());
  REQUIRE(log.message().is_null());
  log.merge(aet::Json::object({{"start", 1.0}, {"logs", aet::Json::array({aet::Json{0.1, 30, "m"}})}}));
  REQUIRE(log.message().is_null());
}

TEST_CASE("a moved-from handle behaves as the log to nowhere") {
  std::vector<aet::Json> delivered;
  aet::LogDefer log = collecting(delivered);
  aet::LogDefer taken = std::move(log);
  log.info("ignored");  // allowed: a moved-from handle logs nowhere
  REQUIRE(log.message().is_null());
  taken.info("kept");
  REQUIRE(taken.message()["logs"].size() == 1);
}

TEST_CASE("a request log collects what the request logs and is stamped with the pid") {
  aet::detail::begin_request_log();
  aet::logger().info("in request", 1);
  aet::logger().data()["method"] = "hash";
  { auto t = aet::logger().timer("step"); }
  aet::Json message = aet::detail::end_request_log();
  REQUIRE(message.is_object());
  REQUIRE(message["pid"] == aet::Json(static_cast<std::int64_t>(getpid())));
  REQUIRE(message["logs"].size() == 1);
  REQUIRE(message["logs"][0][2] == aet::Json("in request"));
  REQUIRE(message["timers"].size() == 1);
  REQUIRE(message["data"]["method"] == aet::Json("hash"));
  REQUIRE(message.contains("start"));
  REQUIRE(message.contains("end"));
  REQUIRE(!aet::logger().enabled(aet::LogDefer::error_level));
  REQUIRE(aet::logger().message().is_null());
}

TEST_CASE("a request that logs nothing gives a null message") {
  aet::detail::begin_request_log();
  REQUIRE(aet::logger().enabled(aet::LogDefer::debug_level));
  aet::logger().data();  // looking at the data is not logging
  REQUIRE(aet::detail::end_request_log().is_null());
  REQUIRE(aet::detail::end_request_log().is_null());  // no request open at all
}

TEST_CASE("a request log made at its first use starts when the request started") {
  // The log is made lazily (a request that logs nothing costs nothing):
  // its times still count from the start of the request.
  const double before = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  aet::detail::begin_request_log();
  let_time_pass(0.05);
  aet::logger().info("late");
  aet::Json message = aet::detail::end_request_log();
  REQUIRE(message["logs"].size() == 1);
  CHECK(message["logs"][0][0].as_double() >= 0.049);
  CHECK(message["end"].as_double() >= 0.049);
  CHECK(message["start"].as_double() >= before - 0.001);
  CHECK(message["start"].as_double() <= before + 0.04);
}

TEST_CASE("each request gets a fresh log") {
  aet::detail::begin_request_log();
  aet::logger().info("first request");
  aet::Json first = aet::detail::end_request_log();
  aet::detail::begin_request_log();
  aet::logger().warn("second request");
  aet::Json second = aet::detail::end_request_log();
  REQUIRE(first["logs"].size() == 1);
  REQUIRE(second["logs"].size() == 1);
  REQUIRE(second["logs"][0][2] == aet::Json("second request"));
  REQUIRE(aet::logger().message().is_null());
}

TEST_CASE("a worker's request message merges into the client's log with its pid") {
  std::vector<aet::Json> delivered;
  {
    aet::LogDefer client_log = collecting(delivered);
    client_log.info("sending");
    let_time_pass(0.002);
    aet::detail::begin_request_log();
    aet::logger().info("working");
    aet::Json worker = aet::detail::end_request_log();
    let_time_pass(0.002);
    client_log.merge(worker);
    client_log.info("received");
  }
  const aet::Json& logs = delivered.at(0)["logs"];
  REQUIRE(logs.size() == 3);
  REQUIRE(logs[1][2] == aet::Json("working"));
  REQUIRE(logs[1][3] == aet::Json::object({{"pid", static_cast<std::int64_t>(getpid())}}));
  REQUIRE(logs[0][2] == aet::Json("sending"));
  REQUIRE(logs[2][2] == aet::Json("received"));
  REQUIRE(logs[0].size() == 3);
  REQUIRE(logs[2].size() == 3);
}

// ---- LogDefer through a client and a worker ----

namespace {

// A server whose methods log into aet::logger(), and a client for it.
struct LoggingRig {
  aet_test::TempDir dir;
  aet::TaskServer server = aet::fork_task_server(server_options(dir.unix_address()));
  aet::Loop loop;
  aet::Client client{loop, client_options(dir.unix_address())};

  static aet::ServerOptions server_options(const std::string& address) {
    aet::ServerOptions so;
    so.listen = address;
    so.hung_worker_timeout = 5;
    so.interface = aet::Methods{
        {"work",
         [](const aet::Json&) -> aet::Json {
           aet::logger().info("worker starts");
           {
             auto t = aet::logger().timer("worker step");
             let_time_pass(0.002);
           }
           aet::logger().warn("worker ends");
           return ::getpid();
         }},
        {"fail",
         [](const aet::Json&) -> aet::Json {
           aet::logger().error("about to fail");
           throw std::runtime_error("failed on purpose");
         }},
        {"sleep",
         [](const aet::Json& args) -> aet::Json {
           let_time_pass(args[0].as_double());
           return nullptr;
         }},
    };
    return so;
  }
  static aet::ClientOptions client_options(const std::string& address) {
    aet::ClientOptions co;
    co.connect = address;
    co.name = "logging";
    co.timeout = 10;
    return co;
  }
};

std::vector<std::string> log_texts(const aet::Json& message) {
  std::vector<std::string> texts;
  for (const aet::Json& entry : message["logs"].as_array()) texts.push_back(entry[2].as_string());
  return texts;
}

const aet::Json* timer_named(const aet::Json& message, const std::string& name) {
  for (const aet::Json& t : message["timers"].as_array())
    if (t[0] == aet::Json(name)) return &t;
  return nullptr;
}

}  // namespace

TEST_CASE("a checkout's LogDefer merges the worker's entries in time order, with the worker's pid") {
  LoggingRig rig;
  std::vector<aet::Json> delivered;
  std::int64_t worker = 0;
  {
    aet::LogDefer log = collecting(delivered);
    log.info("client before");
    aet::CheckoutOptions options;
    options.log_defer = log;
    rig.client.checkout(options).call("work", {}, [&worker, log](aet::Checkout&, aet::Json pid) mutable {
      worker = pid.as_int();
      log.info("client after");
    });
  }
  REQUIRE(delivered.empty());
  REQUIRE(aet_test::run_until(rig.loop, [&] { return !delivered.empty(); }));
  REQUIRE(delivered.size() == 1);
  const aet::Json& m = delivered[0];
  REQUIRE(log_texts(m) ==
          std::vector<std::string>{"client before", "worker starts", "worker ends", "client after"});
  const aet::Json::Array& logs = m["logs"].as_array();
  for (std::size_t i = 1; i < logs.size(); ++i) REQUIRE(logs[i - 1][0].as_double() <= logs[i][0].as_double());
  REQUIRE(worker != 0);
  REQUIRE(worker != getpid());
  const aet::Json worker_tag = aet::Json::object({{"pid", worker}});
  REQUIRE(logs[0].size() == 3);
  REQUIRE(logs[1].size() == 4);
  REQUIRE(logs[1][3] == worker_tag);
  REQUIRE(logs[2][3] == worker_tag);
  REQUIRE(logs[3].size() == 3);
  const aet::Json* call = timer_named(m, "work");
  const aet::Json* step = timer_named(m, "worker step");
  REQUIRE(call);
  REQUIRE(step);
  // The worker's step lies within the client's timing of the call.
  REQUIRE((*call)[1].as_double() <= (*step)[1].as_double() + 1e-5);
  REQUIRE((*step)[2].as_double() <= (*call)[2].as_double() + 1e-5);
  REQUIRE((*step)[2].as_double() - (*step)[1].as_double() >= 0.0019);
}

TEST_CASE("the worker's entries arrive with error replies too") {
  LoggingRig rig;
  std::vector<aet::Json> delivered;
  std::string error;
  {
    aet::CheckoutOptions options;
    options.log_defer = collecting(delivered);
    aet::frame_try([&] { rig.client.checkout(options).call("fail", {}, [](aet::Checkout&, aet::Json) {}); },
                   [&](const std::exception& e, const std::string&) { error = e.what(); });
  }
  REQUIRE(aet_test::run_until(rig.loop, [&] { return !delivered.empty(); }));
  REQUIRE(error == "failed on purpose");
  const aet::Json& m = delivered[0];
  REQUIRE(log_texts(m) == std::vector<std::string>{"about to fail"});
  REQUIRE(m["logs"][0][1] == aet::Json(10));
  REQUIRE(m["logs"][0][3].contains("pid"));
  REQUIRE(timer_named(m, "fail"));
}

TEST_CASE("each call is timed once under its method name, a plain call as ->()") {
  LoggingRig rig;
  std::vector<aet::Json> delivered;
  int done = 0;
  {
    aet::CheckoutOptions options;
    options.log_defer = collecting(delivered);
    aet::Checkout c = rig.client.checkout(options);
    c.call("work", {}, [&](aet::Checkout&, aet::Json) { ++done; });
    c({"work"}, [&](aet::Checkout&, aet::Json) { ++done; });  // the method table takes "work" as the name
    c.call("sleep", {0.001}, [&](aet::Checkout&, aet::Json) { ++done; });
  }
  REQUIRE(aet_test::run_until(rig.loop, [&] { return !delivered.empty(); }));
  REQUIRE(done == 3);
  std::vector<std::string> names;
  for (const aet::Json& t : delivered[0]["timers"].as_array()) names.push_back(t[0].as_string());
  std::sort(names.begin(), names.end());
  REQUIRE(names == std::vector<std::string>{"->()", "sleep", "work", "worker step", "worker step"});
  // Calls run one after the other: their timers do not overlap.
  const aet::Json* first = timer_named(delivered[0], "work");
  const aet::Json* plain = timer_named(delivered[0], "->()");
  REQUIRE((*first)[2].as_double() <= (*plain)[1].as_double());
}

TEST_CASE("after a timeout the LogDefer is delivered right after the catcher ran") {
  LoggingRig rig;
  std::vector<std::string> events;
  aet::Json message;
  bool hold = false;
  aet::Checkout held;  // a failed checkout lets its LogDefer go even while held
  SECTION("nobody holds the checkout") {}
  SECTION("the checkout is still held") { hold = true; }
  {
    aet::LogDefer log([&](const aet::Json& m) {
      events.push_back("log");
      message = m;
    });
    aet::CheckoutOptions options;
    options.timeout = 0.3;
    options.log_defer = log;
    aet::Checkout c = rig.client.checkout(options);
    if (hold) held = c;
    aet::frame_try([&] { c.call("sleep", {1}, [](aet::Checkout&, aet::Json) {}); },
                   [&](const std::exception& e, const std::string&) {
                     events.push_back(std::string("catcher: ") + e.what());
                   });
  }
  REQUIRE(events.empty());
  // Checked after every loop round: the log comes in the same round as the catcher.
  REQUIRE(aet_test::run_until(rig.loop, [&] { return !events.empty(); }));
  REQUIRE(events == std::vector<std::string>{"catcher: timed out after 0.3 seconds", "log"});
  const aet::Json* call = timer_named(message, "sleep");
  REQUIRE(call);
  REQUIRE((*call)[2].as_double() - (*call)[1].as_double() >= 0.29);
}
