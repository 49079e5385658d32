// anyevent_task.hpp - blocking code for event-driven programs, through a pool
// of forked worker processes.
//
// A server forks one worker process per connection. An asynchronous client
// keeps a pool of such connections and hands one worker out exclusively as a
// checkout; calls on a checkout travel as length-prefixed JSON, and replies
// and errors come back to callbacks. Errors reach the right handler through
// frames: error handlers that travel with a callback. LogDefer collects a
// structured log per request and merges the worker's log into the client's.
// POSIX only, C++17, no dependency beyond libc. The C++ successor of Perl's
// AnyEvent::Task.
//
// Quick start
//
//   aet::ServerOptions so;
//   so.listen = "unix:/tmp/hasher.sock";
//   so.interface = aet::Methods{
//       {"hash", [](const aet::Json& args) { return slow_hash(args[0].as_string()); }}};
//   auto server = aet::fork_task_server(so);       // ends when `server` is dropped
//
//   aet::Loop loop;
//   aet::Client client(loop, {"unix:/tmp/hasher.sock"});
//   client.checkout().call("hash", {"secret"}, [&](aet::Checkout&, aet::Json h) {
//     std::puts(h.as_string().c_str()); loop.stop(); });
//   loop.run();
//
// Configuration macros (define before including)
//
//   AET_DEFAULT_MAX_FRAME   largest frame accepted by default (64 MiB)
//   AET_DEFAULT_MAX_DEPTH   JSON nesting limit by default (512)
//
// Licence: MIT. Copyright (c) 2026 the anyevent_task authors; see LICENSE.
//
// Map of this file: the public declarations, section by section, in the
// order errors & frames, json, log_defer, loop, protocol, server, client;
// then the implementation of each section, in the same order, with its
// internals in aet::detail.

#ifndef ANYEVENT_TASK_HPP
#define ANYEVENT_TASK_HPP

#include <poll.h>
#include <sys/types.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#ifndef AET_DEFAULT_MAX_FRAME
#define AET_DEFAULT_MAX_FRAME (64u * 1024u * 1024u)
#endif
#ifndef AET_DEFAULT_MAX_DEPTH
#define AET_DEFAULT_MAX_DEPTH 512u
#endif

namespace aet {

// ===========================================================================
// Errors & frames
//
// Owns the exception hierarchy and frames: error handlers and frame-local
// bindings captured where a callback is created and restored whenever it
// runs. Knows nothing of JSON, sockets or loops; everything below uses it.
// ===========================================================================

// Every exception the library throws derives from aet::Error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A system call failed; code() is the errno value.
class SystemError : public Error {
 public:
  SystemError(const std::string& what, int code);
  int code() const noexcept { return code_; }

 private:
  int code_;
};

// A handler given to frame() or frame_try(): the exception and the trace,
// frames innermost first, one "file:line - NAME" per line.
using Catcher = std::function<void(const std::exception& error, const std::string& trace)>;

namespace detail {
struct FrameNode;
}

// A snapshot of the frames in force at one point: what a framed callable
// restores when it runs.
class FrameContext {
 public:
  FrameContext() = default;  // the empty context: no catcher, no binding
  // Delivers `error` to the innermost catcher of this context, as if a
  // callback created here had thrown it; with no catcher left it rethrows.
  void raise(std::exception_ptr error) const;
  // Runs `code` with this context in force (catchers apply to its throws).
  void run(const std::function<void()>& code) const;
  explicit operator bool() const noexcept { return node_ != nullptr; }

 private:
  friend FrameContext current_frame();
  template <class T>
  friend class FrameLocal;
  friend struct detail::FrameNode;
  explicit FrameContext(std::shared_ptr<detail::FrameNode> node) : node_(std::move(node)) {}
  std::shared_ptr<detail::FrameNode> node_;
};

// The frames in force right now.
FrameContext current_frame();

namespace detail {
// Creates a child frame of the current one (used by frame() and frame_try()).
FrameContext push_frame(Catcher catcher, std::string name, const char* file, int line);
}  // namespace detail

// A callable wrapped in a frame. Calling it restores the frame it was made
// in; an exception escaping `code` goes to that frame's catchers.
template <class F>
class Framed {
 public:
  Framed(F code, FrameContext context) : code_(std::move(code)), context_(std::move(context)) {}
  template <class... Args>
  void operator()(Args&&... args);
  const FrameContext& context() const noexcept { return context_; }

