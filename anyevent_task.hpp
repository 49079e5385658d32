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
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <functional>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
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
// frames innermost first, one "file:line - NAME\n" line per frame. An
// exception not derived from std::exception arrives as
// aet::Error("unknown exception").
using Catcher = std::function<void(const std::exception& error, const std::string& trace)>;

namespace detail {
struct FrameNode;
struct FrameAccess;
}  // namespace detail

// A handle on one frame and, through it, on every frame around it: the
// error handlers and frame-local bindings a framed callable restores when
// it runs. Cheap to copy (a shared pointer).
//
// Error delivery, as in Perl's Callback::Frame: an exception escaping code
// run in a frame goes to the innermost catcher on the chain from that frame
// outwards. The catcher runs in the frame around the one that owns it, so
// if it throws, its new exception goes to the next catcher out, together
// with the trace captured at the first throw. With no catcher left, the
// exception (the last one thrown) propagates to whoever called the framed
// code, for instance out of Loop::run.
class FrameContext {
 public:
  FrameContext() = default;  // the empty context: no catcher, no binding
  // Delivers `error` to the innermost catcher of this context, as if a
  // callback created here had thrown it; with no catcher left it rethrows.
  void raise(std::exception_ptr error) const;
  // Runs `code` with this context in force: its frame-local bindings are
  // seen and an exception escaping `code` is delivered as by raise().
  template <class F>
  void run(F&& code) const;
  // The trace an error raised here would carry.
  std::string trace() const;
  explicit operator bool() const noexcept { return node_ != nullptr; }

 private:
  friend struct detail::FrameAccess;
  explicit FrameContext(std::shared_ptr<detail::FrameNode> node) : node_(std::move(node)) {}
  std::shared_ptr<detail::FrameNode> node_;
};

// The frames in force right now (empty outside any frame).
FrameContext current_frame();

namespace detail {
// Creates a child frame of the current one (used by frame() and frame_try()).
FrameContext push_frame(Catcher catcher, std::string name, const char* file, int line);
}  // namespace detail

// A callable wrapped in a frame. Calling it (any number of times, long after
// the scope that made it has ended) runs `code` with that frame in force and
// the caller's frame restored afterwards, also when `code` throws. Calling
// does not allocate.
template <class F>
class Framed {
 public:
  using code_type = F;
  Framed(F code, FrameContext context) : code_(std::move(code)), context_(std::move(context)) {}
  template <class... Args>
  void operator()(Args&&... args);
  template <class... Args>
  void operator()(Args&&... args) const;
  const FrameContext& context() const noexcept { return context_; }
  const F& code() const& noexcept { return code_; }
  F&& code() && noexcept { return std::move(code_); }

 private:
  F code_;
  FrameContext context_;
};

// True for Framed<...>: library code never wraps a framed callable twice.
template <class F>
struct is_framed : std::false_type {};
template <class F>
struct is_framed<Framed<F>> : std::true_type {};
template <class F>
inline constexpr bool is_framed_v = is_framed<std::decay_t<F>>::value;

// Wraps `code` in a new frame, child of the current one, with `catcher`
// (may be empty) named `name` (empty: ANONYMOUS FRAME). One allocation.
// A callable that is already framed keeps the frame it was made in: it is
// returned as it is when `catcher` is empty, and otherwise gets one new
// frame holding `catcher` inside its own frame (never Framed<Framed<F>>).
template <class F>
auto frame(F code, Catcher catcher = {}, std::string name = {},
           const char* file = __builtin_FILE(), int line = __builtin_LINE());

// "Frame unless framed": wraps `code` in a new anonymous frame, child of the
// current one, without a catcher, so that it runs with the error handlers
// and bindings in force here. A framed callable is returned as it is.
template <class F>
auto fub(F code, const char* file = __builtin_FILE(), int line = __builtin_LINE());

// Runs `code` at once inside a new frame with `catcher`. When the catcher
// handles an error, frame_try returns normally.
void frame_try(const std::function<void()>& code, Catcher catcher, std::string name = {},
               const char* file = __builtin_FILE(), int line = __builtin_LINE());

