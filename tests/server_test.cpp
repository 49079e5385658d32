// Server tests: every behaviour seen from the wire, through raw sockets and
// the codec (encode_frame / FrameDecoder), without the client.
#include "anyevent_task.hpp"

#include <catch2/catch.hpp>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <thread>
#include <utility>

#include "test_support.hpp"

namespace {

using aet::Json;
using aet_test::eventually;
using aet_test::monotonic_now;
using aet_test::StderrCapture;
using aet_test::TempDir;

// ---- a raw connection speaking the wire protocol ----

int connect_to(const std::string& address) {
  if (address.compare(0, 5, "unix:") == 0) {
    sockaddr_un where{};
    where.sun_family = AF_UNIX;
    std::string path = address.substr(5);
    std::memcpy(where.sun_path, path.data(), path.size());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&where), sizeof where) == 0) return fd;
    int error = errno;
    ::close(fd);
    errno = error;
    return -1;
  }
  std::string rest = address.substr(4);
  auto colon = rest.rfind(':');
  std::string host = rest.substr(0, colon), port = rest.substr(colon + 1);
  if (host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return -1;
  int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int rc = ::connect(fd, found->ai_addr, found->ai_addrlen);
  ::freeaddrinfo(found);
  if (rc == 0) return fd;
  ::close(fd);
  return -1;
}

class Wire {
 public:
  explicit Wire(const std::string& address) : fd_(connect_to(address)) {
    if (fd_ < 0) throw std::runtime_error("cannot connect to " + address + ": " + std::strerror(errno));
  }
  ~Wire() { close(); }
  Wire(const Wire&) = delete;
  Wire& operator=(const Wire&) = delete;
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void send_bytes(const std::string& bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throw std::runtime_error(std::string("send: ") + std::strerror(errno));
      done += static_cast<std::size_t>(n);
    }
  }
  void send(const Json& message) { send_bytes(aet::encode_frame(message)); }

  // The next message; nothing if the connection closed. Throws after `limit` s.
  std::optional<Json> receive(double limit = 5) {
    const double deadline = monotonic_now() + limit;
    for (;;) {
      if (auto message = decoder_.next()) return message;
      double left = deadline - monotonic_now();
      if (left <= 0) throw std::runtime_error("no reply within the time limit");
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) continue;
      char buffer[65536];
      ssize_t n = ::read(fd_, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return std::nullopt;
      decoder_.feed(buffer, static_cast<std::size_t>(n));
    }
  }

  // True if the connection closes (EOF or reset) within `limit` seconds
  // without sending anything more.
  bool closes_within(double limit) {
    try {
      return !receive(limit).has_value();
    } catch (const std::runtime_error&) {
      return false;
    }
  }

  // Sends ["do", {}, args...] and returns the reply.
  Json call(const Json& args) {
    Json message = Json::array({"do", Json::object()});
    for (const Json& arg : args.as_array()) message.push_back(arg);
    send(message);
    auto reply = receive();
    if (!reply) throw std::runtime_error("the connection closed instead of replying");
    return *reply;
  }
  // The result of an "ok" reply; anything else fails the test.
  Json result(const Json& args) {
    Json reply = call(args);
    INFO(reply.dump());
    REQUIRE(reply[0].as_string() == "ok");
    return reply[2];
  }
  std::string error(const Json& args) {
    Json reply = call(args);
    INFO(reply.dump());
    REQUIRE(reply[0].as_string() == "er");
    return reply[2].as_string();
  }

  int fd() const { return fd_; }

 private:
  int fd_;
  aet::FrameDecoder decoder_;
};

// ---- what the test servers run ----

// Worker globals: each worker is a fork, so these count per worker.
int setup_attempts = 0;
int checkouts_done = 0;

std::string proc_fd_target(const std::string& fd) {
  char target[256] = {};
  ssize_t n = ::readlink(("/proc/self/fd/" + fd).c_str(), target, sizeof target - 1);
  return n > 0 ? std::string(target, static_cast<std::size_t>(n)) : std::string();
}