 private:
  F code_;
  FrameContext context_;
};

// True for Framed<...>: library code never wraps a framed callable twice.
template <class F>
struct is_framed : std::false_type {};
template <class F>
struct is_framed<Framed<F>> : std::true_type {};

// Wraps `code` in a new frame with `catcher` (may be empty) named `name`.
template <class F>
auto frame(F code, Catcher catcher = {}, std::string name = {},
           const char* file = __builtin_FILE(), int line = __builtin_LINE());

// Wraps `code` so that it runs with the frames in force here ("frame
// unless framed": a framed callable is returned as it is).
template <class F>
auto fub(F code, const char* file = __builtin_FILE(), int line = __builtin_LINE());

// Runs `code` at once inside a new frame with `catcher`.
void frame_try(const std::function<void()>& code, Catcher catcher, std::string name = {},
               const char* file = __builtin_FILE(), int line = __builtin_LINE());

// A frame-local variable of type T. bind(value, code) runs `code` in a new
// frame where get() sees `value`; callbacks created inside see it too,
// whenever they run, and nothing outside does.
template <class T>
class FrameLocal {
 public:
  template <class F>
  void bind(T value, F&& code, const char* file = __builtin_FILE(), int line = __builtin_LINE());
  const T* get() const;  // nullptr where unbound
  T value_or(T fallback) const {
    const T* v = get();
    return v ? *v : fallback;
  }
};

template <class T, class F>
void frame_local(FrameLocal<T>& variable, T value, F&& code) {
  variable.bind(std::move(value), std::forward<F>(code));
}

// ===========================================================================
// JSON
//
// Owns aet::Json: the value type, its parser and its printer. Strict: UTF-8
// is validated both ways, nesting is bounded, NaN is refused. Uses only the
// errors above.
// ===========================================================================

// Wrong type, missing key, unprintable value.
class JsonError : public Error {
 public:
  using Error::Error;
};

// Text that is not JSON; where() is a byte offset, line and column from 1.
class JsonParseError : public JsonError {
 public:
  JsonParseError(const std::string& what, std::size_t offset, std::size_t line, std::size_t column);
  std::size_t offset() const noexcept { return offset_; }
  std::size_t line() const noexcept { return line_; }
  std::size_t column() const noexcept { return column_; }

 private:
  std::size_t offset_, line_, column_;
};

class Json {
 public:
  enum class Type : std::uint8_t { Null, Bool, Int, Double, String, Array, Object };
  using Array = std::vector<Json>;
  // Insertion order is kept; keys are unique (parse rejects duplicates).
  using Object = std::vector<std::pair<std::string, Json>>;

  struct ParseOptions {
    std::size_t max_depth = AET_DEFAULT_MAX_DEPTH;
  };

  Json() noexcept;  // null
  Json(std::nullptr_t) noexcept;
  Json(bool value) noexcept;
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Json(T value);  // unsigned values above INT64_MAX become doubles
  Json(double value) noexcept;
  Json(const char* value);
  Json(std::string value);
  Json(std::string_view value);
  Json(Array value);
  Json(Object value);
  // Always an array, whatever the elements: Json{a, b} is [a, b]. Copy a
  // value with Json(v) or `= v`, never with braces.
  Json(std::initializer_list<Json> elements);
  static Json array(std::initializer_list<Json> elements = {});
  static Json object(std::initializer_list<std::pair<std::string, Json>> members = {});

  Json(const Json&);
  Json(Json&&) noexcept;
  Json& operator=(const Json&);
  Json& operator=(Json&&) noexcept;
  ~Json();

  Type type() const noexcept;
  bool is_null() const noexcept;
  bool is_bool() const noexcept;
  bool is_int() const noexcept;
  bool is_double() const noexcept;
  bool is_number() const noexcept;  // int or double
  bool is_string() const noexcept;
  bool is_array() const noexcept;
  bool is_object() const noexcept;

  // Typed access; a wrong type throws JsonError("expected string, got number").
  bool as_bool() const;
  std::int64_t as_int() const;  // a double with an integral value in range is accepted
  double as_double() const;     // an int converts
  const std::string& as_string() const;
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  // Arrays and objects. size() is 0 for scalars.
  std::size_t size() const noexcept;
  bool empty() const noexcept;
  const Json& operator[](std::size_t index) const;  // throws JsonError out of range
  Json& operator[](std::size_t index);
  const Json& operator[](std::string_view key) const;  // throws JsonError when missing
  Json& operator[](std::string_view key);              // inserts null; null becomes {}
  const Json* find(std::string_view key) const;        // nullptr when missing
  Json* find(std::string_view key);
  bool contains(std::string_view key) const;
  void push_back(Json value);  // null becomes []

  friend bool operator==(const Json& a, const Json& b);
  friend bool operator!=(const Json& a, const Json& b) { return !(a == b); }

  // Compact when indent < 0, else pretty with `indent` spaces. Throws
  // JsonError for NaN, infinities and strings that are not UTF-8.
  std::string dump(int indent = -1) const;
  void dump_to(std::string& out, int indent = -1) const;

  static Json parse(std::string_view text, const ParseOptions& options);
  static Json parse(std::string_view text);

 private:
  // Implementation-defined storage; see the JSON implementation section.
  Type type_ = Type::Null;
  union Storage {
    bool boolean;
    std::int64_t integer;
    double number;
    std::string* string;
    Array* array;
    Object* object;
  } value_{};
  void destroy() noexcept;
};

const char* to_string(Json::Type type) noexcept;  // "null", "boolean", "number", ...

// ===========================================================================
// LogDefer
//
// Owns aet::LogDefer, a structured log for one request in the format of
// Perl's Log::Defer, delivered once as a JSON message when its last handle
// is dropped, and aet::logger(), the per-request log inside a worker. Uses
// errors and json only.
// ===========================================================================

namespace detail {
struct LogDeferState;
}

class LogDefer {
 public:
  enum Level : int { error_level = 10, warn_level = 20, info_level = 30, debug_level = 40 };
  using Callback = std::function<void(const Json& message)>;

