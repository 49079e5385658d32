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

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#include <sys/timerfd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
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

// Text that is not JSON. what() reads "JSON parse error at line L, column C
// (byte B): REASON"; offset() is the byte offset from 0, line() and column()
// count from 1 (the column in characters, not bytes).
class JsonParseError : public JsonError {
 public:
  JsonParseError(const std::string& reason, std::size_t offset, std::size_t line,
                 std::size_t column);
  const std::string& reason() const noexcept { return reason_; }
  std::size_t offset() const noexcept { return offset_; }
  std::size_t line() const noexcept { return line_; }
  std::size_t column() const noexcept { return column_; }

 private:
  std::string reason_;
  std::size_t offset_, line_, column_;
};

namespace detail {
class JsonParser;
template <bool Pretty>
class JsonWriter;

// A slab the parser carves a document's containers and strings from, so a
// parse costs a few allocations instead of one per value. Each block in it
// holds one reference; the slab is freed when the last block goes, from
// whichever thread. A value kept from a parsed document therefore keeps its
// slab (at most 64 KiB) alive; a copy (Json(v)) owns its memory alone.
struct JsonChunk {
  explicit JsonChunk(std::size_t initial) noexcept : references(initial) {}
  std::atomic<std::size_t> references;
  void release() noexcept {
    if (references.fetch_sub(1, std::memory_order_acq_rel) == 1) ::operator delete(this);
  }
};

// The payload of a string value: the text, the slab it lives in (nullptr
// when it was allocated on its own), and whether the text is known to print
// as it is: valid UTF-8 with no '"', '\\' or control character. The parser
// marks what it has just checked, so a value read and then written again
// (a worker passing data through, say) is copied without a second scan;
// the mutable as_string() drops the mark.
struct JsonString {
  std::string text;
  JsonChunk* chunk;
  bool prints_verbatim = false;
};

// The representation of a double or a pointer as the 64-bit payload.
inline std::uint64_t double_bits(double d) noexcept {
  std::uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return bits;
}
inline std::uint64_t pointer_bits(const void* p) noexcept {
  return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p));
}
inline JsonString* new_json_string(std::string text, bool prints_verbatim = false) {
  return new JsonString{std::move(text), nullptr, prints_verbatim};
}
inline void delete_json_string(JsonString* s) noexcept {
  if (JsonChunk* chunk = s->chunk) {
    s->~JsonString();
    chunk->release();
  } else {
    delete s;
  }
}

// The storage of Json::Array and Json::Object: the interface of std::vector
// (what a user of one expects), but the size, the capacity and the elements
// share one heap block, and the handle is one pointer. A Json holds this
// handle in place, so an array costs one allocation and one indirection,
// where a std::vector behind a pointer costs two of each.
template <class T>
class JsonVector {
 public:
  using value_type = T;
  using size_type = std::size_t;
  using difference_type = std::ptrdiff_t;
  using reference = T&;
  using const_reference = const T&;
  using pointer = T*;
  using const_pointer = const T*;
  using iterator = T*;
  using const_iterator = const T*;
  using reverse_iterator = std::reverse_iterator<iterator>;
  using const_reverse_iterator = std::reverse_iterator<const_iterator>;

  JsonVector() noexcept = default;
  explicit JsonVector(size_type n) {
    guard([&] { resize(n); });
  }
  JsonVector(size_type n, const T& value) {
    guard([&] { resize(n, value); });
  }
  template <class It, class = typename std::iterator_traits<It>::iterator_category>
  JsonVector(It first, It last) {
    guard([&] { append(first, last); });
  }
  JsonVector(std::initializer_list<T> init) : JsonVector(init.begin(), init.end()) {}
  JsonVector(const JsonVector& other) : JsonVector(other.begin(), other.end()) {}
  JsonVector(JsonVector&& other) noexcept : block_(other.block_) { other.block_ = nullptr; }
  JsonVector& operator=(const JsonVector& other) {
    if (this != &other) {
      JsonVector copy(other);
      swap(copy);
    }
    return *this;
  }
  JsonVector& operator=(JsonVector&& other) noexcept {
    JsonVector taken(std::move(other));
    swap(taken);
    return *this;
  }
  JsonVector& operator=(std::initializer_list<T> init) {
    JsonVector copy(init);
    swap(copy);
    return *this;
  }
  ~JsonVector() { release(); }

  template <class It, class = typename std::iterator_traits<It>::iterator_category>
  void assign(It first, It last) {
    JsonVector copy(first, last);
    swap(copy);
  }
  void assign(size_type n, const T& value) {
    JsonVector copy(n, value);
    swap(copy);
  }
  void assign(std::initializer_list<T> init) { *this = init; }

  iterator begin() noexcept { return data(); }
  const_iterator begin() const noexcept { return data(); }
  const_iterator cbegin() const noexcept { return data(); }
  iterator end() noexcept { return data() + size(); }
  const_iterator end() const noexcept { return data() + size(); }
  const_iterator cend() const noexcept { return data() + size(); }
  reverse_iterator rbegin() noexcept { return reverse_iterator(end()); }
  const_reverse_iterator rbegin() const noexcept { return const_reverse_iterator(end()); }
  const_reverse_iterator crbegin() const noexcept { return const_reverse_iterator(end()); }
  reverse_iterator rend() noexcept { return reverse_iterator(begin()); }
  const_reverse_iterator rend() const noexcept { return const_reverse_iterator(begin()); }
  const_reverse_iterator crend() const noexcept { return const_reverse_iterator(begin()); }

  size_type size() const noexcept { return block_ ? block_->size : 0; }
  size_type capacity() const noexcept { return block_ ? block_->capacity : 0; }
  bool empty() const noexcept { return size() == 0; }
  static constexpr size_type max_size() noexcept {
    return (static_cast<size_type>(PTRDIFF_MAX) - 3 * sizeof(size_type)) / sizeof(T);
  }
  T* data() noexcept { return block_ ? items(block_) : nullptr; }
  const T* data() const noexcept { return block_ ? items(block_) : nullptr; }

  T& operator[](size_type i) noexcept { return data()[i]; }
  const T& operator[](size_type i) const noexcept { return data()[i]; }
  T& at(size_type i) {
    if (i >= size()) throw std::out_of_range("JsonVector::at");
    return data()[i];
  }
  const T& at(size_type i) const {
    if (i >= size()) throw std::out_of_range("JsonVector::at");
    return data()[i];
  }
  T& front() noexcept { return data()[0]; }
  const T& front() const noexcept { return data()[0]; }
  T& back() noexcept { return data()[size() - 1]; }
  const T& back() const noexcept { return data()[size() - 1]; }

  void reserve(size_type n) {
    if (n > capacity()) reallocate(n);
  }
  void shrink_to_fit() {
    if (size() == 0) release();
    else if (capacity() > size()) reallocate(size());
  }
  void clear() noexcept {
    if (!block_) return;
    destroy(items(block_), items(block_) + block_->size);
    block_->size = 0;
  }

  void push_back(const T& value) { emplace_back(value); }
  void push_back(T&& value) { emplace_back(std::move(value)); }
  template <class... Args>
  T& emplace_back(Args&&... args) {
    if (size() < capacity()) {
      T* slot = items(block_) + block_->size;
      ::new (static_cast<void*>(slot)) T(std::forward<Args>(args)...);
      ++block_->size;
      return *slot;
    }
    return grow_and_emplace(size(), std::forward<Args>(args)...);
  }
  void pop_back() noexcept {
    --block_->size;
    items(block_)[block_->size].~T();
  }

  void resize(size_type n) {
    if (n <= size()) return erase_tail(n);
    reserve(n);
    while (size() < n) emplace_back();
  }
  void resize(size_type n, const T& value) {
    if (n <= size()) return erase_tail(n);
    const T copy(value);  // value may be one of ours
    reserve(n);
    while (size() < n) emplace_back(copy);
  }

  template <class... Args>
  iterator emplace(const_iterator position, Args&&... args) {
    const size_type index = static_cast<size_type>(position - begin());
    const size_type n = size();
    if (index == n) {
      emplace_back(std::forward<Args>(args)...);
    } else if (n == capacity()) {
      grow_and_emplace(index, std::forward<Args>(args)...);
    } else {
      T value(std::forward<Args>(args)...);  // before moving: args may refer to ours
      T* d = items(block_);
      ::new (static_cast<void*>(d + n)) T(std::move(d[n - 1]));
      ++block_->size;
      std::move_backward(d + index, d + n - 1, d + n);
      d[index] = std::move(value);
    }
    return begin() + index;
  }
  iterator insert(const_iterator position, const T& value) { return emplace(position, value); }
  iterator insert(const_iterator position, T&& value) { return emplace(position, std::move(value)); }
  iterator insert(const_iterator position, size_type count, const T& value) {
    return insert_all(position, JsonVector(count, value));
  }
  template <class It, class = typename std::iterator_traits<It>::iterator_category>
  iterator insert(const_iterator position, It first, It last) {
    return insert_all(position, JsonVector(first, last));
  }
  iterator insert(const_iterator position, std::initializer_list<T> init) {
    return insert_all(position, JsonVector(init));
  }

  iterator erase(const_iterator position) { return erase(position, position + 1); }
  iterator erase(const_iterator first, const_iterator last) {
    T* d = data();
    const size_type from = static_cast<size_type>(first - d);
    const size_type to = static_cast<size_type>(last - d);
    if (from != to) {
      std::move(d + to, d + size(), d + from);
      erase_tail(size() - (to - from));
    }
    return d + from;
  }

  void swap(JsonVector& other) noexcept { std::swap(block_, other.block_); }
  friend void swap(JsonVector& a, JsonVector& b) noexcept { a.swap(b); }

  friend bool operator==(const JsonVector& a, const JsonVector& b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  }
  friend bool operator!=(const JsonVector& a, const JsonVector& b) { return !(a == b); }

 private:
  friend class JsonParser;
  struct Header {
    size_type size;
    size_type capacity;
    JsonChunk* chunk;  // the parser's slab it lives in, or nullptr
  };
  static constexpr std::size_t block_bytes(size_type capacity) noexcept {
    return sizeof(Header) + capacity * sizeof(T);
  }
  explicit JsonVector(Header* block) noexcept : block_(block) {}
  static void deallocate(Header* block) noexcept {
    if (JsonChunk* chunk = block->chunk) {
      block->~Header();
      chunk->release();
    } else {
      ::operator delete(block);
    }
  }

  static T* items(Header* block) noexcept {
    return static_cast<T*>(static_cast<void*>(reinterpret_cast<unsigned char*>(block) + sizeof(Header)));
  }
  static Header* allocate(size_type capacity) {
    static_assert(alignof(T) <= alignof(std::max_align_t), "over-aligned element");
    static_assert(sizeof(Header) % alignof(T) == 0, "elements follow the header");
    if (capacity > max_size()) throw std::length_error("JsonVector: too many elements");
    void* raw = ::operator new(block_bytes(capacity));
    return ::new (raw) Header{0, capacity, nullptr};
  }
  static void destroy(T* first, T* last) noexcept {
    for (; first != last; ++first) first->~T();
  }
  // Moves [first, last) into raw memory at out and ends the originals.
  static void relocate(T* first, T* last, T* out) noexcept {
    static_assert(std::is_nothrow_move_constructible_v<T>, "elements move without throwing");
    for (; first != last; ++first, ++out) {
      ::new (static_cast<void*>(out)) T(std::move(*first));
      first->~T();
    }
  }
  size_type grown_capacity(size_type needed) const {
    const size_type doubled = capacity() * 2;
    return std::max({doubled, needed, size_type{4}});
  }
  void reallocate(size_type capacity) {
    Header* fresh = allocate(capacity);
    if (block_) {
      relocate(items(block_), items(block_) + block_->size, items(fresh));
      fresh->size = block_->size;
      deallocate(block_);
    }
    block_ = fresh;
  }
  // Inserts at index into a larger block; the new element is made first,
  // so args may refer to our elements and a throw leaves us untouched.
  template <class... Args>
  T& grow_and_emplace(size_type index, Args&&... args) {
    const size_type n = size();
    Header* fresh = allocate(grown_capacity(n + 1));
    T* out = items(fresh);
    try {
      ::new (static_cast<void*>(out + index)) T(std::forward<Args>(args)...);
    } catch (...) {
      ::operator delete(fresh);
      throw;
    }
    if (block_) {
      T* d = items(block_);
      relocate(d, d + index, out);
      relocate(d + index, d + n, out + index + 1);
      deallocate(block_);
    }
    fresh->size = n + 1;
    block_ = fresh;
    return out[index];
  }
  template <class It>
  void append(It first, It last) {
    using Category = typename std::iterator_traits<It>::iterator_category;
    if constexpr (std::is_base_of_v<std::forward_iterator_tag, Category>) {
      const auto n = static_cast<size_type>(std::distance(first, last));
      if (n == 0) return;
      reserve(size() + n);
      T* out = items(block_) + block_->size;
      if constexpr (std::is_nothrow_constructible_v<T, decltype(*first)>) {
        for (; first != last; ++first, ++out) ::new (static_cast<void*>(out)) T(*first);
        block_->size += n;
      } else {
        for (; first != last; ++first, ++out) {
          ::new (static_cast<void*>(out)) T(*first);
          ++block_->size;  // counted one by one: a throw leaves a valid vector
        }
      }
    } else {
      for (; first != last; ++first) emplace_back(*first);
    }
  }
  iterator insert_all(const_iterator position, JsonVector&& values) {
    const size_type index = static_cast<size_type>(position - begin());
    if (values.empty()) return begin() + index;
    JsonVector result;
    result.reserve(size() + values.size());
    T* d = data();
    result.append(std::make_move_iterator(d), std::make_move_iterator(d + index));
    result.append(std::make_move_iterator(values.begin()), std::make_move_iterator(values.end()));
    result.append(std::make_move_iterator(d + index), std::make_move_iterator(d + size()));
    swap(result);
    return begin() + index;
  }
  void erase_tail(size_type n) noexcept {
    if (!block_) return;
    destroy(items(block_) + n, items(block_) + block_->size);
    block_->size = n;
  }
  void release() noexcept {
    if (!block_) return;
    destroy(items(block_), items(block_) + block_->size);
    deallocate(block_);
    block_ = nullptr;
  }
  template <class F>
  void guard(F&& build) {
    try {
      build();
    } catch (...) {
      release();
      throw;
    }
  }

  Header* block_ = nullptr;
};

}  // namespace detail

// A JSON value: null, boolean, 64-bit integer, double, UTF-8 string, array
// or object; 16 bytes (a tag and a pointer or scalar).
//
// Policies:
// - Numbers: an integer literal that fits int64 parses as Int, anything else
//   (fraction, exponent, or too big) as Double. Int and Double compare by
//   value: Json(1) == Json(1.0). A literal too large for a double (1e400) is
//   a parse error, since a JSON value must be finite; one too small (1e-400)
//   rounds to 0 as IEEE arithmetic would.
// - Doubles print as the shortest text that reads back to the same bits, and
//   always as a double: 1.0 prints "1.0", -0.0 prints "-0.0" (the sign is
//   kept), so parse(dump(x)) == x with the same types.
// - Objects keep insertion order and compare regardless of order. Keys are
//   unique: parse() and object() reject a duplicate key.
// - Copies, comparison, dump() and destruction recurse: values built by
//   parse() are bounded by max_depth, values built by hand are up to you.
// - Memory: parse() carves a document's arrays, objects and strings from a
//   few shared slabs, freed when their last value goes. A value kept from a
//   large parsed document keeps its slab (up to 64 KiB) alive; copy it,
//   Json(v), to hold only its own memory. Values are independent: two of
//   them may be used and destroyed in different threads, wherever they came
//   from (one value is not for concurrent use, as with any type).
class Json {
 public:
  enum class Type : std::uint8_t { Null, Bool, Int, Double, String, Array, Object };
  // Both have the interface of std::vector (see detail::JsonVector).
  using Array = detail::JsonVector<Json>;
  // Insertion order is kept; keys are unique (parse rejects duplicates).
  using Object = detail::JsonVector<std::pair<std::string, Json>>;

  struct ParseOptions {
    std::size_t max_depth = AET_DEFAULT_MAX_DEPTH;  // nested arrays/objects allowed
  };

  Json() noexcept {}  // null
  Json(std::nullptr_t) noexcept {}
  Json(bool value) noexcept : type_(Type::Bool) { value_.bits = value ? 1 : 0; }
  template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
  Json(T value) noexcept;  // unsigned values above INT64_MAX become doubles
  Json(double value) noexcept : type_(Type::Double) { value_.bits = detail::double_bits(value); }
  Json(const char* value);  // throws JsonError for a null pointer
  Json(std::string value);
  Json(std::string_view value);
  Json(Array value);
  Json(Object value);  // throws JsonError for a duplicate key
  // Always an array, whatever the elements: Json{a, b} is [a, b], Json{"k", 1}
  // is ["k", 1], Json{1} is [1]; Json{} is null (the default constructor).
  // One exception, from the language: braces around a single element that
  // is itself a Json copy it under Clang before 18 (C++ core issue 2137)
  // and wrap it under GCC, so write Json::array({x}) for [x] and Json(x)
  // for a copy.
  Json(std::initializer_list<Json> elements);
  static Json array(std::initializer_list<Json> elements = {});
  // Always an object; throws JsonError for a duplicate key.
  static Json object(std::initializer_list<std::pair<std::string, Json>> members = {});

  Json(const Json& other);
  Json(Json&& other) noexcept { take(other); }
  Json& operator=(const Json& other);
  Json& operator=(Json&& other) noexcept;
  ~Json() {
    if (type_ >= Type::String) destroy();  // scalars own nothing
  }

  Type type() const noexcept { return type_; }
  bool is_null() const noexcept { return type_ == Type::Null; }
  bool is_bool() const noexcept { return type_ == Type::Bool; }
  bool is_int() const noexcept { return type_ == Type::Int; }
  bool is_double() const noexcept { return type_ == Type::Double; }
  bool is_number() const noexcept { return type_ == Type::Int || type_ == Type::Double; }
  bool is_string() const noexcept { return type_ == Type::String; }
  bool is_array() const noexcept { return type_ == Type::Array; }
  bool is_object() const noexcept { return type_ == Type::Object; }

  // Typed access; a wrong type throws JsonError("expected string, got number").
  bool as_bool() const;
  std::int64_t as_int() const;  // a double with an integral value in range is accepted
  double as_double() const;     // an int converts
  const std::string& as_string() const;
  // A string parse() read without escapes prints again without a scan; the
  // mutable access drops that mark (read through a const Json& to keep it).
  std::string& as_string();
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  // Arrays and objects. size() is 0 for scalars (and empty() true).
  //
  // References into an array or object are those of a std::vector: adding
  // a member or an element may move the others. Hence, for an object o,
  // o["new"] = o["old"] is undefined behaviour: the right side is a
  // reference to o's member, taken first, that the insertion on the left
  // invalidates. Write o.set("new", o["old"]), which copies before it
  // inserts. (o.push_back(o[0]) is fine: the argument is a copy.)
  std::size_t size() const noexcept;
  bool empty() const noexcept { return size() == 0; }
  const Json& operator[](std::size_t index) const;  // throws JsonError out of range
  Json& operator[](std::size_t index);
  const Json& operator[](std::string_view key) const;  // throws JsonError when missing
  Json& operator[](std::string_view key);              // inserts null; null becomes {}
  // Stores value under key, replacing a member of that key or adding one
  // at the end; null becomes {}. Returns the stored value.
  Json& set(std::string key, Json value);
  const Json* find(std::string_view key) const;        // nullptr when missing or not an object
  Json* find(std::string_view key);
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  void push_back(Json value);  // null becomes []

  friend bool operator==(const Json& a, const Json& b) noexcept;
  friend bool operator!=(const Json& a, const Json& b) noexcept { return !(a == b); }

  // Compact when indent < 0, else pretty with `indent` spaces. Throws
  // JsonError for NaN, infinities and strings that are not UTF-8; dump_to()
  // then leaves `out` as it was.
  std::string dump(int indent = -1) const;
  void dump_to(std::string& out, int indent = -1) const;

  // Strict RFC 8259: one value, optionally surrounded by whitespace. Throws
  // JsonParseError (see the policies above).
  static Json parse(std::string_view text, const ParseOptions& options);
  static Json parse(std::string_view text) { return parse(text, ParseOptions{}); }

 private:
  friend class detail::JsonParser;
  template <bool Pretty>
  friend class detail::JsonWriter;
  // The tag, and the payload it selects: the bits of a boolean, integer,
  // double or string pointer, or the one-pointer handle of an array or
  // object. Keeping every scalar in one member makes moving it one copy.
  Type type_ = Type::Null;
  union Storage {
    Storage() noexcept : bits(0) {}
    ~Storage() {}
    std::uint64_t bits;
    Array array;
    Object object;
  } value_;
  bool bool_payload() const noexcept { return value_.bits != 0; }
  std::int64_t int_payload() const noexcept { return static_cast<std::int64_t>(value_.bits); }
  double double_payload() const noexcept {
    double d;
    std::memcpy(&d, &value_.bits, sizeof d);
    return d;
  }
  detail::JsonString* string_payload() const noexcept {
    return reinterpret_cast<detail::JsonString*>(static_cast<std::uintptr_t>(value_.bits));
  }
  void take(Json& other) noexcept;  // moves other's payload into this payload-less value
  void destroy() noexcept;
  [[noreturn]] void type_error(const char* expected) const;
};

// "null", "boolean", "number" (Int and Double alike), "string", "array", "object".
const char* to_string(Json::Type type) noexcept;

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
  // repeat <= 0, else every `repeat` seconds after the first, on the grid
  // first + k * repeat: no cumulative drift, and a timer that is late (a
  // stalled loop) fires once, then at the next grid point after now.
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
// encoding, incremental decoding and shape checks, and the sending of
// encoded frames on a descriptor it is given (detail::OutgoingBytes); it
// opens no socket and knows no loop.
// ===========================================================================

class ProtocolError : public Error {
 public:
  using Error::Error;
};

constexpr std::size_t default_max_frame = AET_DEFAULT_MAX_FRAME;

// Appends one frame holding `message` (compact JSON) to `out`. Throws
// JsonError when the message cannot be printed (NaN, invalid UTF-8), and
// ProtocolError when it exceeds 4 GiB; `out` is then left as it was.
void append_frame(std::string& out, const Json& message);
std::string encode_frame(const Json& message);

// Throws ProtocolError unless `message` is a well-formed do/dn/ok/er array:
// ["do", {meta}, args...], ["dn", {meta}], ["ok", {meta}, result] or
// ["er", {meta}, "message"]. Unknown meta keys are fine.
void check_message(const Json& message);

namespace detail {
// Bytes whose growth leaves the new ones unset, so that what a socket read
// fills is not first zeroed (std::string's resize() would).
class ByteBuffer {
 public:
  ByteBuffer() = default;
  ByteBuffer(const ByteBuffer& other) { append(other.data(), other.size()); }
  ByteBuffer(ByteBuffer&& other) noexcept
      : bytes_(std::move(other.bytes_)),
        size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  ByteBuffer& operator=(ByteBuffer other) noexcept {  // copy or move, then swap
    std::swap(bytes_, other.bytes_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
    return *this;
  }
  ~ByteBuffer() = default;

  char* data() noexcept { return bytes_.get(); }
  const char* data() const noexcept { return bytes_.get(); }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return capacity_; }
  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    std::unique_ptr<char[]> bigger(new char[n]);
    if (size_) std::memcpy(bigger.get(), bytes_.get(), size_);
    bytes_ = std::move(bigger);
    capacity_ = n;
  }
  // n more bytes, left unset; the old end is returned.
  char* extend(std::size_t n) {
    if (capacity_ - size_ < n) reserve(std::max(size_ + n, capacity_ * 2));
    size_ += n;
    return bytes_.get() + size_ - n;
  }
  void append(const char* p, std::size_t n) {
    if (n) std::memcpy(extend(n), p, n);
  }
  void truncate(std::size_t n) noexcept { size_ = std::min(size_, n); }
  void erase_front(std::size_t n) noexcept {
    std::memmove(bytes_.get(), bytes_.get() + n, size_ - n);
    size_ -= n;
  }
  void release() noexcept {
    bytes_.reset();
    size_ = capacity_ = 0;
  }

 private:
  std::unique_ptr<char[]> bytes_;
  std::size_t size_ = 0, capacity_ = 0;
};
}  // namespace detail

// Takes bytes in any chunking and yields whole, shape-checked messages.
//
// A frame whose body is bad (not JSON, wrong shape) is consumed and makes
// next() throw once; the stream stays in step and later frames decode. A bad
// header (a zero length, or a length above max_frame) is fatal: nothing after
// it is buffered, the messages before it are still yielded, then next()
// throws, and so does every later feed() or next(). feed() throws at once
// when no whole message waits before the bad header, so an oversize header
// is refused before its body arrives.
class FrameDecoder {
 public:
  explicit FrameDecoder(std::size_t max_frame = default_max_frame,
                        std::size_t max_depth = AET_DEFAULT_MAX_DEPTH);
  // Copies decode on their own; a moved-from decoder is left empty, with
  // its limits, and decodes a new stream.
  FrameDecoder(const FrameDecoder&) = default;
  FrameDecoder& operator=(const FrameDecoder&) = default;
  FrameDecoder(FrameDecoder&& other) noexcept;
  FrameDecoder& operator=(FrameDecoder&& other) noexcept;
  ~FrameDecoder() = default;
  void feed(const char* data, std::size_t size);
  void feed(std::string_view bytes) { feed(bytes.data(), bytes.size()); }
  // For reading straight into the decoder (no copy through a buffer of the
  // caller's): room for all of the awaited body once a frame's header is
  // in, else for at least `at_least` bytes (with 0, whatever room is left,
  // maybe none); fill some of it, then commit(n), which takes the first n
  // bytes as feed() would. Both throw as feed() does.
  std::pair<char*, std::size_t> input_space(std::size_t at_least = 64 * 1024);
  void commit(std::size_t n);
  // The next whole message, or nothing yet; ProtocolError on a bad one.
  std::optional<Json> next();
  std::size_t buffered() const noexcept { return buffer_.size() - read_pos_; }  // held, not yet yielded
  // A bad header has stopped the stream: the messages before it are still
  // yielded, then next() throws, as feed() and input_space() do already.
  bool broken() const noexcept { return !broken_.empty(); }