aet::Methods test_methods() {
  return aet::Methods{
      {"echo", [](const Json& args) { return args; }},
      {"pid", [](const Json&) { return Json(static_cast<std::int64_t>(::getpid())); }},
      {"throw", [](const Json& args) -> Json { throw std::runtime_error(args[0].as_string()); }},
      {"throw_int", [](const Json&) -> Json { throw 42; }},
      {"throw_bad_utf8", [](const Json&) -> Json { throw std::runtime_error("bad \xff byte"); }},
      {"nan", [](const Json&) { return Json(std::nan("")); }},
      {"bad_utf8", [](const Json&) { return Json(std::string("\xff\xfe")); }},
      {"sleep",
       [](const Json& args) {
         std::this_thread::sleep_for(std::chrono::duration<double>(args[0].as_double()));
         return Json("slept");
       }},
      {"spin_with_signals_blocked",
       [](const Json&) -> Json {
         sigset_t all;
         sigfillset(&all);
         sigprocmask(SIG_BLOCK, &all, nullptr);
         const double until = monotonic_now() + 10;  // bounded, should be killed long before
         while (monotonic_now() < until) {
         }
         return Json("survived");
       }},
      {"fds",
       [](const Json&) {
         Json list = Json::array();
         DIR* dir = ::opendir("/proc/self/fd");
         int own = ::dirfd(dir);
         while (dirent* entry = ::readdir(dir)) {
           if (entry->d_name[0] == '.' || std::atoi(entry->d_name) == own) continue;
           list.push_back(Json{std::atoi(entry->d_name), proc_fd_target(entry->d_name)});
         }
         ::closedir(dir);
         return list;
       }},
      {"poll_quietly",  // sleeps in poll(), which no signal handler resumes
       [](const Json& args) {
         const int ms = static_cast<int>(args[0].as_double() * 1000);
         return Json(::poll(nullptr, 0, ms) < 0 && errno == EINTR ? "interrupted" : "quiet");
       }},
      {"sigalrm_restarts",
       [](const Json&) {
         struct sigaction action {};
         ::sigaction(SIGALRM, nullptr, &action);
         return Json((action.sa_flags & SA_RESTART) != 0);
       }},
      {"ignore_sigalrm",
       [](const Json&) {
         ::signal(SIGALRM, SIG_IGN);
         return Json("ignoring");
       }},
      {"replace_timerfd",  // closes the worker's timerfd; /dev/zero (always readable) takes its number
       [](const Json&) -> Json {
         for (int fd = 3; fd < 64; ++fd)
           if (proc_fd_target(std::to_string(fd)) == "anon_inode:[timerfd]") {
             ::close(fd);
             return Json(::open("/dev/zero", O_RDONLY) == fd ? "replaced" : "elsewhere");
           }
         return Json("no timerfd");
       }},
      {"block_sigterm",
       [](const Json&) {
         sigset_t term;
         sigemptyset(&term);
         sigaddset(&term, SIGTERM);
         sigprocmask(SIG_BLOCK, &term, nullptr);
         return Json("blocked");
       }},
      {"big", [](const Json&) { return Json(std::string(16 << 20, 'x')); }},
      {"run_inner_server",
       [](const Json& args) {
         aet::ServerOptions inner;
         inner.listen = args[0].as_string();
         aet::Server server(inner);
         server.stop();
         server.run();
         return Json("ran");
       }},
      {"setup_attempts", [](const Json&) { return Json(setup_attempts); }},
      {"checkouts_done", [](const Json&) { return Json(checkouts_done); }},
      {"log",
       [](const Json& args) {
         aet::logger().info(args[0]);
         return Json("logged");
       }},
      {"log_and_throw",
       [](const Json& args) -> Json {
         aet::logger().warn(args[0]);
         throw std::runtime_error("after logging");
       }},
      {"mark_and_sleep",
       [](const Json& args) {
         std::ofstream(args[0].as_string()) << ::getpid();
         std::this_thread::sleep_for(std::chrono::duration<double>(args[1].as_double()));
         return Json("slept");
       }},
      {"log_bad_utf8",
       [](const Json&) {
         aet::logger().info(std::string("\xff\xfe"));
         return Json("logged");
       }},
      {"log_bad_utf8_and_throw",
       [](const Json&) -> Json {
         aet::logger().info(std::string("\xff\xfe"));
         throw std::runtime_error("after logging");
       }},
      {"log_and_throw_bad_utf8",
       [](const Json& args) -> Json {
         aet::logger().warn(args[0]);
         throw std::runtime_error("bad \xff byte");
       }},
      {"log_and_return_nan",
       [](const Json& args) {
         aet::logger().warn(args[0]);
         return Json(std::nan(""));
       }},
  };
}

aet::ServerOptions options_for(const std::string& address) {
  aet::ServerOptions options;
  options.listen = address;
  options.name = "test";
  options.interface = test_methods();
  return options;
}

Json args(std::initializer_list<Json> items) { return Json::array(items); }

std::string read_comm(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
  std::string line;
  std::getline(in, line);
  return line;
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// Runs `body` in a forked child; its exit status, or -1 if it did not end
// within `limit` seconds (it is killed then).
int exit_status_of_child(const std::function<int()>& body, double limit = 5) {
  pid_t pid = ::fork();
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
  bool ended = eventually([&] { return ::waitpid(pid, &status, WNOHANG) == pid; }, limit);
  if (!ended) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    return -1;
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

// ---- calls ----

TEST_CASE("a method table dispatches on the first argument and passes the rest") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json reply = wire.call(args({"echo", 1, "two", Json::array({3})}));
  CHECK(reply == Json::array({"ok", Json::object(), Json::array({1, "two", Json::array({3})})}));
  CHECK(wire.result(args({"echo"})) == Json::array());
}

TEST_CASE("a catch-all receives every argument, the method name first") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.interface = aet::CatchAll([](const Json& all) { return Json::array({"got", all}); });
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  CHECK(wire.result(args({"hash", "secret", 7})) == Json::array({"got", Json::array({"hash", "secret", 7})}));
  CHECK(wire.result(args({5, Json::object({{"k", "v"}})})) ==
        Json::array({"got", Json::array({5, Json::object({{"k", "v"}})})}));
  CHECK(wire.result(args({})) == Json::array({"got", Json::array()}));
}

TEST_CASE("a handler owns its arguments: taken by value they can be moved out of and changed") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.interface = aet::Methods{
      {"take", [](Json args) {
         Json taken = std::move(args[0]);
         return Json::array({std::move(taken), std::as_const(args)[0].is_null()});
       }},
      {"append", [](Json args) {
         args.push_back("added");
         return args;
       }},
      {"read", [](const Json& args) { return args[0]; }},
  };
  const std::string big(100000, 'b');
  {
    auto server = aet::fork_task_server(options);
    Wire wire(server.address());
    CHECK(wire.result(args({"take", big})) == Json::array({big, true}));
    CHECK(wire.result(args({"append", 1})) == Json::array({1, "added"}));
    CHECK(wire.result(args({"read", big})) == Json(big));
  }
  TempDir other;
  options.listen = other.unix_address();
  options.interface = aet::CatchAll([](Json all) {
    all.as_array().erase(all.as_array().begin());
    return all;
  });
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  CHECK(wire.result(args({"dropped", big, 2})) == Json::array({big, 2}));
}

TEST_CASE("an unknown method, a non-string or a missing method name is an error reply") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  CHECK(wire.error(args({"xyz", 1})) == "unknown method \"xyz\"");
  CHECK_THAT(wire.error(args({17})), Catch::Contains("method name must be a string"));
  CHECK_THAT(wire.error(args({})), Catch::Contains("no method name"));
  CHECK(wire.result(args({"echo", 1})) == Json::array({1}));
}

