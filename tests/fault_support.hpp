// Helpers of the fault tests (tests/*_fault_test.cpp): a raw connection
// speaking the wire protocol by hand, hand-made frames, a capture of the
// server's stderr, and a fake worker pool that answers a real aet::Client
// with whatever bytes a test wants. Test code only.
#pragma once

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>

#include "anyevent_task.hpp"
#include "test_support.hpp"

namespace aet_test {

// A connected blocking socket to "unix:PATH" or "tcp:HOST:PORT"; -1 with
// errno set when the connection is refused.
inline int connect_to(const std::string& address) {
  if (address.compare(0, 5, "unix:") == 0) {
    sockaddr_un where{};
    where.sun_family = AF_UNIX;
    const std::string path = address.substr(5);
    std::memcpy(where.sun_path, path.data(), path.size());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&where), sizeof where) == 0) return fd;
    int error = errno;
    ::close(fd);
    errno = error;
    return -1;
  }
  const std::string rest = address.substr(4);
  const auto colon = rest.rfind(':');
  std::string host = rest.substr(0, colon);
  const std::string port = rest.substr(colon + 1);
  if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0) return -1;
  int fd = ::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int rc = ::connect(fd, found->ai_addr, found->ai_addrlen);
  int error = errno;
  ::freeaddrinfo(found);
  if (rc == 0) return fd;
  ::close(fd);
  errno = error;
  return -1;
}

// A frame header announcing `length` bytes.
inline std::string frame_header(std::uint32_t length) {
  std::string out(4, '\0');
  out[0] = static_cast<char>(length >> 24);
  out[1] = static_cast<char>(length >> 16);
  out[2] = static_cast<char>(length >> 8);
  out[3] = static_cast<char>(length);
  return out;
}

// A frame around any bytes, JSON or not.
inline std::string raw_frame(const std::string& body) {
  return frame_header(static_cast<std::uint32_t>(body.size())) + body;
}

// `depth` nested arrays: "[[[...]]]".
inline std::string nested_arrays(std::size_t depth) {
  return std::string(depth, '[') + std::string(depth, ']');
}

// How a connection ended, as the reading side saw it.
enum class Ending { open, eof, reset };

// A client connection driven by hand: bytes or messages out, messages in.
class RawWire {
 public:
  explicit RawWire(const std::string& address) : fd_(connect_to(address)) {
    if (fd_ < 0) throw std::runtime_error("cannot connect to " + address + ": " + std::strerror(errno));
  }
  ~RawWire() { close(); }
  RawWire(const RawWire&) = delete;
  RawWire& operator=(const RawWire&) = delete;

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }
  int fd() const { return fd_; }

  // False if the peer has gone (EPIPE, ECONNRESET).
  bool send_bytes(const std::string& bytes) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      ssize_t n = ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return false;
      done += static_cast<std::size_t>(n);
    }
    return true;
  }
  bool send(const aet::Json& message) { return send_bytes(aet::encode_frame(message)); }

  // The next message; nothing once the connection has ended (see ending()).
  // Throws std::runtime_error when nothing comes within `limit` seconds,
  // and aet::ProtocolError for a bad frame.
  std::optional<aet::Json> receive(double limit = 10) {
    const double deadline = monotonic_now() + limit;
    for (;;) {
      if (auto message = decoder_.next()) return message;
      if (ending_ != Ending::open) return std::nullopt;
      const double left = deadline - monotonic_now();
      if (left <= 0) throw std::runtime_error("nothing received within the time limit");
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left * 1000) + 1) <= 0) continue;
      char buffer[65536];
      ssize_t n = ::read(fd_, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        ending_ = errno == ECONNRESET ? Ending::reset : Ending::eof;
        continue;
      }
      if (n == 0) {
        ending_ = Ending::eof;
        continue;
      }
      decoder_.feed(buffer, static_cast<std::size_t>(n));
    }
  }

  // True if the connection ends within `limit` seconds with nothing more
  // received.
  bool closes_within(double limit) {
    try {
      return !receive(limit).has_value();
    } catch (const std::exception&) {
      return false;
    }
  }
  Ending ending() const { return ending_; }

  // True if a message is already readable without waiting.
  bool has_reply_now() {
    try {
      return receive(0.0).has_value();
    } catch (const std::runtime_error&) {
      return false;
    }
  }

  // ["do", {}, args...] and its reply.
  aet::Json call(const aet::Json& args, double limit = 10) {
    aet::Json message = aet::Json::array({"do", aet::Json::object()});
    for (const aet::Json& arg : args.as_array()) message.push_back(arg);
    if (!send(message)) throw std::runtime_error("the connection is gone");
    auto reply = receive(limit);
    if (!reply) throw std::runtime_error("the connection closed instead of replying");
    return *reply;
  }
  // The result of an "ok" reply (throws for anything else).
  aet::Json result(const aet::Json& args, double limit = 10) {
    aet::Json reply = call(args, limit);
    if (reply[0] != "ok") throw std::runtime_error("not an ok reply: " + reply.dump());
    return reply[2];
  }

 private:
  int fd_;
  aet::FrameDecoder decoder_;
  Ending ending_ = Ending::open;
};

