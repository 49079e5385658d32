// aet_bench: the library's figures next to a floor measured in the same run.
//
//   aet_bench rtt N            sequential echo calls on one checkout
//   aet_bench checkouts N W    N checkouts of one call each over W workers
//   aet_bench spawn N          a fresh worker for every checkout (and its page faults)
//   aet_bench payload BYTES    echo of a string of that size
//   aet_bench json             parse and dump throughput (and peers if installed)
//   aet_bench memory           client memory per pending checkout, idle worker RSS
//   aet_bench scale W [N]      checkouts per second with W workers, and with 4;
//                              the floor likewise, and with epoll_wait()
//
// The server runs with the default hung_worker_timeout (300 s), or with
// $AET_BENCH_HUNG_TIMEOUT seconds (0: none) if set.
// Each prints `name value` lines. A floor is the same exchange done with raw
// sockets and no library: the cost of the kernel and the processes alone.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "anyevent_task.hpp"

#if __has_include(<nlohmann/json.hpp>)
#include <nlohmann/json.hpp>
#define AET_BENCH_NLOHMANN 1
#endif
#if __has_include(<rapidjson/document.h>)
#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
#define AET_BENCH_RAPIDJSON 1
#endif

namespace {

double now() { return aet::Loop::now(); }

void print(const char* name, double value) { std::printf("%s %.6g\n", name, value); }

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "aet_bench: %s: %s\n", what.c_str(), std::strerror(errno));
  std::exit(1);
}

// ---- raw building blocks for the floors ------------------------------------

void write_all(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd p{fd, POLLOUT, 0};
      ::poll(&p, 1, -1);
      continue;
    }
    if (n <= 0) die("send");
    data += n;
    size -= static_cast<std::size_t>(n);
  }
}

// The frames of one raw connection, read the way a careful hand-written
// client would: wait in poll(), then one read() of whatever is there (a
// whole frame, several, or part of one) into a buffer kept from call to call;
// a large body is read straight to its place, in as few reads as the kernel
// allows. No JSON, no event loop: the cost of the kernel and the processes.
class RawReader {
 public:
  explicit RawReader(int fd) : fd_(fd) {}
  // The next frame's body (valid until the next call); false on EOF.
  // `readable`: poll() said so already, read at once.
  bool next(std::string_view& body, bool readable = false) {
    if (start_ > 0 && start_ == end_) start_ = end_ = 0;
    for (;;) {
      std::size_t have = end_ - start_;
      if (have >= 4) {
        const auto* h = reinterpret_cast<const unsigned char*>(data() + start_);
        std::size_t size = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) |
                           (std::size_t{h[2]} << 8) | h[3];
        if (have >= 4 + size) {
          body = std::string_view(data() + start_ + 4, size);
          start_ += 4 + size;
          return true;
        }
        if (capacity_ < start_ + 4 + size) {  // room for the whole frame
          std::memmove(data(), data() + start_, have);
          start_ = 0;
          end_ = have;
          if (capacity_ < 4 + size) grow(4 + size);
        }
      } else if (capacity_ - end_ < 4) {
        std::memmove(data(), data() + start_, have);
        start_ = 0;
        end_ = have;
      }
      pollfd p{fd_, POLLIN, 0};
      if (!std::exchange(readable, false) && ::poll(&p, 1, -1) < 0) {
        if (errno == EINTR) continue;
        die("poll");
      }
      ssize_t n = ::read(fd_, data() + end_, capacity_ - end_);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return false;
      end_ += static_cast<std::size_t>(n);
    }
  }

 private:
  char* data() { return buffer_.get(); }
  void grow(std::size_t size) {
    std::unique_ptr<char[]> bigger(new char[size]);
    std::memcpy(bigger.get(), buffer_.get(), end_);
    buffer_ = std::move(bigger);
    capacity_ = size;
  }
  int fd_;
  // 64 KiB as the library's read buffers, not zeroed (as theirs).
  std::size_t capacity_ = 64 * 1024;
  std::unique_ptr<char[]> buffer_{new char[capacity_]};
  std::size_t start_ = 0, end_ = 0;
};