 private:
  void compact();
  void release_if_drained();
  void take_in();
  [[noreturn]] void throw_broken() const;
  std::size_t max_frame_, max_depth_;
  detail::ByteBuffer buffer_;
  std::size_t read_pos_ = 0;     // start of the first frame not yet yielded
  std::size_t pending_pos_ = 0;  // start of the first frame not yet complete
  std::size_t pending_length_ = 0;  // its body length, once its header is in
  std::string broken_;           // why the stream is unusable, after a bad header
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

// A handler owns its arguments: one taking `Json args` by value can move a
// large string or array out of them instead of copying it; one taking
// `const Json&` works as well.
using Method = std::function<Json(Json args)>;  // args after the method name
using Methods = std::map<std::string, Method, std::less<>>;
using CatchAll = std::function<Json(Json args)>;  // every argument
using Interface = std::variant<Methods, CatchAll>;

// Process titles (prctl PR_SET_NAME, shown by ps and /proc/PID/comm) are
// "aet-server:NAME" and "aet-worker:NAME", cut to the 15 bytes Linux keeps:
// "aet-worker:hasher" reads "aet-worker:hash". Log lines carry the full name.
// Every member has a default, so brace and designated initialisers that
// name only some of them compile warning-free under -Wextra.
struct ServerOptions {
  std::string listen{};               // "unix:PATH", "tcp:HOST:PORT", "tcp:[V6]:PORT"
  std::string name = "aet";           // in process titles and log lines
  std::function<void()> setup{};      // once per worker, lazily, retried after a throw
  std::function<void()> checkout_done{};  // a checkout was released normally ("dn")
  // Seconds one request (setup included) may run; the worker then exits:
  // SIGALRM first (logged; at most half a second late), SIGKILL one to two
  // seconds after the timeout. 0: no limit.
  double hung_worker_timeout = 300;
  Interface interface{};              // method table or catch-all
  unsigned socket_mode = 0600;        // Unix socket file permissions, exactly
  std::size_t max_frame = default_max_frame;
};

namespace detail {
struct ServerState;
}

class TaskServer;
TaskServer fork_task_server(ServerOptions options);

// The listening socket and the master loop. The master only accepts, forks
// one worker per connection and reaps; workers serve requests.
//
// While run() is active the process is the server's: it handles SIGTERM,
// SIGINT, SIGCHLD (reaping every child of the process with waitpid(-1)) and
// ignores SIGPIPE; the old dispositions come back when run() returns. A
// worker uses SIGTERM/SIGINT (finish the request, then exit) and SIGALRM
// (hung_worker_timeout) for itself.
class Server {
 public:
  // Binds and listens at once (so a TCP port 0 is known); throws ServerError.
  // A stale Unix socket file (nobody listening) is replaced; a live one, or
  // a file that is not a socket, is an error. If descriptor 0, 1 or 2 is
  // closed it is opened on /dev/null, so that no server descriptor takes a
  // standard number a worker keeps.
  explicit Server(ServerOptions options);
  ~Server();  // closes the socket; removes the Unix socket file it created
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The address bound, with the real port: "tcp:127.0.0.1:43117".
  const std::string& address() const;
  int port() const;  // 0 for Unix sockets

  // Accepts and forks until SIGTERM/SIGINT or stop(). Stopping closes the
  // listening socket and removes the socket file at once, sends SIGTERM to
  // the workers (an idle one exits, a busy one replies first), waits for
  // them (killing what is left after hung_worker_timeout) and returns.
  // Runs once; one Server may run in a process at a time.
  void run();
  void stop();  // async-signal-safe; before run(), run() returns at once

 private:
  friend TaskServer fork_task_server(ServerOptions options);
  std::unique_ptr<detail::ServerState> state_;
};

// A server in its own process, alive while this handle (and the process
// that made it) lives.
class TaskServer {
 public:
  TaskServer() = default;  // no server: pid() is -1, stop() does nothing
  TaskServer(TaskServer&&) noexcept;
  TaskServer& operator=(TaskServer&&) noexcept;
  ~TaskServer();  // stop()
  pid_t pid() const noexcept { return pid_; }
  const std::string& address() const noexcept { return address_; }
  int port() const noexcept { return port_; }  // 0 for Unix sockets
  // Ends the server (as SIGTERM would) and reaps it. Busy workers finish
  // their calls first, so this can take up to 5 s; then the server and
  // every worker (the server process leads its own process group) are
  // killed with SIGKILL. Idempotent.
  void stop() noexcept;

 private:
  friend TaskServer fork_task_server(ServerOptions options);
  TaskServer(pid_t pid, int keepalive_fd, std::string address, int port);
  pid_t pid_ = -1;
  int keepalive_fd_ = -1;
  std::string address_;
  int port_ = 0;
};

// Binds here (errors are thrown here, the port is known), then forks a
// process that runs the server. That process ends when the handle is
// dropped or this process dies: it watches a keep-alive socket whose other
// end this process holds; dropping the handle shuts that socket down, and
// dying closes it. As a second guard it asks for SIGTERM on parent death,
// which Linux sends when the forking *thread* ends: call it from a thread
// that outlives the handle, such as the main thread.
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

constexpr double forever = -1;  // a timeout that never expires (any negative value)

// Every member has a default, so `{"unix:/path"}` and designated
// initialisers compile warning-free under -Wextra.
struct ClientOptions {
  std::string connect{};                // as ServerOptions::listen
  std::string name{};                   // in frame names; empty: the connect string
  unsigned min_workers = 2;             // kept connected; capped at max_workers
  unsigned max_workers = 20;            // connected or connecting, at most; at least 1
  // Seconds each call may take, counted from when it is queued until its
  // reply; waiting for a worker, and behind earlier calls of the same
  // checkout, counts. On expiry the worker is dropped and the checkout fails
  // with TimeoutError. aet::forever: no limit.
  double timeout = 30;
  unsigned max_checkouts = 0;           // checkouts a worker serves; 0: unlimited
  bool dont_refork_after_error = false;  // keep a worker whose checkout got an error reply
  std::size_t max_frame = default_max_frame;  // largest request sent and reply accepted
  std::size_t max_pending_checkouts = 0;  // checkouts not yet served; 0: unlimited
  // Spreads the recycling of workers started together: each worker's own
  // max_checkouts is drawn uniformly from the integers in
  // [max_checkouts * (1 - j), max_checkouts * (1 + j)], at least 1. From 0
  // (every worker serves exactly max_checkouts) to 1. Last, so that
  // positional initialisers written before it existed keep their meaning.
  double max_checkouts_jitter = 0;
};

struct CheckoutOptions {
  std::optional<double> timeout{};      // default: the client's
  std::optional<LogDefer> log_defer{};  // calls are timed and worker logs merged here
};

namespace detail {
struct CheckoutState;
struct ClientState;
}

// A handle on one checkout; copies share it. The worker is held from when
// the checkout is served until the last handle goes and nothing is pending
// (queued calls keep the checkout alive, so client.checkout().call(...) on
// a temporary works). Calls run in order, one at a time.
//
// Each callback is wrapped, when queued, in a frame named
// "CLIENT_NAME -> METHOD" ("CLIENT_NAME -> ->()" for a plain call) made
// inside the caller's current frame, unless it is already framed (then its
// own frame is used). The result comes through that frame, so what the
// callback throws reaches its catchers; an error is raised there too:
// RemoteError for the worker's error reply, CheckoutError (TimeoutError)
// when the checkout failed for good. With no catcher it propagates out of
// the loop. Callbacks run only from the loop, never inside call(). After an
// error the other queued calls are dropped without running. The callback's
// Checkout& may queue more calls. Once the Client is gone, calls throw
// aet::Error("client is gone").
//
// With CheckoutOptions::log_defer, each call is timed in it under its
// method name ("->()" for a plain call) from send to reply, and the log a
// worker sends back (meta "ld") is merged into it. The checkout lets its
// copy go when released, or as soon as it fails for good.
class Checkout {
 public:
  using Callback = std::function<void(Checkout& checkout, Json result)>;

  Checkout() = default;  // an empty handle; calls on it throw aet::Error

  // Queues a method call: sends ["do", {}, method, args...]. `args` is the
  // array of arguments (null: none; any other value: one argument). Throws
  // JsonError for arguments JSON cannot carry and ProtocolError for a
  // request larger than ClientOptions::max_frame; nothing is queued then.
  template <class F>
  void call(std::string method, Json args, F callback, const char* file = __builtin_FILE(),
            int line = __builtin_LINE());
  // Queues a plain call: ["do", {}, args...], no method name.
  template <class F>
  void operator()(Json args, F callback, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE());
  // Fails the call in flight (or the first queued one) with
  // CheckoutError(message), from the loop; the worker is closed and every
  // later call fails with the same message.
  void throw_fatal_error(const std::string& message);

  explicit operator bool() const noexcept { return state_ != nullptr; }

 private:
  friend class Client;
  friend struct detail::ClientState;
  friend struct detail::CheckoutState;
  explicit Checkout(std::shared_ptr<detail::CheckoutState> state) : state_(std::move(state)) {}
  std::string frame_name(const std::string* method) const;
  void enqueue(std::optional<std::string> method, Json args, Callback callback, FrameContext context);
  std::shared_ptr<detail::CheckoutState> state_;
};

// The pool of worker connections to one server, and its checkouts. It uses
// the event loop only through EventHost, which must outlive it.
//
// Workers are connecting, idle or held by a checkout. A new one is connected
// while fewer than min_workers exist, or when a checkout with a call waits,
// none is idle and fewer than max_workers exist (connecting ones count).
// A failed connect is retried every 0.2 s while there is such demand, so
// checkouts made before the server is up are served once it is, within
// their timeout; a connection that dies before serving any checkout counts
// as a failed connect. An idle worker that dies is dropped at once and
// replaced as needed. A worker is closed, never reused, after a fatal error on its
// checkout, after an error reply (unless dont_refork_after_error), or once
// it served max_checkouts; otherwise a released checkout sends "dn" and
// its worker goes back to the pool.
//
// Destroying the client closes every worker and discards pending
// checkouts and calls silently (their callbacks never run).
class Client {
 public:
  // Throws aet::Error for max_workers 0. Resolves the address (throws
  // aet::Error for a bad one) and starts
  // connecting min(min_workers, max_workers) workers. Each connect tries
  // every address the name resolved to, in turn.
  Client(EventHost& host, ClientOptions options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // A new checkout, queued first come, first served; it gets a worker once
  // it has a call. Throws OverloadError when max_pending_checkouts already
  // wait.
  Checkout checkout(CheckoutOptions options = {});

  const std::string& name() const;
  std::size_t worker_count() const;       // connected or connecting
  std::size_t idle_worker_count() const;
  std::size_t pending_checkout_count() const;  // made, not yet served

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

// The library's one clock, CLOCK_MONOTONIC: in whole nanoseconds for the
// loop (integer deadlines, so a repeating timer's grid never drifts and
// timeouts round exactly), in seconds for everything else.
inline std::int64_t monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // cannot fail for this clock
  return static_cast<std::int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

inline double monotonic_seconds() noexcept { return static_cast<double>(monotonic_ns()) / 1e9; }

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

namespace aet {

inline JsonParseError::JsonParseError(const std::string& reason, std::size_t offset,
                                      std::size_t line, std::size_t column)
    : JsonError("JSON parse error at line " + std::to_string(line) + ", column " +
                std::to_string(column) + " (byte " + std::to_string(offset) + "): " + reason),
      reason_(reason),
      offset_(offset),
      line_(line),
      column_(column) {}

inline const char* to_string(Json::Type type) noexcept {
  switch (type) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "boolean";
    case Json::Type::Int:
    case Json::Type::Double: return "number";
    case Json::Type::String: return "string";
    case Json::Type::Array: return "array";
    case Json::Type::Object: return "object";
  }
  return "unknown";
}

namespace detail {

// Classes of bytes inside a JSON string: what the parser and the printer
// must stop at. Everything else is copied in bulk.
enum JsonByteClass : unsigned char { json_plain, json_quote, json_backslash, json_control, json_high };

struct JsonByteClasses {
  unsigned char of[256];
  constexpr JsonByteClasses() : of{} {
    for (int i = 0; i < 256; ++i)
      of[i] = i < 0x20 ? json_control
              : i == '"' ? json_quote
              : i == '\\' ? json_backslash
              : i >= 0x80 ? json_high
                          : json_plain;
  }
};
inline constexpr JsonByteClasses json_byte_classes{};

// True when one of the 8 bytes at p is '"', '\\', below 0x20 or above 0x7F.
// Borrows only start at such a byte, so the answer for the word is exact.
inline bool json_word_needs_attention(std::uint64_t v) noexcept {
  constexpr std::uint64_t ones = 0x0101010101010101ull;
  const std::uint64_t t = ((v ^ (ones * 0x22)) - ones) | ((v ^ (ones * 0x5C)) - ones) |
                          (v - ones * 0x20) | v;
  return (t & (ones * 0x80)) != 0;
}

#if defined(__SSE2__)
// Of the 16 bytes at p, those that are '"', '\\', below 0x20 or above 0x7F:
// 0xFF where such a byte is, 0 elsewhere; the mask has one bit per byte
// (the low bit for p[0]), 0 when all 16 are plain. Long strings are
// scanned and copied 16 bytes per step with these where SSE2 is there
// (every x86-64); elsewhere 8 bytes per step with the word test above.
inline __m128i json_attention_bytes(const char* p) noexcept {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  // Flipping bit 1 turns '"' (0x22) into 0x20 and keeps the control
  // characters below 0x20 and the bytes above 0x7F negative (as signed
  // bytes): one comparison finds all three, one more the backslash.
  const __m128i flipped = _mm_xor_si128(v, _mm_set1_epi8(0x02));
  const __m128i quote_control_or_high = _mm_cmplt_epi8(flipped, _mm_set1_epi8(0x21));
  const __m128i backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'));
  return _mm_or_si128(quote_control_or_high, backslash);
}
inline unsigned json_attention_mask(const char* p) noexcept {
  return static_cast<unsigned>(_mm_movemask_epi8(json_attention_bytes(p)));
}
#endif

// The first byte at or after p that is not plain printable ASCII.
inline const char* json_skip_plain(const char* p, const char* end) noexcept {
#if defined(__SSE2__)
  // Long runs 64 bytes per test, then 16.
  for (; end - p >= 64; p += 64) {
    const __m128i a = json_attention_bytes(p), b = json_attention_bytes(p + 16);
    const __m128i c = json_attention_bytes(p + 32), d = json_attention_bytes(p + 48);
    if (_mm_movemask_epi8(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d))) == 0) continue;
    const auto bits = [](__m128i x) { return std::uint64_t{static_cast<unsigned>(_mm_movemask_epi8(x))}; };
    return p + __builtin_ctzll(bits(a) | bits(b) << 16 | bits(c) << 32 | bits(d) << 48);
  }
  for (; end - p >= 16; p += 16)
    if (const unsigned mask = json_attention_mask(p)) return p + __builtin_ctz(mask);
#endif
  for (std::uint64_t word; end - p >= 8; p += 8) {
    std::memcpy(&word, p, 8);
    if (json_word_needs_attention(word)) break;
  }
  while (p < end && json_byte_classes.of[static_cast<unsigned char>(*p)] == json_plain) ++p;
  return p;
}

// Length of the well-formed UTF-8 sequence at p (whose first byte is above
// 0x7F), or 0 with *why set (RFC 3629: no overlongs, no surrogates, nothing
// above U+10FFFF, no truncation).
inline std::size_t utf8_sequence_length(const char* p, const char* end, const char** why) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  const std::size_t available = static_cast<std::size_t>(end - p);
  const unsigned lead = u[0];
  std::size_t length;
  unsigned low = 0x80, high = 0xBF;  // range of the second byte
  if (lead < 0xC0) {
    *why = "invalid UTF-8: unexpected continuation byte";
    return 0;
  } else if (lead < 0xC2) {
    *why = "invalid UTF-8: overlong encoding";
    return 0;
  } else if (lead < 0xE0) {
    length = 2;
  } else if (lead < 0xF0) {
    length = 3;
    if (lead == 0xE0) low = 0xA0;
    if (lead == 0xED) high = 0x9F;
  } else if (lead < 0xF5) {
    length = 4;
    if (lead == 0xF0) low = 0x90;
    if (lead == 0xF4) high = 0x8F;
  } else {
    *why = "invalid UTF-8: byte above 0xF4";
    return 0;
  }
  if (available < 2 || (u[1] & 0xC0) != 0x80) {
    *why = "invalid UTF-8: truncated sequence";
    return 0;
  }
  if (u[1] < low || u[1] > high) {
    *why = lead == 0xED   ? "invalid UTF-8: encoded surrogate (U+D800 to U+DFFF)"
           : lead == 0xF4 ? "invalid UTF-8: code point above U+10FFFF"
                          : "invalid UTF-8: overlong encoding";
    return 0;
  }
  for (std::size_t i = 2; i < length; ++i) {
    if (i >= available || (u[i] & 0xC0) != 0x80) {
      *why = "invalid UTF-8: truncated sequence";
      return 0;
    }
  }
  return length;
}

// The length of the UTF-8 sequence at p when it is a plain two- or
// three-byte one (most non-ASCII text); 0 sends the caller to the full
// check above.
inline std::size_t utf8_common_length(const char* p, const char* end) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  const std::size_t available = static_cast<std::size_t>(end - p);
  if (u[0] >= 0xC2 && u[0] <= 0xDF) return available >= 2 && (u[1] & 0xC0) == 0x80 ? 2 : 0;
  if (u[0] >= 0xE1 && u[0] <= 0xEF && u[0] != 0xED)
    return available >= 3 && (u[1] & 0xC0) == 0x80 && (u[2] & 0xC0) == 0x80 ? 3 : 0;
  return 0;
}

inline void append_utf8(std::string& out, std::uint32_t cp) {
  char b[4];
  std::size_t n;
  if (cp < 0x80) {
    b[0] = static_cast<char>(cp);
    n = 1;
  } else if (cp < 0x800) {
    b[0] = static_cast<char>(0xC0 | (cp >> 6));
    b[1] = static_cast<char>(0x80 | (cp & 0x3F));
    n = 2;
  } else if (cp < 0x10000) {
    b[0] = static_cast<char>(0xE0 | (cp >> 12));
    b[1] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    b[2] = static_cast<char>(0x80 | (cp & 0x3F));
    n = 3;
  } else {
    b[0] = static_cast<char>(0xF0 | (cp >> 18));
    b[1] = static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    b[2] = static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    b[3] = static_cast<char>(0x80 | (cp & 0x3F));
    n = 4;
  }
  out.append(b, n);
}

// Index of the first member whose key repeats an earlier one, or n.
inline std::size_t find_duplicate_key(const std::pair<std::string, Json>* members, std::size_t n) {
  if (n < 2) return n;
  if (n <= 16) {
    for (std::size_t j = 1; j < n; ++j)
      for (std::size_t i = 0; i < j; ++i)
        if (members[i].first == members[j].first) return j;
    return n;
  }
  std::vector<std::uint32_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = static_cast<std::uint32_t>(i);
  std::sort(order.begin(), order.end(), [members](std::uint32_t a, std::uint32_t b) {
    int c = members[a].first.compare(members[b].first);
    return c != 0 ? c < 0 : a < b;
  });
  std::size_t first = n;
  for (std::size_t i = 1; i < n; ++i)
    if (members[order[i]].first == members[order[i - 1]].first && order[i] < first)
      first = order[i];
  return first;
}

[[noreturn]] inline void throw_duplicate_key(const std::string& key) {
  throw JsonError("duplicate key \"" + key + "\" in object");
}

// The 8 digits of x < 10^8 (leading zeros included) as characters packed
// into a word, the first digit in the lowest byte: it stays in a register.
// x splits into 4-digit halves in 32-bit lanes, these into 2-digit halves
// in 16-bit lanes, these into digits in bytes; every lane divides at once
// by a multiply and shift (n * 10486 >> 20 is n / 100 for n < 10^4, and
// n * 103 >> 10 is n / 10 for n < 100), no lane overflowing into the next.
inline std::uint64_t eight_digits(std::uint32_t x) noexcept {
  std::uint64_t v = x / 10000 | std::uint64_t{x % 10000} << 32;
  std::uint64_t q = (v * 10486 >> 20) & 0x0000007F0000007Full;
  v = q | (v - q * 100) << 16;
  q = (v * 103 >> 10) & 0x000F000F000F000Full;
  v = q | (v - q * 10) << 8;
  return v | 0x3030303030303030ull;  // + '0' in every byte
}

