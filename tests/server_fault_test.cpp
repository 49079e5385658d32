// Server faults, seen from the wire: bad requests over raw sockets, a
// SIGTERM while workers are busy, the hang backstop, security (socket file
// modes, SIGPIPE, signals across fork, no signal to a reaped pid, nothing
// run but the interface) and hygiene (descriptors, children). Every test
// starts its own server on its own socket path. See tests/RELIABILITY.md.
#include <catch2/catch.hpp>

#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "anyevent_task.hpp"
#include "fault_support.hpp"
#include "test_support.hpp"

using aet::Json;
using aet_test::eventually;
using aet_test::monotonic_now;
using aet_test::RawWire;
using aet_test::StderrCapture;
using aet_test::TempDir;

// ---- kill(2) and waitpid(2), recorded ------------------------------------
//
// This binary defines kill() and waitpid() itself, so the library's calls
// (compiled into it) come here, in the test process and in every process
// forked from it. Each call is passed to the kernel and, while recording is
// on, logged to memory shared by all those processes: the test then checks
// that no process ever signals a pid after having reaped it.

namespace {

struct ProcessEvent {
  pid_t process;  // who made the call
  bool reaped;    // waitpid returned `target`; else kill(target, sig)
  pid_t target;
  int sig;
};

struct ProcessEventLog {
  std::atomic<bool> recording;
  std::atomic<std::uint32_t> count;
  ProcessEvent events[1 << 16];
};

ProcessEventLog* make_event_log() {
  void* memory = ::mmap(nullptr, sizeof(ProcessEventLog), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) std::abort();
  return new (memory) ProcessEventLog{};
}

ProcessEventLog* const event_log = make_event_log();

void record(bool reaped, pid_t target, int sig) {
  if (!event_log || !event_log->recording.load()) return;
  std::uint32_t at = event_log->count.fetch_add(1);
  if (at < sizeof event_log->events / sizeof event_log->events[0])
    event_log->events[at] = ProcessEvent{static_cast<pid_t>(::syscall(SYS_getpid)), reaped, target, sig};
}

}  // namespace

extern "C" int kill(pid_t pid, int sig) noexcept {
  record(false, pid, sig);
  return static_cast<int>(::syscall(SYS_kill, pid, sig));
}

extern "C" pid_t waitpid(pid_t pid, int* status, int options) {
  auto reaped = static_cast<pid_t>(::syscall(SYS_wait4, pid, status, options, nullptr));
  if (reaped > 0) record(true, reaped, 0);
  return reaped;
}

namespace {

// ---- the server under test ------------------------------------------------

// A file in `dir` named after the calling worker's pid: the test awaits it
// to know that a handler is running.
void mark_started(const std::string& dir) {
  std::string path = dir + "/started." + std::to_string(::getpid());
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
  if (fd >= 0) ::close(fd);
}

aet::Methods fault_methods(const std::string& dir) {
  return aet::Methods{
      {"pid", [](const Json&) -> Json { return static_cast<std::int64_t>(::getpid()); }},
      {"echo", [](const Json& args) { return args; }},
      {"sleep",
       [dir](const Json& args) {
         mark_started(dir);
         std::this_thread::sleep_for(std::chrono::duration<double>(args[0].as_double()));
         return Json("slept");
       }},
      {"big", [](const Json&) { return Json(std::string(16 << 20, 'x')); }},
      {"abort", [](const Json&) -> Json { std::abort(); }},
      // Defeats a plain alarm(): every signal blocked, SIGALRM ignored, a
      // busy loop (bounded, so that a broken backstop fails the test
      // instead of hanging it).
      {"spin_defiantly",
       [dir](const Json&) -> Json {
         sigset_t all;
         sigfillset(&all);
         sigprocmask(SIG_BLOCK, &all, nullptr);
         ::signal(SIGALRM, SIG_IGN);
         mark_started(dir);
         const double until = monotonic_now() + 20;
         while (monotonic_now() < until) {
         }
         return Json("survived");
       }},
  };
}

Json args(std::initializer_list<Json> items) { return Json::array(items); }

std::string started_marker(const TempDir& dir, pid_t pid) { return dir.file("started." + std::to_string(pid)); }

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// A forked server whose stderr (its own and its workers') is captured.
struct FaultServer {
  TempDir dir;
  StderrCapture log;
  aet::ServerOptions options;
  aet::TaskServer server;