// A frame-local variable of type T, keyed by its address (so make it live
// as long as the callbacks that read it, typically a static). bind(value,
// code) runs `code` at once in a new frame where get() sees `value`;
// callbacks created inside see it too, whenever they run, and nothing
// outside does. Errors escaping `code` are delivered as from any frame.
template <class T>
class FrameLocal {
 public:
  template <class F>
  void bind(T value, F&& code, const char* file = __builtin_FILE(), int line = __builtin_LINE());
  // The nearest binding in the frames in force, nullptr where unbound.
  // Valid while the current frame is (for the rest of the running callback).
  const T* get() const;
  T value_or(T fallback) const {
    const T* v = get();
    return v ? *v : fallback;
  }
};

template <class T, class F>
void frame_local(FrameLocal<T>& variable, T value, F&& code, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  variable.bind(std::move(value), std::forward<F>(code), file, line);
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
struct LogDeferAccess;
}  // namespace detail

// Copies share one log. Times are seconds relative to "start" (the epoch
// time at construction), rounded to microseconds; they are measured on the
// monotonic clock. A handle that was moved from behaves as the log to
// nowhere (see logger()).
class LogDefer {
 public:
  enum Level : int { error_level = 10, warn_level = 20, info_level = 30, debug_level = 40 };
  using Callback = std::function<void(const Json& message)>;

  // The message reaches `on_done` (may be empty) once, when the last copy
  // of this handle goes. An exception thrown by `on_done` is reported on
  // stderr, never thrown from a destructor.
  explicit LogDefer(Callback on_done);
  LogDefer(const LogDefer&) = default;
  LogDefer(LogDefer&&) noexcept = default;
  LogDefer& operator=(const LogDefer&) = default;
  LogDefer& operator=(LogDefer&&) noexcept = default;
  ~LogDefer() = default;

  // One entry [t, level, items...]; each item becomes Json. A single
  // callable item is lazy: it is called only when the level passes
  // verbosity, and what it returns is the item.
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
  // The log to nowhere reports a verbosity below every level.
  void verbosity(int level);
  int verbosity() const noexcept;
  bool enabled(int level) const noexcept { return level <= verbosity(); }

  // A timer [name, t0, t1] that ends when the guard goes or on finish().
  // It does not keep the log alive: a timer still running when the
  // message is delivered ends at the delivery time.
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
    Timer() = default;  // a timer of the log to nowhere
    Timer(std::weak_ptr<detail::LogDeferState> state, std::size_t index);
    std::weak_ptr<detail::LogDeferState> state_;
    std::size_t index_ = 0;
  };
  Timer timer(std::string name);

  // The free-form "data" object (left out of the message while empty).
  Json& data();

  // Adds another LogDefer message: its logs and timers are moved onto this
  // message's time axis (other start - this start + t), logs kept in time
  // order; its data keys are added (replacing ours of the same name). If
  // the message carries "pid", each of its log entries gets {"pid": N}
  // appended. Throws JsonError for a malformed message, adding nothing.
  void merge(const Json& message);

  // The message as it would be delivered now; null for the log to nowhere.
  Json message() const;

 private:
  friend struct detail::LogDeferAccess;
  LogDefer() = default;  // the log to nowhere
  template <class... Items>
  void log(int level, Items&&... items);
  std::shared_ptr<detail::LogDeferState> state_;
};

// Inside a worker: the LogDefer of the request being served; its message
// rides back in the reply. Outside a request, a log that goes nowhere: every
// call is valid, cheap and allocation-free, and nothing is kept.
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
// Knows nothing of protocols, servers or clients.
// ===========================================================================

enum IoEvents : unsigned { io_read = 1u, io_write = 2u };

// What the client needs from an event loop. aet::Loop implements it; an
// adapter for epoll, libuv or asio implements these five calls.
class EventHost {
 public:
  using Id = std::uint64_t;
  using IoCallback = std::function<void(unsigned events)>;  // io_read | io_write
  using TimerCallback = std::function<void()>;
  virtual ~EventHost() = default;