// The shortest text of a double that needs at most 15 significant digits
// and lies in [1e-7, 1e15), written at o (at most 32 bytes); nullptr for
// any other double (then std::to_chars does it). Decimals of 15 digits lie
// farther apart than doubles, so at most one of them reads back as d: if
// the nearest one does, its digits without trailing zeros are the shortest
// round trip.
inline char* format_short_double(char* o, double d) noexcept {
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
  (void)o;
  (void)d;
  return nullptr;  // the digit words below assume little endian: to_chars does it
#else
  static constexpr double powers[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                                      1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
  if (d == 0) {
    if (std::signbit(d)) *o++ = '-';
    std::memcpy(o, "0.0", 3);
    return o + 3;
  }
  const double a = d < 0 ? -d : d;
  if (!(a >= 1e-7 && a < 1e15)) return nullptr;
  std::uint64_t bits;
  std::memcpy(&bits, &a, sizeof bits);
  const int binary_exponent = static_cast<int>(bits >> 52) - 1023;
  // About floor(log10(a)) (1233 / 4096 is close to log10(2)); an estimate
  // one off gives fewer or more digits, caught by the checks below.
  const int decimal_exponent = (binary_exponent * 1233) / 4096 - (binary_exponent < 0 ? 1 : 0);
  int p = 14 - decimal_exponent;  // a * 10^p has 15 digits before the point
  if (p < 0 || p > 22) return nullptr;
  double scaled = a * powers[p];
  if (scaled >= 1e15) {
    if (p == 0) return nullptr;
    scaled = a * powers[--p];
  }
  const std::uint64_t m = static_cast<std::uint64_t>(scaled + 0.5);
  if (m < 100000000000000u || m >= 1000000000000000u) return nullptr;  // exactly 15 digits
  // Does m / 10^p read back as a = M / 2^k? Exactly, in integers: it does
  // when |m / 10^p - a| is below half the spacing of doubles at a, that is
  // |m * 2^(k+1-p) - 2 * M * 5^p| < 5^p (half that below a power of two,
  // where the spacing below is half). Ties go to the general path.
  __extension__ typedef unsigned __int128 Wide;
  static constexpr std::uint64_t powers_of_5[] = {1, 5, 25, 125, 625, 3125, 15625, 78125, 390625, 1953125,
                                                  9765625, 48828125, 244140625, 1220703125, 6103515625,
                                                  30517578125, 152587890625, 762939453125, 3814697265625,
                                                  19073486328125, 95367431640625, 476837158203125,
                                                  2384185791015625};
  const std::uint64_t mantissa = (bits & ((std::uint64_t{1} << 52) - 1)) | std::uint64_t{1} << 52;
  const int k = 1075 - static_cast<int>(bits >> 52);  // a = mantissa / 2^k
  const int shift = k + 1 - p;
  if (shift < 0 || shift > 76) return nullptr;
  const Wide candidate = static_cast<Wide>(m) << shift;
  const Wide target = static_cast<Wide>(2 * mantissa) * powers_of_5[p];
  const Wide difference = candidate > target ? candidate - target : target - candidate;
  const bool below_power_of_two = mantissa == std::uint64_t{1} << 52 && candidate < target;
  if ((below_power_of_two ? 2 * difference : difference) >= powers_of_5[p]) return nullptr;
  // The 15 digits of m in two words (digit i in byte i, byte 15 zero),
  // kept in registers; the zeros to drop are counted in the words.
  constexpr std::uint64_t zeros = 0x3030303030303030ull;  // "00000000"
  const std::uint64_t high = eight_digits(static_cast<std::uint32_t>(m / 100000000));  // '0' + 7 digits
  const std::uint64_t low = eight_digits(static_cast<std::uint32_t>(m % 100000000));
  const int trail = low != zeros ? __builtin_clzll(low ^ zeros) / 8 : 8 + __builtin_clzll(high ^ zeros) / 8;
  const int n = 15 - trail;   // significant digits, the first nonzero
  const int point = 15 - p;   // digits before the decimal point, from -6 to 15
  const std::uint64_t text_low = high >> 8 | low << 56, text_high = low >> 8;
  if (d < 0) *o++ = '-';
  if (point <= 0) {  // "0.", zeros, the digits
    std::memcpy(o, "0.000000", 8);
    std::memcpy(o + 2 - point, &text_low, 8);
    std::memcpy(o + 10 - point, &text_high, 8);
    return o + 2 - point + n;
  }
  std::memcpy(o, &text_low, 8);
  std::memcpy(o + 8, &text_high, 8);
  if (point >= n) {  // integral: the digits (and zeros) before the point, ".0"
    std::memcpy(o + point, ".0", 2);
    return o + point + 2;
  }
  // The first `point` digits, '.', the rest moved one byte on.
  const Wide rest = (static_cast<Wide>(text_high) << 64 | text_low) >> (8 * point);
  o[point] = '.';
  std::memcpy(o + point + 1, &rest, 16);
  return o + n + 1;
#endif
}

// The parser's bump allocator over JsonChunk slabs. While a parse runs, the
// count of its current slab carries a large bias, so blocks released early
// (a failed parse unwinding) never free it; seal() trades the bias for the
// number of blocks handed out.
class JsonSlabs {
 public:
  static constexpr std::size_t largest_slab = 64 * 1024;
  static constexpr std::size_t largest_block = largest_slab / 4;  // bigger ones go to the heap

  // The first slab is sized from the text, so a small message costs little.
  explicit JsonSlabs(std::size_t text_size) noexcept
      : next_size_(std::min(std::max(text_size * 2, std::size_t{512}), largest_slab)) {}
  JsonSlabs(const JsonSlabs&) = delete;
  JsonSlabs& operator=(const JsonSlabs&) = delete;
  ~JsonSlabs() { seal(); }

  // n bytes (a multiple of 8, at most largest_block) in the current slab;
  // call count() once they are handed out: the block then holds a
  // reference to the slab until it is released.
  void* take(std::size_t n) {
    if (static_cast<std::size_t>(limit_ - next_) < n) refill(n);
    void* p = next_;
    next_ += n;
    return p;
  }
  JsonChunk* chunk() const noexcept { return chunk_; }
  void count() noexcept { ++handed_out_; }

 private:
  static constexpr std::size_t bias = std::numeric_limits<std::size_t>::max() / 2;

  void seal() noexcept {
    if (!chunk_) return;
    const std::size_t unused = bias - handed_out_;
    if (chunk_->references.fetch_sub(unused, std::memory_order_acq_rel) == unused) ::operator delete(chunk_);
    chunk_ = nullptr;
  }
  void refill(std::size_t n) {
    seal();
    const std::size_t size = std::max(next_size_, n + sizeof(JsonChunk));
    next_size_ = largest_slab;
    char* raw = static_cast<char*>(::operator new(size));
    chunk_ = ::new (raw) JsonChunk(bias);
    handed_out_ = 0;
    next_ = raw + sizeof(JsonChunk);
    limit_ = raw + size;
  }

  JsonChunk* chunk_ = nullptr;
  char* next_ = nullptr;
  char* limit_ = nullptr;
  std::size_t handed_out_ = 0;
  std::size_t next_size_;
};

// One-pass parser over a byte range. Iterative: open containers live on an
// explicit stack (levels_), their finished elements on values_ and members_
// until the container closes, so nesting costs no native stack and a
// container's elements are moved once, into a block of the right size
// (see open_container for where it comes from).
class JsonParser {
 public:
  JsonParser(std::string_view text, std::size_t max_depth)
      : begin_(text.data()),
        p_(text.data()),
        end_(text.data() + text.size()),
        max_depth_(max_depth),
        slabs_(text.size()),
        stacks_(take_stacks()),
        levels_(stacks_.levels),
        values_(stacks_.values),
        members_(stacks_.members),
        key_positions_(stacks_.key_positions) {}
  ~JsonParser() {
    for (const Level& level : levels_)  // left open by a failed parse
      if (level.reserved) level.reserved_chunk->release();
    give_back_stacks();
  }
  JsonParser(const JsonParser&) = delete;
  JsonParser& operator=(const JsonParser&) = delete;

  Json parse() {
    skip_ws();
    if (p_ == end_) fail(p_, begin_ == end_ ? "empty input, expected a JSON value" : "expected a JSON value, got only whitespace");
    bool after_comma = false;
  value:
    if (p_ == end_) fail(p_, "expected a value, got end of input");
    switch (*p_) {
      case '[':
        if (levels_.size() >= max_depth_) fail_depth();
        ++p_;
        skip_ws();
        if (p_ < end_ && *p_ == ']') {
          ++p_;
          emit(Json(Json::Array()));
          goto after_value;
        }
        open_container(false, values_.size());
        after_comma = false;
        goto value;
      case '{':
        if (levels_.size() >= max_depth_) fail_depth();
        ++p_;
        skip_ws();
        if (p_ < end_ && *p_ == '}') {
          ++p_;
          emit(Json(Json::Object()));
          goto after_value;
        }
        open_container(true, members_.size());
        after_comma = false;
        goto key;
      case '"': {
        const char* run = p_ + 1;
        const char* stop = scan_text(run);
        if (stop < end_ && *stop == '"') {  // no escape: build it in one go
          p_ = stop + 1;
          emit(make_string(std::string(run, stop), true));
        } else {
          Json value = make_string(std::string());
          parse_string(value.string_payload()->text);
          emit(std::move(value));
        }
        goto after_value;
      }
      case 't':
        literal("true", 4);
        emit(Json(true));
        goto after_value;
      case 'f':
        literal("false", 5);
        emit(Json(false));
        goto after_value;
      case 'n':
        literal("null", 4);
        emit(Json());
        goto after_value;
      case '-': case '0': case '1': case '2': case '3': case '4':
      case '5': case '6': case '7': case '8': case '9':
        emit(parse_number());
        goto after_value;
      case ']':
        if (after_comma) fail(p_, "trailing comma before ']'");
        fail(p_, "expected a value, got ']'");
      case 'N':
      case 'I':
        fail(p_, "expected a value, got " + describe(p_) + " (NaN and Infinity are not JSON)");
      default:
        fail(p_, "expected a value, got " + describe(p_));
    }

  after_value:
    if (levels_.empty()) {
      skip_ws();
      if (p_ != end_) fail(p_, "unexpected " + describe(p_) + " after the JSON value");
      return std::move(root_);
    }
    skip_ws();
    after_comma = false;
    if (!levels_.back().object) {
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        skip_ws();
        after_comma = true;
        goto value;
      }
      if (p_ < end_ && *p_ == ']') {
        ++p_;
        close_array();
        goto after_value;
      }
      fail(p_, "expected ',' or ']', got " + describe(p_));
    }
    if (p_ < end_ && *p_ == ',') {
      ++p_;
      skip_ws();
      after_comma = true;
      goto key;
    }
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      close_object();
      goto after_value;
    }
    fail(p_, "expected ',' or '}', got " + describe(p_));

  key:
    if (p_ == end_ || *p_ != '"') {
      if (after_comma && p_ < end_ && *p_ == '}') fail(p_, "trailing comma before '}'");
      fail(p_, "expected a string key, got " + describe(p_));
    }
    key_positions_.push_back(p_);
    {
      const char* run = p_ + 1;
      const char* stop = scan_text(run);
      if (stop < end_ && *stop == '"') {
        members_.emplace_back(std::piecewise_construct, std::forward_as_tuple(run, stop), std::forward_as_tuple());
        p_ = stop + 1;
      } else {
        members_.emplace_back();
        parse_string(members_.back().first);
      }
    }
    skip_ws();
    if (p_ == end_ || *p_ != ':') fail(p_, "expected ':' after the key, got " + describe(p_));
    ++p_;
    skip_ws();
    after_comma = false;
    goto value;
  }

 private:
  struct Level {
    std::size_t start;  // index of its first element in values_ or members_
    // Its block when one was taken as it opened (see open_container), and
    // the slab that block is in, which it holds a reference to meanwhile.
    void* reserved;
    JsonChunk* reserved_chunk;
    std::uint32_t reserved_capacity;
    bool object;
  };
  static constexpr std::uint32_t most_reserved = 32;  // elements
  // The sizes of the last two non-empty containers of a kind that closed
  // at a depth (an empty one takes no block and is not counted).
  struct ClosedSizes {
    std::uint32_t previous = 0, last = 0;
    // The size to reserve: the smaller of the two, when both are small.
    std::uint32_t guess() const noexcept {
      return std::max(previous, last) <= most_reserved ? std::min(previous, last) : 0;
    }
    void note(std::size_t n) noexcept {
      previous = last;
      last = static_cast<std::uint32_t>(std::min<std::size_t>(n, UINT32_MAX));
    }
  };
  static constexpr std::size_t sized_depths = 32;

  // The parser's working stacks. Each thread keeps one set from parse to
  // parse, with room for kept_entries in each (a message of a few values
  // then costs no allocation for them); a parse that finds them taken makes
  // its own.
  static constexpr std::size_t kept_entries = 64;
  struct Stacks {
    Stacks() { make_room(); }
    void make_room() {
      levels.reserve(kept_entries);
      values.reserve(kept_entries);
      members.reserve(kept_entries);
      key_positions.reserve(kept_entries);
    }
    std::vector<Level> levels;
    std::vector<Json> values;
    std::vector<std::pair<std::string, Json>> members;
    std::vector<const char*> key_positions;  // of members, for duplicate-key errors
    bool taken = false;
  };
  // The thread's set, and whether it is gone already: a parse in the
  // destructor of a static object, or of another thread_local, may come
  // after it (the flag, trivially destructible, outlives it).
  struct ThreadStacks : Stacks {
    ~ThreadStacks() { gone() = true; }
    static bool& gone() noexcept {
      static thread_local bool flag = false;
      return flag;
    }
  };
  Stacks& take_stacks() {
    if (!ThreadStacks::gone()) {
      static thread_local ThreadStacks kept;
      if (!kept.taken) {
        kept.taken = true;
        return kept;
      }
    }
    own_stacks_ = std::make_unique<Stacks>();
    return *own_stacks_;
  }
  // Emptied (a failed parse leaves values in them), and cut back if a
  // large document made them large: a thread keeps only what small ones
  // need.
  void give_back_stacks() noexcept {
    if (own_stacks_) return;
    bool large = false;
    auto empty = [&large](auto& stack) {
      stack.clear();
      if (stack.capacity() > 4 * kept_entries) {
        std::remove_reference_t<decltype(stack)>().swap(stack);
        large = true;
      }
    };
    empty(stacks_.levels);
    empty(stacks_.values);
    empty(stacks_.members);
    empty(stacks_.key_positions);
    if (large) {
      try {
        stacks_.make_room();
      } catch (...) {  // out of memory: the next parse grows them as it goes
      }
    }
    stacks_.taken = false;
  }

  Json make_string(std::string text, bool prints_verbatim = false) {
    void* memory = slabs_.take(sizeof(JsonString));
    auto* s = ::new (memory) JsonString{std::move(text), slabs_.chunk(), prints_verbatim};
    slabs_.count();
    Json j;
    j.type_ = Json::Type::String;
    j.value_.bits = pointer_bits(s);
    return j;
  }

  // A container from its finished elements, moved into the block reserved
  // for it when they fit (see open_container), else into one of the exact
  // size: in the current slab, or on the heap when it is large.
  template <class Container, class Scratch>
  Json make_container(Json::Type type, Scratch& scratch, const Level& level) {
    using Element = typename Container::value_type;
    const auto first = scratch.begin() + static_cast<std::ptrdiff_t>(level.start);
    const std::size_t n = scratch.size() - level.start;
    const std::size_t bytes = Container::block_bytes(n);
    Container elements;
    void* memory = nullptr;
    JsonChunk* chunk = nullptr;
    std::size_t capacity = n;
    if (level.reserved && n <= level.reserved_capacity) {
      memory = level.reserved;
      chunk = level.reserved_chunk;
      capacity = level.reserved_capacity;
    } else {
      if (level.reserved) level.reserved_chunk->release();
      if (bytes <= JsonSlabs::largest_block) {
        memory = slabs_.take(bytes);
        chunk = slabs_.chunk();
        slabs_.count();
      }
    }
    if (memory) {
      auto* block = ::new (memory) typename Container::Header{0, capacity, chunk};
      Element* out = Container::items(block);
      for (auto it = first; it != scratch.end(); ++it, ++out) ::new (static_cast<void*>(out)) Element(std::move(*it));
      block->size = n;
      Container(block).swap(elements);
    } else {
      Container(std::make_move_iterator(first), std::make_move_iterator(scratch.end())).swap(elements);
    }
    scratch.erase(first, scratch.end());
    Json j;
    if constexpr (std::is_same_v<Container, Json::Array>)
      ::new (static_cast<void*>(&j.value_.array)) Json::Array(std::move(elements));
    else
      ::new (static_cast<void*>(&j.value_.object)) Json::Object(std::move(elements));
    j.type_ = type;
    return j;
  }

  // Puts a finished value where it belongs; every destination is still null.
  void emit(Json&& value) {
    if (levels_.empty()) root_.take(value);
    else if (levels_.back().object) members_.back().second.take(value);
    else values_.emplace_back().take(value);
  }

  // A block made when its container closes, at the exact size, lies after
  // its elements' own blocks and strings, so a walk of the tree (dump(), a
  // copy, destruction), which goes from a container to its elements, runs
  // backwards through memory at every level: a dump of a large document
  // of records ran a quarter slower than one of its copy. So when the last
  // two non-empty containers of this kind closed at this depth were both
  // small (at most most_reserved elements), as in a document of records,
  // the block is taken now, at the smaller of their sizes, and used at
  // close if the elements fit (its spare capacity is the vector's).
  // Otherwise, or when they do not fit, it is made at close as before; the
  // reserved block is then unused slab space, at most one per container.
  void open_container(bool object, std::size_t start) {
    Level& level = levels_.emplace_back();
    level.start = start;
    level.reserved = nullptr;
    level.object = object;
    const std::size_t depth = levels_.size() - 1;
    if (depth >= sized_depths) return;
    const std::uint32_t guess = closed_sizes_[depth][object].guess();
    if (guess == 0) return;
    level.reserved = slabs_.take(object ? Json::Object::block_bytes(guess) : Json::Array::block_bytes(guess));
    level.reserved_chunk = slabs_.chunk();
    level.reserved_capacity = guess;
    slabs_.count();
  }

  // Takes the innermost level off the stack, noting its size.
  Level close_level(std::size_t n) noexcept {
    const Level level = levels_.back();
    levels_.pop_back();
    if (levels_.size() < sized_depths) closed_sizes_[levels_.size()][level.object].note(n);
    return level;
  }

  void close_array() {
    const Level level = close_level(values_.size() - levels_.back().start);
    emit(make_container<Json::Array>(Json::Type::Array, values_, level));
  }

  void close_object() {
    const std::size_t start = levels_.back().start;
    const std::size_t n = members_.size() - start;
    const std::size_t dup = find_duplicate_key(members_.data() + start, n);
    if (dup != n)
      fail(key_positions_[start + dup], "duplicate key \"" + members_[start + dup].first + "\"");
    const Level level = close_level(n);
    key_positions_.resize(start);
    emit(make_container<Json::Object>(Json::Type::Object, members_, level));
  }

  void skip_ws() noexcept {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }

  void literal(const char* word, std::size_t n) {
    if (static_cast<std::size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0)
      fail(p_, std::string("invalid literal, expected '") + word + "'");
    p_ += n;
  }

  static bool is_digit(char c) noexcept { return c >= '0' && c <= '9'; }

  Json parse_number() {
    const char* start = p_;
    const bool negative = *p_ == '-';
    if (negative) ++p_;
    if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit after '-', got " + describe(p_));
    const char* digits = p_;
    std::uint64_t magnitude = 0;
    if (*p_ == '0') {
      ++p_;
      if (p_ < end_ && is_digit(*p_)) fail(p_ - 1, "leading zeros are not allowed");
    } else {
      // Wraps silently beyond 19 digits; such numbers are doubles anyway.
      while (p_ < end_ && is_digit(*p_)) magnitude = magnitude * 10 + static_cast<unsigned>(*p_++ - '0');
    }
    const std::size_t digit_count = static_cast<std::size_t>(p_ - digits);
    bool is_double = false;
    // All digits as one integer while they fit (19 digits do), for the
    // fast path below.
    std::uint64_t mantissa = magnitude;
    std::size_t mantissa_digits = digit_count;
    // Wide enough for one per fractional digit of any input.
    std::ptrdiff_t exponent = 0;
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit after the decimal point, got " + describe(p_));
      const char* fraction = p_;
      for (; p_ < end_ && is_digit(*p_) && mantissa_digits < 19; ++p_, ++mantissa_digits)
        mantissa = mantissa * 10 + static_cast<unsigned>(*p_ - '0');
      if (p_ < end_ && is_digit(*p_)) {  // digits past the 19th only count
        const char* rest = p_;
        p_ = skip_digits(p_, end_);
        mantissa_digits += static_cast<std::size_t>(p_ - rest);
      }
      exponent = fraction - p_;
      is_double = true;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      const bool minus = p_ < end_ && *p_ == '-';
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit in the exponent, got " + describe(p_));
      int written = 0;
      for (; p_ < end_ && is_digit(*p_); ++p_)
        if (written < 100000) written = written * 10 + (*p_ - '0');
      exponent += minus ? -written : written;
      is_double = true;
    }
    if (!is_double && digit_count <= 19) {
      constexpr std::uint64_t int64_max = static_cast<std::uint64_t>(INT64_MAX);
      if (!negative && magnitude <= int64_max) return Json(static_cast<std::int64_t>(magnitude));
      if (negative && magnitude <= int64_max + 1)
        return Json(magnitude == int64_max + 1 ? INT64_MIN : -static_cast<std::int64_t>(magnitude));
    }
    // Clinger's fast path: a mantissa and a power of ten that are both exact
    // doubles give the correctly rounded value in one operation.
    if (mantissa_digits <= 19 && mantissa <= (std::uint64_t{1} << 53) && exponent >= -22 && exponent <= 22) {
      static constexpr double powers[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                          1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                          1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
      double value = static_cast<double>(mantissa);
      value = exponent < 0 ? value / powers[-exponent] : value * powers[exponent];
      return Json(negative ? -value : value);
    }
    double value = 0;
    const auto result = std::from_chars(start, p_, value);
    if (result.ec == std::errc::result_out_of_range) {
      if (is_huge(start, p_)) fail(start, "number out of range: " + std::string(start, p_) + " is too large for a double (JSON numbers are finite)");
      value = negative ? -0.0 : 0.0;
    } else if (result.ec != std::errc() || result.ptr != p_) {
      fail(start, "invalid number");  // unreachable: the grammar was checked above
    }
    return Json(value);
  }

  // The end of the run of digits at p, eight bytes at a time.
  static const char* skip_digits(const char* p, const char* end) noexcept {
    constexpr std::uint64_t high = 0xF0F0F0F0F0F0F0F0u, threes = 0x3030303030303030u, sixes = 0x0606060606060606u;
    for (; end - p >= 8; p += 8) {
      std::uint64_t word;
      std::memcpy(&word, p, 8);
      // A digit is 0x30..0x39: its high nibble is 3, and stays 3 when 6 is
      // added (no carry between bytes once every high nibble is 3).
      if ((word & high) != threes || ((word + sixes) & high) != threes) break;
    }
    while (p < end && is_digit(*p)) ++p;
    return p;
  }

  // For a literal from_chars found out of range: is it too large (rather
  // than too small)? Compares the decimal exponent of its first nonzero
  // digit with 0.
  static bool is_huge(const char* p, const char* end) noexcept {
    if (*p == '-') ++p;
    long long lead = 0;
    bool found = false;
    const char* q = p;
    for (; q < end && is_digit(*q); ++q)
      if (!found && *q != '0') {
        found = true;
        lead = 0;
      } else if (found) {
        ++lead;
      }
    if (q < end && *q == '.') {
      ++q;
      for (long long k = 1; q < end && is_digit(*q); ++q, ++k)
        if (!found && *q != '0') {
          found = true;
          lead = -k;
        }
    }
    long long exponent = 0;
    if (q < end && (*q == 'e' || *q == 'E')) {
      ++q;
      const bool minus = *q == '-';
      if (*q == '+' || *q == '-') ++q;
      for (; q < end && is_digit(*q); ++q)
        if (exponent < 1000000000000LL) exponent = exponent * 10 + (*q - '0');
      if (minus) exponent = -exponent;
    }
    return lead + exponent >= 0;
  }

  // p_ is at the opening quote; leaves p_ after the closing one.
  void parse_string(std::string& out) {
    const char* open = p_;
    const char* run = ++p_;
    const char* p = scan_text(run);
    if (p < end_ && *p == '"') {
      out.assign(run, p);
      p_ = p + 1;
      return;
    }
    out.assign(run, p);
    for (;;) {
      if (p == end_) fail(open, "unterminated string");
      const unsigned char c = static_cast<unsigned char>(*p);
      if (c == '"') break;
      if (c == '\\') {
        p = parse_escape(p, out);
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "%02X", c);
        fail(p, std::string("control character U+00") + hex + " in string (must be escaped)");
      }
      run = p;
      p = scan_text(run);
      out.append(run, p);
    }
    p_ = p + 1;
  }

  // Skips plain ASCII and well-formed UTF-8; stops at '"', '\\', a control
  // character or the end. Invalid UTF-8 is an error here.
  const char* scan_text(const char* p) {
    for (;;) {
      p = json_skip_plain(p, end_);
      if (p == end_ || static_cast<unsigned char>(*p) < 0x80) return p;
      do {
        std::size_t n = utf8_common_length(p, end_);
        if (n == 0) {
          const char* why = nullptr;
          n = utf8_sequence_length(p, end_, &why);
          if (n == 0) fail(p, why);
        }
        p += n;
      } while (p < end_ && static_cast<unsigned char>(*p) >= 0x80);
    }
  }

  static int hex_value(char c) noexcept {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  // The four hex digits after "\u" at p, or a parse error.
  std::uint32_t hex4(const char* escape) {
    const char* p = escape + 2;
    if (end_ - p < 4) fail(escape, "truncated \\u escape");
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const int h = hex_value(p[i]);
      if (h < 0) fail(escape, "invalid \\u escape: expected four hex digits");
      v = v << 4 | static_cast<std::uint32_t>(h);
    }
    return v;
  }

  // p is at a backslash; appends the decoded character, returns what follows.
  const char* parse_escape(const char* p, std::string& out) {
    if (end_ - p < 2) fail(p, "unterminated string (escape at end of input)");
    char decoded;
    switch (p[1]) {
      case '"': decoded = '"'; break;
      case '\\': decoded = '\\'; break;
      case '/': decoded = '/'; break;
      case 'b': decoded = '\b'; break;
      case 'f': decoded = '\f'; break;
      case 'n': decoded = '\n'; break;
      case 'r': decoded = '\r'; break;
      case 't': decoded = '\t'; break;
      case 'u': {
        std::uint32_t cp = hex4(p);
        if (cp >= 0xDC00 && cp <= 0xDFFF) fail(p, "lone low surrogate in \\u escape");
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          const char* second = p + 6;
          if (end_ - second < 2 || second[0] != '\\' || second[1] != 'u')
            fail(p, "lone high surrogate in \\u escape (expected a \\uDC00-\\uDFFF escape after it)");
          const std::uint32_t low = hex4(second);
          if (low < 0xDC00 || low > 0xDFFF)
            fail(second, "invalid surrogate pair: a \\uD800-\\uDBFF escape must be followed by \\uDC00-\\uDFFF");
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          append_utf8(out, cp);
          return second + 6;
        }
        append_utf8(out, cp);
        return p + 6;
      }
      default:
        fail(p, "invalid escape \\" + describe_raw(p + 1) + " in string");
    }
    out.push_back(decoded);
    return p + 2;
  }

  [[noreturn]] void fail_depth() const {
    fail(p_, "nesting deeper than " + std::to_string(max_depth_) + " levels");
  }

  // The byte at p for a message: 'x', byte 0xNN, or end of input.
  std::string describe(const char* p) const {
    if (p >= end_) return "end of input";
    const unsigned char c = static_cast<unsigned char>(*p);
    if (c >= 0x20 && c < 0x7F) return "'" + describe_raw(p) + "'";
    return describe_raw(p);
  }
  std::string describe_raw(const char* p) const {
    if (p >= end_) return "end of input";
    const unsigned char c = static_cast<unsigned char>(*p);
    if (c >= 0x20 && c < 0x7F) return std::string(1, static_cast<char>(c));
    char buf[16];
    std::snprintf(buf, sizeof buf, "byte 0x%02X", c);
    return buf;
  }

  [[noreturn]] void fail(const char* at, const std::string& reason) const {
    std::size_t line = 1;
    const char* line_start = begin_;
    for (const char* q = begin_; q < at; ++q)
      if (*q == '\n') {
        ++line;
        line_start = q + 1;
      }
    std::size_t column = 1;
    for (const char* q = line_start; q < at; ++q)
      if ((static_cast<unsigned char>(*q) & 0xC0) != 0x80) ++column;
    throw JsonParseError(reason, static_cast<std::size_t>(at - begin_), line, column);
  }

  const char* begin_;
  const char* p_;
  const char* end_;
  std::size_t max_depth_;
  JsonSlabs slabs_;  // before the values: destroyed after them
  Json root_;
  std::unique_ptr<Stacks> own_stacks_;
  Stacks& stacks_;
  std::vector<Level>& levels_;
  std::vector<Json>& values_;
  std::vector<std::pair<std::string, Json>>& members_;
  std::vector<const char*>& key_positions_;
  ClosedSizes closed_sizes_[sized_depths][2];  // [depth][object]
};

// Keeps a function out of its callers (where the compiler supports it).
#if defined(__GNUC__)
#define AET_NOINLINE __attribute__((noinline))
#else
#define AET_NOINLINE
#endif

// A long string the writer left out of its output, which is to be sent
// from where it lies (see detail::OutgoingBytes): its text goes at byte
// `at` of the output, between the quotes written there.
struct LeftOutString {
  std::size_t at;
  const char* data;
  std::size_t size;
};
// Strings this long are left out when the caller asks; shorter ones cost
// less to copy than to send as a piece of their own.
constexpr std::size_t left_out_min = std::size_t{64} << 10;
// At most this many per output (OutgoingBytes sends up to twice as many
// pieces plus one per sendmsg()).
constexpr std::size_t left_out_max = 16;

// True when [p, end) prints as it is: valid UTF-8, nothing to escape.
inline bool json_text_prints_verbatim(const char* p, const char* end) noexcept {
  for (;;) {
    p = json_skip_plain(p, end);
    if (p == end) return true;
    if (static_cast<unsigned char>(*p) < 0x80) return false;
    std::size_t n = utf8_common_length(p, end);
    if (n == 0) {
      const char* why = nullptr;
      n = utf8_sequence_length(p, end, &why);
      if (n == 0) return false;
    }
    p += n;
  }
}

// Prints into one std::string. The cursor travels in a register from call
// to call (it is passed and returned); the string is grown geometrically
// when a write needs more room than is left, and trimmed at the end.
// Compact and pretty output are two instantiations. Given `left_out`, it
// leaves up to `left_out_room` long strings that need no escape out of the
// output and lists them there instead.
template <bool Pretty>
class JsonWriter {
 public:
  JsonWriter(std::string& out, int indent, std::vector<LeftOutString>* left_out = nullptr,
             std::size_t left_out_room = 0)
      : out_(out), indent_(indent), left_out_(left_out), left_out_room_(left_out_room) {
    const std::size_t used = out.size();
    // Room for a small value; resize() clears what it adds, so never more.
    out_.resize(used + 256);
    cursor_ = rebase(used);
  }

  void run(const Json& v) {
    const char* end = write(cursor_, v, 0);  // first: writing may move begin_
    out_.resize(static_cast<std::size_t>(end - begin_));
  }

 private:
  // At least n writable bytes at o (which may move).
  char* room(char* o, std::size_t n) {
    if (static_cast<std::size_t>(end_ - o) >= n) return o;
    return grow(o, n);
  }
  char* grow(char* o, std::size_t n) {
    const std::size_t used = static_cast<std::size_t>(o - begin_);
    out_.resize(std::max(out_.size() * 2, used + n));
    return rebase(used);
  }
  // The cursor at `used` bytes into out_, after out_ changed size.
  char* rebase(std::size_t used) {
    begin_ = &out_[0];
    end_ = begin_ + out_.size();
    return begin_ + used;
  }

  char* newline(char* o, std::size_t depth) {
    const std::size_t n = depth * static_cast<std::size_t>(indent_);
    o = room(o, n + 1);
    *o++ = '\n';
    std::memset(o, ' ', n);
    return o + n;
  }

  // Containers out of line: the usual call, for a scalar, then saves and
  // restores few registers.
  char* write(char* o, const Json& v, std::size_t depth) {
    if (v.type_ == Json::Type::Array) return write_array(o, v.value_.array, depth);
    if (v.type_ == Json::Type::Object) return write_object(o, v.value_.object, depth);
    return write_scalar(o, v);
  }

  char* write_scalar(char* o, const Json& v) {
    switch (v.type_) {
      case Json::Type::Null:
        o = room(o, 4);
        std::memcpy(o, "null", 4);
        return o + 4;
      case Json::Type::Bool:
        o = room(o, 5);
        if (v.bool_payload()) {
          std::memcpy(o, "true", 4);
          return o + 4;
        }
        std::memcpy(o, "false", 5);
        return o + 5;
      case Json::Type::Int: {
        o = room(o, 24);
        const std::int64_t i = v.int_payload();
        if (static_cast<std::uint64_t>(i) < 10) {
          *o = static_cast<char>('0' + i);
          return o + 1;
        }
        return std::to_chars(o, o + 24, i).ptr;
      }
      case Json::Type::Double: return write_double(o, v.double_payload());
      case Json::Type::String: {
        const JsonString& s = *v.string_payload();
        return s.prints_verbatim ? write_verbatim_string(o, s.text) : write_string(o, s.text);
      }
      case Json::Type::Array:
      case Json::Type::Object: break;  // write() takes them
    }
    return o;
  }