  // The message reaches `on_done` when the last copy of this handle goes.
  explicit LogDefer(Callback on_done);
  LogDefer(const LogDefer&) = default;
  LogDefer(LogDefer&&) noexcept = default;
  LogDefer& operator=(const LogDefer&) = default;
  LogDefer& operator=(LogDefer&&) noexcept = default;
  ~LogDefer() = default;

  // One entry [t, level, items...]; each item becomes Json. A single
  // callable item is called only when the level passes verbosity (lazy).
  template <class... Items>
  void error(Items&&... items) { log(error_level, std::forward<Items>(items)...); }
  template <class... Items>
  void warn(Items&&... items) { log(warn_level, std::forward<Items>(items)...); }
  template <class... Items>
  void info(Items&&... items) { log(info_level, std::forward<Items>(items)...); }
  template <class... Items>
  void debug(Items&&... items) { log(debug_level, std::forward<Items>(items)...); }
  void add_log(int level, Json::Array items);

  // Entries above this level are dropped (default: debug, everything kept).
  void verbosity(int level);
  int verbosity() const;
  bool enabled(int level) const { return level <= verbosity(); }

  // A timer [name, t0, t1] that ends when the guard goes.
  class Timer {
   public:
    Timer(Timer&&) noexcept;
    Timer& operator=(Timer&&) noexcept;
    Timer(const Timer&) = delete;
    Timer& operator=(const Timer&) = delete;
    ~Timer();
    void finish();  // ends it early

   private:
    friend class LogDefer;
    Timer(std::shared_ptr<detail::LogDeferState> state, std::size_t index);
    std::shared_ptr<detail::LogDeferState> state_;
    std::size_t index_ = 0;
  };
  Timer timer(std::string name);

  Json& data();  // free-form "data" object

  // Adds another LogDefer message: its logs and timers are moved onto this
  // message's time axis, logs kept in time order; its data merged in. If
  // the message carries "pid", each of its entries gets {"pid": N} appended.
  void merge(const Json& message);

  Json message() const;  // the message as it would be delivered now

 private:
  template <class... Items>
  void log(int level, Items&&... items);
  std::shared_ptr<detail::LogDeferState> state_;
};

// Inside a worker: the LogDefer of the request being served; its message
// rides back in the reply. Outside a request, a log that goes nowhere.
LogDefer& logger();

namespace detail {
// Used by a worker around each request: a fresh logger() before it, and
// after it the message (with "pid": getpid()) to send back as meta "ld", or
// null when nothing was logged; logger() is the log to nowhere again.
void begin_request_log();
Json end_request_log();
}  // namespace detail

// ===========================================================================
// Loop
//
// Owns the poll(2) event loop and the small interface through which the
// client runs on any loop (EventHost), plus RAII io watchers and timers.
// Knows nothing of protocols, servers or clients. Single-threaded: a loop
// and everything registered on it belong to one thread.
// ===========================================================================

enum IoEvents : unsigned { io_read = 1u, io_write = 2u };

// What the client needs from an event loop. aet::Loop implements it; an
// adapter for epoll, libuv or asio implements these five calls (see
// tests/epoll_host.hpp for a complete one on epoll).
//
// The contract an implementation keeps:
// - ids are never 0 and never reused while the host lives;
// - remove_io / stop_timer of an id that is gone (removed, or a one-shot
//   timer that fired) do nothing;
// - any of the five calls may be made from inside any callback; a watcher
//   or timer removed there is not called again, even if it was ready in the
//   same round, and one added there waits for the next round;
// - a callback may destroy the object that registered it, so the host keeps
//   its own reference to a callback while calling it;
// - readiness is level-triggered: an interest is reported while it holds.
class EventHost {
 public:
  using Id = std::uint64_t;
  using IoCallback = std::function<void(unsigned events)>;  // io_read | io_write
  using TimerCallback = std::function<void()>;
  virtual ~EventHost() = default;

  // `events` is io_read, io_write, both, or 0 (registered, not watched).
  // Errors and hang-ups are reported as io_read to a read interest and as
  // io_write to a write interest, so a writer notices a dead peer.
  virtual Id add_io(int fd, unsigned events, IoCallback callback) = 0;
  virtual void modify_io(Id id, unsigned events) = 0;
  virtual void remove_io(Id id) = 0;
  // Fires `after` seconds from now (<= 0: at the next round); one shot when
  // repeat <= 0, else every `repeat` seconds after the first, on the
  // deadline grid (no cumulative drift; missed periods are skipped).
  virtual Id start_timer(double after, double repeat, TimerCallback callback) = 0;
  virtual void stop_timer(Id id) = 0;
};

// An io interest that is removed when the watcher goes. Move-only; the host
// must outlive it. Resetting or destroying it inside its own callback is safe.
class IoWatcher {
 public:
  IoWatcher() = default;
  IoWatcher(EventHost& host, int fd, unsigned events, EventHost::IoCallback callback);
  IoWatcher(IoWatcher&& other) noexcept;
  IoWatcher& operator=(IoWatcher&& other) noexcept;
  IoWatcher(const IoWatcher&) = delete;
  IoWatcher& operator=(const IoWatcher&) = delete;
  ~IoWatcher() { reset(); }
  void set_events(unsigned events);  // throws aet::Error on an empty watcher
  unsigned events() const noexcept { return events_; }
  void reset() noexcept;  // removes the interest now
  explicit operator bool() const noexcept { return host_ != nullptr; }

