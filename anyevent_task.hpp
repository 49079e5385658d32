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

#include <algorithm>
#include <atomic>
#include <charconv>
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
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
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

// The payload of a string value: the text, and the slab it lives in
// (nullptr when it was allocated on its own).
struct JsonString {
  std::string text;
  JsonChunk* chunk;
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
inline JsonString* new_json_string(std::string text) { return new JsonString{std::move(text), nullptr}; }
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
    // Each element may own memory elsewhere: start loading a few ahead.
    for (T* ahead = first + 4; first != last; ++first, ++ahead) {
      if (ahead < last) prefetch_payload(*ahead);
      first->~T();
    }
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
  std::string& as_string();
  const Array& as_array() const;
  Array& as_array();
  const Object& as_object() const;
  Object& as_object();

  // Arrays and objects. size() is 0 for scalars (and empty() true).
  std::size_t size() const noexcept;
  bool empty() const noexcept { return size() == 0; }
  const Json& operator[](std::size_t index) const;  // throws JsonError out of range
  Json& operator[](std::size_t index);
  const Json& operator[](std::string_view key) const;  // throws JsonError when missing
  Json& operator[](std::string_view key);              // inserts null; null becomes {}
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
  // Starts loading the memory a value owns (walks of large trees are bound
  // by these dependent cache misses). Found by argument-dependent lookup.
  friend void prefetch_payload(const Json& v) noexcept {
    if (v.type_ == Type::String) __builtin_prefetch(v.string_payload());
    else if (v.type_ == Type::Array) __builtin_prefetch(v.value_.array.data());
    else if (v.type_ == Type::Object) __builtin_prefetch(v.value_.object.data());
  }
  friend void prefetch_payload(const std::pair<std::string, Json>& member) noexcept {
    prefetch_payload(member.second);
  }
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

// Appends one frame holding `message` (compact JSON) to `out`. Throws
// JsonError when the message cannot be printed (NaN, invalid UTF-8), and
// ProtocolError when it exceeds 4 GiB; `out` is then left as it was.
void append_frame(std::string& out, const Json& message);
std::string encode_frame(const Json& message);

// Throws ProtocolError unless `message` is a well-formed do/dn/ok/er array:
// ["do", {meta}, args...], ["dn", {meta}], ["ok", {meta}, result] or
// ["er", {meta}, "message"]. Unknown meta keys are fine.
void check_message(const Json& message);

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
  void feed(const char* data, std::size_t size);
  void feed(std::string_view bytes) { feed(bytes.data(), bytes.size()); }
  // The next whole message, or nothing yet; ProtocolError on a bad one.
  std::optional<Json> next();
  std::size_t buffered() const noexcept { return buffer_.size() - read_pos_; }  // held, not yet yielded