  AET_NOINLINE char* write_array(char* o, const Json::Array& a, std::size_t depth) {
    const Json* it = a.data();
    const std::size_t n = a.size();
    o = room(o, 2);
    *o++ = '[';
    for (std::size_t i = 0; i < n; ++i) {
      if (i) {
        o = room(o, 1);
        *o++ = ',';
      }
      if constexpr (Pretty) o = newline(o, depth + 1);
      // An offset, not a pointer: write() may move the buffer.
      const std::size_t element = static_cast<std::size_t>(o - begin_);
      o = write(o, it[i], depth + 1);
      // A long array of small elements: make room for all of it once,
      // guessing from its first element, rather than growing (copying and
      // clearing) step by step. Only a small first element is extrapolated,
      // so a wrong guess costs at most a few hundred bytes per element.
      if (i == 0 && n >= 16) {
        const std::size_t first = static_cast<std::size_t>(o - begin_) - element;
        const std::size_t guess = (first + 2) * (n - 1);
        if (first <= 256 && guess < (std::size_t{1} << 30)) o = room(o, guess + guess / 4);
      }
    }
    if constexpr (Pretty) {
      if (n) o = newline(o, depth);
    }
    o = room(o, 1);
    *o++ = ']';
    return o;
  }

  AET_NOINLINE char* write_object(char* o, const Json::Object& object, std::size_t depth) {
    const auto* it = object.data();
    const std::size_t n = object.size();
    o = room(o, 2);
    *o++ = '{';
    for (std::size_t i = 0; i < n; ++i) {
      if (i) {
        o = room(o, 1);
        *o++ = ',';
      }
      if constexpr (Pretty) o = newline(o, depth + 1);
      o = write_string(o, it[i].first);
      o = room(o, 2);
      *o++ = ':';
      if constexpr (Pretty) *o++ = ' ';
      o = write(o, it[i].second, depth + 1);
    }
    if constexpr (Pretty) {
      if (n) o = newline(o, depth);
    }
    o = room(o, 1);
    *o++ = '}';
    return o;
  }

  char* write_double(char* o, double d) {
    if (!std::isfinite(d)) throw JsonError("cannot print NaN or infinity: JSON numbers must be finite");
    o = room(o, 32);
    if (char* fast = format_short_double(o, d)) return fast;
    char* e = std::to_chars(o, o + 30, d).ptr;
    // Integral values print without '.' or exponent; mark them as doubles.
    for (const char* q = o; q < e; ++q)
      if (*q == '.' || *q == 'e') return e;
    e[0] = '.';
    e[1] = '0';
    return e + 2;
  }

  // The last 1 to 7 bytes of a string in two overlapping loads and one
  // check, when they are all plain (the usual case for short keys); p is
  // left as it was otherwise. Advances o.
  static const char* copy_plain_tail(const char* p, const char* end, char*& o) noexcept {
    const std::size_t k = static_cast<std::size_t>(end - p);
    constexpr std::uint64_t spaces = 0x2020202020202020ull;  // plain filler
    if (k >= 4) {
      std::uint32_t head, tail;
      std::memcpy(&head, p, 4);
      std::memcpy(&tail, end - 4, 4);
      if (json_word_needs_attention(head | std::uint64_t{tail} << 32)) return p;
      std::memcpy(o, &head, 4);
      std::memcpy(o + k - 4, &tail, 4);
    } else if (k >= 2) {
      std::uint16_t head, tail;
      std::memcpy(&head, p, 2);
      std::memcpy(&tail, end - 2, 2);
      if (json_word_needs_attention(head | std::uint64_t{tail} << 16 | (spaces << 32))) return p;
      std::memcpy(o, &head, 2);
      std::memcpy(o + k - 2, &tail, 2);
    } else {
      if (json_byte_classes.of[static_cast<unsigned char>(*p)] != json_plain) return p;
      *o = *p;
    }
    o += k;
    return end;
  }

  // A string the parser found needs no escape and is valid UTF-8. A long
  // one is appended to the output rather than copied into room made for
  // it, which resize() would first fill with zeros.
  char* write_verbatim_string(char* o, const std::string& s) {
    const std::size_t n = s.size();
    if (leaves_out(n)) return leave_out(o, s);
    if (n > 4096 && static_cast<std::size_t>(end_ - o) < n + 2) {
      const std::size_t used = static_cast<std::size_t>(o - begin_);
      out_.resize(used);
      // Grown (geometrically) at most once for the string, both quotes and
      // the room added after it.
      const std::size_t needed = used + n + 2 + 256;
      if (out_.capacity() < needed) out_.reserve(std::max(out_.capacity() * 2, needed));
      out_ += '"';
      out_ += s;
      out_ += '"';
      const std::size_t written = out_.size();
      out_.resize(written + 256);
      return rebase(written);
    }
    o = room(o, n + 2);
    *o = '"';
    std::memcpy(o + 1, s.data(), n);
    o[n + 1] = '"';
    return o + n + 2;
  }

  bool leaves_out(std::size_t n) const noexcept {
    return left_out_ && n >= left_out_min && left_out_->size() < left_out_room_;
  }
  // The quotes, and a note of the text that goes between them.
  char* leave_out(char* o, const std::string& s) {
    o = room(o, 2);
    *o++ = '"';
    left_out_->push_back(LeftOutString{static_cast<std::size_t>(o - begin_), s.data(), s.size()});
    *o++ = '"';
    return o;
  }

  // Strings without anything to escape, and up to 64 bytes (keys, most
  // values), take this short path; the rest the general one.
  char* write_string(char* o, const std::string& s) {
    const std::size_t n = s.size();
    if (n > 64) {
      // A second read of the text, rather than a copy of it.
      if (leaves_out(n) && json_text_prints_verbatim(s.data(), s.data() + n)) return leave_out(o, s);
      return write_any_string(o, s);
    }
    o = room(o, 64 + 2 + 8);
    const char* p = s.data();
    const char* const end = p + n;
    char* out = o + 1;
    for (; end - p >= 8; p += 8, out += 8) {
      std::uint64_t word;
      std::memcpy(&word, p, 8);
      if (json_word_needs_attention(word)) return write_any_string(o, s);
      std::memcpy(out, &word, 8);
    }
    if (p < end && copy_plain_tail(p, end, out) != end) return write_any_string(o, s);
    *o = '"';
    *out = '"';
    return out + 1;
  }

  char* write_any_string(char* o, const std::string& s) {
    const char* p = s.data();
    const char* const end = p + s.size();
    // The text as it is, the quotes, and slack for whole blocks stored past
    // the end of a run (later bytes overwrite them).
    o = room(o, s.size() + 2 + 16);
    *o++ = '"';
    for (;;) {
#if defined(__SSE2__)
      while (end - p >= 16) {
        const unsigned mask = json_attention_mask(p);
        std::memcpy(o, p, 16);
        const int plain = mask ? __builtin_ctz(mask) : 16;
        p += plain;
        o += plain;
        if (mask) break;
      }
#endif
      while (end - p >= 8) {
        std::uint64_t word;
        std::memcpy(&word, p, 8);
        if (json_word_needs_attention(word)) break;
        std::memcpy(o, &word, 8);
        p += 8;
        o += 8;
      }
      if (p < end && end - p < 8) p = copy_plain_tail(p, end, o);
      while (p < end && json_byte_classes.of[static_cast<unsigned char>(*p)] == json_plain) *o++ = *p++;
      if (p == end) break;
      const unsigned char c = static_cast<unsigned char>(*p);
      if (c >= 0x80) {
        do {  // a run of non-ASCII characters, checked and copied as they are
          std::size_t n = utf8_common_length(p, end);
          if (n == 0) {
            const char* why = nullptr;
            n = utf8_sequence_length(p, end, &why);
            if (n == 0)
              throw JsonError(std::string("cannot print a string that is not UTF-8 (") + why + " at byte " +
                              std::to_string(p - s.data()) + ")");
          }
          for (const char* stop = p + n; p < stop;) *o++ = *p++;
        } while (p < end && static_cast<unsigned char>(*p) >= 0x80);
        continue;
      }
      // An escape: make room for it, and again for the rest as it is.
      o = room(o, static_cast<std::size_t>(end - p) + 7 + 16);
      ++p;
      *o++ = '\\';
      switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default: {
          static constexpr char hex[] = "0123456789abcdef";
          o[0] = 'u';
          o[1] = '0';
          o[2] = '0';
          o[3] = hex[c >> 4];
          o[4] = hex[c & 15];
          o += 5;
        }
      }
    }
    *o++ = '"';
    return o;
  }

  std::string& out_;
  int indent_;
  std::vector<LeftOutString>* left_out_;
  std::size_t left_out_room_;  // how many more it may take
  char* begin_;
  char* end_;
  char* cursor_;
};

inline bool int_equals_double(std::int64_t i, double d) noexcept {
  if (!(d >= -0x1p63 && d < 0x1p63)) return false;
  const auto t = static_cast<std::int64_t>(d);
  return t == i && static_cast<double>(t) == d;
}

}  // namespace detail

template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int>>
Json::Json(T value) noexcept {
  if constexpr (std::is_unsigned_v<T> && sizeof(T) >= sizeof(std::int64_t)) {
    if (value > static_cast<T>(INT64_MAX)) {
      type_ = Type::Double;
      value_.bits = detail::double_bits(static_cast<double>(value));
      return;
    }
  }
  type_ = Type::Int;
  value_.bits = static_cast<std::uint64_t>(static_cast<std::int64_t>(value));
}

inline Json::Json(const char* value) {
  if (!value) throw JsonError("Json from a null const char*");
  value_.bits = detail::pointer_bits(detail::new_json_string(value));
  type_ = Type::String;
}
inline Json::Json(std::string value) {
  value_.bits = detail::pointer_bits(detail::new_json_string(std::move(value)));
  type_ = Type::String;
}
inline Json::Json(std::string_view value) {
  value_.bits = detail::pointer_bits(detail::new_json_string(std::string(value)));
  type_ = Type::String;
}
inline Json::Json(Array value) {
  ::new (static_cast<void*>(&value_.array)) Array(std::move(value));
  type_ = Type::Array;
}
inline Json::Json(Object value) {
  const std::size_t dup = detail::find_duplicate_key(value.data(), value.size());
  if (dup != value.size()) detail::throw_duplicate_key(value[dup].first);
  ::new (static_cast<void*>(&value_.object)) Object(std::move(value));
  type_ = Type::Object;
}
inline Json::Json(std::initializer_list<Json> elements) : Json(Array(elements)) {}

inline Json Json::array(std::initializer_list<Json> elements) { return Json(Array(elements)); }

inline Json Json::object(std::initializer_list<std::pair<std::string, Json>> members) {
  return Json(Object(members));
}

inline Json::Json(const Json& other) {
  switch (other.type_) {
    case Type::String: {
      const detail::JsonString& s = *other.string_payload();
      value_.bits = detail::pointer_bits(detail::new_json_string(s.text, s.prints_verbatim));
      break;
    }
    case Type::Array: ::new (static_cast<void*>(&value_.array)) Array(other.value_.array); break;
    case Type::Object: ::new (static_cast<void*>(&value_.object)) Object(other.value_.object); break;
    default: value_.bits = other.value_.bits;
  }
  type_ = other.type_;
}

inline Json& Json::operator=(const Json& other) {
  if (this != &other) {
    Json copy(other);  // before destroying: other may live inside *this
    *this = std::move(copy);
  }
  return *this;
}

inline void Json::take(Json& other) noexcept {
  if (other.type_ == Type::Array) {
    ::new (static_cast<void*>(&value_.array)) Array(std::move(other.value_.array));
    other.value_.array.~Array();
  } else if (other.type_ == Type::Object) {
    ::new (static_cast<void*>(&value_.object)) Object(std::move(other.value_.object));
    other.value_.object.~Object();
  } else {
    value_.bits = other.value_.bits;  // a scalar, or the string pointer
  }
  type_ = other.type_;
  other.type_ = Type::Null;
}

inline Json& Json::operator=(Json&& other) noexcept {
  if (this != &other) {
    // Take other's payload before destroying ours: other may be one of our
    // elements.
    Json taken(std::move(other));
    destroy();
    take(taken);
  }
  return *this;
}

inline void Json::destroy() noexcept {
  switch (type_) {
    case Type::String: detail::delete_json_string(string_payload()); break;
    case Type::Array: value_.array.~Array(); break;
    case Type::Object: value_.object.~Object(); break;
    default: break;
  }
  type_ = Type::Null;
}

inline void Json::type_error(const char* expected) const {
  throw JsonError(std::string("expected ") + expected + ", got " + to_string(type_));
}

inline bool Json::as_bool() const {
  if (type_ != Type::Bool) type_error("boolean");
  return bool_payload();
}

inline std::int64_t Json::as_int() const {
  if (type_ == Type::Int) return int_payload();
  if (type_ == Type::Double) {
    const double d = double_payload();
    if (d >= -0x1p63 && d < 0x1p63 && d == std::trunc(d)) return static_cast<std::int64_t>(d);
    const std::string text = std::isnan(d) ? "NaN" : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity") : dump();
    throw JsonError("expected integer, got number " + text);
  }
  type_error("integer");
}

inline double Json::as_double() const {
  if (type_ == Type::Double) return double_payload();
  if (type_ == Type::Int) return static_cast<double>(int_payload());
  type_error("number");
}

inline const std::string& Json::as_string() const {
  if (type_ != Type::String) type_error("string");
  return string_payload()->text;
}
inline std::string& Json::as_string() {
  if (type_ != Type::String) type_error("string");
  detail::JsonString* s = string_payload();
  s->prints_verbatim = false;  // the caller may change it
  return s->text;
}
inline const Json::Array& Json::as_array() const {
  if (type_ != Type::Array) type_error("array");
  return value_.array;
}
inline Json::Array& Json::as_array() {
  if (type_ != Type::Array) type_error("array");
  return value_.array;
}
inline const Json::Object& Json::as_object() const {
  if (type_ != Type::Object) type_error("object");
  return value_.object;
}
inline Json::Object& Json::as_object() {
  if (type_ != Type::Object) type_error("object");
  return value_.object;
}

inline std::size_t Json::size() const noexcept {
  if (type_ == Type::Array) return value_.array.size();
  if (type_ == Type::Object) return value_.object.size();
  return 0;
}

inline const Json& Json::operator[](std::size_t index) const {
  const Array& a = as_array();
  if (index >= a.size())
    throw JsonError("index " + std::to_string(index) + " out of range for an array of " +
                    std::to_string(a.size()) + " elements");
  return a[index];
}
inline Json& Json::operator[](std::size_t index) {
  return const_cast<Json&>(static_cast<const Json&>(*this)[index]);
}

inline const Json* Json::find(std::string_view key) const {
  if (type_ != Type::Object) return nullptr;
  for (const auto& m : value_.object)
    if (m.first == key) return &m.second;
  return nullptr;
}
inline Json* Json::find(std::string_view key) {
  return const_cast<Json*>(static_cast<const Json&>(*this).find(key));
}

inline const Json& Json::operator[](std::string_view key) const {
  if (type_ != Type::Object) type_error("object");
  if (const Json* v = find(key)) return *v;
  throw JsonError("missing key \"" + std::string(key) + "\"");
}
inline Json& Json::operator[](std::string_view key) {
  if (type_ == Type::Null) *this = Json(Object());
  if (type_ != Type::Object) type_error("object");
  if (Json* v = find(key)) return *v;
  return value_.object.emplace_back(std::string(key), Json()).second;
}

inline Json& Json::set(std::string key, Json value) {
  if (type_ == Type::Null) *this = Json(Object());
  if (type_ != Type::Object) type_error("object");
  if (Json* v = find(key)) return *v = std::move(value);
  return value_.object.emplace_back(std::move(key), std::move(value)).second;
}

inline void Json::push_back(Json value) {
  if (type_ == Type::Null) *this = Json(Array());
  if (type_ != Type::Array) type_error("array");
  value_.array.push_back(std::move(value));
}

inline bool operator==(const Json& a, const Json& b) noexcept {
  using T = Json::Type;
  if (a.type() != b.type()) {
    if (a.is_int() && b.is_double()) return detail::int_equals_double(a.int_payload(), b.double_payload());
    if (a.is_double() && b.is_int()) return detail::int_equals_double(b.int_payload(), a.double_payload());
    return false;
  }
  switch (a.type()) {
    case T::Null: return true;
    case T::Bool: return a.bool_payload() == b.bool_payload();
    case T::Int: return a.int_payload() == b.int_payload();
    case T::Double: return a.double_payload() == b.double_payload();
    case T::String: return a.string_payload()->text == b.string_payload()->text;
    case T::Array: return a.value_.array == b.value_.array;
    case T::Object: {
      const Json::Object& x = a.value_.object;
      const Json::Object& y = b.value_.object;
      if (x.size() != y.size()) return false;
      std::size_t i = 0;  // same order: one pass; otherwise look each key up
      while (i < x.size() && x[i].first == y[i].first) {
        if (x[i].second != y[i].second) return false;
        ++i;
      }
      for (; i < x.size(); ++i) {
        const Json* other = b.find(x[i].first);
        if (!other || *other != x[i].second) return false;
      }
      return true;
    }
  }
  return false;
}

inline void Json::dump_to(std::string& out, int indent) const {
  const std::size_t original = out.size();
  try {
    if (indent < 0) detail::JsonWriter<false>(out, 0).run(*this);
    else detail::JsonWriter<true>(out, indent).run(*this);
  } catch (...) {
    out.resize(original);
    throw;
  }
}

inline std::string Json::dump(int indent) const {
  std::string out;
  dump_to(out, indent);
  return out;
}

inline Json Json::parse(std::string_view text, const ParseOptions& options) {
  return detail::JsonParser(text, options.max_depth).parse();
}

}  // namespace aet

// ---- implementation: log_defer ---------------------------------------------

namespace aet {
namespace detail {

inline double round_to_microseconds(double seconds) { return std::round(seconds * 1e6) / 1e6; }

inline double epoch_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
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
  static LogDeferState* state(LogDefer& log) noexcept { return log.state_.get(); }
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

// The log behind logger(): per request in a worker, else nowhere. A
// request's log is made when logger() is first called in it (most
// requests log nothing: they then cost no allocation), with the request's
// start as its start.
struct RequestLogs {
  LogDefer nowhere = LogDeferAccess::nowhere();
  std::optional<LogDefer> request;
  LogDefer* active = &nowhere;
  bool in_request = false;  // between begin_request_log() and end_request_log()
  timespec started_epoch{}, started_monotonic{};