  // Errors and hang-ups are reported as io_read readiness.
  virtual Id add_io(int fd, unsigned events, IoCallback callback) = 0;
  virtual void modify_io(Id id, unsigned events) = 0;
  virtual void remove_io(Id id) = 0;
  // One shot when repeat <= 0, else every `repeat` seconds after the first.
  virtual Id start_timer(double after, double repeat, TimerCallback callback) = 0;
  virtual void stop_timer(Id id) = 0;
};

// An io interest that is removed when the watcher goes.
class IoWatcher {
 public:
  IoWatcher() = default;
  IoWatcher(EventHost& host, int fd, unsigned events, EventHost::IoCallback callback);
  IoWatcher(IoWatcher&& other) noexcept;
  IoWatcher& operator=(IoWatcher&& other) noexcept;
  ~IoWatcher() { reset(); }
  void set_events(unsigned events);
  unsigned events() const noexcept { return events_; }
  void reset();  // removes the interest now
  explicit operator bool() const noexcept { return host_ != nullptr; }

 private:
  EventHost* host_ = nullptr;
  EventHost::Id id_ = 0;
  unsigned events_ = 0;
};

// A timer that is stopped when the guard goes.
class Timer {
 public:
  Timer() = default;
  Timer(EventHost& host, double after, double repeat, EventHost::TimerCallback callback);
  Timer(Timer&& other) noexcept;
  Timer& operator=(Timer&& other) noexcept;
  ~Timer() { reset(); }
  void reset();
  explicit operator bool() const noexcept { return host_ != nullptr; }

 private:
  EventHost* host_ = nullptr;
  EventHost::Id id_ = 0;
};

namespace detail {
struct LoopState;
}

// The poll(2) loop. run() is prepare() + poll() + process() in a loop, the
// same calls an application with its own poll loop makes.
class Loop : public EventHost {
 public:
  Loop();
  ~Loop() override;
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  Id add_io(int fd, unsigned events, IoCallback callback) override;
  void modify_io(Id id, unsigned events) override;
  void remove_io(Id id) override;
  Id start_timer(double after, double repeat, TimerCallback callback) override;
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

  void run();                            // until stop() or nothing is left to wait for
  bool run_once(double timeout = -1);    // one poll, at most `timeout` s (< 0: until an event);
                                         // false when there was nothing to wait for
  void stop();                           // makes run() return after this dispatch

  // Embedding: append this loop's interests to `fds` and return the poll
  // timeout it needs in ms (-1: none), to be lowered into your own.
  int prepare(std::vector<pollfd>& fds);
  // After poll(): hand back the entries prepare() appended (in any place
  // of your array); runs ready callbacks and due timers.
  void process(const pollfd* fds, std::size_t count);

  static double now();  // monotonic seconds

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

namespace aet {

inline SystemError::SystemError(const std::string& what, int code)
    : Error(what + ": " + std::system_category().message(code)), code_(code) {}

namespace detail {

// One frame. Frames form a tree through parent pointers: a callback made
// inside a frame holds a child of it, so sibling callbacks are independent
// branches that share their ancestors.
struct FrameNode : std::enable_shared_from_this<FrameNode> {
  std::shared_ptr<FrameNode> parent;
  Catcher catcher;
  std::string name;
  const char* file = "";
  int line = 0;
  // A FrameLocal binding held by this frame (see BoundFrameNode), if any.
  const void* local_key = nullptr;
  const void* local_type = nullptr;
  // For a plain frame (no catcher, no binding): how many plain frames in a
  // row end here, and the nearest frame above them that is not plain.
  unsigned plain_run = 0;
  FrameNode* anchor = nullptr;