  explicit FaultServer(const std::function<void(aet::ServerOptions&)>& tweak = {},
                       std::string listen = {}) {
    options.listen = listen.empty() ? dir.unix_address() : listen;
    options.name = "fault";
    options.hung_worker_timeout = 10;  // a handler left running never holds up a test for long
    options.interface = fault_methods(dir.path());
    if (tweak) tweak(options);
    server = log.redirect([&] { return aet::fork_task_server(options); });
  }
  const std::string& address() const { return server.address(); }
  pid_t pid() const { return server.pid(); }

  // The server still accepts and serves.
  bool serves() {
    RawWire probe(address());
    return probe.result(args({"echo", "still here"})) == args({"still here"});
  }
  bool no_children_left(double limit = 5) {
    return eventually([&] { return aet_test::children_of(pid()).empty(); }, limit);
  }
};

std::string worker_tag(pid_t pid) { return "aet-worker:fault[" + std::to_string(pid) + "]: "; }
std::string reaped_tag(pid_t pid) { return "worker " + std::to_string(pid) + " "; }

// Sends `bytes` on a connection whose worker has served one call, then
// (if `then_close`) shuts the connection's writing side. The worker must
// close the connection and exit, by itself and without a signal; it must be
// reaped; the server must serve on, and another connection served by
// another worker all along must be unaffected. `protocol_error`: the error
// the worker must log before exiting with status 1; empty: it exits with
// status 0 and nothing is logged about it.
void check_bad_request(const std::string& bytes, bool then_close, const std::string& protocol_error) {
  FaultServer s;
  RawWire bystander(s.address());
  const Json bystander_pid = bystander.result(args({"pid"}));
  RawWire wire(s.address());
  const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());

  wire.send_bytes(bytes);  // may fail part way if the worker gives up early
  if (then_close) wire.shutdown_write();
  CHECK(wire.closes_within(5));
  CHECK(eventually([&] { return aet_test::process_gone(worker); }, 5));

  // The server reaps (and logs) before it accepts again: once a new
  // connection is served, whatever it had to say about `worker` is out.
  CHECK(s.serves());
  if (protocol_error.empty()) {
    CHECK(s.log.text().find(worker_tag(worker)) == std::string::npos);
    CHECK(s.log.text().find(reaped_tag(worker)) == std::string::npos);
  } else {
    CHECK(s.log.wait_for(reaped_tag(worker) + "exited with status 1"));
    const std::string line = s.log.line_with(worker_tag(worker) + "protocol error: ");
    INFO(line);
    CHECK(line.find(protocol_error) != std::string::npos);
  }
  CHECK(s.log.text().find("killed by signal") == std::string::npos);
  CHECK(bystander.result(args({"pid"})) == bystander_pid);
  bystander.close();
  CHECK(s.no_children_left());
}

std::string do_frame_text(const std::string& rest) { return "[\"do\",{}," + rest + "]"; }

}  // namespace

// ---- bad requests, one each ------------------------------------------------

TEST_CASE("a zero-length frame ends only its worker, with a protocol error") {
  check_bad_request(aet_test::frame_header(0), false, "zero-length frame");
}

TEST_CASE("a frame announcing 0xFFFFFFFF bytes is refused at its header") {
  // No body follows: the worker must refuse on the header alone.
  check_bad_request(aet_test::frame_header(0xFFFFFFFFu), false,
                    "frame of 4294967295 bytes exceeds the limit of 67108864");
}

TEST_CASE("a header cut short, then the connection closed, ends the worker quietly") {
  check_bad_request(aet_test::frame_header(20).substr(0, 2), true, "");
}

TEST_CASE("a body cut short, then the connection closed, ends the worker quietly") {
  const std::string whole = aet::encode_frame(args({"do", Json::object(), "echo", "cut"}));
  check_bad_request(whole.substr(0, whole.size() - 5), true, "");
}

TEST_CASE("invalid UTF-8 in a request is a protocol error") {
  check_bad_request(aet_test::raw_frame(do_frame_text("\"echo\",\"\xff\xfe\"")), false, "bad JSON in frame: ");
}

TEST_CASE("invalid JSON in a request is a protocol error") {
  check_bad_request(aet_test::raw_frame("[\"do\",{},\"echo\","), false, "bad JSON in frame: ");
}

TEST_CASE("JSON that is not an array is a protocol error") {
  check_bad_request(aet_test::raw_frame("{\"do\":{}}"), false, "message is not an array but object");
}