  LogDefer& current() {
    if (in_request && !request) {
      LogDeferState& state = *LogDeferAccess::state(request.emplace(LogDefer::Callback{}));
      state.start_epoch = round_to_microseconds(static_cast<double>(started_epoch.tv_sec) +
                                                static_cast<double>(started_epoch.tv_nsec) * 1e-9);
      state.start_monotonic =
          static_cast<double>(started_monotonic.tv_sec) + static_cast<double>(started_monotonic.tv_nsec) * 1e-9;
      active = &*request;
    }
    return *active;
  }
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

inline LogDefer& logger() { return detail::request_logs().current(); }

namespace detail {

inline void begin_request_log() {
  RequestLogs& logs = request_logs();
  logs.request.reset();
  logs.active = &logs.nowhere;
  logs.in_request = true;
  clock_gettime(CLOCK_REALTIME, &logs.started_epoch);
  clock_gettime(CLOCK_MONOTONIC, &logs.started_monotonic);
}

inline Json end_request_log() {
  RequestLogs& logs = request_logs();
  logs.active = &logs.nowhere;
  logs.in_request = false;
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

namespace aet {
namespace detail {

// A delay in seconds as nanoseconds, rounded up so nothing fires early;
// negative means now; capped at ~31 years so deadline sums cannot overflow.
inline std::int64_t delay_ns(double seconds, const char* what) {
  if (std::isnan(seconds)) throw Error(std::string("aet::Loop: ") + what + " is not a number");
  if (seconds <= 0) return 0;
  constexpr double max_seconds = 1e9;
  return static_cast<std::int64_t>(std::ceil(std::min(seconds, max_seconds) * 1e9));
}

// A repeat interval in ns, rounded to nearest (so the grid keeps its
// period); 0 for a one-shot timer, at least 1 otherwise.
inline std::int64_t interval_ns(double seconds) {
  if (std::isnan(seconds)) throw Error("aet::Loop: timer interval is not a number");
  if (seconds <= 0) return 0;
  constexpr double max_seconds = 1e9;
  return std::max<std::int64_t>(1, std::llround(std::min(seconds, max_seconds) * 1e9));
}

// Milliseconds for poll(), rounded up: a timeout rounded down would wake
// before the deadline and spin with timeout 0 until it passes.
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
    unsigned polled_events = 0;  // what the last prepare() asked poll() for
  };
  struct TimerEntry {
    std::int64_t deadline;
    std::int64_t interval;  // 0: one shot
    std::uint64_t seq;      // start order, for equal deadlines
    std::shared_ptr<EventHost::TimerCallback> callback;
  };
  using QueueKey = std::pair<std::int64_t, std::uint64_t>;  // (deadline, seq)
  struct ReadyIo {
    EventHost::Id id;
    unsigned events;
  };

  EventHost::Id next_id = 1;
  std::uint64_t next_seq = 1;
  bool prepared = false;  // prepare() was called, process() has not consumed it
  std::map<EventHost::Id, Io> ios;  // ordered by id: dispatch in registration order
  std::map<EventHost::Id, TimerEntry> timers;
  std::map<QueueKey, EventHost::Id> queue;  // every timer by its next deadline
  bool dispatching = false;
  bool stop_requested = false;
  // Per-fd scratch, indexed by fd and stamped with the round that wrote
  // it, so that nothing is cleared, hashed or allocated from round to round.
  struct FdScratch {
    std::uint64_t prepared = 0;  // prepare() round that gave this fd `slot`
    std::uint64_t ready = 0;     // process() round that set `revents`
    std::size_t slot = 0;
    short revents = 0;
    std::vector<EventHost::Id> ids;  // the interests on this fd, oldest first
  };
  // Scratch space reused from round to round. The two due lists are read
  // while callbacks run, which is safe because process() is not reentrant.
  std::vector<pollfd> poll_fds;  // run_once()'s array, kept while no interest changes
  bool poll_fds_stale = true;    // an interest was added, changed or removed since
  std::vector<FdScratch> by_fd;
  std::uint64_t prepare_round = 0, process_round = 0;
  std::vector<int> ready_fds;
  std::vector<ReadyIo> due_io;
  std::vector<EventHost::Id> due_timers;

  FdScratch& scratch(int fd) {
    const auto index = static_cast<std::size_t>(fd);
    if (index >= by_fd.size()) by_fd.resize(index + 1);
    return by_fd[index];
  }

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
    const bool fresh = std::exchange(prepared, false);  // a second process() reports nothing
    if (!fresh || count == 0 || ios.empty()) return;
    // Only the fds reported ready are looked at: a round costs what is
    // ready, not what is watched.
    const std::uint64_t round = ++process_round;
    std::vector<int>& ready = ready_fds;
    ready.clear();
    for (std::size_t i = 0; i < count; ++i) {
      const int fd = fds[i].fd;
      if (fds[i].revents == 0 || fd < 0 || static_cast<std::size_t>(fd) >= by_fd.size()) continue;
      FdScratch& entry = by_fd[static_cast<std::size_t>(fd)];
      if (entry.ready != round) {
        entry.ready = round;
        entry.revents = 0;
        ready.push_back(fd);
      }
      entry.revents = static_cast<short>(entry.revents | fds[i].revents);
    }
    if (ready.empty()) return;

    // Decide who is ready before calling anyone, from what was polled: an
    // interest added or widened since prepare() gets nothing from this round.
    std::vector<ReadyIo>& due = due_io;
    due.clear();
    for (int fd : ready) {
      const FdScratch& entry = by_fd[static_cast<std::size_t>(fd)];
      for (EventHost::Id id : entry.ids) {
        auto it = ios.find(id);
        if (it == ios.end()) continue;
        if (unsigned events = readiness(entry.revents, it->second.polled_events)) due.push_back({id, events});
      }
    }
    // In registration order, as if every interest had been visited in turn.
    if (due.size() > 1)
      std::sort(due.begin(), due.end(), [](const ReadyIo& a, const ReadyIo& b) { return a.id < b.id; });
    for (const ReadyIo& r : due) {
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
    std::vector<EventHost::Id>& due = due_timers;
    due.clear();
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
  state_->scratch(fd).ids.push_back(id);
  state_->poll_fds_stale = true;
  return id;
}

inline void Loop::modify_io(Id id, unsigned events) {
  detail::check_io_events(events);
  auto it = state_->ios.find(id);
  if (it == state_->ios.end()) throw Error("aet::Loop::modify_io: no io interest with this id");
  if (it->second.events != events) state_->poll_fds_stale = true;
  it->second.events = events;
}

inline void Loop::remove_io(Id id) {
  auto& s = *state_;
  auto it = s.ios.find(id);
  if (it == s.ios.end()) return;
  std::vector<Id>& ids = s.by_fd[static_cast<std::size_t>(it->second.fd)].ids;
  ids.erase(std::find(ids.begin(), ids.end(), id));
  s.poll_fds_stale = true;
  s.ios.erase(it);  // may destroy the callback's captures: last
}

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
  s.prepared = true;
  // One entry per fd: where each fd's entry is among those appended here.
  const std::uint64_t round = ++s.prepare_round;
  for (auto& [id, io] : s.ios) {
    (void)id;
    io.polled_events = io.events;
    if (io.events == 0) continue;
    const short want = static_cast<short>(((io.events & io_read) ? POLLIN : 0) |
                                          ((io.events & io_write) ? POLLOUT : 0));
    detail::LoopState::FdScratch& entry = s.scratch(io.fd);
    if (entry.prepared != round) {
      entry.prepared = round;
      entry.slot = fds.size();
      fds.push_back(pollfd{io.fd, want, 0});
    } else {
      fds[entry.slot].events = static_cast<short>(fds[entry.slot].events | want);
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
  // Its own array is rebuilt only when the interests changed; otherwise
  // prepare()'s work is only the timeout (and what process() needs).
  std::vector<pollfd>& fds = s.poll_fds;
  int wait;
  if (s.poll_fds_stale) {
    fds.clear();
    wait = prepare(fds);
    s.poll_fds_stale = false;
  } else {
    s.prepared = true;
    wait = s.queue.empty() ? -1
                           : detail::poll_timeout_ms(s.queue.begin()->first.first - detail::monotonic_ns());
  }
  if (timeout >= 0) {
    const int limit = detail::poll_timeout_ms(detail::delay_ns(timeout, "timeout"));
    wait = wait < 0 ? limit : std::min(wait, limit);
  } else if (fds.empty() && wait < 0) {
    s.prepared = false;
    return false;  // nothing could ever wake us
  }
  if (::poll(fds.data(), static_cast<nfds_t>(fds.size()), wait) < 0) {
    const int error = errno;
    if (error != EINTR) throw SystemError("aet::Loop: poll", error);
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

inline double Loop::now() { return detail::monotonic_seconds(); }

}  // namespace aet

// ---- implementation: protocol ----------------------------------------------

namespace aet {

namespace detail {

inline std::string quoted_for_message(const std::string& s) {
  std::string shown = s.size() > 40 ? s.substr(0, 40) : s;
  std::string out;
  try {
    Json(shown).dump_to(out);
  } catch (const JsonError&) {
    out = "(not UTF-8)";
  }
  return s.size() > 40 ? out + "..." : out;
}

// An address of the wire protocol as ServerOptions::listen and
// ClientOptions::connect spell it. One parser for both sides, so that they
// accept and refuse the same strings.
struct SocketAddress {
  bool is_unix = false;
  std::string path;  // unix
  std::string host;  // tcp, without brackets
  std::string port;  // tcp, decimal
};

// The address as error messages show it: a NUL byte (which would end
// what()) reads \0.
inline std::string printable_address(const std::string& text) {
  std::string shown;
  for (char c : text) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
  return shown;
}

// "unix:PATH", "tcp:HOST:PORT" or "tcp:[V6]:PORT"; throws aet::Error
// saying what is wrong (the caller names the address and the side).
inline SocketAddress parse_socket_address(const std::string& text) {
  SocketAddress address;
  if (text.compare(0, 5, "unix:") == 0) {
    address.is_unix = true;
    address.path = text.substr(5);
    if (address.path.empty()) throw Error("empty socket path");
    if (address.path.size() >= sizeof(sockaddr_un{}.sun_path))
      throw Error("socket path longer than " + std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes");
    if (address.path.find('\0') != std::string::npos) throw Error("NUL byte in the socket path");
    return address;
  }
  if (text.compare(0, 4, "tcp:") != 0) throw Error("expected unix:PATH or tcp:HOST:PORT");
  std::string rest = text.substr(4);
  auto colon = rest.rfind(':');
  if (colon == std::string::npos) throw Error("expected tcp:HOST:PORT");
  address.host = rest.substr(0, colon);
  address.port = rest.substr(colon + 1);
  if (!address.host.empty() && address.host.front() == '[') {
    if (address.host.size() < 3 || address.host.back() != ']')
      throw Error("unbalanced brackets around the IPv6 address");
    address.host = address.host.substr(1, address.host.size() - 2);
  } else if (address.host.find(':') != std::string::npos) {
    throw Error("an IPv6 address needs brackets: tcp:[ADDRESS]:PORT");
  }
  if (address.host.empty()) throw Error("missing host");
  if (address.host.find('\0') != std::string::npos) throw Error("NUL byte in the host");
  if (address.port.empty() || address.port.size() > 5 ||
      address.port.find_first_not_of("0123456789") != std::string::npos || std::stoul(address.port) > 65535)
    throw Error("port must be a number from 0 to 65535");
  return address;
}

// How much buffer memory a connection keeps between frames: enough for
// large messages to go without page faults, not a peak kept for ever.
constexpr std::size_t kept_buffer_limit = std::size_t{4} << 20;

// Appends `text` as a JSON string: short plain ASCII (method names) as it
// is, anything else through the printer (escapes, UTF-8 checks).
inline void append_json_string(std::string& out, const std::string& text) {
  bool plain = text.size() <= 256;
  for (std::size_t i = 0; plain && i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    plain = c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
  }
  if (!plain) return Json(text).dump_to(out);
  out += '"';
  out += text;
  out += '"';
}

// True if `command` is the two-letter command `name` (cheaper than
// comparing with a C string, which measures it first).
inline bool is_command(const std::string& command, const char (&name)[3]) noexcept {
  return command.size() == 2 && command[0] == name[0] && command[1] == name[1];
}

// Writes the length of the frame that starts at `start` of `out` (4 bytes
// reserved there) into its header; `left_out`: bytes of the frame that are
// not in `out` (see OutgoingBytes).
inline void seal_frame(std::string& out, std::size_t start, std::size_t left_out = 0) {
  const std::size_t length = out.size() - start - 4 + left_out;
  if (length > 0xFFFFFFFFu) {
    out.resize(start);
    throw ProtocolError("message of " + std::to_string(length) + " bytes is too large for a frame");
  }
  out[start] = static_cast<char>(length >> 24);
  out[start + 1] = static_cast<char>(length >> 16);
  out[start + 2] = static_cast<char>(length >> 8);
  out[start + 3] = static_cast<char>(length);
}

// Frames on their way out of a connection. Long strings of the messages
// (left_out_min bytes and more, needing no escape) are not copied in: they
// are sent from the values that hold them, with sendmsg() taking the text
// between the bytes around it, and those values are kept here until all is
// sent. A 1 MiB argument or result thus costs no copy on the sending side.
// Without such strings (the usual case) this is one string and a count.
class OutgoingBytes {
 public:
  OutgoingBytes() = default;
  OutgoingBytes(OutgoingBytes&& other) noexcept { swap(other); }
  OutgoingBytes& operator=(OutgoingBytes&& other) noexcept {
    clear();
    swap(other);
    return *this;
  }
  OutgoingBytes(const OutgoingBytes&) = delete;  // what was left out points into kept values
  OutgoingBytes& operator=(const OutgoingBytes&) = delete;

  // The unsent bytes, with the texts left out, for writing frames into;
  // what is appended here goes after everything before it.
  std::string& bytes() noexcept { return bytes_; }
  // `value` as JSON at the end, long strings left out: `value` must stay
  // as it is until they are sent (keep() it, or own it for that long).
  void append_json(const Json& value) {
    const std::size_t original = bytes_.size(), listed = left_out_count();
    std::vector<LeftOutString> found;  // allocates only if something is left out
    try {
      JsonWriter<false>(bytes_, 0, &found, listed < left_out_max ? left_out_max - listed : 0).run(value);
      if (found.empty()) return;
      if (!left_out_) left_out_ = std::make_unique<LeftOut>();
      left_out_->strings.insert(left_out_->strings.end(), found.begin(), found.end());
    } catch (...) {
      bytes_.resize(original);
      throw;
    }
    for (const LeftOutString& piece : found) left_out_->size += piece.size;
  }
  // The bytes of the strings left out, and how many they are.
  std::size_t left_out_size() const noexcept { return left_out_ ? left_out_->size : 0; }
  std::size_t left_out_count() const noexcept { return left_out_ ? left_out_->strings.size() : 0; }
  // Keeps `value` until all is sent, if anything was left out (which
  // points into it). A value moved in keeps its strings where they are;
  // if keeping it fails (no memory), `value` is left as it was.
  void keep(Json&& value) {
    if (left_out_count() != 0) left_out_->owners.push_back(std::move(value));
  }
  // Everything after what is here already. Out of memory, both are left
  // as they were.
  void append(OutgoingBytes&& more) {
    if (size() == 0) {
      swap(more);
      return;
    }
    // All the room first: nothing after it can fail.
    bytes_.reserve(bytes_.size() + more.bytes_.size());
    if (more.left_out_) {
      if (!left_out_) left_out_ = std::make_unique<LeftOut>();
      left_out_->strings.reserve(left_out_->strings.size() + more.left_out_->strings.size());
      left_out_->owners.reserve(left_out_->owners.size() + more.left_out_->owners.size());
    }
    const std::size_t shift = bytes_.size();
    bytes_ += more.bytes_;
    if (more.left_out_) {
      for (LeftOutString piece : more.left_out_->strings) {
        piece.at += shift;
        left_out_->strings.push_back(piece);
      }
      for (Json& owner : more.left_out_->owners) left_out_->owners.push_back(std::move(owner));
      left_out_->size += more.left_out_->size;
    }
    more.clear();
  }
  void swap(OutgoingBytes& other) noexcept {
    bytes_.swap(other.bytes_);
    left_out_.swap(other.left_out_);
    std::swap(sent_, other.sent_);
  }

  std::size_t size() const noexcept { return bytes_.size() + left_out_size(); }
  bool all_sent() const noexcept { return sent_ == size(); }
  // All of it, sent or not, in one string.
  std::string contiguous() const {
    std::string all;
    all.reserve(size());
    each_piece([&all](const char* data, std::size_t n) { all.append(data, n); });
    return all;
  }

  // Sends from where the last call stopped, as much as the socket takes:
  // what send() returns, the count or -1 with errno set.
  ssize_t send_some(int fd, int flags) {
    if (!left_out_) {  // the usual case: one piece
      const ssize_t n = ::send(fd, bytes_.data() + sent_, bytes_.size() - sent_, flags);
      if (n > 0) sent_ += static_cast<std::size_t>(n);
      return n;
    }
    constexpr std::size_t max_pieces = 2 * left_out_max + 1;
    iovec pieces[max_pieces];
    std::size_t count = 0, skip = sent_;
    each_piece([&](const char* data, std::size_t n) {
      if (skip >= n) {
        skip -= n;
      } else if (count < max_pieces) {
        pieces[count++] = iovec{const_cast<char*>(data + skip), n - skip};
        skip = 0;
      }
    });
    msghdr message{};
    message.msg_iov = pieces;
    message.msg_iovlen = count;
    const ssize_t n = ::sendmsg(fd, &message, flags);
    if (n > 0) sent_ += static_cast<std::size_t>(n);
    return n;
  }

  // Empty again, keeping its buffer for the next frames (up to
  // kept_buffer_limit).
  void clear() noexcept {
    bytes_.clear();
    if (bytes_.capacity() > kept_buffer_limit) std::string().swap(bytes_);
    left_out_.reset();
    sent_ = 0;
  }

 private:
  // Calls f(data, size) for each piece of the whole, in order: the bytes
  // between strings left out, and those strings.
  template <class F>
  void each_piece(F f) const {
    std::size_t from = 0;
    for (std::size_t i = 0; i < left_out_count(); ++i) {
      const LeftOutString& piece = left_out_->strings[i];
      f(bytes_.data() + from, piece.at - from);
      f(piece.data, piece.size);
      from = piece.at;
    }
    f(bytes_.data() + from, bytes_.size() - from);
  }
  struct LeftOut {
    std::vector<LeftOutString> strings;  // in order of `at`
    std::vector<Json> owners;
    std::size_t size = 0;  // of the strings
  };
  std::string bytes_;
  std::unique_ptr<LeftOut> left_out_;  // only while something is left out
  std::size_t sent_ = 0;
};

inline void check_length(const char* command, std::size_t got, std::size_t expected) {
  if (got != expected)
    throw ProtocolError(std::string("\"") + command + "\" message has " + std::to_string(got) +
                        " elements, expected " + std::to_string(expected));
}

}  // namespace detail

inline void append_frame(std::string& out, const Json& message) {
  const std::size_t start = out.size();
  out.append(4, '\0');
  try {
    message.dump_to(out);
  } catch (...) {
    out.resize(start);
    throw;
  }
  detail::seal_frame(out, start);
}

inline std::string encode_frame(const Json& message) {
  std::string out;
  append_frame(out, message);
  return out;
}

inline void check_message(const Json& message) {
  if (!message.is_array()) throw ProtocolError(std::string("message is not an array but ") + to_string(message.type()));
  const Json::Array& parts = message.as_array();
  if (parts.empty()) throw ProtocolError("message is an empty array");
  if (!parts[0].is_string())
    throw ProtocolError(std::string("message command is not a string but ") + to_string(parts[0].type()));
  const std::string& command = parts[0].as_string();
  using detail::is_command;
  const bool known =
      is_command(command, "do") || is_command(command, "dn") || is_command(command, "ok") || is_command(command, "er");
  if (!known) throw ProtocolError("unknown command " + detail::quoted_for_message(command));
  if (parts.size() < 2) throw ProtocolError("\"" + command + "\" message has no meta");
  if (!parts[1].is_object())
    throw ProtocolError(std::string("meta is not an object but ") + to_string(parts[1].type()));
  if (is_command(command, "dn")) detail::check_length("dn", parts.size(), 2);
  if (is_command(command, "ok")) detail::check_length("ok", parts.size(), 3);
  if (is_command(command, "er")) {
    detail::check_length("er", parts.size(), 3);
    if (!parts[2].is_string())
      throw ProtocolError(std::string("\"er\" message is not a string but ") + to_string(parts[2].type()));
  }
}

inline FrameDecoder::FrameDecoder(std::size_t max_frame, std::size_t max_depth)
    : max_frame_(max_frame), max_depth_(max_depth) {}

inline FrameDecoder::FrameDecoder(FrameDecoder&& other) noexcept
    : max_frame_(other.max_frame_),
      max_depth_(other.max_depth_),
      buffer_(std::move(other.buffer_)),
      read_pos_(std::exchange(other.read_pos_, 0)),
      pending_pos_(std::exchange(other.pending_pos_, 0)),
      pending_length_(std::exchange(other.pending_length_, 0)),
      broken_(std::exchange(other.broken_, std::string())) {}

inline FrameDecoder& FrameDecoder::operator=(FrameDecoder&& other) noexcept {
  if (this != &other) {
    max_frame_ = other.max_frame_;
    max_depth_ = other.max_depth_;
    buffer_ = std::move(other.buffer_);
    read_pos_ = std::exchange(other.read_pos_, 0);
    pending_pos_ = std::exchange(other.pending_pos_, 0);
    pending_length_ = std::exchange(other.pending_length_, 0);
    broken_ = std::exchange(other.broken_, std::string());
  }
  return *this;
}

inline void FrameDecoder::throw_broken() const { throw ProtocolError(broken_); }

// Drops yielded bytes from the front once they are at least half the
// buffer, so each byte is moved O(1) times however the input is chunked.
inline void FrameDecoder::compact() {
  if (read_pos_ == 0) return;
  if (read_pos_ == buffer_.size()) {
    buffer_.truncate(0);
  } else if (read_pos_ >= 4096 && read_pos_ * 2 >= buffer_.size()) {
    buffer_.erase_front(read_pos_);
  } else {
    return;
  }
  pending_pos_ -= read_pos_;
  read_pos_ = 0;
}

// After a large frame, gives its memory back instead of keeping the peak.
inline void FrameDecoder::release_if_drained() {
  if (read_pos_ != buffer_.size() || buffer_.capacity() <= detail::kept_buffer_limit) return;
  buffer_.release();
  read_pos_ = pending_pos_ = 0;
}

inline void FrameDecoder::feed(const char* data, std::size_t size) {
  if (!broken_.empty()) throw_broken();
  compact();
  // Whole frames of a large feed are checked one header at a time, so an
  // oversize header is refused before the body after it is buffered.
  while (size > 0) {
    const std::size_t have = buffer_.size() - pending_pos_;
    const std::size_t want = have < 4 ? 4 - have : 4 + pending_length_ - have;
    const std::size_t take = std::min(want, size);
    buffer_.append(data, take);
    data += take;
    size -= take;
    take_in();
    if (!broken_.empty()) return;
  }
}

inline std::pair<char*, std::size_t> FrameDecoder::input_space(std::size_t at_least) {
  if (!broken_.empty()) throw_broken();
  compact();
  const std::size_t have = buffer_.size() - pending_pos_;
  const std::size_t body_left = have >= 4 ? 4 + pending_length_ - have : 0;
  // While a body is awaited, room for exactly the rest of it (reserved when
  // its header came): asking for more would move the whole frame for the
  // sake of a few bytes, read after read.
  const std::size_t wanted = body_left > 0 ? body_left : at_least;
  if (wanted > 0) buffer_.reserve(buffer_.size() + wanted);
  return {buffer_.data() + buffer_.size(), buffer_.capacity() - buffer_.size()};
}

inline void FrameDecoder::commit(std::size_t n) {
  if (!broken_.empty()) throw_broken();
  if (n > buffer_.capacity() - buffer_.size()) throw Error("FrameDecoder::commit: more bytes than input_space() gave");
  buffer_.extend(n);  // within what input_space() gave: the bytes are there
  take_in();
}

// Completes the pending frame's header and body with what is buffered,
// frame after frame; a bad header stops the stream (and what follows it
// is dropped).
inline void FrameDecoder::take_in() {
  for (;;) {
    const std::size_t have = buffer_.size() - pending_pos_;
    if (have < 4) return;
    if (pending_length_ == 0) {
      const auto* h = reinterpret_cast<const unsigned char*>(buffer_.data() + pending_pos_);
      const std::size_t length = std::size_t{h[0]} << 24 | std::size_t{h[1]} << 16 | std::size_t{h[2]} << 8 | h[3];
      if (length == 0 || length > max_frame_) {
        broken_ = length == 0 ? std::string("zero-length frame")
                              : "frame of " + std::to_string(length) + " bytes exceeds the limit of " +
                                    std::to_string(max_frame_);
        buffer_.truncate(pending_pos_);
        if (read_pos_ == pending_pos_) throw_broken();
        return;
      }
      pending_length_ = length;
      // One allocation for the whole frame: the body is then read or copied once.
      buffer_.reserve(pending_pos_ + 4 + length);
    }
    if (have < 4 + pending_length_) return;
    pending_pos_ += 4 + pending_length_;
    pending_length_ = 0;
  }
}

inline std::optional<Json> FrameDecoder::next() {
  if (read_pos_ == pending_pos_) {
    if (!broken_.empty()) throw_broken();
    return std::nullopt;
  }
  const auto* h = reinterpret_cast<const unsigned char*>(buffer_.data() + read_pos_);
  const std::size_t length = std::size_t{h[0]} << 24 | std::size_t{h[1]} << 16 | std::size_t{h[2]} << 8 | h[3];
  const std::string_view body(buffer_.data() + read_pos_ + 4, length);
  read_pos_ += 4 + length;  // consumed whatever happens: the stream stays in step
  Json message;
  try {
    Json::ParseOptions options;
    options.max_depth = max_depth_;
    message = Json::parse(body, options);
  } catch (const JsonParseError& e) {
    release_if_drained();
    throw ProtocolError("bad JSON in frame: " + std::string(e.what()));
  }
  release_if_drained();
  check_message(message);
  return message;
}

}  // namespace aet


// ---- implementation: server ------------------------------------------------

namespace aet {
namespace detail {
namespace server_internals {

// A descriptor closed when the guard goes.
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) noexcept : fd_(fd) {}
  OwnedFd(OwnedFd&& other) noexcept : fd_(other.release()) {}
  OwnedFd& operator=(OwnedFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  OwnedFd(const OwnedFd&) = delete;
  OwnedFd& operator=(const OwnedFd&) = delete;
  ~OwnedFd() { reset(); }
  int get() const noexcept { return fd_; }
  int release() noexcept {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1) noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  explicit operator bool() const noexcept { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// The server whose run() is active in this process: where its signal
// handlers write. A forked child clears it (the server is its parent's).
inline std::atomic<ServerState*> running_server{nullptr};

inline std::string errno_text(int error) { return std::strerror(error); }

inline std::string format_seconds(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", seconds);
  return text;
}

// One line to stderr in one write(2), so lines of concurrent processes do
// not interleave.
inline void log_line(const std::string& line) noexcept {
  std::string text = line;
  text += '\n';
  const char* data = text.data();
  std::size_t left = text.size();
  while (left > 0) {
    ssize_t n = ::write(2, data, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data += n;
    left -= static_cast<std::size_t>(n);
  }
}

// Linux keeps 15 bytes of a process title; longer ones are cut.
inline void set_process_title(const std::string& title) noexcept {
#ifdef __linux__
  char name[16] = {};
  std::memcpy(name, title.data(), std::min<std::size_t>(title.size(), 15));
  prctl(PR_SET_NAME, name, 0, 0, 0);
#else
  (void)title;
#endif
}

inline std::string process_title() {
#ifdef __linux__
  char name[17] = {};
  if (prctl(PR_GET_NAME, name, 0, 0, 0) == 0) return name;
#endif
  return {};
}

// Closes every descriptor of the process except those in `keep`.
inline void close_descriptors_except(std::vector<int> keep) noexcept {
  std::sort(keep.begin(), keep.end());
  keep.erase(std::unique(keep.begin(), keep.end()), keep.end());
  keep.erase(std::remove_if(keep.begin(), keep.end(), [](int fd) { return fd < 0; }), keep.end());
#if defined(__linux__) && defined(SYS_close_range)
  {
    bool closed = true;
    unsigned next = 0;
    for (int fd : keep) {
      if (static_cast<unsigned>(fd) > next &&
          ::syscall(SYS_close_range, next, static_cast<unsigned>(fd) - 1, 0u) != 0) {
        closed = false;
        break;
      }
      next = static_cast<unsigned>(fd) + 1;
    }
    if (closed && ::syscall(SYS_close_range, next, ~0u, 0u) == 0) return;
  }
#endif
  // No close_range(2): list /proc/self/fd first, then close.
  auto kept = [&keep](int fd) { return std::binary_search(keep.begin(), keep.end(), fd); };
  if (DIR* dir = ::opendir("/proc/self/fd")) {
    std::vector<int> open;
    int own = ::dirfd(dir);
    while (dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
      int fd = std::atoi(entry->d_name);
      if (fd != own && !kept(fd)) open.push_back(fd);
    }
    ::closedir(dir);
    for (int fd : open) ::close(fd);
    return;
  }
  long limit = ::sysconf(_SC_OPEN_MAX);
  if (limit < 0 || limit > 65536) limit = 65536;
  for (int fd = 0; fd < limit; ++fd)
    if (!kept(fd)) ::close(fd);
}

// If 0, 1 or 2 is closed, opens /dev/null there: a socket or pipe of ours
// must never get a number a worker keeps as "standard".
inline void ensure_standard_descriptors() noexcept {
  for (int fd = 0; fd <= 2; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int opened = ::open("/dev/null", O_RDWR);
    if (opened >= 0 && opened != fd) {
      ::dup2(opened, fd);
      ::close(opened);
    }
  }
}

// Every signal blocked while the guard lives, so that no handler of the
// parent runs in a child between fork() and the child's own setup.
class SignalsBlocked {
 public:
  SignalsBlocked() noexcept {
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &previous_);
  }
  ~SignalsBlocked() { sigprocmask(SIG_SETMASK, &previous_, nullptr); }
  SignalsBlocked(const SignalsBlocked&) = delete;
  SignalsBlocked& operator=(const SignalsBlocked&) = delete;

 private:
  sigset_t previous_;
};

// In a fresh child: every disposition back to the default. The mask stays
// as it is (all blocked) until the child has its own handlers.
inline void reset_signal_dispositions() noexcept {
  struct sigaction deflt {};
  deflt.sa_handler = SIG_DFL;
  sigemptyset(&deflt.sa_mask);
  for (int sig = 1; sig < NSIG; ++sig)
    if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &deflt, nullptr);
}

// The signals whose disposition is not the default in this process: all a
// child has to reset. Asked once by a server, so that each worker makes a
// few sigaction() calls instead of one per signal.
inline std::vector<int> signals_not_default() {
  std::vector<int> found;
  for (int sig = 1; sig < NSIG; ++sig) {
    struct sigaction current {};
    if (sig == SIGKILL || sig == SIGSTOP || ::sigaction(sig, nullptr, &current) != 0) continue;
    if (current.sa_handler != SIG_DFL) found.push_back(sig);
  }
  return found;
}

inline void reset_signal_dispositions(const std::vector<int>& signals) noexcept {
  struct sigaction deflt {};
  deflt.sa_handler = SIG_DFL;
  sigemptyset(&deflt.sa_mask);
  for (int sig : signals) sigaction(sig, &deflt, nullptr);
}

inline void unblock_all_signals() noexcept {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
}

inline void install_handler(int sig, void (*handler)(int), int flags) noexcept {
  struct sigaction action {};
  action.sa_handler = handler;
  action.sa_flags = flags;
  sigemptyset(&action.sa_mask);
  sigaction(sig, &action, nullptr);
}

// ---- addresses ----

using ListenAddress = SocketAddress;

inline ListenAddress parse_listen_address(const std::string& text) {
  try {
    return parse_socket_address(text);
  } catch (const Error& e) {
    throw ServerError("bad listen address \"" + printable_address(text) + "\": " + e.what());
  }
}

inline std::string describe_bound_tcp(int fd, int& port) {
  sockaddr_storage bound{};
  socklen_t size = sizeof bound;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &size) != 0)
    throw ServerError("getsockname: " + errno_text(errno));
  char ip[INET6_ADDRSTRLEN] = {};
  if (bound.ss_family == AF_INET6) {
    const auto* v6 = reinterpret_cast<const sockaddr_in6*>(&bound);
    ::inet_ntop(AF_INET6, &v6->sin6_addr, ip, sizeof ip);
    port = ntohs(v6->sin6_port);
    return "tcp:[" + std::string(ip) + "]:" + std::to_string(port);
  }
  const auto* v4 = reinterpret_cast<const sockaddr_in*>(&bound);
  ::inet_ntop(AF_INET, &v4->sin_addr, ip, sizeof ip);
  port = ntohs(v4->sin_port);
  return "tcp:" + std::string(ip) + ":" + std::to_string(port);
}

inline OwnedFd listen_tcp(const ListenAddress& address, const std::string& text) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  int status = ::getaddrinfo(address.host.c_str(), address.port.c_str(), &hints, &found);
  if (status != 0)
    throw ServerError("cannot resolve \"" + address.host + "\" for " + text + ": " +
                      ::gai_strerror(status));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> results(found, ::freeaddrinfo);
  int error = EADDRNOTAVAIL;
  std::string step = "bind";
  for (addrinfo* ai = found; ai; ai = ai->ai_next) {
    OwnedFd fd(::socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) {
      error = errno;
      step = "socket";
      continue;
    }
    int on = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      error = errno;
      step = "bind";
      continue;
    }
    if (::listen(fd.get(), SOMAXCONN) != 0) {
      error = errno;
      step = "listen";
      continue;
    }
    return fd;
  }
  throw ServerError("cannot " + step + " " + text + ": " + errno_text(error));
}

// True if a server accepts connections on the Unix socket at `path`.
inline bool unix_socket_has_listener(const sockaddr_un& where, const std::string& path) {
  OwnedFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!probe) throw ServerError("socket: " + errno_text(errno));
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&where), sizeof where) == 0) return true;
  int error = errno;
  if (error == EAGAIN || error == EINPROGRESS) return true;  // listening, backlog full
  if (error == ECONNREFUSED || error == ENOENT) return false;
  throw ServerError("cannot tell whether a server listens on unix:" + path + ": " +
                    errno_text(error));
}

struct UnixSocketFile {
  dev_t device = 0;
  ino_t inode = 0;
};

inline OwnedFd listen_unix(const std::string& path, unsigned mode, UnixSocketFile& file) {
  sockaddr_un where{};
  where.sun_family = AF_UNIX;
  std::memcpy(where.sun_path, path.data(), path.size());
  const std::string text = "unix:" + path;
  for (int attempt = 0;; ++attempt) {
    OwnedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) throw ServerError("socket: " + errno_text(errno));
    // On Linux the file bind() creates takes the socket's own mode, less
    // the umask: setting it first means the file is never wider than asked.
    if (::fchmod(fd.get(), mode) != 0)
      throw ServerError("cannot set the mode of the socket for " + text + ": " + errno_text(errno));
    if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&where), sizeof where) == 0) {
      struct stat st {};
      if (::lstat(path.c_str(), &st) != 0) {
        int error = errno;
        ::unlink(path.c_str());
        throw ServerError("cannot stat " + path + " after bind: " + errno_text(error));
      }
      file.device = st.st_dev;
      file.inode = st.st_ino;
      // The umask may have narrowed the mode; the option says it exactly.
      if ((st.st_mode & 07777) != mode && ::chmod(path.c_str(), mode) != 0) {
        int error = errno;
        ::unlink(path.c_str());
        throw ServerError("cannot set mode of " + path + ": " + errno_text(error));
      }
      if (::listen(fd.get(), SOMAXCONN) != 0) {
        int error = errno;
        ::unlink(path.c_str());
        throw ServerError("cannot listen on " + text + ": " + errno_text(error));
      }
      return fd;
    }
    int error = errno;
    if (error != EADDRINUSE || attempt > 1)
      throw ServerError("cannot bind " + text + ": " + errno_text(error));
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0) {
      if (errno == ENOENT) continue;  // gone meanwhile
      throw ServerError("cannot bind " + text + ": " + errno_text(errno));
    }
    if (!S_ISSOCK(st.st_mode))
      throw ServerError("cannot bind " + text + ": the path exists and is not a socket (left alone)");
    if (unix_socket_has_listener(where, path))
      throw ServerError("address in use: another server is listening on " + text);
    // A stale socket file: its server is gone.
    if (::unlink(path.c_str()) != 0 && errno != ENOENT)
      throw ServerError("cannot remove the stale socket file " + path + ": " + errno_text(errno));
  }
}