// Gone for good: exited and reaped by its parent (neither running nor a
// zombie).
inline bool process_gone(pid_t pid) { return !process_alive(pid) && !process_zombie(pid); }

// The process state letter from /proc/PID/stat ('R', 'S', 'T', 'Z'...), or
// 0 when there is no such process.
inline char process_state(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!in || !std::getline(in, line)) return 0;
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() ? line[close + 2] : 0;
}

// Number of descriptors process `pid` has open.
inline std::size_t fd_count_of(pid_t pid) {
  std::size_t count = 0;
  std::string base = "/proc/" + std::to_string(pid) + "/fd";
  if (DIR* d = opendir(base.c_str())) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++count;
    closedir(d);
  }
  return count;
}

// A signal-mask line of /proc/PID/status ("SigBlk", "SigIgn", "SigCgt") as
// the set of signal numbers 1..31 in it (the real-time ones are left out:
// the C library keeps some for itself).
inline std::set<int> signal_set_of(pid_t pid, const std::string& field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  std::set<int> signals;
  while (std::getline(in, line)) {
    if (line.compare(0, field.size() + 1, field + ":") != 0) continue;
    std::uint64_t mask = std::stoull(line.substr(field.size() + 1), nullptr, 16);
    for (int sig = 1; sig < 32; ++sig)
      if (mask & (std::uint64_t{1} << (sig - 1))) signals.insert(sig);
  }
  return signals;
}

// ---- a fake worker pool -------------------------------------------------

// A listening Unix socket whose connections the test answers by hand, on
// the same aet::Loop as the client under test (one thread, no races). Each
// "do" a connection receives goes to `on_request`, which answers by
// queueing bytes (send), closing, or doing nothing. Writes never block:
// what the socket does not take waits for it to drain.
class FakeWorkers {
 public:
  class Connection {
   public:
    Connection(FakeWorkers& owner, int fd) : owner_(owner), fd_(fd) {}
    ~Connection() { close(); }
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    void send(const std::string& bytes) {
      out_ += bytes;
      flush();
    }
    // Shuts the writing side once everything queued is out.
    void finish() {
      finish_after_flush_ = true;
      flush();
    }
    void close() {
      watcher_.reset();
      if (fd_ >= 0) ::close(fd_);
      fd_ = -1;
    }
    // Closes the connection as soon as the client sends anything more, with
    // that unread: the client's writes then meet a closed socket.
    void close_on_next_bytes() { close_on_next_bytes_ = true; }
    bool open() const { return fd_ >= 0; }
    bool peer_closed() const { return peer_closed_; }
    std::size_t requests() const { return requests_; }
    std::size_t dones() const { return dones_; }
    std::size_t unsent() const { return out_.size() - sent_; }
    int fd() const { return fd_; }