 private:
  EventHost* host_ = nullptr;
  EventHost::Id id_ = 0;
  unsigned events_ = 0;
};

// A timer that is stopped when the guard goes (a one-shot timer that fired
// is simply gone; resetting the guard then does nothing). Move-only; the
// host must outlive it. Resetting it inside its own callback is safe.
class Timer {
 public:
  Timer() = default;
  Timer(EventHost& host, double after, double repeat, EventHost::TimerCallback callback);
  Timer(Timer&& other) noexcept;
  Timer& operator=(Timer&& other) noexcept;
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() { reset(); }
  void reset() noexcept;
  explicit operator bool() const noexcept { return host_ != nullptr; }

 private:
  EventHost* host_ = nullptr;
  EventHost::Id id_ = 0;
};

namespace detail {
struct LoopState;
}

// The poll(2) loop. run() is prepare() + poll() + process() in a loop, the
// same calls an application with its own poll loop makes. Timers run on
// CLOCK_MONOTONIC; timers with the same deadline fire in the order they
// were started. An exception thrown by a callback propagates out of
// process() / run_once() / run(); the loop stays consistent and usable
// (the rest of that round is served by the next one). Watchers and timers
// must not outlive the loop.
class Loop : public EventHost {
 public:
  Loop();
  ~Loop() override;
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  // Several interests on one fd are allowed; each gets its own events.
  // Throws aet::Error for a negative fd, unknown event bits, an empty
  // callback, or modify_io of an id that is not registered.
  Id add_io(int fd, unsigned events, IoCallback callback) override;
  void modify_io(Id id, unsigned events) override;
  void remove_io(Id id) override;
  Id start_timer(double after, double repeat, TimerCallback callback) override;
  // The same with an absolute deadline on the now() clock: timers started
  // with one deadline fire together, in the order they were started.
  Id start_timer_at(double deadline, double repeat, TimerCallback callback);
  void stop_timer(Id id) override;

  IoWatcher io(int fd, unsigned events, IoCallback callback) {
    return IoWatcher(*this, fd, events, std::move(callback));
  }
  Timer after(double seconds, TimerCallback callback) {
    return Timer(*this, seconds, 0, std::move(callback));
  }
  Timer every(double seconds, TimerCallback callback) {
    return Timer(*this, seconds, seconds, std::move(callback));
  }

  // Until stop() or nothing is left to wait for (no interest with events,
  // no timer). A stop() made before run() does not count.
  void run();
  // One poll of at most `timeout` seconds (< 0: until something happens),
  // then the dispatch. False, at once, when there was nothing to wait for
  // and the timeout is infinite. run() and run_once() may not be called
  // from inside one of this loop's callbacks (aet::Error).
  bool run_once(double timeout = -1);
  void stop();  // makes run() return after the current dispatch

  // Embedding (the pull style of c-ares and curl_multi_waitfds). Before
  // your poll(): prepare() appends one entry per fd this loop watches (the
  // events of its interests OR'ed) and returns the timeout it needs in ms,
  // rounded up (-1: none; 0: a timer is due). Lower your timeout to it.
  int prepare(std::vector<pollfd>& fds);
  // After poll(): hand back the entries, anywhere in your array, in any
  // order (entries for other fds are ignored). Dispatches the readiness to
  // the interests the last prepare() polled, then runs the due timers.
  void process(const pollfd* fds, std::size_t count);
  void process(const std::vector<pollfd>& fds) { process(fds.data(), fds.size()); }

  static double now();  // monotonic seconds (CLOCK_MONOTONIC)

 private:
  std::unique_ptr<detail::LoopState> state_;
};

// ===========================================================================
// Protocol
//
// Owns the wire format: a frame is a 4-byte big-endian length and that many
// bytes of JSON holding one array, ["do"|"dn"|"ok"|"er", {meta}, ...]. Owns
// encoding, incremental decoding and shape checks; no sockets, no loop.
// ===========================================================================

class ProtocolError : public Error {
 public:
  using Error::Error;
};

constexpr std::size_t default_max_frame = AET_DEFAULT_MAX_FRAME;

// Appends one frame holding `message` to `out`.
void append_frame(std::string& out, const Json& message);
std::string encode_frame(const Json& message);

// Throws ProtocolError unless `message` is a well-formed do/dn/ok/er array.
void check_message(const Json& message);

// Takes bytes in any chunking and yields whole, shape-checked messages.
class FrameDecoder {
 public:
  explicit FrameDecoder(std::size_t max_frame = default_max_frame,
                        std::size_t max_depth = AET_DEFAULT_MAX_DEPTH);
  // Throws ProtocolError as soon as a header announces an oversize frame.
  void feed(const char* data, std::size_t size);
  void feed(std::string_view bytes) { feed(bytes.data(), bytes.size()); }
  // The next whole message, or nothing yet; ProtocolError on a bad one.
  std::optional<Json> next();
  std::size_t buffered() const noexcept;  // bytes held, not yet yielded