// ---- the worker ----

// Ends a worker: _exit(), by way of syscall(), which the master has called
// already (see warm_up_worker_paths). Under lazy binding a worker's first
// _exit() would be looked up as the process ends, faulting in pages of
// every library's symbol tables while the next worker starts.
[[noreturn]] inline void exit_worker(int status) noexcept {
#if defined(__linux__) && defined(SYS_exit_group)
  ::syscall(SYS_exit_group, status);
#endif
  ::_exit(status);
}

// Set by SIGTERM/SIGINT in a worker: finish the request in progress, exit.
inline volatile sig_atomic_t worker_stop_requested = 0;
// The hung_worker_timeout line, formatted before any request so that the
// signal handler only has to write(2) it.
inline char hung_message[512];
inline std::size_t hung_message_size = 0;

// Set while the worker is idle: from its last look at worker_stop_requested
// until its wait ends. A stop signal then ends the worker from the handler
// itself (there is nothing to finish), so the wait needs no signals blocked
// around it (a stop signal between the look and the wait is not lost).
inline volatile sig_atomic_t worker_idle = 0;
inline volatile sig_atomic_t worker_connection = -1;

// Ends a worker for SIGTERM/SIGINT with a clean end of stream. Closing with
// input unread (a request that came too late, the "dn" after a last reply)
// would make TCP reset the connection, which may discard a reply still in
// flight: the end is sent first, then what has arrived is read and dropped
// (a bounded amount: a client that keeps sending cannot hold the worker).
// Async-signal-safe.
[[noreturn]] inline void end_worker_for_stop(int conn) noexcept {
  ::shutdown(conn, SHUT_WR);
  char scrap[4096];
  for (int round = 0; round < 256; ++round) {
    ssize_t n = ::recv(conn, scrap, sizeof scrap, MSG_DONTWAIT);
    if (n > 0 || (n < 0 && errno == EINTR)) continue;
    break;
  }
  exit_worker(0);
}

inline void on_worker_stop_signal(int) {
  worker_stop_requested = 1;
  if (worker_idle) end_worker_for_stop(worker_connection);
}

// What the SIGALRM handler of a worker reads: whether a request runs, when
// it started, and where the polite timer is armed.
struct HungWatch {
  std::atomic<bool> in_request{false};
  std::atomic<std::int64_t> started_ns{0};
  std::atomic<std::int64_t> polite_due_ns{0};  // in the past: fired, or never armed
  std::int64_t timeout_ns = 0;
  timer_t polite{};
};
inline HungWatch hung_watch;

inline itimerspec absolute_time(std::int64_t ns) noexcept {
  itimerspec at{};
  at.it_value.tv_sec = static_cast<time_t>(ns / 1000000000);
  at.it_value.tv_nsec = static_cast<long>(ns % 1000000000);
  return at;
}

// The polite timer fired. In a request it has run its timeout (HungTimer
// sets the timer no earlier than that; were it early, it is set again);
// between requests nothing happens.
inline void on_hung_worker(int) {
  HungWatch& watch = hung_watch;
  if (!watch.in_request.load()) return;  // the next request arms it again
  const int saved = errno;
  const std::int64_t due = watch.started_ns.load() + watch.timeout_ns;
  if (monotonic_ns() < due) {
    watch.polite_due_ns.store(due);
    const itimerspec at = absolute_time(due);
    ::timer_settime(watch.polite, TIMER_ABSTIME, &at, nullptr);
    errno = saved;
    return;
  }
  ssize_t written = ::write(2, hung_message, hung_message_size);
  (void)written;
  exit_worker(2);
}

// hung_worker_timeout as two POSIX timers: SIGALRM at the timeout, at most
// half a slack late (a logged exit), and, for a handler that blocks or
// catches SIGALRM, SIGKILL one to two seconds after the timeout, which
// nothing can stop.
//
// Setting a timer is a system call, and a worker may serve tens of
// thousands of requests a second, so neither is set and cleared around
// every request; "slack" below is the timeout, at most 1 s. The polite one
// is set when a request starts only if it would fire before that request
// has run its timeout, and then to half a slack later than that: it is set
// at most once per half slack of busy time, never interrupts a request
// that is not hung, and ends a hung one at most half a slack late. It may
// fire between requests, where its handler does nothing (SA_RESTART
// resumes what it interrupted). The backstop is pushed forward only when
// it would fire less than timeout + 1 s after the request's start, to
// timeout + 1 s + slack (at most once per slack of busy time), and is
// cleared outside requests only where the worker could otherwise wait long
// enough to meet it: idle in poll (woken 1 s before), blocked sending a
// reply, or running checkout_done.
//
// What wakes an idle worker to clear the backstop is a timerfd among the
// descriptors it polls, set whenever the backstop is pushed: a poll() with
// a timeout arms and cancels a kernel timer on every wait, which costs a
// round trip about 4 % on a virtual machine. Without timerfd (not Linux,
// or no descriptor to spare) the idle wait carries the timeout instead.
class HungTimer {
 public:
  explicit HungTimer(double seconds)
      : timeout_ns_(static_cast<std::int64_t>(seconds * 1e9)),
        slack_ns_(std::min<std::int64_t>(timeout_ns_, guard_ns)) {
    if (timeout_ns_ < 1) timeout_ns_ = 1;
    sigevent event{};
    event.sigev_notify = SIGEV_SIGNAL;
    event.sigev_signo = SIGALRM;
    timer_t polite{};
    if (::timer_create(CLOCK_MONOTONIC, &event, &polite) != 0)
      throw ServerError("timer_create: " + errno_text(errno));
    event.sigev_signo = SIGKILL;
    if (::timer_create(CLOCK_MONOTONIC, &event, &kill_) != 0) {
      int error = errno;
      ::timer_delete(polite);
      throw ServerError("timer_create: " + errno_text(error));
    }
    hung_watch.timeout_ns = timeout_ns_;
    hung_watch.polite = polite;
    hung_watch.polite_due_ns.store(0);
#ifdef __linux__
    idle_wake_.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));  // -1: timed waits
#endif
  }
  ~HungTimer() {
    hung_watch.in_request.store(false);
    ::timer_delete(kill_);
    ::timer_delete(hung_watch.polite);
  }
  HungTimer(const HungTimer&) = delete;
  HungTimer& operator=(const HungTimer&) = delete;

  // A request starts.
  void arm() noexcept {
    const std::int64_t now = monotonic_ns();
    hung_watch.started_ns.store(now);
    hung_watch.in_request.store(true);  // after the start: the handler reads both
    if (hung_watch.polite_due_ns.load() < now + timeout_ns_) {
      const std::int64_t due = now + timeout_ns_ + slack_ns_ / 2;
      hung_watch.polite_due_ns.store(due);
      const itimerspec at = absolute_time(due);
      ::timer_settime(hung_watch.polite, TIMER_ABSTIME, &at, nullptr);
    }
    if (kill_due_ < now + timeout_ns_ + guard_ns) {
      kill_due_ = now + timeout_ns_ + guard_ns + slack_ns_;
      const itimerspec at = absolute_time(kill_due_);
      ::timer_settime(kill_, TIMER_ABSTIME, &at, nullptr);
      set_idle_wake(clear_backstop_at());
    }
  }
  // The request ended.
  void disarm() noexcept {
    hung_watch.in_request.store(false);
    if (kill_due_ != 0 && kill_due_ - monotonic_ns() < guard_ns) quiet();
  }
  // Between requests, before the worker waits in poll(): the longest wait
  // in ms (-1: none) that ends before the backstop could fire; none when
  // idle_wake_fd() is polled too (it goes off in time).
  int idle_wait_ms() noexcept {
    if (kill_due_ == 0 || idle_wake_) return -1;
    const std::int64_t left = clear_backstop_at() - monotonic_ns();
    if (left <= 0) {
      quiet();
      return -1;
    }
    return static_cast<int>(std::min<std::int64_t>(left / 1000000 + 1, INT_MAX));
  }
  // Between requests, before what may block for long: the backstop off.
  // The idle wake is left set: going off once for nothing costs less than
  // a system call here, on every checkout_done, to disarm it.
  void quiet() noexcept {
    if (kill_due_ == 0) return;
    kill_due_ = 0;
    const itimerspec off{};
    ::timer_settime(kill_, 0, &off, nullptr);
  }

  // A descriptor readable when the idle worker must clear the backstop,
  // or -1 (then idle_wait_ms() bounds the wait).
  int idle_wake_fd() const noexcept { return idle_wake_.get(); }
  // idle_wake_fd() polled readable: the backstop off if it is due for it.
  // Setting the timerfd again clears its expiry; nothing is read from it,
  // so a descriptor that is not the timerfd any more (the handler closed
  // it, and the number went to something else) is only given up.
  void on_idle_wake() noexcept {
    if (kill_due_ != 0 && clear_backstop_at() - monotonic_ns() <= 0) quiet();
    set_idle_wake(kill_due_ == 0 ? 0 : clear_backstop_at());
  }

 private:
  // When an idle worker clears the armed backstop: a second before it fires.
  std::int64_t clear_backstop_at() const noexcept { return kill_due_ - guard_ns; }
  // The idle wake at `at_ns` on the monotonic clock; 0 disarms it.
  void set_idle_wake(std::int64_t at_ns) noexcept {
#ifdef __linux__
    if (!idle_wake_) return;
    const itimerspec at = absolute_time(at_ns);
    if (::timerfd_settime(idle_wake_.get(), TFD_TIMER_ABSTIME, &at, nullptr) != 0)
      (void)idle_wake_.release();  // not ours to close any more: timed waits from here on
#else
    (void)at_ns;
#endif
  }

  static constexpr std::int64_t guard_ns = 1000000000;  // the backstop's second
  std::int64_t timeout_ns_;
  std::int64_t slack_ns_;
  timer_t kill_{};
  std::int64_t kill_due_ = 0;  // where the backstop is armed; 0: not armed
  OwnedFd idle_wake_;          // a timerfd at clear_backstop_at(), or none
};

// Replaces every non-ASCII byte: the last resort for an error message that
// is not valid UTF-8.
inline std::string ascii_only(std::string text) {
  for (char& c : text)
    if (static_cast<unsigned char>(c) >= 0x80) c = '?';
  return text;
}

// What a worker does with the messages of its connection, apart from the
// socket: runs setup, the interface and checkout_done, and builds the
// replies. The worker's loop and fuzz/worker_fuzz.cpp both go through
// handle(), so the fuzzer exercises the code that serves requests.
class WorkerRequests {
 public:
  // `timer` (may be null) is armed around each request.
  WorkerRequests(const ServerOptions& options, std::string log_prefix, HungTimer* timer)
      : options_(options), prefix_(std::move(log_prefix)), timer_(timer) {}

  // One message from FrameDecoder (so its shape is checked already): the
  // reply frame for a "do", an empty string for a "dn" (nothing to send).
  // ProtocolError for what a client must not send.
  std::string handle(Json& message) {
    OutgoingBytes reply;
    handle(message, reply);
    return reply.contiguous();
  }
  // The same, written to `reply` (replaced), whose buffer the worker keeps;
  // a long string of the result is left where it is (see OutgoingBytes).
  void handle(Json& message, OutgoingBytes& reply) {
    reply.clear();
    const std::string& command = message[0].as_string();
    if (is_command(command, "do")) return request(message, reply);
    if (is_command(command, "dn")) return checkout_done();
    throw ProtocolError("unexpected \"" + command + "\" message from the client");
  }

 private:
  void checkout_done() {
    if (!options_.checkout_done) return;
    if (timer_) timer_->quiet();  // not a request: no limit, as before the first one
    try {
      options_.checkout_done();
    } catch (const std::exception& e) {
      log_line(prefix_ + "checkout_done exception: " + e.what());
    } catch (...) {
      log_line(prefix_ + "checkout_done exception: unknown exception");
    }
  }

  void request(Json& message, OutgoingBytes& out) {
    Json::Array& parts = message.as_array();
    parts.erase(parts.begin(), parts.begin() + 2);  // the arguments are left, in place
    Json args(std::move(message));
    bool ok = false;
    Json result;
    std::string error;
    try {
      detail::begin_request_log();
    } catch (const std::exception& e) {
      log_line(prefix_ + "cannot start the request log: " + e.what());
    }
    if (timer_) timer_->arm();
    if (!setup_done_) {
      try {
        if (options_.setup) options_.setup();
        setup_done_ = true;
      } catch (const std::exception& e) {
        error = std::string("setup exception: ") + e.what();
      } catch (...) {
        error = "setup exception: unknown exception";
      }
    }
    if (setup_done_) {
      try {
        result = call(std::move(args));
        ok = true;
      } catch (const std::exception& e) {
        error = e.what();
      } catch (...) {
        error = "unknown exception (not derived from std::exception)";
      }
    }
    if (timer_) timer_->disarm();
    Json log;
    try {
      log = detail::end_request_log();
    } catch (const std::exception& e) {
      log_line(prefix_ + "cannot finish the request log: " + e.what());
    }
    reply(ok, std::move(log), std::move(result), std::move(error), out);
  }

  Json call(Json args) {
    if (const auto* methods = std::get_if<Methods>(&options_.interface)) {
      Json::Array& all = args.as_array();
      if (all.empty()) throw Error("no method name: the call has no arguments");
      if (!all[0].is_string())
        throw Error(std::string("method name must be a string, got ") + aet::to_string(all[0].type()));
      const std::string& name = all[0].as_string();
      auto method = methods->find(name);
      if (method == methods->end()) throw Error("unknown method \"" + name + "\"");
      if (!method->second) throw Error("method \"" + name + "\" has no function");
      all.erase(all.begin());  // the method's own arguments are left
      return method->second(std::move(args));
    }
    return std::get<CatchAll>(options_.interface)(std::move(args));
  }

  // The frame of ["ok", meta, result] or ["er", meta, error], into `out`;
  // meta "last" tells the client that the worker exits after this reply (a
  // stop signal came during the request), so that it is not handed out
  // again.
  // Each part JSON cannot carry is mended on its own: a log becomes one
  // warning saying it could not be sent, a result becomes the error "result
  // cannot be sent as JSON: ...", an error text loses its non-ASCII bytes.
  void reply(bool ok, Json log, Json result, std::string error, OutgoingBytes& out) {
    // The usual case, written straight into the frame; anything JSON cannot
    // carry takes the general path below, which finds out what.
    try {
      std::string& frame = out.bytes();
      frame.assign(4, '\0');
      frame += ok ? "[\"ok\",{" : "[\"er\",{";
      if (!log.is_null()) {
        frame += "\"ld\":";
        log.dump_to(frame);
      }
      if (worker_stop_requested) frame += log.is_null() ? "\"last\":true" : ",\"last\":true";
      frame += "},";
      if (ok) {
        out.append_json(result);
      } else {
        append_json_string(frame, error);
      }
      frame += ']';
      seal_frame(frame, 0, out.left_out_size());
      out.keep(std::move(result));
      return;
    } catch (const std::exception&) {
    }
    out.clear();
    std::string& frame = out.bytes();
    Json meta = meta_without_log();
    if (!log.is_null()) meta["ld"] = std::move(log);
    Json message = Json::array();
    message.push_back(ok ? "ok" : "er");
    message.push_back(std::move(meta));
    if (ok) {
      message.push_back(std::move(result));
    } else {
      message.push_back(error);
    }
    std::string why;
    if (try_encode(message, why, frame)) return;
    if (Json* ld = message[1].find("ld"); ld && !try_encode(*ld, why, frame)) *ld = unsendable_log(*ld, why);
    if (try_encode(message, why, frame)) return;
    message[0] = "er";
    message[2] = ok ? "result cannot be sent as JSON: " + why : ascii_only(error);
    if (try_encode(message, why, frame)) return;
    frame = encode_frame(Json{"er", meta_without_log(), message[2]});
  }

  static Json meta_without_log() {
    Json meta = Json::object();
    if (worker_stop_requested) meta["last"] = true;
    return meta;
  }

  // `message` as a frame into `frame`, or false with the reason in `why`.
  static bool try_encode(const Json& message, std::string& why, std::string& frame) {
    try {
      frame = encode_frame(message);
      return true;
    } catch (const std::exception& e) {
      why = e.what();
      return false;
    }
  }

  // What replaces a request log JSON cannot carry: its times and pid, and
  // one warning instead of its entries.
  static Json unsendable_log(const Json& log, const std::string& why) {
    Json replacement = Json::object();
    for (const char* key : {"start", "end", "pid"})
      if (const Json* value = log.find(key)) replacement[key] = *value;
    replacement["logs"] =
        Json::array({Json::array({0.0, 20, "the worker's log could not be sent as JSON: " + why})});
    return replacement;
  }

  const ServerOptions& options_;
  std::string prefix_;
  HungTimer* timer_;
  bool setup_done_ = false;
};

// One worker: serves the connection `conn` until EOF, then _exit(0).
class Worker {
 public:
  // `timeout_text`: hung_worker_timeout as the log line shows it, formatted
  // once by the master (printf is not cheap in a fresh process).
  Worker(const ServerOptions& options, int conn, const std::string& timeout_text)
      : options_(options),
        conn_(conn),
        decoder_(options.max_frame),
        prefix_("aet-worker:" + options_.name + "[" + std::to_string(::getpid()) + "]: ") {
    worker_connection = conn;
    if (options_.hung_worker_timeout > 0) {
      // Copied piece by piece, as far as the buffer goes.
      hung_message_size = 0;
      for (std::string_view piece : {std::string_view(prefix_), std::string_view("hung_worker_timeout of "),
                                     std::string_view(timeout_text), std::string_view(" s exceeded, exiting\n")}) {
        const std::size_t n = std::min(piece.size(), sizeof hung_message - hung_message_size);
        std::memcpy(hung_message + hung_message_size, piece.data(), n);
        hung_message_size += n;
      }
      try {
        timer_.emplace(options_.hung_worker_timeout);
      } catch (const std::exception& e) {
        log_line(prefix_ + "no hung_worker_timeout: " + e.what());
      }
    }
    requests_.emplace(options_, prefix_, timer_ ? &*timer_ : nullptr);
  }

  [[noreturn]] void serve_forever() {
    for (;;) {
      for (;;) {
        std::optional<Json> message;
        try {
          message = decoder_.next();
          if (!message) break;
          requests_->handle(*message, reply_);
        } catch (const ProtocolError& e) {
          protocol_error(e.what());
        }
        if (reply_.size() != 0) send_all(reply_);
        reply_.clear();
        if (worker_stop_requested) exit_for_stop();
      }
      // The stop signals are let in while waiting even if a handler blocked
      // them: the worker owns them.
      sigset_t waiting;
      sigprocmask(SIG_BLOCK, nullptr, &waiting);
      sigdelset(&waiting, SIGTERM);
      sigdelset(&waiting, SIGINT);
      const int wait_ms = timer_ ? timer_->idle_wait_ms() : -1;
      const timespec wait{wait_ms / 1000, static_cast<long>(wait_ms % 1000) * 1000000};
      pollfd waits[2] = {{conn_, POLLIN, 0}, {timer_ ? timer_->idle_wake_fd() : -1, POLLIN, 0}};
      const nfds_t count = waits[1].fd >= 0 ? 2 : 1;
      worker_idle = 1;  // from here a stop signal ends the worker at once
      if (worker_stop_requested) exit_for_stop();
      int ready = ::ppoll(waits, count, wait_ms < 0 ? nullptr : &wait, &waiting);
      int error = errno;
      worker_idle = 0;
      if (ready < 0) {
        if (error == EINTR || error == EAGAIN) continue;
        fail("poll: " + errno_text(error));
      }
      if (count == 2 && waits[1].revents) timer_->on_idle_wake();
      if (waits[0].revents == 0) continue;  // the hung timer's backstop was due for clearing
      // Straight into the decoder (its memory is not zeroed: a fresh worker
      // touches only what read() fills), all of a large body at once.
      std::pair<char*, std::size_t> space;
      try {
        space = decoder_.input_space();
      } catch (const std::exception& e) {
        protocol_error(e.what());
      }
      ssize_t n = ::read(conn_, space.first, space.second);
      if (n == 0) exit_worker(0);
      if (n < 0) {
        error = errno;
        if (error == EINTR || error == EAGAIN) continue;
        if (error == ECONNRESET) exit_worker(0);
        fail("read: " + errno_text(error));
      }
      try {
        decoder_.commit(static_cast<std::size_t>(n));
      } catch (const std::exception& e) {
        protocol_error(e.what());
      }
    }
  }

 private:
  [[noreturn]] void protocol_error(const std::string& what) {
    log_line(prefix_ + "protocol error: " + what);
    exit_worker(1);
  }
  [[noreturn]] void exit_for_stop() { end_worker_for_stop(conn_); }
  [[noreturn]] void fail(const std::string& what) {
    log_line(prefix_ + what);
    exit_worker(1);
  }

  // Without waiting while the socket takes it all (the usual case); before
  // waiting for a slow reader, the hung timer's backstop goes off.
  void send_all(OutgoingBytes& bytes) {
    int flags = MSG_NOSIGNAL | MSG_DONTWAIT;
    while (!bytes.all_sent()) {
      const ssize_t n = bytes.send_some(conn_, flags);
      if (n < 0) {
        int error = errno;
        if (error == EINTR) continue;
        if (error == EAGAIN || error == EWOULDBLOCK) {
          if (timer_) timer_->quiet();
          flags = MSG_NOSIGNAL;
          continue;
        }
        if (error == EPIPE || error == ECONNRESET) exit_worker(0);  // the client left
        fail("write: " + errno_text(error));
      }
    }
  }

  const ServerOptions& options_;
  int conn_;
  FrameDecoder decoder_;
  std::string prefix_;
  std::optional<HungTimer> timer_;
  std::optional<WorkerRequests> requests_;  // after timer_, which it points to
  OutgoingBytes reply_;  // its buffer kept from reply to reply (up to kept_buffer_limit)
};

// Runs, once in the master, the library code every worker runs first: two
// requests (a result, then an error) served by a method table of its own,
// without a socket, and the C library calls that only a worker makes, each
// in a form that does nothing. A program linked for lazy binding resolves
// a function at its first call, in each process: done here, before any
// fork, it is done once and inherited, instead of in every fresh worker
// before its first reply (each lookup also faults in pages of the symbol
// tables: a third of a fresh worker's page faults, measured).
inline void warm_up_worker_paths() noexcept {
  {
    const int saved_errno = errno;  // read through a function a worker calls too
    sigset_t set;
    sigemptyset(&set);
    sigdelset(&set, SIGTERM);
    const timespec now{0, 0};
    (void)::ppoll(nullptr, 0, &now, nullptr);  // returns at once, the signal mask untouched
    char byte = 0;
    (void)::read(-1, &byte, 0);  // EBADF, as send() below
    (void)::send(-1, &byte, 0, MSG_NOSIGNAL);
    (void)::getpid();
    const itimerspec off{};
#ifdef __linux__
    (void)::syscall(SYS_getpid);    // close_descriptors_except and exit_worker call syscall()
    (void)::timerfd_create(-1, 0);  // EINVAL: no clock -1
    (void)::timerfd_settime(-1, 0, &off, nullptr);
#endif
    sigevent none{};
    none.sigev_notify = SIGEV_NONE;
    timer_t timer{};
    if (::timer_create(CLOCK_MONOTONIC, &none, &timer) == 0) {
      (void)::timer_settime(timer, 0, &off, nullptr);
      ::timer_delete(timer);
    }
    std::string sized(32, ' ');  // a constructor the worker's start uses
    (void)sized;
    errno = saved_errno;
  }
  try {
    ServerOptions own;
    own.interface = Methods{{"warm-up", [](const Json& args) { return args; }}};
    WorkerRequests requests(own, std::string(), nullptr);
    FrameDecoder decoder;
    decoder.feed(encode_frame(Json{"do", Json::object(), "warm-up", "x"}) +
                 encode_frame(Json{"do", Json::object(), "no such method"}));
    OutgoingBytes reply;
    while (std::optional<Json> message = decoder.next()) requests.handle(*message, reply);
  } catch (...) {
  }
}

// What the master works out once for all its workers.
struct WorkerPrelude {
  std::vector<int> handled_signals;  // not at their default: each worker resets them
  std::string timeout_text;          // hung_worker_timeout, formatted
};

// The freshly forked child of the master: becomes a worker for `conn`.
// Never returns.
[[noreturn]] inline void become_worker(const ServerOptions& options, int conn,
                                       const WorkerPrelude& prelude) noexcept {
  try {
    reset_signal_dispositions(prelude.handled_signals);
    running_server.store(nullptr);
    install_handler(SIGTERM, on_worker_stop_signal, SA_RESTART);
    install_handler(SIGINT, on_worker_stop_signal, SA_RESTART);
    if (options.hung_worker_timeout > 0) install_handler(SIGALRM, on_hung_worker, SA_RESTART);
    unblock_all_signals();
    close_descriptors_except({0, 1, 2, conn});
    set_process_title("aet-worker:" + options.name);
    Worker(options, conn, prelude.timeout_text).serve_forever();
  } catch (const std::exception& e) {
    log_line("aet-worker:" + options.name + "[" + std::to_string(::getpid()) + "]: " + e.what());
  } catch (...) {
  }
  exit_worker(1);
}

}  // namespace server_internals