// A raw echo process: answers every frame that is not a "dn" with `reply`.
pid_t spawn_raw_echo(int fd, const std::string& reply) {
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    // Keep only our end: a peer end held here would hide the parent's close.
    for (int other = 3; other < 4096; ++other)
      if (other != fd) close(other);
    RawReader in(fd);
    std::string_view body;
    while (in.next(body)) {
      if (body.substr(0, 5) == "[\"dn\"") continue;
      write_all(fd, reply.data(), reply.size());
    }
    _exit(0);
  }
  return pid;
}

void reap(pid_t pid) {
  while (waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
  }
}

// ---- library set-up ----------------------------------------------------------

// The servers' hung_worker_timeout: the library's default unless
// AET_BENCH_HUNG_TIMEOUT says otherwise (0 measures the worker without it).
double hung_worker_timeout() {
  const char* text = std::getenv("AET_BENCH_HUNG_TIMEOUT");
  return text ? std::atof(text) : aet::ServerOptions{}.hung_worker_timeout;
}

struct Bench {
  char dir[32] = "/tmp/aet-bench-XXXXXX";
  std::string address;
  aet::TaskServer server;

  Bench() : address(make_address()), server(aet::fork_task_server(options())) {}
  ~Bench() {
    server.stop();
    rmdir(dir);
  }
  std::string make_address() {
    if (!mkdtemp(dir)) die("mkdtemp");
    return std::string("unix:") + dir + "/b.sock";
  }
  aet::ServerOptions options() {
    aet::ServerOptions so;
    so.listen = address;
    so.name = "bench";
    so.hung_worker_timeout = hung_worker_timeout();
    // The handler owns its arguments: the echo moves its argument out.
    // page_faults: the worker's minor faults so far (getrusage is called
    // here first, so that a worker does not look it up itself).
    (void)minor_faults();
    so.interface = aet::Methods{
        {"echo", [](aet::Json args) -> aet::Json { return std::move(args[0]); }},
        {"page_faults", [](aet::Json) -> aet::Json { return static_cast<std::int64_t>(minor_faults()); }},
    };
    return so;
  }
  static long minor_faults() {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_minflt;
  }
  aet::ClientOptions client_options(unsigned workers) {
    aet::ClientOptions co;
    co.connect = address;
    co.min_workers = workers;
    co.max_workers = workers;
    return co;  // the default timeout (30 s): each call runs against one, as users' do
  }
};

// Runs `loop` until `done` or a generous bound; exits loudly on the bound.
void run_until(aet::Loop& loop, const std::function<bool()>& done, double limit = 120) {
  double deadline = now() + limit;
  while (!done()) {
    if (now() > deadline) {
      std::fprintf(stderr, "aet_bench: gave up waiting\n");
      std::exit(1);
    }
    loop.run_once(0.1);
  }
}

void on_error(const std::exception& e, const std::string&) {
  std::fprintf(stderr, "aet_bench: call failed: %s\n", e.what());
  std::exit(1);
}

// ---- alternating batches -------------------------------------------------------

// The library and its floor run in alternating batches, so that a change in
// the machine's load (other processes share its cores) hits both alike; each
// figure is the median over the batches of seconds per batch.
constexpr int batches = 10;

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  std::size_t n = values.size();
  return n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

// Runs each of `work` (callables returning the seconds a batch took) once
// per batch, in turn; returns their medians in the same order.
// With $AET_BENCH_ONLY=i (for profiling) only the i-th (from 0) runs.
std::vector<double> alternate(const std::vector<std::function<double()>>& work) {
  std::vector<std::vector<double>> times(work.size());
  const char* only = std::getenv("AET_BENCH_ONLY");
  for (int i = 0; i < batches; ++i)
    for (std::size_t w = 0; w < work.size(); ++w)
      times[w].push_back(!only || std::atoi(only) == static_cast<int>(w) ? work[w]() : 0.0);
  std::vector<double> medians;
  for (auto& t : times) medians.push_back(median(t));
  return medians;
}