  bool plain() const noexcept { return !catcher && local_key == nullptr; }
};

template <class T>
struct BoundFrameNode : FrameNode {
  explicit BoundFrameNode(T v) : value(std::move(v)) {}
  T value;
};

// Distinct address per T, so a binding is only read back as its own type.
template <class T>
struct FrameLocalTypeTag {
  static constexpr char tag = 0;
};

// Callbacks that schedule callbacks forever would otherwise grow an endless
// chain of anonymous frames; past this many plain frames in a row the new
// frame hangs from the nearest frame that holds a catcher or a binding (the
// trace then shows the newest frames of the run).
constexpr unsigned max_plain_frame_run = 64;

inline FrameNode*& current_node() noexcept {
  static thread_local FrameNode* node = nullptr;
  return node;
}

// Makes `node` the current frame until the scope ends (also by a throw).
class CurrentFrameScope {
 public:
  explicit CurrentFrameScope(FrameNode* node) noexcept : saved_(current_node()) {
    current_node() = node;
  }
  ~CurrentFrameScope() { current_node() = saved_; }
  CurrentFrameScope(const CurrentFrameScope&) = delete;
  CurrentFrameScope& operator=(const CurrentFrameScope&) = delete;

 private:
  FrameNode* saved_;
};

inline std::shared_ptr<FrameNode> shared_node(FrameNode* node) {
  return node ? node->shared_from_this() : nullptr;
}

// Links a freshly made node below `parent`.
inline void attach_frame(FrameNode& node, FrameNode* parent, Catcher catcher, std::string name,
                         const char* file, int line) {
  node.catcher = std::move(catcher);
  node.name = std::move(name);
  node.file = file ? file : "";
  node.line = line;
  if (node.plain()) {
    if (parent && parent->plain()) {
      if (parent->plain_run >= max_plain_frame_run) {
        node.anchor = parent->anchor;
        node.plain_run = 1;
        node.parent = shared_node(parent->anchor);
        return;
      }
      node.anchor = parent->anchor;
      node.plain_run = parent->plain_run + 1;
    } else {
      node.anchor = parent;
      node.plain_run = 1;
    }
  }
  node.parent = shared_node(parent);
}

inline std::shared_ptr<FrameNode> new_frame(FrameNode* parent, Catcher catcher, std::string name,
                                            const char* file, int line) {
  auto node = std::make_shared<FrameNode>();
  attach_frame(*node, parent, std::move(catcher), std::move(name), file, line);
  return node;
}

inline std::string frame_trace(const FrameNode* node) {
  std::string trace;
  for (; node; node = node->parent.get()) {
    trace += node->file;
    trace += ':';
    trace += std::to_string(node->line);
    trace += " - ";
    trace += node->name.empty() ? "ANONYMOUS FRAME" : node->name;
    trace += '\n';
  }
  return trace;
}

// The trace of an error that escaped every catcher of its frames, so that
// a catcher of unrelated frames further up the call stack still gets the
// trace of the first throw.
struct EscapedError {
  std::exception_ptr error;
  std::string trace;
};

inline EscapedError& escaped_error() {
  static thread_local EscapedError escaped;
  return escaped;
}

inline void call_catcher(const Catcher& catcher, const std::exception_ptr& error,
                         const std::string& trace) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    catcher(e, trace);
  } catch (...) {
    catcher(Error("unknown exception"), trace);
  }
}

// Hands `error`, thrown in frame `from`, to the innermost catcher from
// there outwards; each catcher runs in the frame around its own, and what
// it throws goes on outwards with the first trace. Rethrows the last error
// when no catcher is left. The caller keeps `from` alive.
inline void deliver_error(FrameNode* from, std::exception_ptr error) {
  std::string trace;
  EscapedError& escaped = escaped_error();
  if (escaped.error && escaped.error == error) {
    trace = std::move(escaped.trace);
    escaped = EscapedError{};
  } else {
    trace = frame_trace(from);
  }
  for (FrameNode* node = from; node; node = node->parent.get()) {
    if (!node->catcher) continue;
    CurrentFrameScope scope(node->parent.get());
    try {
      call_catcher(node->catcher, error, trace);
      return;
    } catch (...) {
      error = std::current_exception();
    }
  }
  escaped.error = error;
  escaped.trace = std::move(trace);
  std::rethrow_exception(error);
}

template <class F>
void run_in_frame(std::shared_ptr<FrameNode> node, F&& code) {
  // `node` is held here: the code may drop the callable that owns it.
  CurrentFrameScope scope(node.get());
  std::exception_ptr error;
  try {
    std::forward<F>(code)();
    return;
  } catch (...) {
    error = std::current_exception();  // delivered outside the handler
  }
  deliver_error(node.get(), std::move(error));
}

struct FrameAccess {
  static const std::shared_ptr<FrameNode>& node(const FrameContext& c) noexcept { return c.node_; }
  static FrameContext make(std::shared_ptr<FrameNode> node) { return FrameContext(std::move(node)); }
};

inline FrameContext push_frame(Catcher catcher, std::string name, const char* file, int line) {
  return FrameAccess::make(new_frame(current_node(), std::move(catcher), std::move(name), file, line));
}

}  // namespace detail