 private:
  void compact();
  void release_if_drained();
  [[noreturn]] void throw_broken() const;
  std::size_t max_frame_, max_depth_;
  std::string buffer_;
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

// The first byte at or after p that is not plain printable ASCII.
inline const char* json_skip_plain(const char* p, const char* end) noexcept {
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
inline std::uint64_t eight_digits(std::uint32_t x) noexcept {
  static constexpr char pairs[] =
      "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
      "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
      "8081828384858687888990919293949596979899";
  const std::uint32_t high = x / 10000, low = x % 10000;
  std::uint16_t a, b, c, d;
  std::memcpy(&a, pairs + 2 * (high / 100), 2);
  std::memcpy(&b, pairs + 2 * (high % 100), 2);
  std::memcpy(&c, pairs + 2 * (low / 100), 2);
  std::memcpy(&d, pairs + 2 * (low % 100), 2);
  return std::uint64_t{a} | std::uint64_t{b} << 16 | std::uint64_t{c} << 32 | std::uint64_t{d} << 48;
}

// The shortest text of a double that needs at most 15 significant digits
// and lies in [1e-7, 1e15), written at o; nullptr for any other double
// (then std::to_chars does it). Decimals of 15 digits lie farther apart
// than doubles, so at most one of them reads back as d: if the nearest one
// does, its digits without trailing zeros are the shortest round trip.
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
  std::uint64_t m = static_cast<std::uint64_t>(scaled + 0.5);
  if (m >= 1000000000000000u) return nullptr;
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
  // All 16 digits of m (leading zeros included) in two independent halves,
  // kept in registers: the zeros to drop are counted in the words, and the
  // text is assembled by shifts and stored in whole words.
  constexpr std::uint64_t zeros = 0x3030303030303030ull;  // "00000000"
  const std::uint64_t high = eight_digits(static_cast<std::uint32_t>(m / 100000000));
  const std::uint64_t low = eight_digits(static_cast<std::uint32_t>(m % 100000000));
  const int lead = high != zeros ? __builtin_ctzll(high ^ zeros) / 8 : 8 + __builtin_ctzll(low ^ zeros) / 8;
  const int trail = low != zeros ? __builtin_clzll(low ^ zeros) / 8 : 8 + __builtin_clzll(high ^ zeros) / 8;
  p -= trail;
  const int n = 16 - lead - trail;  // significant digits, at most 15
  const Wide text = (static_cast<Wide>(low) << 64 | high) >> (8 * lead);  // digit i in byte i
  if (d < 0) *o++ = '-';
  const int point = n - p;  // digits before the decimal point, from -6 to 15
  if (point >= n) {  // integral: the digits, zeros, ".0"
    std::memcpy(o, &text, 16);
    for (int i = n; i < point; ++i) o[i] = '0';
    o += point;
    *o++ = '.';
    *o++ = '0';
  } else if (point > 0) {
    const Wide integral = text & ((static_cast<Wide>(1) << (8 * point)) - 1);
    const Wide joined = integral | static_cast<Wide>('.') << (8 * point) | (text >> (8 * point)) << (8 * (point + 1));
    std::memcpy(o, &joined, 16);
    o += n + 1;
  } else {
    std::memcpy(o, "0.000000", 8);
    std::memcpy(o + 2 - point, &text, 16);
    o += 2 - point + n;
  }
  return o;
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
  // call count() once an object lives there.
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
// until the container closes, so nesting costs no native stack and every
// container is allocated once at its exact size.
class JsonParser {
 public:
  JsonParser(std::string_view text, std::size_t max_depth)
      : begin_(text.data()),
        p_(text.data()),
        end_(text.data() + text.size()),
        max_depth_(max_depth),
        slabs_(text.size()) {}

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
        levels_.push_back({false, values_.size()});
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
        levels_.push_back({true, members_.size()});
        after_comma = false;
        goto key;
      case '"': {
        const char* run = p_ + 1;
        const char* stop = scan_text(run);
        if (stop < end_ && *stop == '"') {  // no escape: build it in one go
          p_ = stop + 1;
          emit(make_string(std::string(run, stop)));
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
    bool object;
    std::size_t start;  // index of its first element in values_ or members_
  };

  Json make_string(std::string text) {
    void* memory = slabs_.take(sizeof(JsonString));
    auto* s = ::new (memory) JsonString{std::move(text), slabs_.chunk()};
    slabs_.count();
    Json j;
    j.type_ = Json::Type::String;
    j.value_.bits = pointer_bits(s);
    return j;
  }

  // A container from its finished elements, moved into a block of the exact
  // size: in the current slab, or on the heap when it is large.
  template <class Container, class Scratch>
  Json make_container(Json::Type type, Scratch& scratch, std::size_t start) {
    using Element = typename Container::value_type;
    const auto first = scratch.begin() + static_cast<std::ptrdiff_t>(start);
    const std::size_t n = scratch.size() - start;
    const std::size_t bytes = Container::block_bytes(n);
    Container elements;
    if (bytes <= JsonSlabs::largest_block) {
      void* memory = slabs_.take(bytes);
      auto* block = ::new (memory) typename Container::Header{0, n, slabs_.chunk()};
      Element* out = Container::items(block);
      for (auto it = first; it != scratch.end(); ++it, ++out) ::new (static_cast<void*>(out)) Element(std::move(*it));
      block->size = n;
      slabs_.count();
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

  void close_array() {
    const std::size_t start = levels_.back().start;
    levels_.pop_back();
    emit(make_container<Json::Array>(Json::Type::Array, values_, start));
  }

  void close_object() {
    const std::size_t start = levels_.back().start;
    const std::size_t n = members_.size() - start;
    const std::size_t dup = find_duplicate_key(members_.data() + start, n);
    if (dup != n)
      fail(key_positions_[start + dup], "duplicate key \"" + members_[start + dup].first + "\"");
    levels_.pop_back();
    key_positions_.resize(start);
    emit(make_container<Json::Object>(Json::Type::Object, members_, start));
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
    int exponent = 0;
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (p_ == end_ || !is_digit(*p_)) fail(p_, "expected a digit after the decimal point, got " + describe(p_));
      for (; p_ < end_ && is_digit(*p_); ++p_) {
        if (mantissa_digits < 19) mantissa = mantissa * 10 + static_cast<unsigned>(*p_ - '0');
        ++mantissa_digits;
        --exponent;
      }
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
  std::vector<Level> levels_;
  std::vector<Json> values_;
  std::vector<std::pair<std::string, Json>> members_;
  std::vector<const char*> key_positions_;  // of members_, for duplicate-key errors
};

// Prints into one std::string. The cursor travels in a register from call
// to call (it is passed and returned); the string is grown geometrically
// when a write needs more room than is left, and trimmed at the end.
// Compact and pretty output are two instantiations.
template <bool Pretty>
class JsonWriter {
 public:
  JsonWriter(std::string& out, int indent) : out_(out), indent_(indent) {
    const std::size_t used = out.size();
    // Room for a small value; resize() clears what it adds, so never more.
    out_.resize(used + 256);
    begin_ = &out_[0];
    end_ = begin_ + out_.size();
    cursor_ = begin_ + used;
  }

  void run(const Json& v) { out_.resize(static_cast<std::size_t>(write(cursor_, v, 0) - begin_)); }

 private:
  // At least n writable bytes at o (which may move).
  char* room(char* o, std::size_t n) {
    if (static_cast<std::size_t>(end_ - o) >= n) return o;
    return grow(o, n);
  }
  char* grow(char* o, std::size_t n) {
    const std::size_t used = static_cast<std::size_t>(o - begin_);
    out_.resize(std::max(out_.size() * 2, used + n));
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

  // Scalars inline; containers, strings and doubles out of line.
  char* write(char* o, const Json& v, std::size_t depth) {
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
      case Json::Type::String: return write_string(o, v.string_payload()->text);
      case Json::Type::Array: return write_array(o, v.value_.array, depth);
      case Json::Type::Object: return write_object(o, v.value_.object, depth);
    }
    return o;
  }

  char* write_array(char* o, const Json::Array& a, std::size_t depth) {
    const Json* it = a.data();
    const std::size_t n = a.size();
    o = room(o, 2);
    *o++ = '[';
    for (std::size_t i = 0; i < n; ++i) {
      if (i + 4 < n) prefetch_payload(it[i + 4]);
      if (i) {
        o = room(o, 1);
        *o++ = ',';
      }
      if constexpr (Pretty) o = newline(o, depth + 1);
      char* element = o;
      o = write(o, it[i], depth + 1);
      // A long array: make room for all of it once, guessing from its first
      // element, rather than growing (copying and clearing) step by step.
      if (i == 0 && n >= 16) {
        const std::size_t guess = (static_cast<std::size_t>(o - element) + 2) * (n - 1);
        if (guess < (std::size_t{1} << 30)) o = room(o, guess + guess / 4);
      }
    }
    if constexpr (Pretty) {
      if (n) o = newline(o, depth);
    }
    o = room(o, 1);
    *o++ = ']';
    return o;
  }

  char* write_object(char* o, const Json::Object& object, std::size_t depth) {
    const auto* it = object.data();
    const std::size_t n = object.size();
    o = room(o, 2);
    *o++ = '{';
    for (std::size_t i = 0; i < n; ++i) {
      if (i + 2 < n) prefetch_payload(it[i + 2]);
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

  // Strings without anything to escape, and up to 64 bytes (keys, most
  // values), take this short path; the rest the general one.
  char* write_string(char* o, const std::string& s) {
    const std::size_t n = s.size();
    if (n > 64) return write_any_string(o, s);
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
    // The text as it is, the quotes, and slack for whole words stored past
    // the end of a run (later bytes overwrite them).
    o = room(o, s.size() + 2 + 8);
    *o++ = '"';
    for (;;) {
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
      o = room(o, static_cast<std::size_t>(end - p) + 7 + 8);
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
    case Type::String: value_.bits = detail::pointer_bits(detail::new_json_string(other.string_payload()->text)); break;
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
  return string_payload()->text;
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

// ---- implementation: loop --------------------------------------------------

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
  const std::size_t length = out.size() - start - 4;
  if (length > 0xFFFFFFFFu) {
    out.resize(start);
    throw ProtocolError("message of " + std::to_string(length) + " bytes is too large for a frame");
  }
  out[start] = static_cast<char>(length >> 24);
  out[start + 1] = static_cast<char>(length >> 16);
  out[start + 2] = static_cast<char>(length >> 8);
  out[start + 3] = static_cast<char>(length);
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
  const bool known = command == "do" || command == "dn" || command == "ok" || command == "er";
  if (!known) throw ProtocolError("unknown command " + detail::quoted_for_message(command));
  if (parts.size() < 2) throw ProtocolError("\"" + command + "\" message has no meta");
  if (!parts[1].is_object())
    throw ProtocolError(std::string("meta is not an object but ") + to_string(parts[1].type()));
  if (command == "dn") detail::check_length("dn", parts.size(), 2);
  if (command == "ok") detail::check_length("ok", parts.size(), 3);
  if (command == "er") {
    detail::check_length("er", parts.size(), 3);
    if (!parts[2].is_string())
      throw ProtocolError(std::string("\"er\" message is not a string but ") + to_string(parts[2].type()));
  }
}

inline FrameDecoder::FrameDecoder(std::size_t max_frame, std::size_t max_depth)
    : max_frame_(max_frame), max_depth_(max_depth) {}

inline void FrameDecoder::throw_broken() const { throw ProtocolError(broken_); }

// Drops yielded bytes from the front once they are at least half the
// buffer, so each byte is moved O(1) times however the input is chunked.
inline void FrameDecoder::compact() {
  if (read_pos_ == 0) return;
  if (read_pos_ == buffer_.size()) {
    buffer_.clear();
  } else if (read_pos_ >= 4096 && read_pos_ * 2 >= buffer_.size()) {
    buffer_.erase(0, read_pos_);
  } else {
    return;
  }
  pending_pos_ -= read_pos_;
  read_pos_ = 0;
}

// After a large frame, gives its memory back instead of keeping the peak.
inline void FrameDecoder::release_if_drained() {
  if (read_pos_ != buffer_.size() || buffer_.capacity() <= (std::size_t{1} << 20)) return;
  std::string().swap(buffer_);
  read_pos_ = pending_pos_ = 0;
}

inline void FrameDecoder::feed(const char* data, std::size_t size) {
  if (!broken_.empty()) throw_broken();
  compact();
  while (size > 0) {
    std::size_t have = buffer_.size() - pending_pos_;
    if (have < 4) {
      // Complete the header first: its length decides whether the body is
      // welcome at all.
      const std::size_t take = std::min(4 - have, size);
      buffer_.append(data, take);
      data += take;
      size -= take;
      if (buffer_.size() - pending_pos_ < 4) break;
      const auto* h = reinterpret_cast<const unsigned char*>(buffer_.data() + pending_pos_);
      const std::size_t length = std::size_t{h[0]} << 24 | std::size_t{h[1]} << 16 | std::size_t{h[2]} << 8 | h[3];
      if (length == 0 || length > max_frame_) {
        broken_ = length == 0 ? std::string("zero-length frame")
                              : "frame of " + std::to_string(length) + " bytes exceeds the limit of " +
                                    std::to_string(max_frame_);
        buffer_.resize(pending_pos_);
        if (read_pos_ == pending_pos_) throw_broken();
        return;
      }
      pending_length_ = length;
      // One allocation for the whole frame: the body is then copied once.
      if (buffer_.capacity() < pending_pos_ + 4 + length) buffer_.reserve(pending_pos_ + 4 + length);
      have = 4;
    }
    const std::size_t need = 4 + pending_length_ - have;
    const std::size_t take = std::min(need, size);
    buffer_.append(data, take);
    data += take;
    size -= take;
    if (take == need) {
      pending_pos_ += 4 + pending_length_;
      pending_length_ = 0;
    }
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

// ---- implementation: client ------------------------------------------------

#endif  // ANYEVENT_TASK_HPP