// A raw echo process at the other end of a socketpair.
struct RawEcho {
  int fd = -1;
  pid_t child = -1;
  explicit RawEcho(const std::string& reply) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
    child = spawn_raw_echo(sv[1], reply);
    close(sv[1]);
    fd = sv[0];
  }
  ~RawEcho() {
    close(fd);
    reap(child);
  }
  RawEcho(const RawEcho&) = delete;
  RawEcho& operator=(const RawEcho&) = delete;
};

// Sequential echo calls of `arg` on one checkout of a one-worker client.
struct LibraryEcho {
  aet::Loop loop;
  aet::Client client;
  aet::Checkout checkout;
  aet::Json arg;
  std::size_t expected_size = 0;  // of a string result, if not 0
  int left = 0;
  std::function<void(aet::Checkout&, aet::Json)> next;

  LibraryEcho(const aet::ClientOptions& options, aet::Json argument)
      : client(loop, options), checkout(client.checkout()), arg(std::move(argument)) {
    // Each call sends back what the last one returned (as the raw echo
    // sends the same bytes again), moved rather than copied.
    next = [this](aet::Checkout& c, aet::Json r) {
      const aet::Json& echoed = r;
      if (expected_size && echoed.as_string().size() != expected_size) die("short echo");
      if (--left > 0) c.call("echo", args(std::move(r)), next);
    };
  }
  // [a], without copying a (an initializer list would copy it twice).
  static aet::Json args(aet::Json a) {
    aet::Json list = aet::Json::array();
    list.push_back(std::move(a));
    return list;
  }
  double batch(int count) {
    left = count;
    double t0 = now();
    aet::frame_try([&] { checkout.call("echo", args(arg), next); }, on_error);
    run_until(loop, [&] { return left == 0; });
    return now() - t0;
  }
};

// The same calls on the raw echo: `request` written, the reply read.
double raw_echo_batch(RawEcho& raw, RawReader& in, const std::string& request, std::size_t reply_size,
                      int count) {
  std::string_view body;
  double t0 = now();
  for (int i = 0; i < count; ++i) {
    write_all(raw.fd, request.data(), request.size());
    if (!in.next(body) || body.size() != reply_size) die("raw echo died");
  }
  return now() - t0;
}

// ---- rtt ---------------------------------------------------------------------

void bench_rtt(int n) {
  const std::string payload = "hello world";
  const std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", payload});
  const std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), payload});
  Bench b;
  LibraryEcho library(b.client_options(1), payload);
  RawEcho raw(reply);
  RawReader in(raw.fd);
  const int per_batch = std::max(1, n / batches);
  library.batch(1);  // connects the worker
  raw_echo_batch(raw, in, request, reply.size() - 4, 1);
  std::vector<double> t = alternate({
      [&] { return library.batch(per_batch); },
      [&] { return raw_echo_batch(raw, in, request, reply.size() - 4, per_batch); },
  });
  print("rtt_us", t[0] / per_batch * 1e6);
  print("floor_rtt_us", t[1] / per_batch * 1e6);
}

// ---- checkouts -----------------------------------------------------------------

// A client of `workers` workers on a loop of its own; a batch is `count`
// checkouts of one call, all queued at once.
struct LibraryPool {
  aet::Loop loop;
  aet::Client client;
  int served = 0;
  LibraryPool(Bench& b, unsigned workers) : client(loop, b.client_options(workers)) {}
  double batch(int count) {
    served = 0;
    double t0 = now();
    aet::frame_try(
        [&] {
          for (int i = 0; i < count; ++i)
            client.checkout().call("echo", {1}, [this](aet::Checkout&, aet::Json) { ++served; });
        },
        on_error);
    run_until(loop, [&] { return served == count; });
    return now() - t0;
  }
};