inline FrameContext current_frame() {
  return detail::FrameAccess::make(detail::shared_node(detail::current_node()));
}

inline void FrameContext::raise(std::exception_ptr error) const {
  std::shared_ptr<detail::FrameNode> pinned = node_;  // a catcher may drop this context
  detail::deliver_error(pinned.get(), std::move(error));
}

template <class F>
void FrameContext::run(F&& code) const {
  detail::run_in_frame(node_, std::forward<F>(code));
}

inline std::string FrameContext::trace() const { return detail::frame_trace(node_.get()); }

template <class F>
template <class... Args>
void Framed<F>::operator()(Args&&... args) {
  context_.run([&] { code_(std::forward<Args>(args)...); });
}

template <class F>
template <class... Args>
void Framed<F>::operator()(Args&&... args) const {
  context_.run([&] { code_(std::forward<Args>(args)...); });
}

template <class F>
auto frame(F code, Catcher catcher, std::string name, const char* file, int line) {
  if constexpr (is_framed<F>::value) {
    if (!catcher) return code;
    const auto& inner = detail::FrameAccess::node(code.context());
    auto node = detail::new_frame(inner.get(), std::move(catcher), std::move(name), file, line);
    return F(std::move(code).code(), detail::FrameAccess::make(std::move(node)));
  } else {
    return Framed<F>(std::move(code),
                     detail::push_frame(std::move(catcher), std::move(name), file, line));
  }
}

template <class F>
auto fub(F code, const char* file, int line) {
  if constexpr (is_framed<F>::value) {
    return code;
  } else {
    return Framed<F>(std::move(code), detail::push_frame({}, {}, file, line));
  }
}

inline void frame_try(const std::function<void()>& code, Catcher catcher, std::string name,
                      const char* file, int line) {
  detail::push_frame(std::move(catcher), std::move(name), file, line).run(code);
}

template <class T>
template <class F>
void FrameLocal<T>::bind(T value, F&& code, const char* file, int line) {
  auto node = std::make_shared<detail::BoundFrameNode<T>>(std::move(value));
  node->local_key = this;
  node->local_type = &detail::FrameLocalTypeTag<T>::tag;
  detail::attach_frame(*node, detail::current_node(), {}, {}, file, line);
  detail::run_in_frame(std::move(node), std::forward<F>(code));
}

template <class T>
const T* FrameLocal<T>::get() const {
  for (const detail::FrameNode* node = detail::current_node(); node; node = node->parent.get()) {
    if (node->local_key == this && node->local_type == &detail::FrameLocalTypeTag<T>::tag) {
      return &static_cast<const detail::BoundFrameNode<T>*>(node)->value;
    }
  }
  return nullptr;
}

}  // namespace aet


// ---- implementation: json --------------------------------------------------

// ---- implementation: log_defer ---------------------------------------------

namespace aet {
namespace detail {

inline double round_to_microseconds(double seconds) { return std::round(seconds * 1e6) / 1e6; }

inline double epoch_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

inline double monotonic_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

struct LogDeferTimer {
  Json name;
  double start;
  double end;
  bool running;
};

struct LogDeferState {
  explicit LogDeferState(LogDefer::Callback callback)
      : on_done(std::move(callback)),
        start_epoch(round_to_microseconds(epoch_seconds())),
        start_monotonic(monotonic_seconds()) {}
  LogDeferState(const LogDeferState&) = delete;
  LogDeferState& operator=(const LogDeferState&) = delete;