TEST_CASE("a handler's exception becomes an error reply and the same worker serves on") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  CHECK(wire.error(args({"throw", "the handler failed"})) == "the handler failed");
  CHECK(wire.result(args({"pid"})) == pid);
  CHECK_THAT(wire.error(args({"throw_int"})), Catch::Contains("unknown exception"));
  CHECK(wire.result(args({"pid"})) == pid);
}

TEST_CASE("a result JSON cannot carry becomes an error reply") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  CHECK_THAT(wire.error(args({"nan"})), Catch::StartsWith("result cannot be sent as JSON: "));
  CHECK_THAT(wire.error(args({"bad_utf8"})), Catch::StartsWith("result cannot be sent as JSON: "));
  CHECK(wire.result(args({"pid"})) == pid);
}

TEST_CASE("an error message that is not UTF-8 still reaches the client") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  CHECK(wire.error(args({"throw_bad_utf8"})) == "bad ? byte");
}

TEST_CASE("setup runs lazily at the first request, once, and is retried after it throws") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  const std::string marker = dir.file("setup-ran");
  const std::string done_marker = dir.file("done-ran");
  options.setup = [marker] {
    ++setup_attempts;
    std::ofstream(marker) << setup_attempts;
    if (setup_attempts == 1) throw std::runtime_error("first setup fails");
  };
  options.checkout_done = [done_marker] { std::ofstream(done_marker) << "dn"; };
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  // The worker is up and has served a dn, yet setup has not run.
  wire.send(Json::array({"dn", Json::object()}));
  REQUIRE(eventually([&] { return path_exists(done_marker); }, 5));
  CHECK_FALSE(path_exists(marker));
  CHECK(wire.error(args({"pid"})) == "setup exception: first setup fails");
  CHECK(wire.result(args({"setup_attempts"})) == 2);
  CHECK(wire.result(args({"setup_attempts"})) == 2);
  // Another worker runs its own setup, from scratch.
  Wire other(server.address());
  CHECK(other.error(args({"pid"})) == "setup exception: first setup fails");
  CHECK(other.result(args({"setup_attempts"})) == 2);
}

TEST_CASE("checkout_done runs on dn, and its exception leaves the worker serving") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.checkout_done = [] {
    ++checkouts_done;
    if (checkouts_done == 2) throw std::runtime_error("checkout_done failed");
  };
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  Wire wire(server.address());
  CHECK(wire.result(args({"checkouts_done"})) == 0);
  wire.send(Json::array({"dn", Json::object()}));
  CHECK(wire.result(args({"checkouts_done"})) == 1);
  wire.send(Json::array({"dn", Json::object({{"unknown meta", true}})}));
  wire.send(Json::array({"dn", Json::object()}));
  CHECK(wire.result(args({"checkouts_done"})) == 3);
  CHECK(stderr_capture.wait_for("checkout_done exception: checkout_done failed"));
}

TEST_CASE("a reply carries the request's log in meta ld, and {} when nothing was logged") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  Json quiet = wire.call(args({"pid"}));
  CHECK(quiet[1] == Json::object());

  Json logged = wire.call(args({"log", "hello from the worker"}));
  REQUIRE(logged[0].as_string() == "ok");
  REQUIRE(logged[1].contains("ld"));
  const Json& ld = logged[1]["ld"];
  CHECK(ld["pid"] == pid);
  REQUIRE(ld["logs"].size() == 1);
  CHECK(ld["logs"][0][1] == 30);
  CHECK(ld["logs"][0][2] == "hello from the worker");

  Json failed = wire.call(args({"log_and_throw", "before failing"}));
  REQUIRE(failed[0].as_string() == "er");
  CHECK(failed[2] == "after logging");
  REQUIRE(failed[1].contains("ld"));
  CHECK(failed[1]["ld"]["logs"][0][2] == "before failing");

  // Each request has a fresh log.
  CHECK(wire.call(args({"pid"}))[1] == Json::object());
}

TEST_CASE("a log JSON cannot carry is replaced by a warning and the result still arrives") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  for (const char* method : {"log_bad_utf8", "log_bad_utf8_and_throw"}) {
    Json reply = wire.call(args({method}));
    INFO(reply.dump());
    if (std::string(method) == "log_bad_utf8") {
      CHECK(reply[0] == "ok");
      CHECK(reply[2] == "logged");
    } else {
      CHECK(reply[0] == "er");
      CHECK(reply[2] == "after logging");
    }
    REQUIRE(reply[1].contains("ld"));
    const Json& ld = reply[1]["ld"];
    CHECK(ld["pid"] == pid);
    REQUIRE(ld["logs"].size() == 1);
    CHECK(ld["logs"][0][1] == 20);
    CHECK_THAT(ld["logs"][0][2].as_string(),
               Catch::StartsWith("the worker's log could not be sent as JSON: "));
  }
}

TEST_CASE("an unsendable error text or result keeps the request's valid log") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  Json bad_error = wire.call(args({"log_and_throw_bad_utf8", "logged before the bad error"}));
  INFO(bad_error.dump());
  CHECK(bad_error[0] == "er");
  CHECK(bad_error[2] == "bad ? byte");
  REQUIRE(bad_error[1].contains("ld"));
  CHECK(bad_error[1]["ld"]["logs"][0][2] == "logged before the bad error");

  Json bad_result = wire.call(args({"log_and_return_nan", "logged before the NaN"}));
  INFO(bad_result.dump());
  CHECK(bad_result[0] == "er");
  CHECK_THAT(bad_result[2].as_string(), Catch::StartsWith("result cannot be sent as JSON: "));
  REQUIRE(bad_result[1].contains("ld"));
  CHECK(bad_result[1]["ld"]["logs"][0][2] == "logged before the NaN");
}