TEST_CASE("an unknown command is a protocol error") {
  check_bad_request(aet_test::raw_frame("[\"zz\",{}]"), false, "unknown command \"zz\"");
}

TEST_CASE("a do without meta is a protocol error") {
  check_bad_request(aet_test::raw_frame("[\"do\"]"), false, "\"do\" message has no meta");
}

TEST_CASE("a reply command sent to a worker is a protocol error") {
  check_bad_request(aet_test::raw_frame("[\"ok\",{},1]"), false, "unexpected \"ok\" message from the client");
}

TEST_CASE("100,000-deep nesting is refused without exhausting the stack") {
  check_bad_request(aet_test::raw_frame(do_frame_text("\"echo\"," + aet_test::nested_arrays(100000))), false,
                    "nesting deeper than 512 levels");
}

TEST_CASE("a 10 MB string under the frame limit is served") {
  FaultServer s;
  std::string text;
  text.reserve(10 << 20);
  while (text.size() < (10u << 20)) text += "ten megabytes, \xc3\xa9\xf0\x9f\x98\x80 and more; ";
  RawWire wire(s.address());
  const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  const double start = monotonic_now();
  CHECK(wire.result(args({"echo", text}), 30) == args({text}));
  CHECK(monotonic_now() - start < 20);
  wire.close();
  CHECK(eventually([&] { return aet_test::process_gone(worker); }, 5));
  CHECK(s.serves());
  CHECK(s.log.text().find(reaped_tag(worker)) == std::string::npos);
  CHECK(s.no_children_left());
}

TEST_CASE("a request sent a byte at a time keeps only its own worker waiting") {
  FaultServer s;
  RawWire slow(s.address());
  RawWire other(s.address());
  const auto slow_worker = static_cast<pid_t>(slow.result(args({"pid"})).as_int());
  const std::string frame = aet::encode_frame(args({"do", Json::object(), "echo", "slowly"}));
  // Between two bytes of the slow request, the other connection is served
  // in full: its worker is not held up by the slow one, nor is the server.
  int served_meanwhile = 0;
  for (std::size_t i = 0; i < frame.size(); ++i) {
    REQUIRE(slow.send_bytes(frame.substr(i, 1)));
    if (other.result(args({"echo", static_cast<std::int64_t>(i)})) == args({static_cast<std::int64_t>(i)}))
      ++served_meanwhile;
    if (i % 8 == 0) CHECK(s.serves());
    if (i + 1 < frame.size()) CHECK_FALSE(slow.has_reply_now());
  }
  CHECK(served_meanwhile == static_cast<int>(frame.size()));
  auto reply = slow.receive();
  REQUIRE(reply);
  CHECK(*reply == args({"ok", Json::object(), args({"slowly"})}));
  CHECK(slow.result(args({"pid"})) == static_cast<std::int64_t>(slow_worker));
  slow.close();
  other.close();
  CHECK(eventually([&] { return aet_test::process_gone(slow_worker); }, 5));
  CHECK(s.no_children_left());
}

// ---- stopping, hanging ------------------------------------------------------

TEST_CASE("SIGTERM with busy workers: accepting stops at once, busy calls finish, nothing accepted is reset") {
  // Over TCP, where a connection closed with data unread is reset (RST):
  // every accepted connection must end with a plain EOF instead.
  FaultServer s({}, "tcp:127.0.0.1:0");
  std::vector<std::unique_ptr<RawWire>> busy, idle;
  std::vector<pid_t> busy_pids;
  for (int i = 0; i < 3; ++i) {
    busy.push_back(std::make_unique<RawWire>(s.address()));
    busy_pids.push_back(static_cast<pid_t>(busy.back()->result(args({"pid"})).as_int()));
    idle.push_back(std::make_unique<RawWire>(s.address()));
    idle.back()->result(args({"pid"}));
  }
  for (auto& wire : busy) wire->send(args({"do", Json::object(), "sleep", 1.0}));
  for (pid_t pid : busy_pids)
    REQUIRE(eventually([&] { return file_exists(started_marker(s.dir, pid)); }, 5));

  const double sent = monotonic_now();
  REQUIRE(::kill(s.pid(), SIGTERM) == 0);
  REQUIRE(eventually(
      [&] {
        int fd = aet_test::connect_to(s.address());
        if (fd >= 0) ::close(fd);
        return fd < 0;
      },
      2));
  // The listener went while the calls were still running: they do not
  // hold it up.
  CHECK(monotonic_now() - sent < 0.8);
  for (auto& wire : busy) CHECK_FALSE(wire->has_reply_now());

  for (auto& wire : busy) {
    auto reply = wire->receive(5);
    REQUIRE(reply);
    CHECK(*reply == args({"ok", Json::object({{"last", true}}), "slept"}));
    CHECK(wire->closes_within(5));
    CHECK(wire->ending() == aet_test::Ending::eof);
  }
  for (auto& wire : idle) {
    CHECK(wire->closes_within(5));
    CHECK(wire->ending() == aet_test::Ending::eof);
  }
  CHECK(eventually([&] { return !aet_test::process_alive(s.pid()); }, 5));
  CHECK(s.log.text().find("killed") == std::string::npos);
}