// The floor of a pool: `workers` raw echo processes, one request each in
// flight, a reply answered with "dn" and the next request in one write.
// It waits in poll() as the library's loop does, or, for `scale`, in
// epoll_wait(), whose cost does not grow with the number of descriptors:
// the two side by side show what the event mechanism costs at W = 500.
struct RawPool {
  enum class Wait { poll, epoll };
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", 1});
  std::string release = aet::encode_frame(aet::Json{"dn", aet::Json::object()});
  std::string release_and_request = release + request;
  std::vector<std::unique_ptr<RawEcho>> echoes;
  std::vector<RawReader> readers;
  std::vector<pollfd> polls;
  Wait wait;
  int epoll_fd = -1;
  std::vector<epoll_event> events;
  std::vector<std::size_t> ready;  // indices into echoes

  explicit RawPool(unsigned workers, Wait how = Wait::poll) : wait(how) {
    const std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), 1});
    if (wait == Wait::epoll && (epoll_fd = epoll_create1(EPOLL_CLOEXEC)) < 0) die("epoll_create1");
    for (unsigned i = 0; i < workers; ++i) {
      echoes.push_back(std::make_unique<RawEcho>(reply));
      readers.emplace_back(echoes.back()->fd);
      polls.push_back({echoes.back()->fd, POLLIN, 0});
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.u64 = i;
      if (wait == Wait::epoll && epoll_ctl(epoll_fd, EPOLL_CTL_ADD, echoes.back()->fd, &e) < 0) die("epoll_ctl");
    }
    if (wait == Wait::epoll) events.resize(workers);
  }
  ~RawPool() {
    if (epoll_fd >= 0) close(epoll_fd);
  }
  RawPool(const RawPool&) = delete;
  RawPool& operator=(const RawPool&) = delete;

  // Blocks until some echoes have replied; their indices in `ready`.
  void wait_for_replies() {
    ready.clear();
    if (wait == Wait::poll) {
      if (::poll(polls.data(), polls.size(), -1) < 0 && errno != EINTR) die("poll");
      for (std::size_t i = 0; i < polls.size(); ++i)
        if (polls[i].revents & POLLIN) ready.push_back(i);
      return;
    }
    const int n = epoll_wait(epoll_fd, events.data(), static_cast<int>(events.size()), -1);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    for (int i = 0; i < n; ++i) ready.push_back(static_cast<std::size_t>(events[static_cast<std::size_t>(i)].data.u64));
  }
  double batch(int count) {
    double t0 = now();
    int sent = 0, served = 0;
    for (pollfd& p : polls)
      if (sent < count) {
        write_all(p.fd, request.data(), request.size());
        ++sent;
      }
    std::string_view body;
    while (served < count) {
      wait_for_replies();
      for (std::size_t i : ready) {
        if (!readers[i].next(body, true)) die("raw echo died");
        ++served;
        const std::string& next = sent < count ? release_and_request : release;
        if (sent < count) ++sent;
        write_all(polls[i].fd, next.data(), next.size());
      }
    }
    return now() - t0;
  }
};

void bench_checkouts(int n, unsigned workers) {
  Bench b;
  LibraryPool library(b, workers);
  RawPool raw(workers);
  const int per_batch = std::max(1, n / batches);
  library.batch(static_cast<int>(workers) * 2);  // connects every worker
  raw.batch(static_cast<int>(workers) * 2);
  std::vector<double> t = alternate({
      [&] { return library.batch(per_batch); },
      [&] { return raw.batch(per_batch); },
  });
  print("checkouts_per_s", per_batch / t[0]);
  print("floor_checkouts_per_s", per_batch / t[1]);
}

