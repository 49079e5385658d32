// Helpers shared by the test files: temporary directories, bounded waits,
// descriptor and child counts. Test code only.
#pragma once

#include <dirent.h>
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

}  // namespace aet_test
