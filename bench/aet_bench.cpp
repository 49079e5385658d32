// aet_bench: the library's figures next to a floor measured in the same run.
//
//   aet_bench rtt N            sequential echo calls on one checkout
//   aet_bench checkouts N W    N checkouts of one call each over W workers
//   aet_bench spawn N          a fresh worker for every checkout
//   aet_bench payload BYTES    echo of a string of that size
//   aet_bench json             parse and dump throughput (and peers if installed)
//   aet_bench memory           client memory per pending checkout, idle worker RSS
//   aet_bench scale W          checkouts per second with W workers
//
// Each prints `name value` lines. A floor is the same exchange done with raw
// sockets and no library: the cost of the kernel and the processes alone.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
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

// Reads one frame (header + body) into `body`, waiting in poll(); false on EOF.
bool read_frame(int fd, std::string& body) {
  auto read_exact = [fd](char* out, std::size_t size) {
    while (size > 0) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, -1) < 0 && errno != EINTR) die("poll");
      ssize_t n = ::read(fd, out, size);
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
      if (n <= 0) return false;
      out += n;
      size -= static_cast<std::size_t>(n);
    }
    return true;
  };
  unsigned char header[4];
  if (!read_exact(reinterpret_cast<char*>(header), 4)) return false;
  std::size_t size = (std::size_t{header[0]} << 24) | (std::size_t{header[1]} << 16) |
                     (std::size_t{header[2]} << 8) | header[3];
  body.resize(size);
  return read_exact(body.data(), size);
}

// A raw echo process: answers every frame that is not a "dn" with `reply`.
pid_t spawn_raw_echo(int fd, const std::string& reply) {
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid == 0) {
    // Keep only our end: a peer end held here would hide the parent's close.
    for (int other = 3; other < 4096; ++other)
      if (other != fd) close(other);
    std::string body;
    while (read_frame(fd, body)) {
      if (body.compare(0, 5, "[\"dn\"") == 0) continue;
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
    so.hung_worker_timeout = 0;
    so.interface = aet::Methods{{"echo", [](const aet::Json& args) -> aet::Json { return args[0]; }}};
    return so;
  }
  aet::ClientOptions client_options(unsigned workers) {
    aet::ClientOptions co;
    co.connect = address;
    co.min_workers = workers;
    co.max_workers = workers;
    co.timeout = aet::forever;
    return co;
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

// ---- rtt ---------------------------------------------------------------------

double library_rtt_us(int n, const std::string& payload) {
  Bench b;
  aet::Loop loop;
  aet::Client client(loop, b.client_options(1));
  aet::Checkout co = client.checkout();
  int done = 0;
  double t0 = 0;
  std::function<void(aet::Checkout&, aet::Json)> next = [&](aet::Checkout& c, aet::Json) {
    if (done == 0) t0 = now();  // the first call connects the worker: not timed
    if (++done <= n) c.call("echo", {payload}, next);
  };
  aet::frame_try([&] { co.call("echo", {payload}, next); }, on_error);
  run_until(loop, [&] { return done > n; });
  return (now() - t0) / n * 1e6;
}

double floor_rtt_us(int n, const std::string& payload) {
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", payload});
  std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), payload});
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  pid_t child = spawn_raw_echo(sv[1], reply);
  close(sv[1]);
  std::string body;
  double t0 = 0;
  for (int i = 0; i <= n; ++i) {
    if (i == 1) t0 = now();
    write_all(sv[0], request.data(), request.size());
    if (!read_frame(sv[0], body)) die("echo died");
  }
  double us = (now() - t0) / n * 1e6;
  close(sv[0]);
  reap(child);
  return us;
}

// ---- checkouts -----------------------------------------------------------------

double library_checkouts_per_s(int n, unsigned workers) {
  Bench b;
  aet::Loop loop;
  aet::Client client(loop, b.client_options(workers));
  int served = 0;
  auto round = [&](int count) {
    served = 0;
    aet::frame_try(
        [&] {
          for (int i = 0; i < count; ++i)
            client.checkout().call("echo", {1}, [&](aet::Checkout&, aet::Json) { ++served; });
        },
        on_error);
    run_until(loop, [&] { return served == count; });
  };
  round(static_cast<int>(workers) * 2);  // connect every worker first
  double t0 = now();
  round(n);
  return n / (now() - t0);
}