// W workers beside 4 (each pool on its own loop, one server), in the same
// run: the ratio of the two is the target. The floor is measured the same
// way, W raw echoes beside 4, so that the floor's own ratio (what 500
// processes on this machine cost) stands next to the library's; and once
// more with W raw echoes waiting in epoll_wait() instead of poll().
void bench_scale(int n, unsigned workers) {
  Bench b;
  LibraryPool few(b, 4);
  LibraryPool many(b, workers);
  RawPool raw(workers);
  RawPool raw_few(4);
  RawPool raw_epoll(workers, RawPool::Wait::epoll);
  const int per_batch = std::max(1, n / batches);
  few.batch(8);
  many.batch(static_cast<int>(workers) * 2);
  raw.batch(static_cast<int>(workers) * 2);
  raw_few.batch(8);
  raw_epoll.batch(static_cast<int>(workers) * 2);
  std::vector<double> t = alternate({
      [&] { return many.batch(per_batch); },
      [&] { return few.batch(per_batch); },
      [&] { return raw.batch(per_batch); },
      [&] { return raw_few.batch(per_batch); },
      [&] { return raw_epoll.batch(per_batch); },
  });
  print("checkouts_per_s", per_batch / t[0]);
  print("w4_checkouts_per_s", per_batch / t[1]);
  print("floor_checkouts_per_s", per_batch / t[2]);
  print("floor_w4_checkouts_per_s", per_batch / t[3]);
  print("floor_epoll_checkouts_per_s", per_batch / t[4]);
}

// ---- spawn -----------------------------------------------------------------------

// A fresh worker for every checkout: max_checkouts 1, and min_workers 0 so
// that no worker is connected ahead of demand (each checkout pays a whole
// connect, accept and fork, as the floor does).
struct LibrarySpawn {
  aet::Loop loop;
  aet::Client client;
  int left = 0;
  std::function<void()> next;
  static aet::ClientOptions options(Bench& b) {
    aet::ClientOptions co = b.client_options(1);
    co.max_checkouts = 1;
    co.min_workers = 0;
    return co;
  }
  explicit LibrarySpawn(Bench& b) : client(loop, options(b)) {
    next = [this] {
      client.checkout().call("echo", {1}, [this](aet::Checkout&, aet::Json) {
        if (--left > 0) next();
      });
    };
  }
  double batch(int count) {
    left = count;
    double t0 = now();
    aet::frame_try([&] { next(); }, on_error);
    run_until(loop, [&] { return left == 0; });
    return now() - t0;
  }
};

// The floor: a forking server (waiting in poll(), one echo child per
// connection) and a client connecting afresh for each request.
struct RawSpawn {
  char dir[32] = "/tmp/aet-floor-XXXXXX";
  sockaddr_un addr{};
  std::string path;
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", 1});
  std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), 1});
  pid_t server = -1;

  RawSpawn() {
    if (!mkdtemp(dir)) die("mkdtemp");
    path = std::string(dir) + "/f.sock";
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 ||
        listen(listener, 128) < 0)
      die("listen");
    // What an echo child calls, called once here, before the forks: a lazy
    // binding would otherwise be looked up in every child (the library's
    // server does the same for its workers).
    {
      RawReader warm(-1);
      std::string_view none;
      (void)warm.next(none, true);
      char byte = 0;
      (void)::send(-1, &byte, 0, MSG_NOSIGNAL);
    }
    server = fork();
    if (server < 0) die("fork");
    if (server == 0) {
      signal(SIGCHLD, SIG_IGN);
      for (;;) {
        pollfd p{listener, POLLIN, 0};
        if (::poll(&p, 1, -1) < 0) continue;
        int c = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        pid_t w = fork();
        if (w == 0) {
          close(listener);
          RawReader in(c);
          std::string_view body;
          while (in.next(body)) write_all(c, reply.data(), reply.size());
          _exit(0);
        }
        close(c);
      }
    }
    close(listener);
  }
  ~RawSpawn() {
    kill(server, SIGKILL);
    reap(server);
    unlink(path.c_str());
    rmdir(dir);
  }
  double batch(int count) {
    std::string_view body;
    double t0 = now();
    for (int i = 0; i < count; ++i) {
      int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) die("connect");
      write_all(c, request.data(), request.size());
      RawReader in(c);
      if (!in.next(body)) die("floor echo died");
      close(c);
    }
    return now() - t0;
  }
};

