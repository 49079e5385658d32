// An aet::EventHost on epoll(7): how the client runs on a loop other than
// aet::Loop. One short file, as each hiredis adapter is; level-triggered
// epoll for io, an ordered list of timers whose earliest deadline becomes
// epoll_wait's timeout.
//
//   EpollHost host;
//   aet::Client client(host, {"unix:/tmp/x.sock"});
//   while (...) host.run_once(0.1);
//
// The EventHost contract (see anyevent_task.hpp) is kept the same way
// aet::Loop keeps it: ids are never reused, readiness is decided for every
// interest before any callback runs, each callback is looked up again by id
// right before it is called (so one removed meanwhile is skipped) and held
// by a local shared_ptr while it runs.
#pragma once

#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <system_error>
#include <utility>
#include <vector>

#include "anyevent_task.hpp"

namespace aet_test {

class EpollHost : public aet::EventHost {
 public:
  EpollHost() : epoll_fd_(epoll_create1(EPOLL_CLOEXEC)) {
    if (epoll_fd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
  }
  ~EpollHost() override { close(epoll_fd_); }
  EpollHost(const EpollHost&) = delete;
  EpollHost& operator=(const EpollHost&) = delete;

  Id add_io(int fd, unsigned events, IoCallback callback) override {
    const Id id = next_id_++;
    ios_[id] = Io{fd, events, std::make_shared<IoCallback>(std::move(callback))};
    sync_fd(fd);
    return id;
  }
  void modify_io(Id id, unsigned events) override {
    auto it = ios_.find(id);
    if (it == ios_.end()) throw aet::Error("EpollHost::modify_io: no io interest with this id");
    it->second.events = events;
    sync_fd(it->second.fd);
  }
  void remove_io(Id id) override {
    auto it = ios_.find(id);
    if (it == ios_.end()) return;
    const int fd = it->second.fd;
    ios_.erase(it);
    try {
      sync_fd(fd);
    } catch (const std::system_error&) {
      // The fd was closed before this watcher went: epoll has dropped it.
    }
  }
  Id start_timer(double after, double repeat, TimerCallback callback) override {
    const Id id = next_id_++;
    timers_[id] = TimerEntry{aet::Loop::now() + std::max(after, 0.0), std::max(repeat, 0.0),
                             std::make_shared<TimerCallback>(std::move(callback))};
    return id;
  }
  void stop_timer(Id id) override { timers_.erase(id); }

  // One epoll_wait of at most `timeout` seconds (< 0: until something
  // happens), then the ready io and the due timers. False, at once, when
  // there was nothing to wait for and the timeout is infinite.
  bool run_once(double timeout = -1) {
    if (registered_.empty() && timers_.empty() && timeout < 0) return false;
    double wait = timeout;  // seconds, < 0: forever
    for (const auto& entry : timers_) {
      const double left = std::max(entry.second.deadline - aet::Loop::now(), 0.0);
      if (wait < 0 || left < wait) wait = left;
    }
    // Rounded up to whole ms, so a timer is never woken for too early.
    const int wait_ms = wait < 0 ? -1 : static_cast<int>(std::min(std::ceil(wait * 1000), double(INT_MAX)));
    epoll_event ready[64];
    int n = epoll_wait(epoll_fd_, ready, 64, wait_ms);
    if (n < 0) {
      if (errno != EINTR) throw std::system_error(errno, std::generic_category(), "epoll_wait");
      n = 0;
    }
    dispatch_io(ready, n);
    run_due_timers();
    return true;
  }

 private:
  struct Io {
    int fd;
    unsigned events;
    std::shared_ptr<IoCallback> callback;
  };
  struct TimerEntry {
    double deadline;
    double repeat;
    std::shared_ptr<TimerCallback> callback;
  };

  // epoll holds one registration per fd: the OR of that fd's interests.
  void sync_fd(int fd) {
    std::uint32_t want = 0;
    for (const auto& entry : ios_) {
      if (entry.second.fd != fd) continue;
      if (entry.second.events & aet::io_read) want |= EPOLLIN;
      if (entry.second.events & aet::io_write) want |= EPOLLOUT;
    }
    auto it = registered_.find(fd);
    epoll_event ev{};
    ev.events = want;
    ev.data.fd = fd;
    if (want == 0) {
      // Not watched at all (epoll would still report errors and hang-ups).
      // The fd may be closed already, so a failure here is expected.
      if (it != registered_.end()) {
        epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, &ev);
        registered_.erase(it);
      }
    } else if (it == registered_.end() || it->second != want) {
      // MOD or ADD, whichever epoll accepts: a registered fd that was
      // closed and reused has silently left the epoll set.
      const int first = it == registered_.end() ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
      if (epoll_ctl(epoll_fd_, first, fd, &ev) < 0 &&
          epoll_ctl(epoll_fd_, first == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &ev) < 0)
        throw std::system_error(errno, std::generic_category(), "epoll_ctl");
      registered_[fd] = want;
    }
  }

  void dispatch_io(const epoll_event* ready, int count) {
    std::vector<std::pair<Id, unsigned>> due;
    for (int i = 0; i < count; ++i) {
      const std::uint32_t got = ready[i].events;
      for (const auto& entry : ios_) {
        if (entry.second.fd != ready[i].data.fd) continue;
        unsigned events = 0;
        if ((entry.second.events & aet::io_read) && (got & (EPOLLIN | EPOLLHUP | EPOLLERR))) events |= aet::io_read;
        if ((entry.second.events & aet::io_write) && (got & (EPOLLOUT | EPOLLHUP | EPOLLERR))) events |= aet::io_write;
        if (events) due.emplace_back(entry.first, events);
      }
    }
    for (const auto& [id, events] : due) {
      auto it = ios_.find(id);
      if (it == ios_.end()) continue;  // removed by an earlier callback
      const unsigned still = events & it->second.events;
      if (still == 0) continue;
      std::shared_ptr<IoCallback> callback = it->second.callback;
      (*callback)(still);
    }
  }

  void run_due_timers() {
    const double now = aet::Loop::now();
    std::vector<std::pair<double, Id>> due;  // by deadline, then start order
    for (const auto& entry : timers_)
      if (entry.second.deadline <= now) due.emplace_back(entry.second.deadline, entry.first);
    std::sort(due.begin(), due.end());
    for (const auto& item : due) {
      auto it = timers_.find(item.second);
      if (it == timers_.end()) continue;  // stopped by an earlier callback
      std::shared_ptr<TimerCallback> callback = it->second.callback;
      if (it->second.repeat > 0) {
        // Next point of the grid after now: no drift, missed periods skipped.
        TimerEntry& timer = it->second;
        timer.deadline += timer.repeat * (std::floor((now - timer.deadline) / timer.repeat) + 1);
      } else {
        timers_.erase(it);
      }
      (*callback)();
    }
  }

  int epoll_fd_;
  Id next_id_ = 1;
  std::map<Id, Io> ios_;
  std::map<Id, TimerEntry> timers_;
  std::map<int, std::uint32_t> registered_;  // fd -> events given to epoll
};

}  // namespace aet_test