// ---- hung workers ----

TEST_CASE("a request longer than hung_worker_timeout makes the worker exit") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.2;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  Wire wire(server.address());
  wire.send(Json::array({"do", Json::object(), "sleep", 5}));
  const double start = monotonic_now();
  CHECK(wire.closes_within(3));
  CHECK(monotonic_now() - start < 1.0);
  CHECK(stderr_capture.wait_for("hung_worker_timeout of 0.2 s exceeded, exiting"));
  CHECK(stderr_capture.wait_for("exited with status 2"));
  // The server serves on.
  Wire next(server.address());
  CHECK(next.result(args({"echo", 1})) == Json::array({1}));
}

TEST_CASE("a handler that blocks every signal and spins is killed after hung_worker_timeout") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.2;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  Wire wire(server.address());
  wire.send(Json::array({"do", Json::object(), "spin_with_signals_blocked"}));
  const double start = monotonic_now();
  CHECK(wire.closes_within(4));
  CHECK(monotonic_now() - start < 2.5);
  CHECK(stderr_capture.wait_for("killed by signal 9"));
}

TEST_CASE("requests shorter than hung_worker_timeout never trip it, however many") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  const double start = monotonic_now();
  while (monotonic_now() - start < 0.7) CHECK(wire.result(args({"sleep", 0.02})) == "slept");
  // Idle for longer than the timeout: the timer is disarmed between requests.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  CHECK(wire.result(args({"pid"})) == pid);
}

// The timers are armed lazily (not around every request): these check
// the moments where a lazy timer could fire at the wrong time.

TEST_CASE("after a busy spell longer than hung_worker_timeout a hung request still ends on time") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  Wire wire(server.address());
  const double busy_until = monotonic_now() + 0.8;
  while (monotonic_now() < busy_until) CHECK(wire.result(args({"echo", 1})) == Json::array({1}));
  wire.send(Json::array({"do", Json::object(), "sleep", 5}));
  const double start = monotonic_now();
  CHECK(wire.closes_within(3));
  CHECK(monotonic_now() - start < 1.0);
  CHECK(stderr_capture.wait_for("hung_worker_timeout of 0.3 s exceeded, exiting"));
}

TEST_CASE("the hung-worker timer never interrupts a request that has not run its timeout") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 2;
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  CHECK(wire.result(args({"sigalrm_restarts"})) == true);  // what it interrupts between requests resumes
  // The request above set the timer for its own timeout, 2 s from its
  // start; this one starts 0.8 s later and sleeps across that moment.
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  CHECK(wire.result(args({"poll_quietly", 1.5})) == "quiet");
}

TEST_CASE("a worker that ignores SIGALRM is killed when hung, and never while idle") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  CHECK(wire.result(args({"ignore_sigalrm"})) == "ignoring");
  // Past every deadline the last request set (0.3 s, and the SIGKILL one
  // to two seconds later): the idle worker must still be there.
  std::this_thread::sleep_for(std::chrono::milliseconds(2200));
  CHECK(wire.result(args({"pid"})) == pid);
  wire.send(Json::array({"do", Json::object(), "sleep", 10}));
  const double start = monotonic_now();
  CHECK(wire.closes_within(5));
  CHECK(monotonic_now() - start < 3.0);
  CHECK(stderr_capture.wait_for("killed by signal 9"));
}

// The idle wait has no timeout: the timerfd wakes the worker to clear the
// backstop. A handler that takes the descriptor away leaves the worker to
// bound its waits instead, and the descriptor is not closed under it.
TEST_CASE("a worker whose handler takes its timerfd away is still never killed while idle") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  REQUIRE(wire.result(args({"replace_timerfd"})) == "replaced");
  // Past the backstop the last request set (one to two seconds after its
  // 0.3 s timeout), idle, with /dev/zero polled readable all along.
  std::this_thread::sleep_for(std::chrono::milliseconds(2200));
  CHECK(wire.result(args({"pid"})) == pid);
  bool dev_zero_open = false;
  const Json fds = wire.result(args({"fds"}));
  for (const Json& entry : fds.as_array())
    if (entry[1].as_string() == "/dev/zero") dev_zero_open = true;
  CHECK(dev_zero_open);
  // The limit still holds.
  wire.send(Json::array({"do", Json::object(), "sleep", 10}));
  CHECK(wire.closes_within(5));
}

TEST_CASE("neither a slow reader of a large reply nor a long checkout_done meets hung_worker_timeout") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  options.checkout_done = [] { std::this_thread::sleep_for(std::chrono::milliseconds(1800)); };
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  Json pid = wire.result(args({"pid"}));
  wire.send(Json::array({"do", Json::object(), "big"}));
  std::this_thread::sleep_for(std::chrono::milliseconds(2200));  // not reading the 16 MiB
  std::optional<Json> reply = wire.receive();
  REQUIRE(reply);
  CHECK((*reply)[2].as_string().size() == std::size_t{16} << 20);
  wire.send(Json::array({"dn", Json::object()}));
  CHECK(wire.result(args({"pid"})) == pid);  // answered once checkout_done is over
}

// ---- processes ----

TEST_CASE("process titles name the server and the worker, cut to 15 bytes") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.name = "hasher";
  auto server = aet::fork_task_server(options);
  Wire wire(server.address());
  auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  CHECK(read_comm(worker) == "aet-worker:hash");
  CHECK(eventually([&] { return read_comm(server.pid()) == "aet-server:hash"; }, 5));

  TempDir dir2;
  aet::ServerOptions short_name = options_for(dir2.unix_address());
  short_name.name = "ab";
  auto server2 = aet::fork_task_server(short_name);
  Wire wire2(server2.address());
  CHECK(read_comm(static_cast<pid_t>(wire2.result(args({"pid"})).as_int())) == "aet-worker:ab");
  CHECK(read_comm(server2.pid()) == "aet-server:ab");
}