void bench_spawn(int n) {
  Bench b;
  LibrarySpawn library(b);
  RawSpawn raw;
  const int per_batch = std::max(1, n / batches);
  library.batch(1);
  raw.batch(1);
  std::vector<double> t = alternate({
      [&] { return library.batch(per_batch); },
      [&] { return raw.batch(per_batch); },
  });
  print("spawn_us", t[0] / per_batch * 1e6);
  print("floor_spawn_us", t[1] / per_batch * 1e6);
  // What a fresh worker costs in page faults up to its first request: each
  // page it touches after the fork is mapped, or copied, one at a time.
  long faults = -1;
  aet::frame_try(
      [&] {
        library.client.checkout().call("page_faults", {},
                                       [&](aet::Checkout&, aet::Json r) { faults = static_cast<long>(r.as_int()); });
      },
      on_error);
  run_until(library.loop, [&] { return faults >= 0; });
  print("worker_faults_at_first_request", static_cast<double>(faults));
}

// ---- payload ---------------------------------------------------------------------

void bench_payload(std::size_t bytes, int rounds) {
  const std::string payload(bytes, 'x');
  const std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", payload});
  const std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), payload});
  Bench b;
  aet::ClientOptions co = b.client_options(1);
  co.max_frame = bytes * 2 + 1024;
  LibraryEcho library(co, payload);
  library.expected_size = bytes;
  RawEcho raw(reply);
  RawReader in(raw.fd);
  const int per_batch = std::max(1, rounds / batches);
  library.batch(1);
  raw_echo_batch(raw, in, request, reply.size() - 4, 1);
  std::vector<double> t = alternate({
      [&] { return library.batch(per_batch); },
      [&] { return raw_echo_batch(raw, in, request, reply.size() - 4, per_batch); },
  });
  // Both directions count.
  print("payload_mb_s", 2.0 * bytes * per_batch / t[0] / 1e6);
  print("floor_payload_mb_s", 2.0 * bytes * per_batch / t[1] / 1e6);
}

// ---- json ------------------------------------------------------------------------

// A mixed document of about `target` bytes: objects, arrays, escapes,
// non-ASCII text, integers and doubles, some nesting.
std::string mixed_document(std::size_t target) {
  std::mt19937_64 rng(42);
  const char* words[] = {"alpha", "b\\u00e9ta", "gamma \\\"quoted\\\"", "δέλτα", "εψιλον",
                         "line\\nbreak", "tab\\there", "😀 emoji", "plain ascii text", "日本語"};
  std::string out = "[";
  while (out.size() < target) {
    if (out.size() > 1) out += ',';
    out += "{\"id\":" + std::to_string(rng() % 1000000000) + ",\"name\":\"" + words[rng() % 10] +
           "\",\"score\":" + std::to_string(static_cast<double>(rng() % 100000) / 977.0) +
           ",\"tags\":[\"" + words[rng() % 10] + "\",\"" + words[rng() % 10] + "\"]" +
           ",\"nested\":{\"ok\":" + (rng() % 2 ? "true" : "false") + ",\"none\":null,\"depth\":[[1,2],[3,[4,5.5e-3]]]}}";
  }
  out += "]";
  return out;
}

// Seconds one run of `work` takes.
template <class F>
double seconds(F&& work) {
  double t0 = now();
  work();
  return now() - t0;
}

// The three libraries take turns (alternate()), so that a change in the
// machine's load hits them alike; each figure is the median of 10 turns.
void bench_json() {
  std::string text = mixed_document(8u << 20);
  print("json_document_mb", text.size() / 1e6);
  const double mb = text.size() / 1e6;
  std::vector<std::string> names = {"json_parse_mb_s", "json_dump_mb_s"};
  aet::Json doc;
  std::string dumped;
  std::vector<std::function<double()>> work = {
      [&] { return seconds([&] { doc = aet::Json::parse(text); }); },
      [&] { return seconds([&] { dumped = doc.dump(); }); },
  };
#ifdef AET_BENCH_NLOHMANN
  nlohmann::json n;
  names.insert(names.end(), {"nlohmann_parse_mb_s", "nlohmann_dump_mb_s"});
  work.push_back([&] { return seconds([&] { n = nlohmann::json::parse(text); }); });
  work.push_back([&] { return seconds([&] { dumped = n.dump(); }); });
#endif
#ifdef AET_BENCH_RAPIDJSON
  rapidjson::Document r;
  names.insert(names.end(), {"rapidjson_parse_mb_s", "rapidjson_dump_mb_s"});
  work.push_back([&] {
    return seconds([&] {
      r.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseFullPrecisionFlag>(text.c_str(), text.size());
      if (r.HasParseError()) die("rapidjson parse");
    });
  });
  work.push_back([&] {
    return seconds([&] {
      rapidjson::StringBuffer sb;
      rapidjson::Writer<rapidjson::StringBuffer> w(sb);
      r.Accept(w);
      dumped.assign(sb.GetString(), sb.GetSize());
    });
  });
#endif
  const std::vector<double> t = alternate(work);
  for (std::size_t i = 0; i < t.size(); ++i) print(names[i].c_str(), mb / t[i]);
}