TEST_CASE("a worker stopped with a request still unread closes its connection without a reset") {
  // The request reaches the worker's socket just as it is told to stop:
  // it exits without serving it, but must not leave it unread, or TCP
  // resets the connection (and may throw away a reply sent just before).
  FaultServer s({}, "tcp:127.0.0.1:0");
  RawWire wire(s.address());
  const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  REQUIRE(::kill(worker, SIGSTOP) == 0);
  REQUIRE(eventually([&] { return aet_test::process_state(worker) == 'T'; }, 5));
  REQUIRE(wire.send(args({"do", Json::object(), "echo", "too late"})));
  REQUIRE(::kill(worker, SIGTERM) == 0);
  REQUIRE(::kill(worker, SIGCONT) == 0);
  CHECK(wire.closes_within(5));
  CHECK(wire.ending() == aet_test::Ending::eof);
  CHECK(eventually([&] { return aet_test::process_gone(worker); }, 5));
  CHECK(s.serves());
}

TEST_CASE("a handler that blocks every signal, ignores SIGALRM and spins is killed, and the server says which and why") {
  FaultServer s([](aet::ServerOptions& o) { o.hung_worker_timeout = 0.3; });
  RawWire wire(s.address());
  const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  wire.send(args({"do", Json::object(), "spin_defiantly"}));
  REQUIRE(eventually([&] { return file_exists(started_marker(s.dir, worker)); }, 5));
  const double start = monotonic_now();
  CHECK(wire.closes_within(6));
  const double took = monotonic_now() - start;
  CHECK(took < 3);  // 0.3 s, then the SIGKILL one second later, with slack for a loaded machine
  CHECK(s.log.wait_for(reaped_tag(worker) + "killed by signal 9"));
  // The polite signal was ignored, so the worker had nothing to say.
  CHECK(s.log.text().find(worker_tag(worker) + "hung_worker_timeout") == std::string::npos);
  CHECK(aet_test::process_gone(worker));
  CHECK(s.serves());
  CHECK(s.no_children_left());
}

TEST_CASE("a server out of descriptors pauses accepting instead of spinning, and serves once it has them again") {
  FaultServer s;
  CHECK(s.serves());
  // No new descriptor for the server: its lowest free number is 3, and the
  // soft limit goes down to 3 (prlimit from here, on its process).
  rlimit old_limit{};
  REQUIRE(::prlimit(s.pid(), RLIMIT_NOFILE, nullptr, &old_limit) == 0);
  rlimit starved = old_limit;
  starved.rlim_cur = 3;
  REQUIRE(::prlimit(s.pid(), RLIMIT_NOFILE, &starved, nullptr) == 0);
  auto cpu_ticks = [&] {
    std::ifstream in("/proc/" + std::to_string(s.pid()) + "/stat");
    std::string line;
    std::getline(in, line);
    std::istringstream fields(line.substr(line.rfind(')') + 2));
    std::string field;
    long long ticks = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i)
      if (i >= 14) ticks += std::stoll(field);  // utime + stime
    return ticks;
  };
  RawWire waiting(s.address());  // connected, in the backlog: accept fails
  REQUIRE(s.log.wait_for("accept: Too many open files"));
  const long long ticks_before = cpu_ticks();
  const std::size_t lines_before = s.log.count("accept: Too many open files");
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // an interval measured, not a wait for an event
  const long long ticks = cpu_ticks() - ticks_before;
  const std::size_t lines = s.log.count("accept: Too many open files") - lines_before;
  CHECK(ticks <= 10);  // a spinning master would burn about 50 ticks in 0.5 s
  CHECK(lines <= 8);   // one attempt per pause of 0.1 s, not a storm
  REQUIRE(::prlimit(s.pid(), RLIMIT_NOFILE, &old_limit, nullptr) == 0);
  CHECK(waiting.result(args({"echo", "at last"}), 5) == args({"at last"}));
  CHECK(s.serves());
}