 private:
  std::size_t max_frame_, max_depth_;
  std::string buffer_;
  std::size_t read_pos_ = 0;
};

// ===========================================================================
// Server
//
// Owns the listening socket, the fork of one worker per connection, the
// worker's request loop, signals and reaping. Uses json, log_defer, loop
// and protocol; knows nothing of the client.
// ===========================================================================

class ServerError : public Error {
 public:
  using Error::Error;
};

using Method = std::function<Json(const Json& args)>;  // args after the method name
using Methods = std::map<std::string, Method, std::less<>>;
using CatchAll = std::function<Json(const Json& args)>;  // every argument
using Interface = std::variant<Methods, CatchAll>;

struct ServerOptions {
  std::string listen;                 // "unix:PATH", "tcp:HOST:PORT", "tcp:[V6]:PORT"
  std::string name = "aet";           // process titles aet-server:NAME, aet-worker:NAME
  std::function<void()> setup;        // once per worker, lazily, retried after a throw
  std::function<void()> checkout_done;  // a checkout was released normally ("dn")
  double hung_worker_timeout = 300;   // seconds a request may run; 0: no limit
  Interface interface;                // method table or catch-all
  unsigned socket_mode = 0600;        // Unix socket file permissions
  std::size_t max_frame = default_max_frame;
};

namespace detail {
struct ServerState;
}

class Server {
 public:
  // Binds and listens at once (so a TCP port 0 is known); throws ServerError.
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The address bound, with the real port: "tcp:127.0.0.1:43117".
  const std::string& address() const;
  int port() const;  // 0 for Unix sockets

  // Accepts and forks until SIGTERM/SIGINT or stop(); reaps every child.
  void run();
  void stop();  // async-signal-safe

 private:
  std::unique_ptr<detail::ServerState> state_;
};

// A server in its own process, alive while this handle (and the process
// that made it) lives.
class TaskServer {
 public:
  TaskServer(TaskServer&&) noexcept;
  TaskServer& operator=(TaskServer&&) noexcept;
  ~TaskServer();
  pid_t pid() const noexcept { return pid_; }
  const std::string& address() const noexcept { return address_; }
  void stop();  // ends the server and waits for it

 private:
  friend TaskServer fork_task_server(ServerOptions options);
  TaskServer(pid_t pid, int keepalive_fd, std::string address);
  pid_t pid_ = -1;
  int keepalive_fd_ = -1;
  std::string address_;
};

TaskServer fork_task_server(ServerOptions options);

// ===========================================================================
// Client
//
// Owns the worker pool, checkouts, their queues and timeouts, and the
// delivery of results and errors into the callers' frames. Uses everything
// above; touches the event loop only through EventHost.
// ===========================================================================

// The worker replied with an error ("er"); what() is its message.
class RemoteError : public Error {
 public:
  using Error::Error;
};

// A checkout failed for good: timeout, lost connection, protocol error or
// throw_fatal_error(). Every later call on it fails with the same message.
class CheckoutError : public Error {
 public:
  using Error::Error;
};

class TimeoutError : public CheckoutError {
 public:
  using CheckoutError::CheckoutError;
};

// checkout() refused because max_pending_checkouts are already waiting.
class OverloadError : public Error {
 public:
  using Error::Error;
};

constexpr double forever = -1;  // a timeout that never expires

struct ClientOptions {
  std::string connect;                  // as ServerOptions::listen
  std::string name;                     // in frame names; empty: the connect string
  unsigned min_workers = 2;             // capped at max_workers
  unsigned max_workers = 20;
  double timeout = 30;                  // seconds per call, or aet::forever
  unsigned max_checkouts = 0;           // checkouts a worker serves; 0: unlimited
  bool dont_refork_after_error = false;
  std::size_t max_frame = default_max_frame;
  std::size_t max_pending_checkouts = 0;  // checkouts waiting for a worker; 0: unlimited
};

struct CheckoutOptions {
  std::optional<double> timeout;        // default: the client's
  std::optional<LogDefer> log_defer;    // calls are timed and worker logs merged here
};

namespace detail {
struct CheckoutState;
struct ClientState;
}

// A handle on one checkout; copies share it. The worker is held from when
// the checkout is served until the last handle goes and nothing is pending.
class Checkout {
 public:
  using Callback = std::function<void(Checkout& checkout, Json result)>;

  // Queues a method call; `args` is the array of arguments.
  template <class F>
  void call(std::string method, Json args, F callback);
  // Queues a plain call: no method name is sent.
  template <class F>
  void operator()(Json args, F callback);
  // Fails the call in flight and every later one with `message`.
  void throw_fatal_error(const std::string& message);