// ---- memory ------------------------------------------------------------------------

long rss_kib(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      long kib;
      in >> kib;
      return kib;
    }
    in.ignore(1 << 20, '\n');
  }
  return -1;
}

void bench_memory() {
  // An idle worker's resident set, measured first: a server forked after
  // the pending checkouts below would inherit the heap they left behind.
  {
    Bench b;
    aet::Loop loop;
    aet::Client client(loop, b.client_options(1));
    pid_t worker = 0;
    aet::frame_try(
        [&] {
          client.checkout().call("echo", {0}, [&](aet::Checkout&, aet::Json) { worker = 1; });
        },
        on_error);
    run_until(loop, [&] { return worker != 0; });
    std::string pid = std::to_string(b.server.pid());
    std::ifstream children("/proc/" + pid + "/task/" + pid + "/children");
    long total = 0;
    int count = 0;
    for (pid_t kid; children >> kid; ++count) total += rss_kib(kid);
    if (count) print("idle_worker_rss_kib", static_cast<double>(total) / count);
  }
  // Pending checkouts: a client whose server never answers (nothing listens).
  {
    aet::Loop loop;
    aet::ClientOptions co;
    co.connect = "unix:/nonexistent/aet-bench.sock";  // the default timeout: each call has one running
    co.min_workers = 0;
    co.max_workers = 1;
    aet::Client client(loop, co);
    std::vector<aet::Checkout> held;
    held.reserve(20000);
    long before = rss_kib(getpid());
    for (int i = 0; i < 10000; ++i) {
      held.push_back(client.checkout());
      held.back().call("echo", {i}, [](aet::Checkout&, aet::Json) {});
    }
    loop.run_once(0);
    long after = rss_kib(getpid());
    print("pending_checkout_bytes", (after - before) * 1024.0 / 10000);
  }
}

int arg(int argc, char** argv, int i, int fallback) { return i < argc ? std::atoi(argv[i]) : fallback; }

void usage() {
  std::fputs("usage: aet_bench rtt N | checkouts N W | spawn N | payload BYTES | json | memory | scale W [N]\n",
             stderr);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage();
  signal(SIGPIPE, SIG_IGN);
  rlimit nofile{};
  getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);
  std::string what = argv[1];
  if (what == "rtt") {
    bench_rtt(arg(argc, argv, 2, 20000));
  } else if (what == "checkouts") {
    bench_checkouts(arg(argc, argv, 2, 20000), static_cast<unsigned>(arg(argc, argv, 3, 4)));
  } else if (what == "scale") {
    bench_scale(arg(argc, argv, 3, 20000), static_cast<unsigned>(arg(argc, argv, 2, 500)));
  } else if (what == "spawn") {
    bench_spawn(arg(argc, argv, 2, 300));
  } else if (what == "payload") {
    std::size_t bytes = static_cast<std::size_t>(arg(argc, argv, 2, 1 << 20));
    bench_payload(bytes, static_cast<int>(std::max<std::size_t>(batches, (256u << 20) / bytes)));
  } else if (what == "json") {
    bench_json();
  } else if (what == "memory") {
    bench_memory();
  } else {
    usage();
  }
  return 0;
}