// ---- security --------------------------------------------------------------

TEST_CASE("a Unix socket file is never seen with a mode wider than asked, whatever the umask") {
  TempDir dir;
  const std::string path = dir.file("s.sock");
  const unsigned requested = GENERATE(0600u, 0660u);
  const mode_t umask_value = GENERATE(mode_t{0}, mode_t{022}, mode_t{077});
  // A watcher spins on lstat() while servers are created and destroyed
  // over and over: every mode it ever sees must lie within the requested
  // one (a narrower umask may show a narrower mode briefly, never wider).
  std::atomic<bool> stop{false};
  std::atomic<int> sightings{0};
  std::atomic<unsigned> wider{0};
  std::thread watcher([&] {
    while (!stop.load()) {
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0) continue;
      const unsigned mode = st.st_mode & 07777;
      if ((mode & ~requested) != 0) wider.store(mode);
      sightings.fetch_add(1);
    }
  });
  const mode_t old_umask = ::umask(umask_value);
  for (int round = 0; round < 40; ++round) {
    aet::ServerOptions options;
    options.listen = "unix:" + path;
    options.socket_mode = requested;
    options.interface = aet::CatchAll([](const Json& a) { return a; });
    const int seen_before = sightings.load();
    aet::Server server(options);
    eventually([&] { return sightings.load() > seen_before; }, 2);
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK((st.st_mode & 07777) == requested);
  }
  ::umask(old_umask);
  stop.store(true);
  watcher.join();
  CHECK(sightings.load() > 0);
  INFO("a wider mode seen: 0" << std::oct << wider.load());
  CHECK(wider.load() == 0u);
}

TEST_CASE("SIGPIPE never kills a worker whose client leaves in the middle of a reply") {
  struct sigaction old_action {};
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  sigaction(SIGPIPE, &default_action, &old_action);  // the default, that kills, in the test process too
  {
    FaultServer s;
    for (int i = 0; i < 3; ++i) {
      RawWire wire(s.address());
      const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
      wire.send(args({"do", Json::object(), "big"}));
      // The first bytes of the 16 MB reply arrive, then the client goes
      // with the rest unread: the worker's next write hits a closed socket.
      pollfd p{wire.fd(), POLLIN, 0};
      REQUIRE(::poll(&p, 1, 10000) == 1);
      wire.close();
      CHECK(eventually([&] { return aet_test::process_gone(worker); }, 10));
      CHECK(s.serves());
      CHECK(s.log.text().find(reaped_tag(worker)) == std::string::npos);  // exited 0, no signal
    }
    CHECK(s.log.text().find("signal 13") == std::string::npos);
    CHECK(aet_test::signal_set_of(s.pid(), "SigIgn") == std::set<int>{SIGPIPE});
  }
  sigaction(SIGPIPE, &old_action, nullptr);
}

TEST_CASE("the server and its workers start with default signal handlers and nothing blocked") {
  // The test process gets a handler, an ignored signal and a blocked one:
  // none of them may leak into the server or its workers.
  struct sigaction handled {}, ignored {}, old_usr1 {}, old_hup {};
  handled.sa_handler = [](int) {};
  sigemptyset(&handled.sa_mask);
  ignored.sa_handler = SIG_IGN;
  sigemptyset(&ignored.sa_mask);
  sigaction(SIGUSR1, &handled, &old_usr1);
  sigaction(SIGHUP, &ignored, &old_hup);
  sigset_t usr2, old_mask;
  sigemptyset(&usr2);
  sigaddset(&usr2, SIGUSR2);
  pthread_sigmask(SIG_BLOCK, &usr2, &old_mask);

  FaultServer s([](aet::ServerOptions& o) { o.hung_worker_timeout = 5; });

  pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  sigaction(SIGUSR1, &old_usr1, nullptr);
  sigaction(SIGHUP, &old_hup, nullptr);

  RawWire wire(s.address());
  const auto worker = static_cast<pid_t>(wire.result(args({"pid"})).as_int());
  using Set = std::set<int>;
  // The master blocks everything for the instant of each fork, which may
  // not have returned yet in the master when the worker already replies.
  CHECK(eventually([&] { return aet_test::signal_set_of(s.pid(), "SigBlk").empty(); }, 5));
  CHECK(aet_test::signal_set_of(s.pid(), "SigIgn") == Set{SIGPIPE});
  CHECK(aet_test::signal_set_of(s.pid(), "SigCgt") == Set{SIGINT, SIGCHLD, SIGTERM});
  CHECK(aet_test::signal_set_of(worker, "SigBlk") == Set{});
  CHECK(aet_test::signal_set_of(worker, "SigIgn") == Set{});
  CHECK(aet_test::signal_set_of(worker, "SigCgt") == Set{SIGINT, SIGALRM, SIGTERM});
}