// The descriptors of a worker of a server with these options: number and
// what /proc says it is, checked to be 0, 1, 2, one socket and `timerfds`
// timerfds; a descriptor the test process holds must not leak into it.
void check_worker_descriptors(aet::ServerOptions options, int timerfds) {
  int stray = ::open("/dev/null", O_RDONLY);  // without O_CLOEXEC, on purpose
  auto server = aet::fork_task_server(std::move(options));
  Wire first(server.address());
  Wire wire(server.address());
  Json fds = wire.result(args({"fds"}));
  ::close(stray);
  INFO(fds.dump());
  REQUIRE(fds.size() == 4u + static_cast<unsigned>(timerfds));
  std::set<std::int64_t> numbers;
  int sockets = 0, timers = 0;
  for (const Json& entry : fds.as_array()) {
    numbers.insert(entry[0].as_int());
    if (entry[0].as_int() <= 2) continue;
    if (entry[1].as_string().compare(0, 7, "socket:") == 0) ++sockets;
    if (entry[1].as_string() == "anon_inode:[timerfd]") ++timers;
  }
  CHECK(numbers.count(0) == 1);
  CHECK(numbers.count(1) == 1);
  CHECK(numbers.count(2) == 1);
  CHECK(sockets == 1);
  CHECK(timers == timerfds);
}

TEST_CASE("a worker holds only descriptors 0, 1, 2, its connection and the timerfd of its hung_worker_timeout") {
  TempDir dir;
  check_worker_descriptors(options_for(dir.unix_address()), 1);
}

TEST_CASE("a worker without hung_worker_timeout holds only descriptors 0, 1, 2 and its connection") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0;
  check_worker_descriptors(options, 0);
}

TEST_CASE("with descriptor 0 closed, the server puts /dev/null there, not a socket of its own") {
  TempDir dir;
  int status = exit_status_of_child([&] {
    ::close(0);
    aet::Server server(options_for(dir.unix_address()));
    return proc_fd_target("0") == "/dev/null" ? 0 : 1;
  });
  CHECK(status == 0);
}

TEST_CASE("a hundred concurrent connections get a hundred workers, all reaped after") {
  rlimit limit{};
  ::getrlimit(RLIMIT_NOFILE, &limit);
  if (limit.rlim_cur < 512 && limit.rlim_max >= 512) {
    limit.rlim_cur = 512;
    ::setrlimit(RLIMIT_NOFILE, &limit);
  }
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  std::vector<std::unique_ptr<Wire>> wires;
  for (int i = 0; i < 100; ++i) wires.push_back(std::make_unique<Wire>(server.address()));
  // All requests in flight at once, then all replies.
  for (auto& wire : wires) wire->send(Json::array({"do", Json::object(), "pid"}));
  std::set<std::int64_t> pids;
  for (auto& wire : wires) {
    auto reply = wire->receive();
    REQUIRE(reply);
    pids.insert((*reply)[2].as_int());
  }
  CHECK(pids.size() == 100);
  CHECK(aet_test::children_of(server.pid()).size() == 100);
  wires.clear();
  CHECK(eventually([&] { return aet_test::children_of(server.pid()).empty(); }, 10));
  for (std::int64_t pid : pids) CHECK_FALSE(aet_test::process_zombie(static_cast<pid_t>(pid)));
}

// ---- addresses and socket files ----

TEST_CASE("a TCP server on IPv4 port 0 reports the port it bound") {
  aet::ServerOptions options = options_for("tcp:127.0.0.1:0");
  aet::Server probe(options_for("tcp:127.0.0.1:0"));
  CHECK(probe.port() > 0);
  CHECK(probe.address() == "tcp:127.0.0.1:" + std::to_string(probe.port()));
  auto server = aet::fork_task_server(options);
  REQUIRE(server.port() > 0);
  CHECK(server.address() == "tcp:127.0.0.1:" + std::to_string(server.port()));
  Wire wire(server.address());
  CHECK(wire.result(args({"echo", "v4"})) == Json::array({"v4"}));
}

TEST_CASE("a TCP server on IPv6 port 0 reports the port it bound") {
  auto server = aet::fork_task_server(options_for("tcp:[::1]:0"));
  REQUIRE(server.port() > 0);
  CHECK(server.address() == "tcp:[::1]:" + std::to_string(server.port()));
  Wire wire(server.address());
  CHECK(wire.result(args({"echo", "v6"})) == Json::array({"v6"}));
}