  // Delivers the message: the last handle is gone.
  ~LogDeferState() {
    if (!on_done) return;
    try {
      on_done(build(elapsed()));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "aet::LogDefer: the message callback threw: %s\n", e.what());
    } catch (...) {
      std::fprintf(stderr, "aet::LogDefer: the message callback threw an unknown exception\n");
    }
  }

  double elapsed() const { return round_to_microseconds(monotonic_seconds() - start_monotonic); }

  Json build(double end) const {
    Json message = Json::object({{"start", start_epoch}, {"end", end}});
    if (!logs.empty()) message["logs"] = Json(logs);
    if (!timers.empty()) {
      Json::Array list;
      list.reserve(timers.size());
      for (const LogDeferTimer& t : timers) list.push_back(Json{t.name, t.start, t.running ? end : t.end});
      message["timers"] = Json(std::move(list));
    }
    if (!data.is_null() && !(data.is_object() && data.empty())) message["data"] = data;
    return message;
  }

  bool empty() const {
    return logs.empty() && timers.empty() && (data.is_null() || (data.is_object() && data.empty()));
  }

  LogDefer::Callback on_done;
  int verbosity = LogDefer::debug_level;
  double start_epoch;
  double start_monotonic;
  Json::Array logs;  // [t, level, items...] in time order
  std::vector<LogDeferTimer> timers;
  Json data;
};

struct LogDeferAccess {
  static LogDefer nowhere() { return LogDefer(); }
  static const LogDeferState* state(const LogDefer& log) noexcept { return log.state_.get(); }
};

template <class... Items>
struct is_lazy_log_item : std::false_type {};
template <class Item>
struct is_lazy_log_item<Item> : std::is_invocable<Item&> {};

template <class F>
Json make_lazy_log_item(F& make) {
  static_assert(!std::is_void_v<std::invoke_result_t<F&>>, "a lazy log item must return the item");
  return Json(make());
}

// The log behind logger(): per request in a worker, else nowhere.
struct RequestLogs {
  LogDefer nowhere = LogDeferAccess::nowhere();
  std::optional<LogDefer> request;
  LogDefer* active = &nowhere;
};

inline RequestLogs& request_logs() {
  static thread_local RequestLogs logs;
  return logs;
}

}  // namespace detail

inline LogDefer::LogDefer(Callback on_done)
    : state_(std::make_shared<detail::LogDeferState>(std::move(on_done))) {}

template <class... Items>
void LogDefer::log(int level, Items&&... items) {
  if (!state_ || level > state_->verbosity) return;  // filtered out: nothing is built
  Json::Array entry;
  entry.reserve(sizeof...(Items));
  if constexpr (detail::is_lazy_log_item<Items...>::value) {
    (entry.push_back(detail::make_lazy_log_item(items)), ...);
  } else {
    (entry.emplace_back(std::forward<Items>(items)), ...);
  }
  add_log(level, std::move(entry));
}

inline void LogDefer::add_log(int level, Json::Array items) {
  if (!state_ || level > state_->verbosity) return;
  Json::Array entry;
  entry.reserve(items.size() + 2);
  entry.emplace_back(state_->elapsed());
  entry.emplace_back(level);
  for (Json& item : items) entry.push_back(std::move(item));
  state_->logs.emplace_back(std::move(entry));
}

inline void LogDefer::verbosity(int level) {
  if (state_) state_->verbosity = level;
}

inline int LogDefer::verbosity() const noexcept {
  return state_ ? state_->verbosity : std::numeric_limits<int>::min();
}

inline LogDefer::Timer::Timer(std::weak_ptr<detail::LogDeferState> state, std::size_t index)
    : state_(std::move(state)), index_(index) {}

inline LogDefer::Timer::Timer(Timer&& other) noexcept
    : state_(std::move(other.state_)), index_(other.index_) {
  other.state_.reset();
}

inline LogDefer::Timer& LogDefer::Timer::operator=(Timer&& other) noexcept {
  if (this != &other) {
    finish();
    state_ = std::move(other.state_);
    index_ = other.index_;
    other.state_.reset();
  }
  return *this;
}

inline LogDefer::Timer::~Timer() { finish(); }