TEST_CASE("a SIGTERM that reaches a worker the instant it is forked still ends it") {
  // Signals stay blocked from fork() until the worker's own handlers are in
  // place: a SIGTERM sent as soon as the child exists is held, then ends the
  // idle worker. Were the parent's handler to run in the child, the worker
  // would swallow it and serve on.
  FaultServer s;
  std::atomic<bool> stop{false};
  std::atomic<int> signalled{0};
  std::thread sniper([&] {
    std::set<pid_t> seen;
    while (!stop.load()) {
      for (pid_t pid : aet_test::children_of(s.pid())) {
        if (seen.insert(pid).second) {
          ::kill(pid, SIGTERM);
          signalled.fetch_add(1);
        }
      }
    }
  });
  int ended = 0;
  const int rounds = 30;
  for (int i = 0; i < rounds; ++i) {
    RawWire wire(s.address());
    if (wire.closes_within(5)) ++ended;
  }
  stop.store(true);
  sniper.join();
  CHECK(signalled.load() == rounds);
  CHECK(ended == rounds);
  CHECK(s.no_children_left());
}

TEST_CASE("no process ever signals a pid it has reaped") {
  event_log->count.store(0);
  event_log->recording.store(true);
  {
    FaultServer s([](aet::ServerOptions& o) { o.hung_worker_timeout = 0.3; });
    // Workers that end by themselves, crash, hang past the backstop, then
    // a stop with busy, idle and stuck workers: every path that reaps and
    // every path that signals.
    for (int i = 0; i < 5; ++i) {
      RawWire wire(s.address());
      wire.result(args({"pid"}));
    }
    for (int i = 0; i < 3; ++i) {
      RawWire wire(s.address());
      wire.send(args({"do", Json::object(), "abort"}));
      CHECK(wire.closes_within(5));
    }
    {
      RawWire wire(s.address());
      wire.send(args({"do", Json::object(), "spin_defiantly"}));
      CHECK(wire.closes_within(6));
    }
    RawWire busy(s.address()), idle(s.address()), stuck(s.address());
    const auto busy_pid = static_cast<pid_t>(busy.result(args({"pid"})).as_int());
    idle.result(args({"pid"}));
    stuck.result(args({"pid"}));
    busy.send(args({"do", Json::object(), "sleep", 0.1}));
    // The 16 MB reply is never read: once its first bytes are here, the
    // worker is blocked in send, and stays so past the timeout. (A stop
    // that reached it before the request would end it as idle instead.)
    stuck.send(args({"do", Json::object(), "big"}));
    pollfd reply_started{stuck.fd(), POLLIN, 0};
    REQUIRE(::poll(&reply_started, 1, 10000) == 1);
    REQUIRE(eventually([&] { return file_exists(started_marker(s.dir, busy_pid)); }, 5));
    REQUIRE(::kill(s.pid(), SIGTERM) == 0);
    CHECK(s.log.wait_for("still busy, killing it", 5));
    CHECK(eventually([&] { return !aet_test::process_alive(s.pid()); }, 5));
    s.server.stop();
  }
  event_log->recording.store(false);

  const std::uint32_t count = std::min<std::uint32_t>(event_log->count.load(), 1 << 16);
  std::map<pid_t, std::set<pid_t>> reaped_by;
  int kills = 0, reaps = 0, late = 0;
  for (std::uint32_t i = 0; i < count; ++i) {
    const ProcessEvent& e = event_log->events[i];
    if (e.reaped) {
      reaped_by[e.process].insert(e.target);
      ++reaps;
      continue;
    }
    ++kills;
    CHECK(e.target > 0);  // never a process group, never everyone
    if (reaped_by[e.process].count(e.target)) {
      ++late;
      UNSCOPED_INFO("process " << e.process << " sent signal " << e.sig << " to " << e.target
                               << " after reaping it");
    }
  }
  CHECK(kills >= 3);   // the SIGTERMs of the stop and the SIGKILL of the stuck worker, at least
  CHECK(reaps >= 10);  // every worker, and the server process
  CHECK(late == 0);
}