double floor_checkouts_per_s(int n, unsigned workers) {
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", 1});
  std::string release = aet::encode_frame(aet::Json{"dn", aet::Json::object()});
  std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), 1});
  std::vector<int> fds;
  std::vector<pid_t> kids;
  for (unsigned i = 0; i < workers; ++i) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
    kids.push_back(spawn_raw_echo(sv[1], reply));
    close(sv[1]);
    fds.push_back(sv[0]);
  }
  double t0 = now();
  int sent = 0, served = 0;
  std::vector<pollfd> polls;
  for (int fd : fds) {
    if (sent < n) {
      write_all(fd, request.data(), request.size());
      ++sent;
    }
    polls.push_back({fd, POLLIN, 0});
  }
  std::string body;
  while (served < n) {
    if (::poll(polls.data(), polls.size(), -1) < 0 && errno != EINTR) die("poll");
    for (pollfd& p : polls) {
      if (!(p.revents & POLLIN)) continue;
      if (!read_frame(p.fd, body)) die("echo died");
      ++served;
      std::string next = release;
      if (sent < n) {
        next += request;
        ++sent;
      }
      write_all(p.fd, next.data(), next.size());
    }
  }
  double rate = n / (now() - t0);
  for (int fd : fds) close(fd);
  for (pid_t k : kids) reap(k);
  return rate;
}

// ---- spawn -----------------------------------------------------------------------

double library_spawn_us(int n) {
  Bench b;
  aet::Loop loop;
  aet::ClientOptions co = b.client_options(1);
  co.max_checkouts = 1;
  co.min_workers = 1;
  aet::Client client(loop, co);
  int done = 0;
  double t0 = 0;
  std::function<void()> next = [&] {
    client.checkout().call("echo", {1}, [&](aet::Checkout&, aet::Json) {
      if (done == 0) t0 = now();
      if (++done <= n) next();
    });
  };
  aet::frame_try([&] { next(); }, on_error);
  run_until(loop, [&] { return done > n; });
  return (now() - t0) / n * 1e6;
}

double floor_spawn_us(int n) {
  char dir[] = "/tmp/aet-floor-XXXXXX";
  if (!mkdtemp(dir)) die("mkdtemp");
  std::string path = std::string(dir) + "/f.sock";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 ||
      listen(listener, 128) < 0)
    die("listen");
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", 1});
  std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), 1});
  pid_t server = fork();
  if (server == 0) {  // a forking server: one echo child per connection
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
      int c = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      pid_t w = fork();
      if (w == 0) {
        close(listener);
        std::string body;
        while (read_frame(c, body)) write_all(c, reply.data(), reply.size());
        _exit(0);
      }
      close(c);
    }
  }
  close(listener);
  std::string body;
  double t0 = 0;
  for (int i = 0; i <= n; ++i) {
    if (i == 1) t0 = now();
    int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) die("connect");
    write_all(c, request.data(), request.size());
    if (!read_frame(c, body)) die("floor echo died");
    close(c);
  }
  double us = (now() - t0) / n * 1e6;
  kill(server, SIGKILL);
  reap(server);
  unlink(path.c_str());
  rmdir(dir);
  return us;
}

// ---- payload ---------------------------------------------------------------------

double library_payload_mb_s(std::size_t bytes, int rounds) {
  std::string payload(bytes, 'x');
  Bench b;
  aet::Loop loop;
  aet::ClientOptions co = b.client_options(1);
  co.max_frame = bytes * 2 + 1024;
  aet::Client client(loop, co);
  aet::Checkout c = client.checkout();
  int done = 0;
  double t0 = 0;
  std::function<void(aet::Checkout&, aet::Json)> next = [&](aet::Checkout& k, aet::Json r) {
    if (done > 0 && r.as_string().size() != bytes) die("short echo");
    if (done == 0) t0 = now();
    if (++done <= rounds) k.call("echo", {payload}, next);
  };
  aet::frame_try([&] { c.call("echo", {payload}, next); }, on_error);
  run_until(loop, [&] { return done > rounds; });
  return 2.0 * bytes * rounds / (now() - t0) / 1e6;  // both directions
}