inline void LogDefer::Timer::finish() {
  if (auto state = state_.lock()) {
    detail::LogDeferTimer& t = state->timers[index_];
    if (t.running) {
      t.end = state->elapsed();
      t.running = false;
    }
  }
  state_.reset();
}

inline LogDefer::Timer LogDefer::timer(std::string name) {
  if (!state_) return Timer();
  state_->timers.push_back({Json(std::move(name)), state_->elapsed(), 0, true});
  return Timer(state_, state_->timers.size() - 1);
}

inline Json& LogDefer::data() {
  if (!state_) {
    // Nowhere: a scratch object, emptied on every call, so nothing builds up.
    static thread_local Json scratch;
    if (scratch.is_object()) {
      scratch.as_object().clear();
    } else {
      scratch = Json::object();
    }
    return scratch;
  }
  if (state_->data.is_null()) state_->data = Json::object();
  return state_->data;
}

inline void LogDefer::merge(const Json& message) {
  if (!state_) return;
  detail::LogDeferState& self = *state_;
  if (!message.is_object()) throw JsonError("LogDefer::merge: expected an object message");
  const Json* start = message.find("start");
  const double shift = start ? start->as_double() - self.start_epoch : 0.0;
  const Json* pid = message.find("pid");

  // Everything is converted first, so a malformed message adds nothing.
  Json::Array logs;
  if (const Json* other = message.find("logs")) {
    for (const Json& entry : other->as_array()) {
      const Json::Array& fields = entry.as_array();
      if (fields.size() < 2) throw JsonError("LogDefer::merge: a log entry needs a time and a level");
      Json::Array shifted = fields;
      shifted[0] = detail::round_to_microseconds(fields[0].as_double() + shift);
      if (pid) shifted.push_back(Json::object({{"pid", *pid}}));
      logs.emplace_back(std::move(shifted));
    }
  }
  std::vector<detail::LogDeferTimer> timers;
  if (const Json* other = message.find("timers")) {
    for (const Json& entry : other->as_array()) {
      const Json::Array& fields = entry.as_array();
      if (fields.size() != 3) throw JsonError("LogDefer::merge: a timer is [name, start, end]");
      timers.push_back({fields[0], detail::round_to_microseconds(fields[1].as_double() + shift),
                        detail::round_to_microseconds(fields[2].as_double() + shift), false});
    }
  }
  const Json* data = message.find("data");
  if (data && !data->is_null() && !data->is_object()) {
    throw JsonError("LogDefer::merge: \"data\" must be an object");
  }

  for (Json& entry : logs) self.logs.push_back(std::move(entry));
  std::stable_sort(self.logs.begin(), self.logs.end(), [](const Json& a, const Json& b) {
    return a[0].as_double() < b[0].as_double();
  });
  for (detail::LogDeferTimer& t : timers) self.timers.push_back(std::move(t));
  if (data && data->is_object() && !data->empty()) {
    Json& mine = this->data();
    for (const auto& member : data->as_object()) mine[member.first] = member.second;
  }
}

inline Json LogDefer::message() const { return state_ ? state_->build(state_->elapsed()) : Json(); }

inline LogDefer& logger() { return *detail::request_logs().active; }

namespace detail {

inline void begin_request_log() {
  RequestLogs& logs = request_logs();
  logs.request.emplace(LogDefer::Callback{});
  logs.active = &*logs.request;
}

inline Json end_request_log() {
  RequestLogs& logs = request_logs();
  logs.active = &logs.nowhere;
  if (!logs.request) return Json();
  std::optional<LogDefer> finished = std::move(logs.request);
  logs.request.reset();
  const LogDeferState* state = LogDeferAccess::state(*finished);
  if (!state || state->empty()) return Json();
  Json message = finished->message();
  message["pid"] = static_cast<std::int64_t>(::getpid());
  return message;
}

}  // namespace detail
}  // namespace aet


// ---- implementation: loop --------------------------------------------------

// ---- implementation: protocol ----------------------------------------------

// ---- implementation: server ------------------------------------------------

// ---- implementation: client ------------------------------------------------

#endif  // ANYEVENT_TASK_HPP