struct ServerState {
  ServerOptions options;
  server_internals::OwnedFd listener;
  std::string address;
  int port = 0;
  std::string unix_path;  // set for a Unix socket
  server_internals::UnixSocketFile socket_file;
  bool owns_socket_file = false;  // removed when the server stops
  server_internals::OwnedFd wake_read, wake_write;  // the self-pipe
  server_internals::OwnedFd keepalive;  // fork_task_server: EOF means stop
  std::atomic<bool> stop_requested{false};
  bool ran = false;
  std::set<pid_t> workers;  // forked, not reaped yet
  server_internals::WorkerPrelude prelude;  // set when run() starts
  volatile sig_atomic_t child_exited = 0;  // SIGCHLD came: reap

  // Async-signal-safe.
  void wake() noexcept {
    char byte = 1;
    ssize_t written = ::write(wake_write.get(), &byte, 1);
    (void)written;
  }
  void request_stop() noexcept {
    stop_requested.store(true);
    wake();
  }

  // Removes the socket file if it is still the one this server created.
  void remove_socket_file() noexcept {
    if (!owns_socket_file) return;
    owns_socket_file = false;
    struct stat st {};
    if (::lstat(unix_path.c_str(), &st) == 0 && st.st_dev == socket_file.device &&
        st.st_ino == socket_file.inode)
      ::unlink(unix_path.c_str());
  }
  void stop_listening() noexcept {
    listener.reset();
    remove_socket_file();
  }
};

namespace server_internals {

inline void on_server_stop_signal(int) {
  int saved = errno;
  if (ServerState* state = running_server.load()) state->request_stop();
  errno = saved;
}

inline void on_server_child_signal(int) {
  int saved = errno;
  if (ServerState* state = running_server.load()) {
    state->child_exited = 1;
    state->wake();
  }
  errno = saved;
}

// The signal handling and process title of a running server, put back
// when run() returns.
class RunningServerScope {
 public:
  explicit RunningServerScope(ServerState& state) {
    ServerState* none = nullptr;
    if (!running_server.compare_exchange_strong(none, &state))
      throw ServerError("another aet::Server is already running in this process");
    save_and_install(SIGTERM, on_server_stop_signal, SA_RESTART, 0);
    save_and_install(SIGINT, on_server_stop_signal, SA_RESTART, 1);
    save_and_install(SIGCHLD, on_server_child_signal, SA_RESTART | SA_NOCLDSTOP, 2);
    save_and_install(SIGPIPE, SIG_IGN, 0, 3);
    state.prelude.handled_signals = signals_not_default();
    state.prelude.timeout_text = format_seconds(state.options.hung_worker_timeout);
    title_ = process_title();
    set_process_title("aet-server:" + state.options.name);
  }
  ~RunningServerScope() {
    if (!title_.empty()) set_process_title(title_);
    for (int i = 0; i < 4; ++i) sigaction(signals_[i], &saved_[i], nullptr);
    running_server.store(nullptr);
  }
  RunningServerScope(const RunningServerScope&) = delete;
  RunningServerScope& operator=(const RunningServerScope&) = delete;

 private:
  void save_and_install(int sig, void (*handler)(int), int flags, int slot) {
    struct sigaction action {};
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    signals_[slot] = sig;
    sigaction(sig, &action, &saved_[slot]);
  }
  int signals_[4] = {};
  struct sigaction saved_[4] = {};
  std::string title_;
};

// The master loop of one run().
class MasterLoop {
 public:
  explicit MasterLoop(ServerState& state)
      : state_(state), prefix_("aet-server:" + state.options.name + ": ") {}

  void run() {
    for (;;) {
      if (!stopping_ && state_.stop_requested.load()) begin_stop();
      // waitpid() only when a child ended (SIGCHLD), or while stopping.
      if (state_.child_exited || stopping_) {
        state_.child_exited = 0;
        reap();
      }
      if (stopping_) {
        if (state_.workers.empty()) return;
        double now = monotonic_seconds();
        if (!killed_ && now >= kill_at_) {
          for (pid_t pid : state_.workers) {
            log_line(prefix_ + "worker " + std::to_string(pid) + " still busy, killing it");
            ::kill(pid, SIGKILL);
          }
          killed_ = true;
          give_up_at_ = now + 5;
        }
        if (killed_ && now >= give_up_at_) {
          log_line(prefix_ + "giving up waiting for " + std::to_string(state_.workers.size()) +
                   " killed worker(s)");
          return;
        }
      }
      wait_and_dispatch();
    }
  }

 private:
  void wait_and_dispatch() {
    pollfd fds[3];
    nfds_t count = 0;
    fds[count++] = pollfd{state_.wake_read.get(), POLLIN, 0};
    int listener_slot = -1, keepalive_slot = -1;
    double now = monotonic_seconds();
    if (state_.listener && now >= accept_paused_until_) {
      listener_slot = static_cast<int>(count);
      fds[count++] = pollfd{state_.listener.get(), POLLIN, 0};
    }
    if (state_.keepalive && !keepalive_closed_) {
      keepalive_slot = static_cast<int>(count);
      fds[count++] = pollfd{state_.keepalive.get(), POLLIN, 0};
    }
    double wake_at = -1;
    if (state_.listener && now < accept_paused_until_) wake_at = accept_paused_until_;
    if (stopping_) {
      double deadline = killed_ ? give_up_at_ : kill_at_;
      if (wake_at < 0 || deadline < wake_at) wake_at = deadline;
    }
    int timeout_ms = -1;
    if (wake_at >= 0) {
      double ms = (wake_at - now) * 1000 + 1;
      timeout_ms = ms <= 0 ? 0 : ms > 1e9 ? 1000000000 : static_cast<int>(ms);
    }
    int ready = ::poll(fds, count, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) return;
      throw ServerError("poll: " + errno_text(errno));
    }
    if (fds[0].revents) drain_wake_pipe();
    if (keepalive_slot >= 0 && fds[keepalive_slot].revents) read_keepalive();
    if (listener_slot >= 0 && fds[listener_slot].revents && state_.listener &&
        !state_.stop_requested.load())
      accept_connections();
  }

  void drain_wake_pipe() {
    char bytes[256];
    while (::read(state_.wake_read.get(), bytes, sizeof bytes) == static_cast<ssize_t>(sizeof bytes)) {
    }
  }

  void read_keepalive() {
    char bytes[256];
    ssize_t n = ::read(state_.keepalive.get(), bytes, sizeof bytes);
    if (n > 0 || (n < 0 && (errno == EINTR || errno == EAGAIN))) return;
    // EOF: the handle was dropped or its process died. The descriptor
    // stays open until this process exits: its closing tells the caller
    // that the server is gone.
    keepalive_closed_ = true;
    state_.stop_requested.store(true);
  }

  void accept_connections() {
    for (int i = 0; i < 64; ++i) {
      int fd = ::accept4(state_.listener.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) {
        int error = errno;
        if (error == EAGAIN || error == EWOULDBLOCK) return;
        if (error == EINTR || error == ECONNABORTED || error == EPROTO) continue;
        // Out of descriptors or memory: pause accepting instead of spinning.
        log_line(prefix_ + "accept: " + errno_text(error));
        accept_paused_until_ = monotonic_seconds() + 0.1;
        return;
      }
      spawn_worker(OwnedFd(fd));
      if (state_.stop_requested.load()) return;
    }
  }

  void spawn_worker(OwnedFd conn) {
    pid_t pid;
    {
      SignalsBlocked blocked;
      pid = ::fork();
      if (pid == 0) become_worker(state_.options, conn.get(), state_.prelude);
    }
    if (pid < 0) {
      log_line(prefix_ + "cannot fork a worker, dropping the connection: " + errno_text(errno));
      return;
    }
    state_.workers.insert(pid);
  }

  // Reaps every exited child; logs the workers that did not end well.
  void reap() {
    for (;;) {
      int status = 0;
      pid_t pid = ::waitpid(-1, &status, WNOHANG);
      if (pid < 0 && errno == EINTR) continue;
      if (pid <= 0) return;
      if (state_.workers.erase(pid) == 0) continue;
      if (WIFSIGNALED(status)) {
        log_line(prefix_ + "worker " + std::to_string(pid) + " killed by signal " +
                 std::to_string(WTERMSIG(status)));
      } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        log_line(prefix_ + "worker " + std::to_string(pid) + " exited with status " +
                 std::to_string(WEXITSTATUS(status)));
      }
    }
  }

  void begin_stop() {
    stopping_ = true;
    state_.stop_listening();
    for (pid_t pid : state_.workers) ::kill(pid, SIGTERM);  // none is reaped yet
    double timeout = state_.options.hung_worker_timeout;
    kill_at_ = timeout > 0 ? monotonic_seconds() + timeout : 1e300;
  }

  ServerState& state_;
  std::string prefix_;
  bool stopping_ = false;
  bool killed_ = false;
  bool keepalive_closed_ = false;
  double kill_at_ = 0;
  double give_up_at_ = 0;
  double accept_paused_until_ = 0;
};

inline void check_options(const ServerOptions& options) {
  if (!(options.hung_worker_timeout >= 0) || options.hung_worker_timeout > 1e9)
    throw ServerError("hung_worker_timeout must be a number of seconds, 0 or more");
  if (options.socket_mode > 07777) throw ServerError("socket_mode must be a permission mode");
  if (const auto* catch_all = std::get_if<CatchAll>(&options.interface); catch_all && !*catch_all)
    throw ServerError("the catch-all interface function is empty");
  if (options.max_frame == 0) throw ServerError("max_frame must be positive");
}

}  // namespace server_internals
}  // namespace detail

inline Server::Server(ServerOptions options) : state_(std::make_unique<detail::ServerState>()) {
  namespace si = detail::server_internals;
  si::check_options(options);
  si::ensure_standard_descriptors();
  auto& state = *state_;
  state.options = std::move(options);
  si::ListenAddress where = si::parse_listen_address(state.options.listen);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0)
    throw ServerError("pipe: " + si::errno_text(errno));
  state.wake_read.reset(pipe_fds[0]);
  state.wake_write.reset(pipe_fds[1]);
  if (where.is_unix) {
    state.listener = si::listen_unix(where.path, state.options.socket_mode, state.socket_file);
    state.unix_path = where.path;
    state.owns_socket_file = true;
    state.address = "unix:" + where.path;
  } else {
    state.listener = si::listen_tcp(where, state.options.listen);
    state.address = si::describe_bound_tcp(state.listener.get(), state.port);
  }
}

inline Server::~Server() {
  if (state_) state_->stop_listening();
}

inline const std::string& Server::address() const { return state_->address; }

inline int Server::port() const { return state_->port; }

inline void Server::stop() { state_->request_stop(); }

inline void Server::run() {
  namespace si = detail::server_internals;
  auto& state = *state_;
  if (state.ran) throw ServerError("Server::run() was already called");
  state.ran = true;
  si::RunningServerScope scope(state);
  si::warm_up_worker_paths();
  try {
    si::MasterLoop(state).run();
  } catch (...) {
    state.stop_listening();
    throw;
  }
  state.stop_listening();
}

inline TaskServer::TaskServer(pid_t pid, int keepalive_fd, std::string address, int port)
    : pid_(pid), keepalive_fd_(keepalive_fd), address_(std::move(address)), port_(port) {}

inline TaskServer::TaskServer(TaskServer&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      keepalive_fd_(std::exchange(other.keepalive_fd_, -1)),
      address_(std::move(other.address_)),
      port_(other.port_) {}

inline TaskServer& TaskServer::operator=(TaskServer&& other) noexcept {
  if (this != &other) {
    stop();
    pid_ = std::exchange(other.pid_, -1);
    keepalive_fd_ = std::exchange(other.keepalive_fd_, -1);
    address_ = std::move(other.address_);
    port_ = other.port_;
  }
  return *this;
}

inline TaskServer::~TaskServer() { stop(); }

inline void TaskServer::stop() noexcept {
  namespace si = detail::server_internals;
  if (pid_ > 0) {
    bool ended = false;
    if (keepalive_fd_ >= 0) {
      // Our end half-closed: the server sees EOF and stops; its end closes
      // when its process exits, which we see as EOF in turn.
      ::shutdown(keepalive_fd_, SHUT_WR);
      const double deadline = detail::monotonic_seconds() + 5;
      for (;;) {
        double left = deadline - detail::monotonic_seconds();
        if (left <= 0) break;
        pollfd gone{keepalive_fd_, POLLIN, 0};
        int ready = ::poll(&gone, 1, static_cast<int>(left * 1000) + 1);
        if (ready < 0 && errno == EINTR) continue;
        if (ready <= 0) break;
        char bytes[64];
        ssize_t n = ::read(keepalive_fd_, bytes, sizeof bytes);
        if (n > 0 || (n < 0 && (errno == EINTR || errno == EAGAIN))) continue;
        ended = true;
        break;
      }
    }
    if (!ended) {
      // The whole group: busy workers must not outlive their server.
      ::kill(-pid_, SIGKILL);
      ::kill(pid_, SIGKILL);
    }
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
  }
  if (keepalive_fd_ >= 0) {
    ::close(keepalive_fd_);
    keepalive_fd_ = -1;
  }
}

inline TaskServer fork_task_server(ServerOptions options) {
  namespace si = detail::server_internals;
  Server server(std::move(options));
  detail::ServerState& state = *server.state_;
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0)
    throw ServerError("socketpair: " + si::errno_text(errno));
  si::OwnedFd caller_end(pair[0]), server_end(pair[1]);
  const pid_t parent = ::getpid();
  pid_t pid;
  {
    si::SignalsBlocked blocked;
    pid = ::fork();
    if (pid == 0) {
      // The server process: never returns into the caller.
      try {
        si::reset_signal_dispositions();
        si::running_server.store(nullptr);
        si::unblock_all_signals();
        // A group of its own, which its workers join: stop() can kill them
        // all when they do not end in time.
        ::setpgid(0, 0);
#ifdef __linux__
        prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0);
#endif
        if (::getppid() != parent) ::_exit(0);  // the caller died already
        si::close_descriptors_except({0, 1, 2, state.listener.get(), state.wake_read.get(),
                                      state.wake_write.get(), server_end.get()});
        caller_end.release();  // closed above
        state.keepalive = std::move(server_end);
        server.run();
        ::_exit(0);
      } catch (const std::exception& e) {
        si::log_line("aet-server:" + state.options.name + ": " + e.what());
      } catch (...) {
      }
      ::_exit(1);
    }
  }
  if (pid < 0) throw ServerError("cannot fork the server process: " + si::errno_text(errno));
  state.owns_socket_file = false;  // the server process removes it
  return TaskServer(pid, caller_end.release(), state.address, state.port);
  // `server` goes here: the caller's copy of the listening socket closes.
}

}  // namespace aet

// ---- implementation: client ------------------------------------------------

namespace aet {
namespace detail {

// Where a client connects, resolved once when the client is made: one
// address for a Unix socket, every getaddrinfo result for TCP (tried in
// turn when connecting).
struct ClientAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  int family = AF_UNSPEC;
};

inline std::vector<ClientAddress> resolve_client_addresses(const std::string& connect) {
  auto bad = [&](const std::string& why) {
    return Error("aet::Client: bad connect address \"" + printable_address(connect) + "\": " + why);
  };
  SocketAddress parsed;
  try {
    parsed = parse_socket_address(connect);
  } catch (const Error& e) {
    throw bad(e.what());
  }
  std::vector<ClientAddress> addresses;
  if (parsed.is_unix) {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, parsed.path.data(), parsed.path.size());
    ClientAddress& address = addresses.emplace_back();
    std::memcpy(&address.storage, &un, sizeof(un));
    address.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + parsed.path.size() + 1);
    address.family = AF_UNIX;
    return addresses;
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(parsed.host.c_str(), parsed.port.c_str(), &hints, &found);
  if (rc != 0 || !found) throw bad(::gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> results(found, ::freeaddrinfo);
  for (const addrinfo* ai = found; ai; ai = ai->ai_next) {
    if (ai->ai_addrlen > sizeof(sockaddr_storage)) continue;
    ClientAddress& address = addresses.emplace_back();
    std::memcpy(&address.storage, ai->ai_addr, ai->ai_addrlen);
    address.length = static_cast<socklen_t>(ai->ai_addrlen);
    address.family = ai->ai_family;
  }
  if (addresses.empty()) throw bad("no usable address");
  return addresses;
}

// One queued call: its frame is encoded when queued (a value JSON cannot
// carry fails in call(), not later in the loop).
struct ClientCall {
  std::optional<std::string> method;  // nullopt: a plain call
  OutgoingBytes frame;
  Checkout::Callback callback;
  FrameContext context;
  double deadline = -1;  // monotonic seconds: when queued plus the timeout; < 0: none
};

// ["do",{},method,args...] written straight into a frame in `out` (which
// keeps its capacity from call to call), without building the message as
// a Json. Long strings of `args` are left out (see OutgoingBytes): the
// caller keeps `args` there until the frame is sent, and clears `out` if
// this throws (what was written may point into `args`).
inline void encode_call(const std::optional<std::string>& method, const Json& args, OutgoingBytes& out) {
  out.clear();
  std::string& scratch = out.bytes();
  scratch.assign(4, '\0');
  scratch += "[\"do\",{}";
  if (method) {
    scratch += ',';
    append_json_string(scratch, *method);
  }
  if (args.is_array()) {
    for (const Json& arg : args.as_array()) {
      scratch += ',';
      out.append_json(arg);
    }
  } else if (!args.is_null()) {
    scratch += ',';
    out.append_json(args);
  }
  scratch += ']';
  seal_frame(scratch, 0, out.left_out_size());
}

// The frame in `scratch` for a queued call: a small one copied to its
// size, a large one (or one that left strings out) with the scratch's
// buffer.
inline OutgoingBytes take_frame(OutgoingBytes& scratch) {
  OutgoingBytes frame;
  if (scratch.left_out_count() == 0 && scratch.size() <= 4096) {
    frame.bytes() = scratch.bytes();
  } else {
    frame.swap(scratch);
  }
  return frame;
}

// A list, not a deque: an empty one allocates nothing, and a pending
// checkout holds two.
using CallQueue = std::list<ClientCall>;

struct CheckoutCore;

// A worker's own max_checkouts (see ClientOptions::max_checkouts_jitter):
// uniform over the integers in [max * (1 - jitter), max * (1 + jitter)],
// at least 1; 0 (unlimited) stays 0.
inline unsigned draw_checkout_limit(unsigned max_checkouts, double jitter, std::minstd_rand& random) {
  if (max_checkouts == 0 || !(jitter > 0)) return max_checkouts;
  const double most = static_cast<double>(std::numeric_limits<unsigned>::max());
  const double low = std::max(1.0, std::ceil(max_checkouts * (1 - jitter)));
  const double high = std::min(most, std::max(low, std::floor(max_checkouts * (1 + jitter))));
  std::uniform_int_distribution<unsigned> pick(static_cast<unsigned>(low), static_cast<unsigned>(high));
  return pick(random);
}

inline std::minstd_rand::result_type random_seed(const void* salt) {
  const auto now = static_cast<std::uint64_t>(monotonic_ns());
  const auto mixed = now ^ static_cast<std::uint64_t>(::getpid()) << 32 ^ reinterpret_cast<std::uintptr_t>(salt);
  return static_cast<std::minstd_rand::result_type>(mixed % 2147483646u + 1);  // never 0
}

// One connection to the server, that is one worker process.
struct ClientWorker {
  explicit ClientWorker(std::size_t max_frame) : decoder(max_frame) {}
  ~ClientWorker() { close_now(); }
  ClientWorker(const ClientWorker&) = delete;
  ClientWorker& operator=(const ClientWorker&) = delete;

  void close_now() noexcept {
    watcher.reset();
    failure.reset();
    if (fd >= 0) ::close(fd);
    fd = -1;
  }

  int fd = -1;
  bool connecting = true;
  bool dropped = false;  // out of the pool: never used again
  bool broken = false;   // a write failed, its replies broke off or ended, or it said it exits: never used again
  bool replying = false;  // its replies are being delivered: it was read from just now
  IoWatcher watcher;
  Timer failure;  // reports a failed write from the loop
  OutgoingBytes out;
  FrameDecoder decoder;
  CheckoutCore* checkout = nullptr;  // the checkout holding it, if any
  bool held = false;  // ever handed to a checkout; dying before counts as a failed connect
  std::size_t address_index = 0;  // in ClientState::addresses, while connecting
  unsigned served = 0;               // checkouts released cleanly
  unsigned checkout_limit = 0;       // its own max_checkouts; 0: unlimited
  std::list<std::shared_ptr<ClientWorker>>::iterator position;  // in ClientState::workers
};

struct ClientState;

// The state of one checkout, owned by its client (never by a timer, a
// worker or a lambda), so that it goes as soon as the checkout is released
// and takes its LogDefer with it.
struct CheckoutCore {
  ClientState* client = nullptr;  // null once released or the client is gone
  std::list<std::shared_ptr<CheckoutCore>>::iterator position;  // in ClientState::checkouts
  std::weak_ptr<CheckoutState> handle;  // the handles' shared state, while any lives
  bool queued = false;                  // waiting for a worker
  std::list<CheckoutCore*>::iterator queue_position;
  ClientWorker* worker = nullptr;
  CallQueue calls;  // the front one is on the wire when in_flight
  bool in_flight = false;
  double timeout = forever;
  // In ClientState's list of timed checkouts while a call runs against
  // the timeout (see start_timeout()).
  bool timed = false;
  double deadline = 0;  // Loop::now() seconds
  CheckoutCore* timed_prev = nullptr;
  CheckoutCore* timed_next = nullptr;
  std::optional<LogDefer> log_defer;
  std::optional<LogDefer::Timer> call_timer;
  bool had_error = false;  // an error reply: the worker is not reused
  bool failed = false;     // for good: later calls get `fatal`
  bool fatal_is_timeout = false;
  std::string fatal;
  CallQueue doomed;  // calls to fail with `fatal`, from the loop
  Timer doomed_timer;

  std::exception_ptr fatal_error() const {
    if (fatal_is_timeout) return std::make_exception_ptr(TimeoutError(fatal));
    return std::make_exception_ptr(CheckoutError(fatal));
  }
};

// What Checkout handles share; when the last one goes, the checkout is
// released unless calls are pending.
struct CheckoutState {
  std::weak_ptr<CheckoutCore> core;
  CheckoutState() = default;
  CheckoutState(const CheckoutState&) = delete;
  CheckoutState& operator=(const CheckoutState&) = delete;
  ~CheckoutState();
};

struct ClientState : std::enable_shared_from_this<ClientState> {
  ClientState(EventHost& event_host, ClientOptions client_options)
      : host(event_host),
        options(std::move(client_options)),
        name(options.name.empty() ? options.connect : options.name),
        addresses(resolve_client_addresses(options.connect)),
        done_frame(encode_frame(Json{"dn", Json::object()})),
        read_buffer(64 * 1024),
        random(random_seed(this)) {
    const double jitter = options.max_checkouts_jitter;
    if (!(jitter >= 0 && jitter <= 1))
      throw Error("aet::Client: max_checkouts_jitter must be from 0 to 1");
  }
  ClientState(const ClientState&) = delete;
  ClientState& operator=(const ClientState&) = delete;
  ~ClientState() { shutdown(); }

  EventHost& host;
  ClientOptions options;
  std::string name;
  std::vector<ClientAddress> addresses;  // tried in turn by each connect
  std::string done_frame;
  std::vector<char> read_buffer;  // shared by every worker: reads never overlap
  OutgoingBytes call_scratch;     // where call frames are encoded
  std::minstd_rand random;        // draws each worker's checkout limit
  bool closed = false;
  std::list<std::shared_ptr<ClientWorker>> workers;  // connected or connecting
  std::size_t connecting = 0;
  std::vector<ClientWorker*> idle;                  // most recently used last
  std::list<std::shared_ptr<CheckoutCore>> checkouts;  // every live checkout
  std::list<CheckoutCore*> pending;                 // not yet served, in order
  Timer retry;  // armed after a failed connect: no new attempt before it fires
  CheckoutCore* timed_head = nullptr;  // checkouts under a timeout, soonest first
  CheckoutCore* timed_tail = nullptr;
  Timer deadline_timer;  // for the soonest of them, or earlier
  double deadline_timer_at = 0;

  // -- the pool --

  // Serves waiting checkouts with idle workers, then connects workers for
  // the demand left; repeats once if a connect succeeded at once.
  void pump() {
    if (closed) return;
    dispatch();
    if (open_workers()) dispatch();
  }

  // First come, first served; a checkout without a call does not block
  // the ones behind it.
  void dispatch() {
    for (auto it = pending.begin(); it != pending.end() && !idle.empty();) {
      CheckoutCore* core = *it;
      if (core->calls.empty()) {
        ++it;
        continue;
      }
      ClientWorker* worker = idle.back();
      idle.pop_back();
      if (!usable(*worker)) {
        // Died before the loop noticed; open_workers() replaces it.
        if (!worker->held) arm_retry();
        drop_worker(*worker);
        continue;
      }
      it = pending.erase(it);
      core->queued = false;
      core->worker = worker;
      worker->checkout = core;
      worker->held = true;
      send_next(*core);
    }
  }

  // An idle worker may have died since the loop last looked (a server
  // restart, say): one peek, so that the checkout goes to a live one. Not
  // for a worker whose reply is being delivered right now (released in its
  // own reply's callback, the usual case under load): it was just read
  // from, and a system call per checkout is too dear for what it would
  // add; if it ends right after that reply, the call sent to it reports it.
  // Bytes beyond its reply (a second reply nobody asked for) rule it out.
  static bool usable(const ClientWorker& worker) {
    if (worker.decoder.buffered() != 0 || worker.decoder.broken() || worker.broken) return false;
    return worker.replying || still_open(worker);
  }