TEST_CASE("bad listen addresses are refused with a clear message") {
  auto refused = [](const std::string& address) {
    try {
      aet::Server server(options_for(address));
    } catch (const aet::ServerError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK_THAT(refused("nonsense"), Catch::Contains("expected unix:PATH or tcp:HOST:PORT"));
  CHECK_THAT(refused(""), Catch::Contains("expected unix:PATH or tcp:HOST:PORT"));
  CHECK_THAT(refused("unix:"), Catch::Contains("empty socket path"));
  CHECK_THAT(refused("unix:/tmp/" + std::string(200, 'x')), Catch::Contains("longer than"));
  CHECK_THAT(refused("tcp:127.0.0.1"), Catch::Contains("expected tcp:HOST:PORT"));
  CHECK_THAT(refused("tcp::::1:80"), Catch::Contains("needs brackets"));
  CHECK_THAT(refused("tcp:127.0.0.1:99999"), Catch::Contains("port must be a number"));
  CHECK_THAT(refused("tcp:127.0.0.1:http"), Catch::Contains("port must be a number"));
  CHECK_THAT(refused("tcp::80"), Catch::Contains("missing host"));
  CHECK_THAT(refused("tcp:[::1:80"), Catch::Contains("brackets"));
  CHECK_THAT(refused("tcp:203.0.113.1:0"),
             Catch::Contains("cannot bind tcp:203.0.113.1:0: ") &&
                 Catch::Contains(std::strerror(EADDRNOTAVAIL)));
  CHECK_THAT(refused("unix:/nonexistent-dir/s.sock"),
             Catch::Contains("cannot bind unix:/nonexistent-dir/s.sock: ") &&
                 Catch::Contains(std::strerror(ENOENT)));
}

TEST_CASE("a TCP port already in use is a bind error") {
  aet::Server first(options_for("tcp:127.0.0.1:0"));
  try {
    aet::Server second(options_for(first.address()));
    FAIL("the second bind succeeded");
  } catch (const aet::ServerError& e) {
    CHECK_THAT(e.what(), Catch::Contains(std::strerror(EADDRINUSE)));
  }
}

TEST_CASE("a Unix socket file is created with mode 0600 whatever the umask, never wider") {
  TempDir dir;
  // inotify reports a chmod after creation as IN_ATTRIB: there is none, so
  // the file was born with its final mode and was never wider.
  int watch = ::inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  REQUIRE(watch >= 0);
  REQUIRE(::inotify_add_watch(watch, dir.path().c_str(), IN_CREATE | IN_ATTRIB) >= 0);
  mode_t old_umask = ::umask(0);
  aet::Server server(options_for(dir.unix_address()));
  ::umask(old_umask);
  struct stat st {};
  REQUIRE(::lstat(dir.file("s.sock").c_str(), &st) == 0);
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);
  alignas(inotify_event) char events[4096];
  ssize_t n = ::read(watch, events, sizeof events);
  ::close(watch);
  REQUIRE(n > 0);
  int created = 0, attribute_changes = 0;
  for (ssize_t at = 0; at < n;) {
    const auto* event = reinterpret_cast<const inotify_event*>(events + at);
    if (event->len > 0 && std::string(event->name) == "s.sock") {
      if (event->mask & IN_CREATE) ++created;
      if (event->mask & IN_ATTRIB) ++attribute_changes;
    }
    at += static_cast<ssize_t>(sizeof(inotify_event) + event->len);
  }
  CHECK(created == 1);
  CHECK(attribute_changes == 0);
}

TEST_CASE("socket_mode sets the socket file's mode exactly, even under a narrower umask") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.socket_mode = 0660;
  mode_t old_umask = ::umask(077);
  aet::Server server(options);
  ::umask(old_umask);
  struct stat st {};
  REQUIRE(::lstat(dir.file("s.sock").c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0660);
}

TEST_CASE("a stale socket file is replaced") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un where{};
    where.sun_family = AF_UNIX;
    std::memcpy(where.sun_path, path.data(), path.size());
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&where), sizeof where) == 0);
    ::close(fd);  // the file stays, nobody listens
  }
  REQUIRE(path_exists(path));
  auto server = aet::fork_task_server(options_for("unix:" + path));
  Wire wire(server.address());
  CHECK(wire.result(args({"echo", "replaced"})) == Json::array({"replaced"}));
}

TEST_CASE("a live server on the socket path is an error, and keeps its file") {
  TempDir dir;
  aet::Server first(options_for(dir.unix_address()));
  try {
    aet::Server second(options_for(dir.unix_address()));
    FAIL("the second server bound the same path");
  } catch (const aet::ServerError& e) {
    CHECK_THAT(e.what(), Catch::Contains("address in use: another server is listening on unix:" +
                                         dir.file("s.sock")));
  }
  CHECK(path_exists(dir.file("s.sock")));
  CHECK_THROWS_AS(aet::fork_task_server(options_for(dir.unix_address())), aet::ServerError);
  int fd = connect_to(dir.unix_address());
  CHECK(fd >= 0);
  ::close(fd);
}

TEST_CASE("a file that is not a socket is never replaced") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  std::ofstream(path) << "precious";
  try {
    aet::Server server(options_for("unix:" + path));
    FAIL("the server replaced a regular file");
  } catch (const aet::ServerError& e) {
    CHECK_THAT(e.what(), Catch::Contains("not a socket"));
  }
  std::ifstream in(path);
  std::string content;
  in >> content;
  CHECK(content == "precious");
}

TEST_CASE("the socket file is removed when the server goes") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  {
    aet::Server server(options_for("unix:" + path));
    CHECK(path_exists(path));
  }
  CHECK_FALSE(path_exists(path));
}

// ---- stopping ----

TEST_CASE("stop() before run() makes run() return at once, with signal dispositions restored; run() runs once") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  int status = exit_status_of_child([&] {
    struct sigaction mine {};
    mine.sa_handler = [](int) {};
    sigemptyset(&mine.sa_mask);
    sigaction(SIGTERM, &mine, nullptr);
    aet::Server server(options_for("unix:" + path));
    server.stop();
    server.run();
    struct sigaction now {};
    sigaction(SIGTERM, nullptr, &now);
    if (now.sa_handler != mine.sa_handler) return 2;
    sigaction(SIGCHLD, nullptr, &now);
    if (now.sa_handler != SIG_DFL) return 3;
    if (path_exists(path)) return 4;
    try {
      server.run();
      return 5;
    } catch (const aet::ServerError&) {
    }
    return 0;
  });
  CHECK(status == 0);
}

TEST_CASE("stop() from another thread makes run() return") {
  TempDir dir;
  int status = exit_status_of_child([&] {
    aet::Server server(options_for(dir.unix_address()));
    std::thread stopper([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      server.stop();
    });
    server.run();
    stopper.join();
    return 0;
  });
  CHECK(status == 0);
}