   private:
    friend class FakeWorkers;
    void start(aet::Loop& loop) {
      watcher_ = loop.io(fd_, aet::io_read, [this](unsigned events) { on_io(events); });
    }
    void on_io(unsigned events) {
      if (events & aet::io_write) flush();
      if (fd_ >= 0 && (events & aet::io_read)) read_all();
    }
    void read_all() {
      if (close_on_next_bytes_) {
        close();
        return;
      }
      char buffer[65536];
      ssize_t n = ::recv(fd_, buffer, sizeof buffer, MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      if (n <= 0) {
        peer_closed_ = true;
        close();
        return;
      }
      try {
        decoder_.feed(buffer, static_cast<std::size_t>(n));
        while (std::optional<aet::Json> message = decoder_.next()) {
          if ((*message)[0] == "dn") {
            ++dones_;
            continue;
          }
          ++requests_;
          owner_.on_request_(*this, *message);
          if (fd_ < 0) return;
        }
      } catch (const aet::ProtocolError&) {
        owner_.client_protocol_errors_++;
        close();
      }
    }
    void flush() {
      while (fd_ >= 0 && sent_ < out_.size()) {
        ssize_t n = ::send(fd_, out_.data() + sent_, out_.size() - sent_, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
          sent_ += static_cast<std::size_t>(n);
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
          watcher_.set_events(aet::io_read | aet::io_write);
          return;
        }
        peer_closed_ = true;  // EPIPE / ECONNRESET: the client closed it
        close();
        return;
      }
      if (fd_ < 0) return;
      out_.clear();
      sent_ = 0;
      watcher_.set_events(aet::io_read);
      if (finish_after_flush_) ::shutdown(fd_, SHUT_WR);
    }

    FakeWorkers& owner_;
    int fd_;
    aet::IoWatcher watcher_;
    aet::FrameDecoder decoder_;
    std::string out_;
    std::size_t sent_ = 0;
    bool finish_after_flush_ = false;
    bool close_on_next_bytes_ = false;
    bool peer_closed_ = false;
    std::size_t requests_ = 0, dones_ = 0;
  };

  using OnRequest = std::function<void(Connection& connection, const aet::Json& request)>;

  FakeWorkers(aet::Loop& loop, const std::string& path, OnRequest on_request)
      : loop_(loop), on_request_(std::move(on_request)) {
    listener_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_un where{};
    where.sun_family = AF_UNIX;
    std::memcpy(where.sun_path, path.data(), path.size());
    if (::bind(listener_, reinterpret_cast<sockaddr*>(&where), sizeof where) != 0 ||
        ::listen(listener_, 128) != 0)
      throw std::runtime_error("fake worker pool cannot listen on " + path);
    accept_watcher_ = loop_.io(listener_, aet::io_read, [this](unsigned) { accept_all(); });
  }
  ~FakeWorkers() {
    accept_watcher_.reset();
    connections_.clear();
    ::close(listener_);
  }
  FakeWorkers(const FakeWorkers&) = delete;
  FakeWorkers& operator=(const FakeWorkers&) = delete;

  std::size_t accepted() const { return connections_.size(); }
  std::size_t open_connections() const {
    std::size_t open = 0;
    for (const auto& c : connections_) open += c->open() ? 1 : 0;
    return open;
  }
  std::list<std::unique_ptr<Connection>>& connections() { return connections_; }
  // Frames from the client that did not decode (should stay 0).
  std::size_t client_protocol_errors() const { return client_protocol_errors_; }

 private:
  void accept_all() {
    for (;;) {
      int fd = ::accept4(listener_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;
      connections_.push_back(std::make_unique<Connection>(*this, fd));
      connections_.back()->start(loop_);
    }
  }

  aet::Loop& loop_;
  OnRequest on_request_;
  int listener_ = -1;
  aet::IoWatcher accept_watcher_;
  std::list<std::unique_ptr<Connection>> connections_;
  std::size_t client_protocol_errors_ = 0;
};

}  // namespace aet_test