  static bool still_open(const ClientWorker& worker) {
    char byte;
    ssize_t n;
    do {
      n = ::recv(worker.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);  // EOF, stray bytes or error: no
  }

  // Connects workers up to min_workers, and one per checkout with a call
  // that no connecting worker will serve, within max_workers. True if one
  // became idle at once.
  bool open_workers() {
    if (closed || retry) return false;
    const std::size_t total = workers.size();
    const std::size_t most = options.max_workers;
    if (total >= most) return false;
    const std::size_t room = most - total;
    const std::size_t least = std::min(options.min_workers, options.max_workers);
    std::size_t wanted = total < least ? least - total : 0;
    std::size_t waiting = 0;
    const std::size_t enough = connecting + room;
    for (CheckoutCore* core : pending) {
      if (!core->calls.empty() && ++waiting >= enough) break;
    }
    if (waiting > connecting) wanted = std::max(wanted, waiting - connecting);
    wanted = std::min(wanted, room);
    bool ready = false;
    for (std::size_t i = 0; i < wanted; ++i) {
      int outcome = connect_worker();
      if (outcome < 0) {
        arm_retry();
        break;
      }
      if (outcome > 0) ready = true;
    }
    return ready;
  }

  void arm_retry() {
    if (retry || closed) return;
    std::weak_ptr<ClientState> weak = weak_from_this();
    retry = Timer(host, 0.2, 0, [weak] {
      auto self = weak.lock();
      if (!self || self->closed) return;
      self->retry.reset();
      self->pump();
    });
  }

  // -1: failed at once; 0: connecting; 1: connected and idle.
  int connect_worker() {
    auto worker = std::make_shared<ClientWorker>(options.max_frame);
    worker->checkout_limit = draw_checkout_limit(options.max_checkouts, options.max_checkouts_jitter, random);
    const int started = start_connect(*worker, 0);
    if (started < 0) return -1;
    workers.push_back(worker);
    worker->position = std::prev(workers.end());
    if (started == 0) {
      worker->connecting = false;
      watch(worker, io_read);
      idle.push_back(worker.get());
      return 1;
    }
    ++connecting;
    watch(worker, io_write);
    return 0;
  }

  // Gives the worker a socket connecting to the first address, from
  // `first` on, that does not fail at once. 0: connected; 1: connecting;
  // -1: every one failed.
  int start_connect(ClientWorker& worker, std::size_t first) {
    for (std::size_t i = first; i < addresses.size(); ++i) {
      worker.close_now();
      const ClientAddress& address = addresses[i];
      worker.address_index = i;
      const int fd = ::socket(address.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      worker.fd = fd;
      if (address.family != AF_UNIX) {
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // best effort
      }
      const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&address.storage), address.length);
      if (rc == 0) return 0;
      // EINTR: the connection goes on asynchronously, as with EINPROGRESS.
      if (errno == EINPROGRESS || errno == EINTR) return 1;
    }
    worker.close_now();
    return -1;
  }

  void watch(const std::shared_ptr<ClientWorker>& worker, unsigned events) {
    std::weak_ptr<ClientState> weak_self = weak_from_this();
    std::weak_ptr<ClientWorker> weak_worker = worker;
    worker->watcher = IoWatcher(host, worker->fd, events, [weak_self, weak_worker](unsigned ready) {
      auto self = weak_self.lock();
      auto worker = weak_worker.lock();
      if (!self || !worker || self->closed || worker->dropped) return;
      self->on_io(worker, ready);
    });
  }

  // Out of the pool for good; the descriptor is closed now.
  void drop_worker(ClientWorker& worker) {
    if (worker.dropped) return;
    worker.dropped = true;
    if (worker.connecting) --connecting;
    auto it = std::find(idle.begin(), idle.end(), &worker);
    if (it != idle.end()) idle.erase(it);
    if (worker.checkout) worker.checkout->worker = nullptr;
    worker.checkout = nullptr;
    std::shared_ptr<ClientWorker> keep = std::move(*worker.position);
    workers.erase(worker.position);
    worker.close_now();
  }

  // -- worker i/o --

  void on_io(const std::shared_ptr<ClientWorker>& worker, unsigned ready) {
    if (worker->connecting) {
      finish_connect(worker);
      return;
    }
    if ((ready & io_write) && !flush(*worker)) {
      worker_failed(worker, "worker connection suddenly died");
      return;
    }
    if (ready & io_read) read_replies(worker);
  }

  void finish_connect(const std::shared_ptr<ClientWorker>& worker) {
    int error = 0;
    socklen_t length = sizeof(error);
    if (::getsockopt(worker->fd, SOL_SOCKET, SO_ERROR, &error, &length) < 0) error = errno;
    if (error == EINPROGRESS || error == EALREADY) return;
    if (error != 0) {
      // On to the next resolved address; a failed connect when none is left.
      const int started = start_connect(*worker, worker->address_index + 1);
      if (started < 0) {
        drop_worker(*worker);
        arm_retry();
        return;
      }
      if (started > 0) {
        watch(worker, io_write);
        return;
      }
      watch(worker, io_read);
    } else {
      worker->watcher.set_events(io_read);
    }
    --connecting;
    worker->connecting = false;
    idle.push_back(worker.get());
    pump();
  }

  // Sends what is buffered; false when the connection is broken.
  bool flush(ClientWorker& worker) {
    if (worker.broken) return false;
    while (!worker.out.all_sent()) {
      const ssize_t n = worker.out.send_some(worker.fd, MSG_NOSIGNAL);
      if (n > 0) continue;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (!(worker.watcher.events() & io_write)) worker.watcher.set_events(io_read | io_write);
        return true;
      }
      worker.broken = true;
      return false;
    }
    worker.out.clear();  // keeps its capacity for the next call
    if (worker.watcher.events() & io_write) worker.watcher.set_events(io_read);
    return true;
  }

  // Queues `frame` on the worker. A failed write is reported from the loop
  // (this runs inside call() and release too).
  void send(ClientWorker& worker, OutgoingBytes& frame) {
    worker.out.append(std::move(frame));  // into an empty one: swapped, no copy
    push(worker);
  }

  // Sends what the worker has buffered; a failure is reported from the loop.
  void push(ClientWorker& worker) {
    if (flush(worker) || worker.failure) return;
    std::weak_ptr<ClientState> weak_self = weak_from_this();
    std::weak_ptr<ClientWorker> weak_worker = *worker.position;
    worker.failure = Timer(host, 0, 0, [weak_self, weak_worker] {
      auto self = weak_self.lock();
      auto worker = weak_worker.lock();
      if (!self || !worker || self->closed || worker->dropped) return;
      self->worker_failed(worker, "worker connection suddenly died");
    });
  }

  void read_replies(const std::shared_ptr<ClientWorker>& worker) {
    bool eof = false;
    // A bad header stops the reading, not the replies before it: they are
    // delivered, and the decoder then reports the error (below).
    std::string read_error;
    auto describe = [](const std::exception& e) {
      const bool protocol = dynamic_cast<const ProtocolError*>(&e) != nullptr;
      return std::string(protocol ? "protocol error: " : "cannot read the worker's replies: ") + e.what();
    };
    for (;;) {
      // Into the shared buffer, then copied into the decoder; but straight
      // into the decoder when it has that much room anyway (a large body
      // is awaited), so a large reply is not copied twice.
      std::pair<char*, std::size_t> space;
      try {
        space = worker->decoder.input_space(0);
      } catch (const std::exception& e) {
        read_error = describe(e);
        break;
      }
      const bool direct = space.second >= read_buffer.size();
      if (!direct) space = {read_buffer.data(), read_buffer.size()};
      const ssize_t n = ::recv(worker->fd, space.first, space.second, 0);
      if (n > 0) {
        try {
          if (direct) worker->decoder.commit(static_cast<std::size_t>(n));
          else worker->decoder.feed(space.first, static_cast<std::size_t>(n));
        } catch (const std::exception& e) {
          read_error = describe(e);
          break;
        }
        if (static_cast<std::size_t>(n) < space.second) break;  // drained, most likely
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      eof = true;  // end of file, ECONNRESET or another error
      break;
    }
    // Replies first: a worker may answer and exit at once. One whose
    // stream broke off or ended is not handed out again by a callback
    // releasing its checkout.
    if (eof || !read_error.empty() || worker->decoder.broken()) worker->broken = true;
    struct Replying {
      ClientWorker& worker;
      explicit Replying(ClientWorker& w) : worker(w) { worker.replying = true; }
      ~Replying() { worker.replying = false; }
      Replying(const Replying&) = delete;
      Replying& operator=(const Replying&) = delete;
    } replying(*worker);
    while (!worker->dropped && !closed) {
      std::optional<Json> message;
      try {
        message = worker->decoder.next();
      } catch (const std::exception& e) {
        worker_failed(worker, std::string("protocol error: ") + e.what());
        return;
      }
      if (!message) break;
      on_reply(worker, std::move(*message));
    }
    if (worker->dropped || closed) return;
    if (!read_error.empty()) worker_failed(worker, read_error);
    else if (eof) worker_failed(worker, "worker connection suddenly died");
  }

  // The worker is unusable: an idle one is replaced as needed, a checkout
  // holding it fails for good. One that dies before serving any checkout
  // counts as a failed connect (a server that accepts and closes, say): it
  // is replaced after the retry delay, not at once in a tight loop.
  void worker_failed(const std::shared_ptr<ClientWorker>& worker, const std::string& message) {
    CheckoutCore* holder = worker->checkout;
    if (!worker->held) arm_retry();
    drop_worker(*worker);
    if (holder) {
      std::shared_ptr<CheckoutCore> core = *holder->position;  // a copy: fail() may erase it
      fail(core, false, message);
    } else {
      pump();
    }
  }

  void on_reply(const std::shared_ptr<ClientWorker>& worker, Json message) {
    CheckoutCore* holder = worker->checkout;
    if (!holder || !holder->in_flight) {
      worker_failed(worker, "protocol error: a reply with no call in flight");
      return;
    }
    // FrameDecoder checked the shape: ok and er are [kind, {meta}, payload].
    const bool ok = is_command(message[0].as_string(), "ok");
    if (!ok && !is_command(message[0].as_string(), "er")) {
      worker_failed(worker, "protocol error: unexpected \"" + message[0].as_string() + "\" message from the worker");
      return;
    }
    // Its last reply: the worker exits (its server stops), so it is not
    // handed to another checkout.
    if (const Json* last = message[1].find("last"); last && last->is_bool() && last->as_bool()) worker->broken = true;
    std::shared_ptr<CheckoutCore> core = *holder->position;
    ClientCall call = std::move(core->calls.front());
    core->calls.pop_front();
    core->in_flight = false;
    core->call_timer.reset();
    stop_timeout(*core);
    if (core->log_defer) {
      if (const Json* log = message[1].find("ld"); log && log->is_object()) {
        try {
          core->log_defer->merge(*log);
        } catch (const std::exception& e) {
          core->log_defer->warn(std::string("unreadable worker log: ") + e.what());
        }
      }
    }
    Json& payload = message.as_array()[2];
    if (ok) {
      if (!core->calls.empty()) {
        start_timeout(*core);
        send_next(*core);
      }
      deliver_result(core, std::move(call), std::move(payload));
      return;
    }
    core->had_error = true;
    CallQueue discarded = std::move(core->calls);
    core->calls.clear();
    const std::string text = payload.as_string();  // a string: FrameDecoder checked it
    deliver_error(core, std::move(call), std::make_exception_ptr(RemoteError(text)),
                  std::move(discarded));
  }

  // -- checkouts --

  // Sends the first queued call: its frame, or `frame` if given.
  void send_next(CheckoutCore& core, OutgoingBytes* frame = nullptr) {
    ClientCall& call = core.calls.front();
    core.in_flight = true;
    if (core.log_defer) core.call_timer.emplace(core.log_defer->timer(call.method ? *call.method : "->()"));
    send(*core.worker, frame ? *frame : call.frame);
  }

  // -- timeouts --
  //
  // The checkouts whose call runs against its timeout are linked through
  // the checkouts themselves, soonest deadline first, and one loop timer
  // stands for them all: a call's timeout costs no allocation and no timer
  // of its own. The timer is set for the soonest deadline, or earlier (it
  // is not moved when the soonest checkout leaves the list): it then looks
  // again and sets itself for the new soonest.

  // For the deadline of the checkout's first call (when it was queued
  // plus the timeout, as each call has its own).
  void start_timeout(CheckoutCore& core) {
    stop_timeout(core);
    core.deadline = core.calls.front().deadline;
    if (core.deadline < 0) return;  // aet::forever
    // From the back: with the usual single timeout value, that is where
    // it goes.
    CheckoutCore* after = timed_tail;
    while (after && after->deadline > core.deadline) after = after->timed_prev;
    core.timed_prev = after;
    core.timed_next = after ? after->timed_next : timed_head;
    (core.timed_next ? core.timed_next->timed_prev : timed_tail) = &core;
    (after ? after->timed_next : timed_head) = &core;
    core.timed = true;
    if (!deadline_timer || core.deadline < deadline_timer_at) set_deadline_timer(core.deadline);
  }

  void stop_timeout(CheckoutCore& core) noexcept {
    if (!core.timed) return;
    (core.timed_prev ? core.timed_prev->timed_next : timed_head) = core.timed_next;
    (core.timed_next ? core.timed_next->timed_prev : timed_tail) = core.timed_prev;
    core.timed_prev = core.timed_next = nullptr;
    core.timed = false;
  }

  void set_deadline_timer(double at) {
    deadline_timer_at = at;
    std::weak_ptr<ClientState> weak = weak_from_this();
    deadline_timer = Timer(host, at - Loop::now(), 0, [weak] {
      auto self = weak.lock();
      if (!self || self->closed) return;
      self->deadline_timer.reset();
      self->expire_timeouts();
    });
  }

  // Fails the checkout whose deadline passed first, one per round: the
  // timer is armed for the next one before, so that when this failure's
  // error escapes the loop (no catcher, or one that throws), the others
  // still expire, in the rounds that follow.
  void expire_timeouts() {
    if (!timed_head) return;
    if (timed_head->deadline > Loop::now()) {
      set_deadline_timer(timed_head->deadline);
      return;
    }
    std::shared_ptr<CheckoutCore> core = *timed_head->position;
    stop_timeout(*timed_head);
    if (timed_head) set_deadline_timer(timed_head->deadline);
    char text[64];
    std::snprintf(text, sizeof(text), "timed out after %g seconds", core->timeout);
    fail(core, true, text);
  }

  // `frame` is call_scratch. A call that goes out at once is sent from it
  // (its buffer and the worker's swap, so neither is allocated again); one
  // that waits takes a copy.
  void queue_call(const std::shared_ptr<CheckoutCore>& core, ClientCall call, OutgoingBytes& frame) {
    if (core->failed) {
      doom_later(core, std::move(call));
      return;
    }
    if (core->timeout >= 0) call.deadline = Loop::now() + core->timeout;
    const bool now = core->worker && !core->in_flight;
    if (!now) call.frame = take_frame(frame);
    core->calls.push_back(std::move(call));
    if (!core->timed) start_timeout(*core);
    if (now) {
      send_next(*core, &frame);
    } else if (!core->worker) {
      pump();
    }
  }

  void unqueue(CheckoutCore& core) {
    if (!core.queued) return;
    pending.erase(core.queue_position);
    core.queued = false;
  }

  // Makes `core` fail for good: no worker, no timer, no queue. Returns the
  // call that gets the error (the one in flight, else the first queued);
  // the others go to `discarded`.
  std::optional<ClientCall> doom(CheckoutCore& core, bool timeout, const std::string& message,
                                 CallQueue& discarded) {
    core.failed = true;
    core.fatal_is_timeout = timeout;
    core.fatal = message;
    stop_timeout(core);
    core.call_timer.reset();
    core.in_flight = false;
    unqueue(core);
    if (ClientWorker* worker = core.worker) drop_worker(*worker);
    std::optional<ClientCall> target;
    if (!core.calls.empty()) {
      target = std::move(core.calls.front());
      core.calls.pop_front();
    }
    discarded = std::move(core.calls);
    core.calls.clear();
    return target;
  }

  // A fatal error seen from the loop: delivered now.
  void fail(const std::shared_ptr<CheckoutCore>& core, bool timeout, const std::string& message) {
    CallQueue discarded;
    std::optional<ClientCall> target = doom(*core, timeout, message, discarded);
    pump();
    if (target) {
      deliver_error(core, std::move(*target), core->fatal_error(), std::move(discarded));
    } else {
      SettleGuard settle(core, std::move(discarded));
    }
  }

  // Fails `call` with the checkout's error from the loop, never inside call().
  void doom_later(const std::shared_ptr<CheckoutCore>& core, ClientCall call) {
    core->doomed.push_back(std::move(call));
    arm_doomed(core);
  }

  void arm_doomed(const std::shared_ptr<CheckoutCore>& core) {
    if (core->doomed_timer) return;
    std::weak_ptr<CheckoutCore> weak = core;
    core->doomed_timer = Timer(host, 0, 0, [weak] {
      auto core = weak.lock();
      if (!core || !core->client || core->client->closed) return;
      std::shared_ptr<ClientState> self = core->client->shared_from_this();
      self->deliver_doomed(core);
    });
  }

  // One per round, so each call gets its error even when one escapes.
  void deliver_doomed(const std::shared_ptr<CheckoutCore>& core) {
    core->doomed_timer.reset();
    if (core->doomed.empty()) return;
    ClientCall call = std::move(core->doomed.front());
    core->doomed.pop_front();
    if (!core->doomed.empty()) arm_doomed(core);
    deliver_error(core, std::move(call), core->fatal_error(), {});
  }

  void throw_fatal_error(const std::shared_ptr<CheckoutCore>& core, const std::string& message) {
    if (core->failed) return;  // the first error sticks
    CallQueue discarded;
    std::optional<ClientCall> target = doom(*core, false, message, discarded);
    if (target) doom_later(core, std::move(*target));
    pump();
    if (!target) core->log_defer.reset();
    // `discarded` goes last: its callbacks may hold the last handles.
  }

  // After a delivery, or while an exception from it unwinds: a failed
  // checkout lets its LogDefer go; one with nothing left is released.
  // Discarded calls are destroyed after the delivery, not before it.
  struct SettleGuard {
    SettleGuard(std::shared_ptr<CheckoutCore> settled, CallQueue dropped)
        : core(std::move(settled)), discarded(std::move(dropped)) {}
    std::shared_ptr<CheckoutCore> core;
    CallQueue discarded;
    SettleGuard(const SettleGuard&) = delete;
    SettleGuard& operator=(const SettleGuard&) = delete;
    ~SettleGuard() {
      try {
        discarded.clear();
        ClientState* client = core->client;
        if (!client || client->closed) return;
        std::optional<LogDefer> finished;
        if (core->failed && core->doomed.empty()) finished.swap(core->log_defer);
        client->maybe_release(core);
        // `finished`, then `core`, go here: a LogDefer may be delivered last.
      } catch (...) {
        // nothing may escape a guard; a throwing LogDefer callback is lost
      }
    }
  };

  void deliver_result(const std::shared_ptr<CheckoutCore>& core, ClientCall call, Json result) {
    Checkout handle = handle_for(core);
    // Run in its frame: a throw goes to that frame's catchers, or out.
    call.context.run([&] { call.callback(handle, std::move(result)); });
  }

  void deliver_error(std::shared_ptr<CheckoutCore> core, ClientCall call, std::exception_ptr error,
                     CallQueue discarded) {
    SettleGuard settle(std::move(core), std::move(discarded));
    ClientCall delivered = std::move(call);  // goes before the guard: it may hold the last handle
    delivered.context.raise(std::move(error));
  }

  Checkout handle_for(const std::shared_ptr<CheckoutCore>& core) {
    std::shared_ptr<CheckoutState> state = core->handle.lock();
    if (!state) {
      state = std::make_shared<CheckoutState>();
      state->core = core;
      core->handle = state;
    }
    return Checkout(std::move(state));
  }

  // Released once no handle is left and nothing is pending: a clean
  // checkout gives its worker back ("dn"), a failed one has none.
  void maybe_release(const std::shared_ptr<CheckoutCore>& core) {
    if (closed || core->client != this) return;
    if (!core->handle.expired() || !core->calls.empty() || !core->doomed.empty()) return;
    std::shared_ptr<ClientWorker> kept;  // back in the pool, its "dn" not sent yet
    core->client = nullptr;
    unqueue(*core);
    stop_timeout(*core);
    core->doomed_timer.reset();
    if (ClientWorker* worker = core->worker) {
      core->worker = nullptr;
      worker->checkout = nullptr;
      const bool clean = !worker->broken && !(core->had_error && !options.dont_refork_after_error);
      // A normal release: "dn" even when the worker retires now, so that
      // checkout_done runs for every checkout released normally.
      bool retiring = false;
      if (clean) {
        ++worker->served;
        retiring = worker->checkout_limit != 0 && worker->served >= worker->checkout_limit;
      }
      if (clean && !retiring) {
        // Its "dn" waits for pump(): if a waiting checkout gets this worker
        // now, one write carries both "dn" and that checkout's first call.
        worker->out.bytes() += done_frame;
        idle.push_back(worker);
        kept = *worker->position;
      } else {
        if (retiring) {
          worker->out.bytes() += done_frame;
          push(*worker);
        }
        drop_worker(*worker);
      }
    }
    std::shared_ptr<CheckoutCore> released = std::move(*core->position);
    checkouts.erase(core->position);
    pump();
    if (kept && !kept->dropped && !kept->out.all_sent()) push(*kept);  // "dn" alone
  }

  std::shared_ptr<CheckoutCore> new_checkout(CheckoutOptions checkout_options) {
    if (options.max_pending_checkouts != 0 && pending.size() >= options.max_pending_checkouts)
      throw OverloadError("too many pending checkouts (" +
                          std::to_string(options.max_pending_checkouts) + ")");
    auto core = std::make_shared<CheckoutCore>();
    core->client = this;
    core->timeout = checkout_options.timeout.value_or(options.timeout);
    core->log_defer = std::move(checkout_options.log_defer);
    checkouts.push_back(core);
    core->position = std::prev(checkouts.end());
    pending.push_back(core.get());
    core->queue_position = std::prev(pending.end());
    core->queued = true;
    return core;
  }

  // Everything goes now, silently; handles left become inert.
  void shutdown() noexcept {
    if (closed) return;
    closed = true;
    retry.reset();
    std::list<std::shared_ptr<CheckoutCore>> gone_checkouts = std::move(checkouts);
    std::list<std::shared_ptr<ClientWorker>> gone_workers = std::move(workers);
    checkouts.clear();
    workers.clear();
    pending.clear();
    idle.clear();
    deadline_timer.reset();
    for (auto& core : gone_checkouts) {
      stop_timeout(*core);
      core->client = nullptr;
      core->worker = nullptr;
      core->doomed_timer.reset();
    }
    for (auto& worker : gone_workers) {
      worker->dropped = true;
      worker->checkout = nullptr;
      worker->close_now();
    }
    gone_workers.clear();
    gone_checkouts.clear();  // queued callbacks and LogDefers go last
  }
};

inline CheckoutState::~CheckoutState() {
  try {
    std::shared_ptr<CheckoutCore> live = core.lock();
    if (!live || !live->client || live->client->closed) return;
    std::shared_ptr<ClientState> client = live->client->shared_from_this();
    client->maybe_release(live);
  } catch (...) {
    // a destructor: a throwing LogDefer callback is lost
  }
}

inline std::shared_ptr<CheckoutCore> live_core(const std::shared_ptr<CheckoutState>& state) {
  if (!state) throw Error("aet::Checkout: empty checkout handle");
  std::shared_ptr<CheckoutCore> core = state->core.lock();
  if (!core || !core->client || core->client->closed) throw Error("client is gone");
  return core;
}

}  // namespace detail

// -- Checkout --

// The callback is stored as it is beside its frame, not wrapped in a
// Framed (which would take an allocation of its own): the client runs it
// in that frame, as the wrapper would.
template <class F>
void Checkout::call(std::string method, Json args, F callback, const char* file, int line) {
  if constexpr (is_framed<std::decay_t<F>>::value) {
    FrameContext context = callback.context();
    enqueue(std::optional<std::string>(std::move(method)), std::move(args), Callback(std::move(callback).code()),
            std::move(context));
  } else {
    FrameContext context = detail::push_frame(Catcher{}, frame_name(&method), file, line);
    enqueue(std::optional<std::string>(std::move(method)), std::move(args), Callback(std::move(callback)),
            std::move(context));
  }
}

template <class F>
void Checkout::operator()(Json args, F callback, const char* file, int line) {
  if constexpr (is_framed<std::decay_t<F>>::value) {
    FrameContext context = callback.context();
    enqueue(std::nullopt, std::move(args), Callback(std::move(callback).code()), std::move(context));
  } else {
    FrameContext context = detail::push_frame(Catcher{}, frame_name(nullptr), file, line);
    enqueue(std::nullopt, std::move(args), Callback(std::move(callback)), std::move(context));
  }
}

inline std::string Checkout::frame_name(const std::string* method) const {
  std::shared_ptr<detail::CheckoutCore> core = detail::live_core(state_);
  const std::string& client = core->client->name;
  const char* called = method ? method->c_str() : "->()";
  const std::size_t called_size = method ? method->size() : 4;
  std::string name;
  name.reserve(client.size() + 4 + called_size);
  name.append(client).append(" -> ").append(called, called_size);
  return name;
}

inline void Checkout::enqueue(std::optional<std::string> method, Json args, Callback callback,
                              FrameContext context) {
  std::shared_ptr<detail::CheckoutCore> core = detail::live_core(state_);
  std::shared_ptr<detail::ClientState> client = core->client->shared_from_this();
  detail::OutgoingBytes& frame = client->call_scratch;
  // Emptied however this ends: nothing is left pointing into `args`.
  struct Cleared {
    detail::OutgoingBytes& frame;
    ~Cleared() { frame.clear(); }
  } cleared{frame};
  detail::encode_call(method, args, frame);
  // The worker would refuse it and exit: say so here, where it can be fixed.
  if (frame.size() - 4 > client->options.max_frame)
    throw ProtocolError("request of " + std::to_string(frame.size() - 4) + " bytes exceeds the limit of " +
                        std::to_string(client->options.max_frame));
  frame.keep(std::move(args));  // until sent: strings left out of the frame are in it
  client->queue_call(core, detail::ClientCall{std::move(method), {}, std::move(callback), std::move(context)},
                     frame);
}

inline void Checkout::throw_fatal_error(const std::string& message) {
  std::shared_ptr<detail::CheckoutCore> core = detail::live_core(state_);
  std::shared_ptr<detail::ClientState> client = core->client->shared_from_this();
  client->throw_fatal_error(core, message);
}

// -- Client --

namespace detail {

// No worker at all would make every checkout time out: refused up front.
inline ClientOptions checked_client_options(ClientOptions options) {
  if (options.max_workers == 0) throw Error("aet::Client: max_workers must be at least 1");
  return options;
}

}  // namespace detail

inline Client::Client(EventHost& host, ClientOptions options)
    : state_(std::make_shared<detail::ClientState>(host, detail::checked_client_options(std::move(options)))) {
  state_->pump();
}

inline Client::~Client() {
  if (state_) state_->shutdown();
}

inline Checkout Client::checkout(CheckoutOptions options) {
  if (state_->closed) throw Error("client is gone");
  std::shared_ptr<detail::CheckoutCore> core = state_->new_checkout(std::move(options));
  return state_->handle_for(core);
}

inline const std::string& Client::name() const { return state_->name; }
inline std::size_t Client::worker_count() const { return state_->workers.size(); }
inline std::size_t Client::idle_worker_count() const { return state_->idle.size(); }
inline std::size_t Client::pending_checkout_count() const { return state_->pending.size(); }

}  // namespace aet

#endif  // ANYEVENT_TASK_HPP