TEST_CASE("a worker runs nothing but the interface it was given") {
  TempDir dir;
  aet::ServerOptions a;
  a.listen = dir.unix_address("a.sock");
  a.interface = aet::Methods{{"a_only", [](const Json&) { return Json("a"); }},
                             {"echo", [](const Json& v) { return v; }}};
  aet::ServerOptions b;
  b.listen = dir.unix_address("b.sock");
  b.interface = aet::Methods{{"b_only", [](const Json&) { return Json("b"); }}};
  aet::TaskServer server_a = aet::fork_task_server(a);
  aet::TaskServer server_b = aet::fork_task_server(b);
  // What the caller does to its copy after the fork changes nothing.
  std::get<aet::Methods>(a.interface)["added_later"] = [](const Json&) { return Json("later"); };

  RawWire wire(server_a.address());
  auto error_of = [&](const Json& call_args) {
    Json reply = wire.call(call_args);
    return reply[0] == "er" ? reply[2].as_string() : "not an error: " + reply.dump();
  };
  CHECK(error_of(args({"b_only"})) == "unknown method \"b_only\"");
  CHECK(error_of(args({"added_later"})) == "unknown method \"added_later\"");
  CHECK(error_of(args({"A_ONLY"})) == "unknown method \"A_ONLY\"");
  CHECK(error_of(args({"a_only "})) == "unknown method \"a_only \"");
  CHECK(error_of(args({std::string("a_only\0x", 8)})).find("unknown method") == 0);
  CHECK(error_of(args({""})) == "unknown method \"\"");
  CHECK(error_of(args({Json::array({"a_only"})})) == "method name must be a string, got array");
  CHECK(error_of(args({})) == "no method name: the call has no arguments");
  // Meta cannot pick a method either: it is ignored.
  wire.send(args({"do", Json::object({{"method", "b_only"}, {"call", "a_only"}}), "echo", 1}));
  CHECK(*wire.receive() == args({"ok", Json::object(), args({1})}));
  CHECK(wire.result(args({"a_only"})) == "a");
  RawWire other(server_b.address());
  CHECK(other.result(args({"b_only"})) == "b");
  CHECK(other.call(args({"a_only"}))[2] == "unknown method \"a_only\"");
}

// ---- hygiene ----------------------------------------------------------------

TEST_CASE("after hundreds of connections of every kind the server's descriptors and children are back to baseline") {
  FaultServer s([](aet::ServerOptions& o) { o.max_frame = 1 << 20; });
  CHECK(s.serves());
  REQUIRE(s.no_children_left());
  const std::size_t baseline_fds = aet_test::fd_count_of(s.pid());
  REQUIRE(baseline_fds > 0);
  const std::vector<std::string> bad = {
      aet_test::frame_header(0),
      aet_test::frame_header(0xFFFFFFFFu),
      aet_test::raw_frame("[\"do\",{},"),
      aet_test::raw_frame("[\"zz\",{}]"),
      aet_test::frame_header(30).substr(0, 3),
  };
  for (int i = 0; i < 200; ++i) {
    RawWire wire(s.address());
    switch (i % 4) {
      case 0:
        wire.result(args({"echo", i}));
        break;
      case 1:
        wire.send_bytes(bad[static_cast<std::size_t>(i / 4) % bad.size()]);
        wire.shutdown_write();
        CHECK(wire.closes_within(5));
        break;
      case 2:
        wire.send(args({"do", Json::object(), "abort"}));
        CHECK(wire.closes_within(5));
        break;
      default:
        break;  // connects and goes at once
    }
  }
  // Served after every connection above, which the server has therefore
  // accepted (and forked for) by now.
  CHECK(s.serves());
  CHECK(s.no_children_left(10));
  CHECK(aet_test::fd_count_of(s.pid()) == baseline_fds);
  CHECK(s.log.count("killed by signal 6") == 50);
}