TEST_CASE("SIGTERM stops accepting, removes the socket file and lets a busy worker reply") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  auto server = aet::fork_task_server(options_for("unix:" + path));
  Wire idle(server.address());
  Wire busy(server.address());
  CHECK(idle.result(args({"echo"})) == Json::array());
  busy.send(Json::array({"do", Json::object(), "sleep", 0.5}));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the request start
  REQUIRE(::kill(server.pid(), SIGTERM) == 0);
  CHECK(eventually([&] { return !path_exists(path); }, 5));
  CHECK(connect_to("unix:" + path) < 0);
  CHECK(idle.closes_within(2));
  auto reply = busy.receive();
  REQUIRE(reply);
  CHECK((*reply)[2] == "slept");
  CHECK(busy.closes_within(2));
  CHECK(eventually([&] { return !aet_test::process_alive(server.pid()); }, 5));
}

TEST_CASE("SIGINT stops the server like SIGTERM: the socket file goes and a busy worker replies") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  const std::string marker = dir.file("worker-pid");
  auto server = aet::fork_task_server(options_for("unix:" + path));
  Wire idle(server.address());
  Wire busy(server.address());
  CHECK(idle.result(args({"echo"})) == Json::array());
  busy.send(Json::array({"do", Json::object(), "mark_and_sleep", marker, 0.5}));
  REQUIRE(eventually([&] { return path_exists(marker); }, 5));  // the request runs
  REQUIRE(::kill(server.pid(), SIGINT) == 0);
  CHECK(eventually([&] { return !path_exists(path); }, 5));
  CHECK(connect_to("unix:" + path) < 0);
  CHECK(idle.closes_within(2));
  auto reply = busy.receive();
  REQUIRE(reply);
  CHECK((*reply)[2] == "slept");
  CHECK(busy.closes_within(2));
  CHECK(eventually([&] { return !aet_test::process_alive(server.pid()); }, 5));
}

TEST_CASE("a stopping server kills a worker still busy after hung_worker_timeout") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0.3;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });
  // The reply is far larger than the socket buffers and this client never
  // reads it: the worker stays blocked in send(), past its request timer.
  // Its first bytes arriving show the worker is sending, not idle.
  Wire stuck(server.address());
  stuck.send(Json::array({"do", Json::object(), "big"}));
  pollfd reply_started{stuck.fd(), POLLIN, 0};
  REQUIRE(::poll(&reply_started, 1, 10000) == 1);
  const double start = monotonic_now();
  REQUIRE(::kill(server.pid(), SIGTERM) == 0);
  CHECK(eventually([&] { return !aet_test::process_alive(server.pid()); }, 5));
  CHECK(monotonic_now() - start < 2);
  CHECK(stderr_capture.wait_for("still busy, killing it"));
  CHECK(stderr_capture.wait_for("killed by signal 9"));
}

TEST_CASE("SIGTERM to a worker: idle it exits, busy it replies first, marking its reply its last") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire idle(server.address());
  Wire busy(server.address());
  auto idle_pid = static_cast<pid_t>(idle.result(args({"pid"})).as_int());
  auto busy_pid = static_cast<pid_t>(busy.result(args({"pid"})).as_int());
  const std::string marker = dir.file("busy-started");
  busy.send(Json::array({"do", Json::object(), "mark_and_sleep", marker, 0.3}));
  REQUIRE(eventually([&] { return path_exists(marker); }, 5));  // the request runs
  ::kill(idle_pid, SIGTERM);
  ::kill(busy_pid, SIGTERM);
  CHECK(idle.closes_within(2));
  auto reply = busy.receive();
  REQUIRE(reply);
  CHECK((*reply)[2] == "slept");
  CHECK((*reply)[1]["last"] == true);  // so that its client hands it to no other checkout
  CHECK(busy.closes_within(2));
  // A reply not followed by an exit says nothing of the kind.
  Wire other(server.address());
  Json plain = other.call(args({"echo", 1}));
  CHECK_FALSE(plain[1].contains("last"));
}

TEST_CASE("an idle worker exits on SIGTERM even after its handler blocked SIGTERM") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  auto pid = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  CHECK(wire.result(args({"block_sigterm"})) == "blocked");
  ::kill(pid, SIGTERM);
  CHECK(wire.closes_within(2));
}

TEST_CASE("a worker can run a server of its own") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  CHECK(wire.result(args({"run_inner_server", dir.unix_address("inner.sock")})) == "ran");
  CHECK(wire.result(args({"echo", 1})) == Json::array({1}));
}

TEST_CASE("a fork_task_server ends when its handle is dropped") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  pid_t pid;
  {
    auto server = aet::fork_task_server(options_for("unix:" + path));
    pid = server.pid();
    Wire wire(server.address());
    CHECK(wire.result(args({"echo"})) == Json::array());
    CHECK(aet_test::process_alive(pid));
  }
  CHECK_FALSE(aet_test::process_alive(pid));
  CHECK_FALSE(aet_test::process_zombie(pid));
  CHECK_FALSE(path_exists(path));
}

TEST_CASE("dropping a TaskServer kills, after 5 s, a worker still busy with its server") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = 0;  // the server itself would wait for ever
  const std::string marker = dir.file("worker-pid");
  pid_t worker = -1;
  double dropped_at = 0;
  {
    auto server = aet::fork_task_server(options);
    Wire busy(server.address());
    busy.send(Json::array({"do", Json::object(), "mark_and_sleep", marker, 20}));
    REQUIRE(eventually([&] { return path_exists(marker) && (std::ifstream(marker) >> worker); }, 5));
    REQUIRE(aet_test::process_alive(worker));
    dropped_at = monotonic_now();
  }
  const double took = monotonic_now() - dropped_at;
  CHECK(took >= 4.9);
  CHECK(took < 6.5);
  CHECK(eventually([&] { return !aet_test::process_alive(worker); }, 1));
}