double floor_payload_mb_s(std::size_t bytes, int rounds) {
  std::string payload(bytes, 'x');
  std::string request = aet::encode_frame(aet::Json{"do", aet::Json::object(), "echo", payload});
  std::string reply = aet::encode_frame(aet::Json{"ok", aet::Json::object(), payload});
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) die("socketpair");
  pid_t child = spawn_raw_echo(sv[1], reply);
  close(sv[1]);
  std::string body;
  double t0 = 0;
  for (int i = 0; i <= rounds; ++i) {
    if (i == 1) t0 = now();
    write_all(sv[0], request.data(), request.size());
    if (!read_frame(sv[0], body)) die("echo died");
  }
  double rate = 2.0 * bytes * rounds / (now() - t0) / 1e6;
  close(sv[0]);
  reap(child);
  return rate;
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

template <class F>
double mb_per_s(std::size_t bytes, F&& work) {
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    double t0 = now();
    work();
    double rate = bytes / (now() - t0) / 1e6;
    if (rate > best) best = rate;
  }
  return best;
}

void bench_json() {
  std::string text = mixed_document(8u << 20);
  print("json_document_mb", text.size() / 1e6);
  aet::Json doc;
  print("json_parse_mb_s", mb_per_s(text.size(), [&] { doc = aet::Json::parse(text); }));
  std::string dumped;
  print("json_dump_mb_s", mb_per_s(text.size(), [&] { dumped = doc.dump(); }));
#ifdef AET_BENCH_NLOHMANN
  nlohmann::json n;
  print("nlohmann_parse_mb_s", mb_per_s(text.size(), [&] { n = nlohmann::json::parse(text); }));
  print("nlohmann_dump_mb_s", mb_per_s(text.size(), [&] { dumped = n.dump(); }));
#endif
#ifdef AET_BENCH_RAPIDJSON
  rapidjson::Document r;
  print("rapidjson_parse_mb_s", mb_per_s(text.size(), [&] {
          r.Parse<rapidjson::kParseValidateEncodingFlag | rapidjson::kParseFullPrecisionFlag>(text.c_str(),
                                                                                             text.size());
          if (r.HasParseError()) die("rapidjson parse");
        }));
  print("rapidjson_dump_mb_s", mb_per_s(text.size(), [&] {
          rapidjson::StringBuffer sb;
          rapidjson::Writer<rapidjson::StringBuffer> w(sb);
          r.Accept(w);
          dumped.assign(sb.GetString(), sb.GetSize());
        }));
#endif
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
  // Pending checkouts: a client whose server never answers (nothing listens).
  {
    aet::Loop loop;
    aet::ClientOptions co;
    co.connect = "unix:/nonexistent/aet-bench.sock";
    co.timeout = aet::forever;
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
  // An idle worker's resident set.
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
}

int arg(int argc, char** argv, int i, int fallback) { return i < argc ? std::atoi(argv[i]) : fallback; }

void usage() {
  std::fputs("usage: aet_bench rtt N | checkouts N W | spawn N | payload BYTES | json | memory | scale W\n", stderr);
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
    int n = arg(argc, argv, 2, 20000);
    std::string payload = "hello world";
    print("rtt_us", library_rtt_us(n, payload));
    print("floor_rtt_us", floor_rtt_us(n, payload));
  } else if (what == "checkouts" || what == "scale") {
    int n = what == "scale" ? 20000 : arg(argc, argv, 2, 20000);
    unsigned w = static_cast<unsigned>(what == "scale" ? arg(argc, argv, 2, 500) : arg(argc, argv, 3, 4));
    print("checkouts_per_s", library_checkouts_per_s(n, w));
    print("floor_checkouts_per_s", floor_checkouts_per_s(n, w));
  } else if (what == "spawn") {
    int n = arg(argc, argv, 2, 500);
    print("spawn_us", library_spawn_us(n));
    print("floor_spawn_us", floor_spawn_us(n));
  } else if (what == "payload") {
    std::size_t bytes = static_cast<std::size_t>(arg(argc, argv, 2, 1 << 20));
    int rounds = static_cast<int>(std::max<std::size_t>(10, (256u << 20) / bytes));
    print("payload_mb_s", library_payload_mb_s(bytes, rounds));
    print("floor_payload_mb_s", floor_payload_mb_s(bytes, rounds));
  } else if (what == "json") {
    bench_json();
  } else if (what == "memory") {
    bench_memory();
  } else {
    usage();
  }
  return 0;
}