 private:
  friend class Client;
  friend struct detail::ClientState;
  friend struct detail::CheckoutState;
  explicit Checkout(std::shared_ptr<detail::CheckoutState> state) : state_(std::move(state)) {}
  void enqueue(std::optional<std::string> method, Json args, Callback callback, FrameContext context);
  std::shared_ptr<detail::CheckoutState> state_;
};

class Client {
 public:
  Client(EventHost& host, ClientOptions options);
  ~Client();  // drops every worker; pending checkouts are discarded silently
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  Checkout checkout(CheckoutOptions options = {});

  std::size_t worker_count() const;       // connected or connecting
  std::size_t idle_worker_count() const;
  std::size_t pending_checkout_count() const;  // waiting for a worker

 private:
  std::shared_ptr<detail::ClientState> state_;
};

}  // namespace aet

// ===========================================================================
// Implementation
// ===========================================================================

// ---- implementation: errors & frames --------------------------------------

// ---- implementation: json --------------------------------------------------

// ---- implementation: log_defer ---------------------------------------------

// ---- implementation: loop --------------------------------------------------

namespace aet {
namespace detail {

// Monotonic time in nanoseconds: integer deadlines, so a repeating timer's
// grid never drifts and timeouts round exactly.
inline std::int64_t monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // cannot fail for this clock
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// A delay in seconds as nanoseconds, rounded up so nothing fires early;
// negative means now; capped at ~31 years so deadline sums cannot overflow.
inline std::int64_t delay_ns(double seconds, const char* what) {
  if (std::isnan(seconds)) throw Error(std::string("aet::Loop: ") + what + " is not a number");
  if (seconds <= 0) return 0;
  constexpr double max_seconds = 1e9;
  return static_cast<std::int64_t>(std::ceil(std::min(seconds, max_seconds) * 1e9));
}

// Milliseconds for poll(), rounded up: a timeout rounded down would wake
// before the deadline and spin with timeout 0 until it passes.
// A repeat interval in ns, rounded to nearest (so the grid keeps its
// period); 0 for a one-shot timer, at least 1 otherwise.
inline std::int64_t interval_ns(double seconds) {
  if (std::isnan(seconds)) throw Error("aet::Loop: timer interval is not a number");
  if (seconds <= 0) return 0;
  constexpr double max_seconds = 1e9;
  return std::max<std::int64_t>(1, std::llround(std::min(seconds, max_seconds) * 1e9));
}

inline int poll_timeout_ms(std::int64_t ns) noexcept {
  if (ns <= 0) return 0;
  const std::int64_t ms = (ns + 999999) / 1000000;
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

inline void check_io_events(unsigned events) {
  if (events & ~static_cast<unsigned>(io_read | io_write))
    throw Error("aet::Loop: io events must be io_read, io_write or both");
}

// What poll() reported for one fd, as this interest's events. Errors and
// hang-ups wake both readers and writers.
inline unsigned readiness(short revents, unsigned interest) noexcept {
  unsigned events = 0;
  if ((interest & io_read) && (revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) events |= io_read;
  if ((interest & io_write) && (revents & (POLLOUT | POLLHUP | POLLERR | POLLNVAL))) events |= io_write;
  return events;
}

// Entries are found by id in maps, never through pointers held across a
// callback. Ids come from one counter and are never reused (the counter is
// the generation): an id that was removed finds nothing, so a watcher or
// timer removed during dispatch is skipped. Callbacks are shared_ptrs; the
// dispatcher holds its own copy while calling, so a callback may remove
// itself or destroy what owns it.
struct LoopState {
  struct Io {
    int fd;
    unsigned events;
    std::shared_ptr<EventHost::IoCallback> callback;
    unsigned polled_events = 0;    // what the last prepare() asked poll() for
    std::uint64_t polled_round = 0;  // the prepare() that did
  };
  struct TimerEntry {
    std::int64_t deadline;
    std::int64_t interval;  // 0: one shot
    std::uint64_t seq;      // start order, for equal deadlines
    std::shared_ptr<EventHost::TimerCallback> callback;
  };
  using QueueKey = std::pair<std::int64_t, std::uint64_t>;  // (deadline, seq)

  EventHost::Id next_id = 1;
  std::uint64_t next_seq = 1;
  std::uint64_t rounds = 0;         // prepare() calls so far
  std::uint64_t pending_round = 0;  // the round prepared and not yet processed; 0: none
  std::map<EventHost::Id, Io> ios;  // ordered by id: dispatch in registration order
  std::map<EventHost::Id, TimerEntry> timers;
  std::map<QueueKey, EventHost::Id> queue;  // every timer by its next deadline
  bool dispatching = false;
  bool stop_requested = false;
  std::vector<pollfd> poll_fds;  // run_once()'s own array, reused

  EventHost::Id add_timer(std::int64_t deadline, std::int64_t interval,
                          EventHost::TimerCallback callback) {
    if (!callback) throw Error("aet::Loop: empty timer callback");
    const EventHost::Id id = next_id++;
    TimerEntry entry{deadline, interval, next_seq++,
                     std::make_shared<EventHost::TimerCallback>(std::move(callback))};
    queue.emplace(QueueKey{deadline, entry.seq}, id);
    timers.emplace(id, std::move(entry));
    return id;
  }

  void dispatch_io(const pollfd* fds, std::size_t count) {
    const std::uint64_t round = pending_round;
    pending_round = 0;  // a second process() of the same round reports nothing
    if (round == 0 || count == 0 || ios.empty()) return;
    std::unordered_map<int, short> ready;
    for (std::size_t i = 0; i < count; ++i)
      if (fds[i].revents != 0) ready[fds[i].fd] |= fds[i].revents;
    if (ready.empty()) return;

    // Decide who is ready before calling anyone: interests added or widened
    // by a callback were not polled, so they get nothing from this round.
    struct Ready {
      EventHost::Id id;
      unsigned events;
    };
    std::vector<Ready> due;
    for (const auto& [id, io] : ios) {
      if (io.polled_round != round) continue;
      auto it = ready.find(io.fd);
      if (it == ready.end()) continue;
      if (unsigned events = readiness(it->second, io.polled_events)) due.push_back({id, events});
    }
    for (const Ready& r : due) {
      auto it = ios.find(r.id);
      if (it == ios.end()) continue;  // removed by an earlier callback
      const unsigned events = r.events & it->second.events;  // narrowed since?
      if (events == 0) continue;
      std::shared_ptr<EventHost::IoCallback> callback = it->second.callback;
      (*callback)(events);
    }
  }

  void run_due_timers() {
    if (queue.empty()) return;
    const std::int64_t now = monotonic_ns();
    // Only timers due now and started before this point: one started by a
    // callback, even with delay 0, waits for the next round (no starvation).
    std::vector<EventHost::Id> due;
    for (auto it = queue.begin(); it != queue.end() && it->first.first <= now; ++it)
      due.push_back(it->second);
    for (EventHost::Id id : due) {
      auto it = timers.find(id);
      if (it == timers.end()) continue;  // stopped by an earlier callback
      TimerEntry& timer = it->second;
      std::shared_ptr<EventHost::TimerCallback> callback = timer.callback;
      queue.erase(QueueKey{timer.deadline, timer.seq});
      if (timer.interval > 0) {
        // Next point of the grid deadline + k * interval after now.
        std::int64_t next = timer.deadline + timer.interval;
        if (next <= now) next += ((now - next) / timer.interval + 1) * timer.interval;
        timer.deadline = next;
        queue.emplace(QueueKey{next, timer.seq}, id);
      } else {
        timers.erase(it);
      }
      (*callback)();
    }
  }
};

// Clears the dispatching flag however process() ends.
struct DispatchScope {
  explicit DispatchScope(bool& flag) : flag_(flag) { flag_ = true; }
  ~DispatchScope() { flag_ = false; }
  DispatchScope(const DispatchScope&) = delete;
  DispatchScope& operator=(const DispatchScope&) = delete;
  bool& flag_;
};

}  // namespace detail

// -- IoWatcher, Timer --

inline IoWatcher::IoWatcher(EventHost& host, int fd, unsigned events, EventHost::IoCallback callback)
    : host_(&host), id_(host.add_io(fd, events, std::move(callback))), events_(events) {}

inline IoWatcher::IoWatcher(IoWatcher&& other) noexcept
    : host_(std::exchange(other.host_, nullptr)),
      id_(std::exchange(other.id_, 0)),
      events_(std::exchange(other.events_, 0)) {}

// Takes the new interest first and removes the old one last: removing may
// destroy a callback that owns this watcher, so nothing touches *this after.
inline IoWatcher& IoWatcher::operator=(IoWatcher&& other) noexcept {
  if (this != &other) {
    EventHost* old_host = std::exchange(host_, std::exchange(other.host_, nullptr));
    const EventHost::Id old_id = std::exchange(id_, std::exchange(other.id_, 0));
    events_ = std::exchange(other.events_, 0);
    if (old_host) old_host->remove_io(old_id);
  }
  return *this;
}

inline void IoWatcher::set_events(unsigned events) {
  if (!host_) throw Error("aet::IoWatcher::set_events on an empty watcher");
  host_->modify_io(id_, events);
  events_ = events;
}

inline void IoWatcher::reset() noexcept {
  EventHost* host = std::exchange(host_, nullptr);
  const EventHost::Id id = std::exchange(id_, 0);
  events_ = 0;
  if (host) host->remove_io(id);  // may destroy *this: last statement
}

inline Timer::Timer(EventHost& host, double after, double repeat, EventHost::TimerCallback callback)
    : host_(&host), id_(host.start_timer(after, repeat, std::move(callback))) {}

inline Timer::Timer(Timer&& other) noexcept
    : host_(std::exchange(other.host_, nullptr)), id_(std::exchange(other.id_, 0)) {}

inline Timer& Timer::operator=(Timer&& other) noexcept {
  if (this != &other) {
    EventHost* old_host = std::exchange(host_, std::exchange(other.host_, nullptr));
    const EventHost::Id old_id = std::exchange(id_, std::exchange(other.id_, 0));
    if (old_host) old_host->stop_timer(old_id);
  }
  return *this;
}

inline void Timer::reset() noexcept {
  EventHost* host = std::exchange(host_, nullptr);
  const EventHost::Id id = std::exchange(id_, 0);
  if (host) host->stop_timer(id);  // may destroy *this: last statement
}

// -- Loop --

inline Loop::Loop() : state_(std::make_unique<detail::LoopState>()) {}

inline Loop::~Loop() = default;

inline EventHost::Id Loop::add_io(int fd, unsigned events, IoCallback callback) {
  if (fd < 0) throw Error("aet::Loop::add_io: invalid descriptor " + std::to_string(fd));
  detail::check_io_events(events);
  if (!callback) throw Error("aet::Loop::add_io: empty callback");
  const Id id = state_->next_id++;
  state_->ios.emplace(
      id, detail::LoopState::Io{fd, events, std::make_shared<IoCallback>(std::move(callback))});
  return id;
}

inline void Loop::modify_io(Id id, unsigned events) {
  detail::check_io_events(events);
  auto it = state_->ios.find(id);
  if (it == state_->ios.end()) throw Error("aet::Loop::modify_io: no io interest with this id");
  it->second.events = events;
}

inline void Loop::remove_io(Id id) { state_->ios.erase(id); }

inline EventHost::Id Loop::start_timer(double after, double repeat, TimerCallback callback) {
  const std::int64_t delay = detail::delay_ns(after, "timer delay");
  return state_->add_timer(detail::monotonic_ns() + delay, detail::interval_ns(repeat),
                           std::move(callback));
}

inline EventHost::Id Loop::start_timer_at(double deadline, double repeat, TimerCallback callback) {
  if (std::isnan(deadline)) throw Error("aet::Loop: timer deadline is not a number");
  // Whole ns on the now() clock, rounded up; capped like a delay.
  const double latest = static_cast<double>(detail::monotonic_ns()) + 1e18;
  const double ns = std::min(std::max(deadline * 1e9, 0.0), latest);
  return state_->add_timer(static_cast<std::int64_t>(std::ceil(ns)), detail::interval_ns(repeat),
                           std::move(callback));
}

inline void Loop::stop_timer(Id id) {
  auto& s = *state_;
  auto it = s.timers.find(id);
  if (it == s.timers.end()) return;
  s.queue.erase(detail::LoopState::QueueKey{it->second.deadline, it->second.seq});
  s.timers.erase(it);
}

inline int Loop::prepare(std::vector<pollfd>& fds) {
  auto& s = *state_;
  const std::uint64_t round = ++s.rounds;
  s.pending_round = round;
  // One entry per fd: index of each fd's entry among those appended here.
  std::unordered_map<int, std::size_t> slot;
  for (auto& [id, io] : s.ios) {
    (void)id;
    io.polled_events = io.events;
    io.polled_round = round;
    if (io.events == 0) continue;
    const short want = static_cast<short>(((io.events & io_read) ? POLLIN : 0) |
                                          ((io.events & io_write) ? POLLOUT : 0));
    auto [it, inserted] = slot.emplace(io.fd, fds.size());
    if (inserted) {
      fds.push_back(pollfd{io.fd, want, 0});
    } else {
      fds[it->second].events = static_cast<short>(fds[it->second].events | want);
    }
  }
  if (s.queue.empty()) return -1;
  return detail::poll_timeout_ms(s.queue.begin()->first.first - detail::monotonic_ns());
}

inline void Loop::process(const pollfd* fds, std::size_t count) {
  auto& s = *state_;
  if (s.dispatching) throw Error("aet::Loop: process() called from inside one of its callbacks");
  detail::DispatchScope scope(s.dispatching);
  s.dispatch_io(fds, count);
  s.run_due_timers();
}

inline bool Loop::run_once(double timeout) {
  auto& s = *state_;
  if (s.dispatching) throw Error("aet::Loop: run_once() called from inside one of its callbacks");
  if (std::isnan(timeout)) throw Error("aet::Loop::run_once: timeout is not a number");
  std::vector<pollfd>& fds = s.poll_fds;
  fds.clear();
  int wait = prepare(fds);
  if (timeout >= 0) {
    const int limit = detail::poll_timeout_ms(detail::delay_ns(timeout, "timeout"));
    wait = wait < 0 ? limit : std::min(wait, limit);
  } else if (fds.empty() && wait < 0) {
    s.pending_round = 0;
    return false;  // nothing could ever wake us
  }
  if (::poll(fds.data(), static_cast<nfds_t>(fds.size()), wait) < 0) {
    const int error = errno;
    if (error != EINTR) throw SystemError("poll", error);
    for (pollfd& p : fds) p.revents = 0;  // a signal: no readiness, timers may be due
  }
  process(fds.data(), fds.size());
  return true;
}

inline void Loop::run() {
  auto& s = *state_;
  if (s.dispatching) throw Error("aet::Loop: run() called from inside one of its callbacks");
  s.stop_requested = false;
  while (!s.stop_requested && run_once(-1)) {
  }
  s.stop_requested = false;
}

inline void Loop::stop() { state_->stop_requested = true; }

inline double Loop::now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

}  // namespace aet

// ---- implementation: protocol ----------------------------------------------

// ---- implementation: server ------------------------------------------------

// ---- implementation: client ------------------------------------------------

#endif  // ANYEVENT_TASK_HPP