TEST_CASE("a moved TaskServer keeps its server; the moved-from handle does nothing") {
  TempDir dir;
  auto first = aet::fork_task_server(options_for(dir.unix_address()));
  pid_t pid = first.pid();
  aet::TaskServer second(std::move(first));
  first.stop();
  CHECK(aet_test::process_alive(pid));
  Wire wire(second.address());
  CHECK(wire.result(args({"echo", 1})) == Json::array({1}));
  second.stop();
  CHECK_FALSE(aet_test::process_alive(pid));

  aet::TaskServer later;  // empty until assigned
  CHECK(later.pid() == -1);
  later = aet::fork_task_server(options_for(dir.unix_address()));
  Wire again(later.address());
  CHECK(again.result(args({"echo", 2})) == Json::array({2}));
  pid_t later_pid = later.pid();
  later = aet::TaskServer();  // assigning stops the server it held
  CHECK_FALSE(aet_test::process_alive(later_pid));
}

TEST_CASE("a fork_task_server ends when the process that made it dies") {
  TempDir dir;
  int pipe_fds[2];
  REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  pid_t middle = ::fork();
  if (middle == 0) {
    try {
      auto server = aet::fork_task_server(options_for(dir.unix_address()));
      pid_t pid = server.pid();
      if (::write(pipe_fds[1], &pid, sizeof pid) != sizeof pid) ::_exit(1);
      for (;;) ::pause();
    } catch (...) {
    }
    ::_exit(1);
  }
  ::close(pipe_fds[1]);
  pid_t server_pid = 0;
  pollfd p{pipe_fds[0], POLLIN, 0};
  REQUIRE(::poll(&p, 1, 5000) == 1);
  REQUIRE(::read(pipe_fds[0], &server_pid, sizeof server_pid) == sizeof server_pid);
  ::close(pipe_fds[0]);
  REQUIRE(aet_test::process_alive(server_pid));
  {
    Wire wire(dir.unix_address());
    CHECK(wire.result(args({"echo"})) == Json::array());
  }
  ::kill(middle, SIGKILL);
  ::waitpid(middle, nullptr, 0);
  CHECK(eventually([&] { return !aet_test::process_alive(server_pid); }, 5));
  CHECK(eventually([&] { return !path_exists(dir.file("s.sock")); }, 5));
}

// ---- protocol errors ----

TEST_CASE("a protocol error closes the connection; the server keeps accepting") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.max_frame = 1024;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options); });

  auto frame_of = [](const std::string& body) {
    std::string out(4, '\0');
    auto size = static_cast<std::uint32_t>(body.size());
    out[0] = static_cast<char>(size >> 24);
    out[1] = static_cast<char>(size >> 16);
    out[2] = static_cast<char>(size >> 8);
    out[3] = static_cast<char>(size);
    return out + body;
  };
  std::string bad;
  SECTION("an oversize frame") { bad = std::string("\x00\x10\x00\x00", 4); }
  SECTION("bad JSON") { bad = frame_of("[\"do\", {}, "); }
  SECTION("JSON that is not an array") { bad = frame_of("{\"do\": 1}"); }
  SECTION("a do without meta") { bad = frame_of("[\"do\"]"); }
  SECTION("an unknown command") { bad = frame_of("[\"xx\", {}]"); }
  SECTION("an ok sent to a worker") { bad = frame_of("[\"ok\", {}, 1]"); }
  SECTION("an er sent to a worker") { bad = frame_of("[\"er\", {}, \"no\"]"); }

  Wire wire(server.address());
  CHECK(wire.result(args({"echo"})) == Json::array());
  wire.send_bytes(bad);
  CHECK(wire.closes_within(3));
  CHECK(stderr_capture.wait_for("protocol error: "));
  CHECK(stderr_capture.wait_for("aet-worker:test["));
  Wire next(server.address());
  CHECK(next.result(args({"echo", 2})) == Json::array({2}));
}

TEST_CASE("a client that disconnects ends its worker quietly") {
  TempDir dir;
  StderrCapture stderr_capture;
  auto server = stderr_capture.redirect([&] { return aet::fork_task_server(options_for(dir.unix_address())); });
  pid_t worker;
  {
    Wire wire(server.address());
    worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  }
  CHECK(eventually([&] { return !aet_test::process_alive(worker); }, 5));
  CHECK(eventually([&] { return !aet_test::process_zombie(worker); }, 5));
  server.stop();
  stderr_capture.wait_for("\n", 0.2);
  CHECK(stderr_capture.text().find("worker") == std::string::npos);
}

TEST_CASE("frames split across many writes are reassembled") {
  TempDir dir;
  auto server = aet::fork_task_server(options_for(dir.unix_address()));
  Wire wire(server.address());
  std::string bytes = aet::encode_frame(Json::array({"do", Json::object(), "echo", "piecewise"}));
  for (char c : bytes) {
    wire.send_bytes(std::string(1, c));
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  auto reply = wire.receive();
  REQUIRE(reply);
  CHECK((*reply)[2] == Json::array({"piecewise"}));
  // Two requests in one write get two replies in order.
  wire.send_bytes(aet::encode_frame(Json::array({"do", Json::object(), "echo", 1})) +
                  aet::encode_frame(Json::array({"do", Json::object(), "echo", 2})));
  CHECK((*wire.receive())[2] == Json::array({1}));
  CHECK((*wire.receive())[2] == Json::array({2}));
}

TEST_CASE("option mistakes are refused at construction") {
  TempDir dir;
  aet::ServerOptions options = options_for(dir.unix_address());
  options.hung_worker_timeout = -1;
  CHECK_THROWS_AS(aet::Server(options), aet::ServerError);
  options.hung_worker_timeout = 1;
  options.interface = aet::CatchAll();
  CHECK_THROWS_WITH(aet::Server(options), Catch::Contains("catch-all"));
}
