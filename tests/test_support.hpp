// Helpers shared by the test files: temporary directories, bounded waits,
// descriptor and child counts, a capture of stderr. Test code only.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

namespace aet_test {

// A fresh directory (mkdtemp) removed with its contents when the test ends,
// so tests running in parallel never share a socket path.
class TempDir {
 public:
  TempDir() {
    char pattern[] = "/tmp/aet-test-XXXXXX";
    if (!mkdtemp(pattern)) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::string cmd = "rm -rf '" + path_ + "'";
    if (std::system(cmd.c_str()) != 0) {
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::string unix_address(const std::string& name = "s.sock") const { return "unix:" + file(name); }

 private:
  std::string path_;
};

inline double monotonic_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs `loop` until `done()` holds or `limit` seconds pass; true if done.
// Every wait in the tests is bounded so a broken build fails, not hangs.
template <class LoopT>
bool run_until(LoopT& loop, const std::function<bool()>& done, double limit = 20) {
  const double deadline = monotonic_now() + limit;
  while (!done()) {
    double left = deadline - monotonic_now();
    if (left <= 0) return false;
    loop.run_once(left < 0.05 ? left : 0.05);
  }
  return true;
}

// Polls `done()` without a loop (for conditions outside this process, such
// as a child exiting), up to `limit` seconds; true if it held.
inline bool eventually(const std::function<bool()>& done, double limit = 20) {
  const double deadline = monotonic_now() + limit;
  while (!done()) {
    if (monotonic_now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

// Descriptors open in this process.
inline std::set<int> open_fds() {
  std::set<int> fds;
  if (DIR* d = opendir("/proc/self/fd")) {
    int self = dirfd(d);
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      int fd = std::atoi(e->d_name);
      if (fd != self) fds.insert(fd);
    }
    closedir(d);
  }
  return fds;
}

// Direct children of process `pid` (from /proc/PID/task/*/children).
inline std::set<pid_t> children_of(pid_t pid) {
  std::set<pid_t> kids;
  std::string base = "/proc/" + std::to_string(pid) + "/task";
  if (DIR* d = opendir(base.c_str())) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] == '.') continue;
      std::ifstream in(base + "/" + e->d_name + "/children");
      pid_t k;
      while (in >> k) kids.insert(k);
    }
    closedir(d);
  }
  return kids;
}

// True while `pid` exists and is not a zombie.
inline bool process_alive(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return false;
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

// True if `pid` is a zombie (exited, not yet reaped).
inline bool process_zombie(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return false;
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

// Captures what a forked server and its workers write to stderr: fd 2
// points at a pipe while `start` forks, and is restored after.
class StderrCapture {
 public:
  StderrCapture() {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
    read_end_ = fds[0];
    write_end_ = fds[1];
  }
  ~StderrCapture() {
    ::close(write_end_);
    ::close(read_end_);
  }
  StderrCapture(const StderrCapture&) = delete;
  StderrCapture& operator=(const StderrCapture&) = delete;

  template <class F>
  auto redirect(F start) {
    int saved = ::dup(2);
    ::dup2(write_end_, 2);
    struct Restore {
      int saved;
      ~Restore() {
        ::dup2(saved, 2);
        ::close(saved);
      }
    } restore{saved};
    return start();
  }

  // True once the text contains `needle`; waits up to `limit` seconds.
  bool wait_for(const std::string& needle, double limit = 5) {
    const double deadline = monotonic_now() + limit;
    for (;;) {
      if (text_.find(needle) != std::string::npos) return true;
      const double left = deadline - monotonic_now();
      if (left <= 0) return false;
      if (!read_some(left)) return text_.find(needle) != std::string::npos;
    }
  }
  // Everything written so far (reads what is waiting, without blocking).
  const std::string& text() {
    while (read_some(0)) {
    }
    return text_;
  }
  // The first whole line containing `needle`, without its newline; empty
  // if there is none.
  std::string line_with(const std::string& needle) {
    const std::string& all = text();
    const auto at = all.find(needle);
    if (at == std::string::npos) return {};
    const auto begin = all.rfind('\n', at);
    const auto end = all.find('\n', at);
    const std::size_t from = begin == std::string::npos ? 0 : begin + 1;
    return all.substr(from, end == std::string::npos ? std::string::npos : end - from);
  }
  std::size_t count(const std::string& needle) {
    const std::string& all = text();
    std::size_t found = 0;
    for (auto at = all.find(needle); at != std::string::npos; at = all.find(needle, at + 1)) ++found;
    return found;
  }

 private:
  bool read_some(double limit) {
    pollfd p{read_end_, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(limit * 1000)) <= 0) return false;
    char buffer[4096];
    ssize_t n = ::read(read_end_, buffer, sizeof buffer);
    if (n <= 0) return false;
    text_.append(buffer, static_cast<std::size_t>(n));
    return true;
  }
  int read_end_ = -1, write_end_ = -1;
  std::string text_;
};

}  // namespace aet_test
