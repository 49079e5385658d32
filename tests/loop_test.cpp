// Tests of the loop section: aet::Loop (poll, timers, prepare/process),
// IoWatcher and Timer, and the same watchers hosted on epoll.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "anyevent_task.hpp"
#include "epoll_host.hpp"
#include "test_support.hpp"

namespace {

// A non-blocking pipe that closes its ends.
struct Pipe {
  int read_end = -1, write_end = -1;
  Pipe() {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) throw std::runtime_error("pipe2 failed");
    read_end = fds[0];
    write_end = fds[1];
  }
  ~Pipe() {
    close_read();
    close_write();
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  void close_read() {
    if (read_end >= 0) close(read_end);
    read_end = -1;
  }
  void close_write() {
    if (write_end >= 0) close(write_end);
    write_end = -1;
  }
  void put(const std::string& bytes = "x") const {
    REQUIRE(write(write_end, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
  }
  std::string take() const {
    char buffer[4096];
    ssize_t n = read(read_end, buffer, sizeof buffer);
    return n > 0 ? std::string(buffer, static_cast<std::size_t>(n)) : std::string();
  }
};

// CPU time of this thread, in seconds.
double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

// Keeps the CPU busy (not sleeping) for `seconds`: a callback doing work.
void busy_for(double seconds) {
  const double end = aet::Loop::now() + seconds;
  while (aet::Loop::now() < end) {
  }
}

// A process() round with made-up readiness, for the dispatch rules.
std::vector<pollfd> prepared(aet::Loop& loop) {
  std::vector<pollfd> fds;
  loop.prepare(fds);
  return fds;
}

}  // namespace

// ---------------------------------------------------------------------------
// Timers

TEST_CASE("a one-shot timer fires once, not before its delay") {
  aet::Loop loop;
  int fired = 0;
  double fired_at = 0;
  const double start = aet::Loop::now();
  aet::Timer timer = loop.after(0.05, [&] {
    ++fired;
    fired_at = aet::Loop::now();
  });
  loop.run();  // returns once the timer is gone: nothing left to wait for
  CHECK(fired == 1);
  CHECK(fired_at - start >= 0.05);
  CHECK(fired_at - start < 2);
}

TEST_CASE("a repeating timer fires until it is reset from its own callback") {
  aet::Loop loop;
  int fired = 0;
  aet::Timer timer;
  timer = loop.every(0.005, [&] {
    if (++fired == 5) timer.reset();
  });
  loop.run();
  CHECK(fired == 5);
  CHECK_FALSE(timer);
}

TEST_CASE("a repeating timer does not drift when its callbacks take time") {
  aet::Loop loop;
  const double interval = 0.0205;  // not whole ms: each wake rounds up a little
  const double first = aet::Loop::now() + interval;
  std::vector<double> fires;
  aet::EventHost::Id id = loop.start_timer_at(first, interval, [&] {
    fires.push_back(aet::Loop::now());
    busy_for(0.003);
  });
  REQUIRE(aet_test::run_until(loop, [&] { return fires.size() >= 40; }, 20));
  loop.stop_timer(id);
  CHECK(fires[0] >= first);  // never early
  // The slip that adds up from call to call: each gap between two calls
  // minus the whole intervals it spans. On the grid the sum stays within
  // one call's lateness; a timer rescheduled from when it ran slips 0.5 ms
  // or more a period (20 ms by the end). A period skipped by a busy
  // machine spans two intervals and adds no slip.
  double slip = 0;
  std::vector<double> slips;
  for (std::size_t i = 1; i < fires.size(); ++i) {
    const double gap = fires[i] - fires[i - 1];
    slip += gap - std::round(gap / interval) * interval;
    slips.push_back(slip);
  }
  CHECK(*std::min_element(slips.end() - 5, slips.end()) < 0.006);
}

TEST_CASE("a repeating timer late after a stall fires once, then keeps its grid") {
  aet::Loop loop;
  const double interval = 0.1;
  const double first = aet::Loop::now() + interval;
  std::vector<double> fires;
  double stall_end = 0;
  aet::EventHost::Id id = loop.start_timer_at(first, interval, [&] {
    fires.push_back(aet::Loop::now());
    if (fires.size() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(230));  // past 2 deadlines
      stall_end = aet::Loop::now();
    }
  });
  REQUIRE(aet_test::run_until(loop, [&] { return fires.size() >= 3; }, 10));
  loop.stop_timer(id);
  // One late call for the missed deadlines, at once: no burst of them...
  CHECK(fires[1] >= stall_end);
  CHECK(fires[1] - stall_end < 0.05);
  // ...then the next point of the original grid, not fires[1] + interval.
  const double grid = first + interval * (std::floor((fires[1] - first) / interval) + 1);
  CHECK(fires[2] >= grid);
  CHECK(fires[2] < grid + 0.025);
}

TEST_CASE("timers with the same deadline fire in the order they were started") {
  aet::Loop loop;
  std::vector<int> order;
  const double deadline = aet::Loop::now() + 0.01;
  for (int i = 0; i < 20; ++i) loop.start_timer_at(deadline, 0, [&order, i] { order.push_back(i); });
  loop.run();
  REQUIRE(order.size() == 20);
  CHECK(std::is_sorted(order.begin(), order.end()));
}

TEST_CASE("timers due together fire by deadline, then by start order") {
  aet::Loop loop;
  std::vector<int> order;
  const double base = aet::Loop::now();
  loop.start_timer_at(base + 0.003, 0, [&] { order.push_back(3); });
  loop.start_timer_at(base + 0.001, 0, [&] { order.push_back(1); });
  loop.start_timer_at(base + 0.002, 0, [&] { order.push_back(2); });
  loop.start_timer_at(base + 0.001, 0, [&] { order.push_back(11); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));  // all due in one round
  REQUIRE(loop.run_once(0));
  CHECK(order == std::vector<int>{1, 11, 2, 3});
}

TEST_CASE("a timer with zero delay or a past deadline fires at the next round") {
  aet::Loop loop;
  int fired = 0;
  loop.start_timer(0, 0, [&] { ++fired; });
  loop.start_timer(-5, 0, [&] { ++fired; });
  loop.start_timer_at(aet::Loop::now() - 100, 0, [&] { ++fired; });
  std::vector<pollfd> fds;
  CHECK(loop.prepare(fds) == 0);
  loop.process(fds.data(), fds.size());
  CHECK(fired == 3);
}

TEST_CASE("a timer stopped by an earlier callback of the same round never fires") {
  aet::Loop loop;
  const double deadline = aet::Loop::now() + 0.005;
  bool second_fired = false;
  aet::EventHost::Id second = 0;
  loop.start_timer_at(deadline, 0, [&] { loop.stop_timer(second); });
  second = loop.start_timer_at(deadline, 0, [&] { second_fired = true; });
  loop.run();
  CHECK_FALSE(second_fired);
}

TEST_CASE("a repeating timer stopped from inside its own callback is never called again") {
  aet::Loop loop;
  int fired = 0;
  aet::EventHost::Id id = 0;
  id = loop.start_timer(0, 0.001, [&] {
    ++fired;
    loop.stop_timer(id);
  });
  loop.run();  // returns: the only timer is gone
  CHECK(fired == 1);
}

TEST_CASE("a timer started from inside a callback waits for the next round") {
  aet::Loop loop;
  int inner = 0;
  aet::Timer inner_timer;
  aet::Timer outer = loop.after(0, [&] { inner_timer = loop.after(0, [&] { ++inner; }); });
  REQUIRE(loop.run_once(0));
  CHECK(inner == 0);  // not in the round that started it, although due
  REQUIRE(loop.run_once(0));
  CHECK(inner == 1);
}

TEST_CASE("a timer that restarts itself with zero delay does not starve the loop") {
  aet::Loop loop;
  Pipe pipe;
  int ticks = 0;
  bool read_seen = false;
  aet::Timer timer;
  std::function<void()> tick = [&] {
    ++ticks;
    timer = loop.after(0, tick);
  };
  timer = loop.after(0, tick);
  aet::IoWatcher reader = loop.io(pipe.read_end, aet::io_read, [&](unsigned) { read_seen = true; });
  pipe.put();
  for (int i = 0; i < 5; ++i) REQUIRE(loop.run_once(0));
  CHECK(read_seen);
  CHECK(ticks == 5);  // once per round
}

TEST_CASE("a Timer guard stops its timer when it goes") {
  aet::Loop loop;
  bool fired = false;
  {
    aet::Timer timer = loop.after(0, [&] { fired = true; });
    CHECK(timer);
  }
  CHECK_FALSE(loop.run_once(-1));  // nothing left to wait for
  CHECK_FALSE(fired);
}

TEST_CASE("moving a Timer keeps one timer and move-assigning stops the old one") {
  aet::Loop loop;
  int a = 0, b = 0;
  aet::Timer first = loop.after(0, [&] { ++a; });
  aet::Timer moved(std::move(first));
  CHECK_FALSE(first);
  CHECK(moved);
  aet::Timer other = loop.after(0, [&] { ++b; });
  other = std::move(moved);  // stops b's timer, takes a's
  loop.run();
  CHECK(a == 1);
  CHECK(b == 0);
  other.reset();  // after a one-shot fired: nothing to do
  loop.stop_timer(12345);  // an unknown id: nothing to do
}

TEST_CASE("a callback may destroy the object that owns its timer") {
  aet::Loop loop;
  struct Owner {
    aet::Timer timer;
  };
  auto owner = std::make_unique<Owner>();
  std::string seen;
  std::string payload(100, 'p');  // captured by value: lives in the callback
  owner->timer = loop.every(0.001, [&owner, &seen, payload] {
    owner.reset();  // destroys the Timer, which stops this very timer
    seen = payload;  // the loop still holds the callback while it runs
  });
  loop.run();
  CHECK_FALSE(owner);
  CHECK(seen == std::string(100, 'p'));
}

TEST_CASE("timer arguments that are not numbers are refused") {
  aet::Loop loop;
  const double nan = std::nan("");
  CHECK_THROWS_AS(loop.start_timer(nan, 0, [] {}), aet::Error);
  CHECK_THROWS_AS(loop.start_timer(1, nan, [] {}), aet::Error);
  CHECK_THROWS_AS(loop.start_timer_at(nan, 0, [] {}), aet::Error);
  CHECK_THROWS_AS(loop.start_timer(1, 0, aet::EventHost::TimerCallback()), aet::Error);
  CHECK_THROWS_AS(loop.run_once(nan), aet::Error);
}

// ---------------------------------------------------------------------------
// Io

TEST_CASE("a read watcher is called when its pipe is readable") {
  aet::Loop loop;
  Pipe pipe;
  std::string got;
  aet::IoWatcher reader = loop.io(pipe.read_end, aet::io_read, [&](unsigned events) {
    CHECK(events == aet::io_read);
    got += pipe.take();
    loop.stop();
  });
  aet::Timer writer = loop.after(0.01, [&] { pipe.put("hello"); });
  aet::Timer limit = loop.after(10, [&] { loop.stop(); });
  loop.run();
  CHECK(got == "hello");
}

TEST_CASE("a write watcher is called while its pipe has room") {
  aet::Loop loop;
  Pipe pipe;
  unsigned seen = 0;
  aet::IoWatcher writer = loop.io(pipe.write_end, aet::io_write, [&](unsigned events) { seen = events; });
  REQUIRE(loop.run_once(1));
  CHECK(seen == aet::io_write);
}

TEST_CASE("set_events changes what a watcher is woken for") {
  aet::Loop loop;
  std::vector<unsigned> seen;
  int sock[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sock) == 0);
  REQUIRE(write(sock[1], "x", 1) == 1);  // sock[0]: readable and writable
  aet::IoWatcher watcher = loop.io(sock[0], aet::io_read, [&](unsigned events) { seen.push_back(events); });
  REQUIRE(loop.run_once(1));
  watcher.set_events(aet::io_write);
  CHECK(watcher.events() == aet::io_write);
  REQUIRE(loop.run_once(1));
  watcher.set_events(aet::io_read | aet::io_write);
  REQUIRE(loop.run_once(1));
  CHECK(seen == std::vector<unsigned>{aet::io_read, aet::io_write, aet::io_read | aet::io_write});
  watcher.reset();
  CHECK_THROWS_AS(watcher.set_events(aet::io_read), aet::Error);
  close(sock[0]);
  close(sock[1]);
}

TEST_CASE("an interest with events 0 stays registered but is not polled") {
  aet::Loop loop;
  Pipe pipe;
  pipe.put();
  int calls = 0;
  aet::IoWatcher watcher = loop.io(pipe.read_end, 0, [&](unsigned) { ++calls; });
  std::vector<pollfd> fds;
  CHECK(loop.prepare(fds) == -1);
  CHECK(fds.empty());
  loop.run();  // returns at once: nothing to wait for
  CHECK_FALSE(loop.run_once(-1));
  CHECK(calls == 0);
  watcher.set_events(aet::io_read);  // the same interest, now polled
  REQUIRE(loop.run_once(1));
  CHECK(calls == 1);
}

TEST_CASE("a hang-up wakes both a reader and a writer") {
  aet::Loop loop;
  Pipe to_reader, to_writer;
  unsigned reader_saw = 0, writer_saw = 0;
  aet::IoWatcher reader = loop.io(to_reader.read_end, aet::io_read, [&](unsigned e) { reader_saw = e; });
  // Fill the pipe, so only the dead reader can make the writer ready.
  while (write(to_writer.write_end, "xxxxxxxxxxxxxxxx", 16) > 0) {
  }
  aet::IoWatcher writer = loop.io(to_writer.write_end, aet::io_write, [&](unsigned e) { writer_saw = e; });
  REQUIRE(loop.run_once(0));
  CHECK(reader_saw == 0);
  CHECK(writer_saw == 0);
  to_reader.close_write();  // POLLHUP on the read end
  to_writer.close_read();   // POLLERR on the write end
  REQUIRE(loop.run_once(1));
  CHECK(reader_saw == aet::io_read);
  CHECK(writer_saw == aet::io_write);
}

TEST_CASE("poll results map to io events per interest") {
  aet::Loop loop;
  Pipe pipe;  // the fd only needs to exist: the readiness is made up
  struct Case {
    short revents;
    unsigned reader, writer, both;
  };
  const Case cases[] = {
      {POLLIN, aet::io_read, 0, aet::io_read},
      {POLLOUT, 0, aet::io_write, aet::io_write},
      {POLLHUP, aet::io_read, aet::io_write, aet::io_read | aet::io_write},
      {POLLERR, aet::io_read, aet::io_write, aet::io_read | aet::io_write},
      {POLLNVAL, aet::io_read, aet::io_write, aet::io_read | aet::io_write},
      {POLLPRI, 0, 0, 0},
  };
  unsigned reader = 0, writer = 0, both = 0;
  aet::IoWatcher r = loop.io(pipe.read_end, aet::io_read, [&](unsigned e) { reader = e; });
  aet::IoWatcher w = loop.io(pipe.read_end, aet::io_write, [&](unsigned e) { writer = e; });
  aet::IoWatcher b = loop.io(pipe.read_end, aet::io_read | aet::io_write, [&](unsigned e) { both = e; });
  for (const Case& c : cases) {
    reader = writer = both = 0;
    std::vector<pollfd> fds = prepared(loop);
    REQUIRE(fds.size() == 1);
    fds[0].revents = c.revents;
    loop.process(fds);
    CHECK(reader == c.reader);
    CHECK(writer == c.writer);
    CHECK(both == c.both);
  }
}

TEST_CASE("watchers on a descriptor closed under them are woken, not left spinning") {
  aet::Loop loop;
  int fds[2];
  REQUIRE(pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0);
  unsigned reader = 0, writer = 0;
  aet::IoWatcher r = loop.io(fds[0], aet::io_read, [&](unsigned e) { reader = e; });
  aet::IoWatcher w = loop.io(fds[1], aet::io_write, [&](unsigned e) { writer = e; });
  close(fds[0]);
  close(fds[1]);  // poll reports POLLNVAL for both
  REQUIRE(loop.run_once(1));
  CHECK(reader == aet::io_read);
  CHECK(writer == aet::io_write);
}

TEST_CASE("several watchers on one fd each get their own events") {
  aet::Loop loop;
  int sock[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sock) == 0);
  REQUIRE(write(sock[1], "x", 1) == 1);
  unsigned a = 0, b = 0, c = 0;
  aet::IoWatcher reader = loop.io(sock[0], aet::io_read, [&](unsigned e) { a = e; });
  aet::IoWatcher writer = loop.io(sock[0], aet::io_write, [&](unsigned e) { b = e; });
  aet::IoWatcher both = loop.io(sock[0], aet::io_read | aet::io_write, [&](unsigned e) { c = e; });
  aet::IoWatcher idle = loop.io(sock[1], 0, [&](unsigned) {});
  std::vector<pollfd> fds = prepared(loop);
  REQUIRE(fds.size() == 1);  // one entry per fd, events OR'ed; sock[1] not polled
  CHECK(fds[0].fd == sock[0]);
  CHECK(fds[0].events == (POLLIN | POLLOUT));
  REQUIRE(poll(fds.data(), fds.size(), 1000) == 1);
  loop.process(fds);
  CHECK(a == aet::io_read);
  CHECK(b == aet::io_write);
  CHECK(c == (aet::io_read | aet::io_write));
  close(sock[0]);
  close(sock[1]);
}

TEST_CASE("a watcher removed by an earlier callback of the same round is not called") {
  aet::Loop loop;
  Pipe first, second;
  first.put();
  second.put();
  bool second_called = false;
  aet::IoWatcher second_watcher;
  aet::IoWatcher first_watcher = loop.io(first.read_end, aet::io_read, [&](unsigned) {
    first.take();
    second_watcher.reset();  // its fd is ready in this very round
  });
  second_watcher = loop.io(second.read_end, aet::io_read, [&](unsigned) { second_called = true; });
  std::vector<pollfd> fds = prepared(loop);
  REQUIRE(poll(fds.data(), fds.size(), 1000) == 2);  // both ready in one round
  loop.process(fds);
  CHECK_FALSE(second_called);
  CHECK_FALSE(second_watcher);
}

TEST_CASE("a watcher removed through remove_io during dispatch is not called") {
  aet::Loop loop;
  Pipe pipe;
  pipe.put();
  int calls_a = 0, calls_b = 0;
  aet::EventHost::Id b = 0;
  aet::EventHost::Id a = loop.add_io(pipe.read_end, aet::io_read, [&](unsigned) {
    ++calls_a;
    loop.remove_io(b);  // same fd, later in the round
  });
  b = loop.add_io(pipe.read_end, aet::io_read, [&](unsigned) { ++calls_b; });
  REQUIRE(loop.run_once(1));
  CHECK(calls_a == 1);
  CHECK(calls_b == 0);
  loop.remove_io(a);
  loop.remove_io(a);  // twice: nothing to do
  CHECK_FALSE(loop.run_once(-1));
}

TEST_CASE("a watcher added during dispatch gets no readiness from that round") {
  aet::Loop loop;
  Pipe pipe;
  pipe.put();
  int added_calls = 0;
  aet::IoWatcher added;
  aet::IoWatcher first = loop.io(pipe.read_end, aet::io_read, [&](unsigned) {
    if (!added) added = loop.io(pipe.read_end, aet::io_read, [&](unsigned) { ++added_calls; });
  });
  std::vector<pollfd> fds = prepared(loop);
  REQUIRE(poll(fds.data(), fds.size(), 1000) == 1);
  loop.process(fds);
  CHECK(added);
  CHECK(added_calls == 0);
  REQUIRE(loop.run_once(1));  // the next round polls it
  CHECK(added_calls == 1);
}

TEST_CASE("readiness is limited to what the last prepare polled and what is still wanted") {
  aet::Loop loop;
  Pipe pipe;  // the fd only needs to exist: the readiness is made up
  std::vector<unsigned> seen;
  aet::IoWatcher watcher = loop.io(pipe.read_end, aet::io_write, [&](unsigned e) { seen.push_back(e); });
  std::vector<pollfd> fds = prepared(loop);
  REQUIRE(fds.size() == 1);
  watcher.set_events(aet::io_read | aet::io_write);  // widened after prepare
  fds[0].revents = POLLIN | POLLOUT;
  loop.process(fds);
  CHECK(seen == std::vector<unsigned>{aet::io_write});  // POLLIN was not asked for
  seen.clear();

  fds = prepared(loop);
  watcher.set_events(aet::io_read);  // narrowed after prepare
  fds[0].revents = POLLIN | POLLOUT;
  loop.process(fds);
  CHECK(seen == std::vector<unsigned>{aet::io_read});
  seen.clear();

  loop.process(fds);  // the same round again: already dispatched
  CHECK(seen.empty());
}

TEST_CASE("process takes entries in any order and ignores fds it does not know") {
  aet::Loop loop;
  Pipe a, b, c;
  std::vector<int> called;
  aet::IoWatcher wa = loop.io(a.read_end, aet::io_read, [&](unsigned) { called.push_back(1); });
  aet::IoWatcher wb = loop.io(b.read_end, aet::io_read, [&](unsigned) { called.push_back(2); });
  std::vector<pollfd> fds{pollfd{c.read_end, POLLIN, 0}};
  loop.prepare(fds);
  REQUIRE(fds.size() == 3);
  std::reverse(fds.begin(), fds.end());
  for (pollfd& p : fds) p.revents = POLLIN;
  loop.process(fds);
  CHECK(called == std::vector<int>{1, 2});  // registration order, whatever the array order
}

TEST_CASE("a callback may destroy the object that owns its watcher") {
  aet::Loop loop;
  Pipe pipe;
  pipe.put();
  struct Owner {
    aet::IoWatcher watcher;
    aet::IoWatcher sibling;  // same fd, later in the round
  };
  auto owner = std::make_unique<Owner>();
  std::string seen;
  std::string payload(100, 'p');
  bool sibling_called = false;
  owner->watcher = loop.io(pipe.read_end, aet::io_read, [&owner, &seen, payload](unsigned) {
    owner.reset();
    seen = payload;  // the loop still holds this callback
  });
  owner->sibling = loop.io(pipe.read_end, aet::io_read, [&](unsigned) { sibling_called = true; });
  REQUIRE(loop.run_once(1));
  CHECK_FALSE(owner);
  CHECK(seen == std::string(100, 'p'));
  CHECK_FALSE(sibling_called);
  CHECK_FALSE(loop.run_once(-1));
}

TEST_CASE("resetting or reassigning a watcher from inside its own callback is safe") {
  aet::Loop loop;
  Pipe pipe;
  pipe.put();
  int first_calls = 0, second_calls = 0;
  aet::IoWatcher watcher;
  watcher = loop.io(pipe.read_end, aet::io_read, [&](unsigned) {
    ++first_calls;
    watcher = loop.io(pipe.read_end, aet::io_read, [&](unsigned) {
      ++second_calls;
      watcher.reset();
    });
  });
  REQUIRE(loop.run_once(1));
  REQUIRE(loop.run_once(1));
  CHECK(first_calls == 1);
  CHECK(second_calls == 1);
  CHECK_FALSE(watcher);
  CHECK_FALSE(loop.run_once(-1));
}

TEST_CASE("an IoWatcher removes its interest when it goes, and moves keep one interest") {
  aet::Loop loop;
  Pipe pipe;
  int calls = 0;
  {
    aet::IoWatcher watcher = loop.io(pipe.write_end, aet::io_write, [&](unsigned) { ++calls; });
    aet::IoWatcher moved(std::move(watcher));
    CHECK_FALSE(watcher);
    CHECK(moved.events() == aet::io_write);
    CHECK(prepared(loop).size() == 1);
    aet::IoWatcher other = loop.io(pipe.read_end, aet::io_read, [&](unsigned) {});
    other = std::move(moved);  // the read interest goes
    std::vector<pollfd> fds = prepared(loop);
    REQUIRE(fds.size() == 1);
    CHECK(fds[0].fd == pipe.write_end);
    REQUIRE(loop.run_once(1));
    CHECK(calls == 1);
  }
  CHECK(prepared(loop).empty());
  CHECK_FALSE(loop.run_once(-1));
}

TEST_CASE("bad io arguments are refused") {
  aet::Loop loop;
  CHECK_THROWS_AS(loop.add_io(-1, aet::io_read, [](unsigned) {}), aet::Error);
  CHECK_THROWS_AS(loop.add_io(0, 4, [](unsigned) {}), aet::Error);
  CHECK_THROWS_AS(loop.add_io(0, aet::io_read, aet::EventHost::IoCallback()), aet::Error);
  CHECK_THROWS_AS(loop.modify_io(999, aet::io_read), aet::Error);
  aet::EventHost::Id id = loop.add_io(0, 0, [](unsigned) {});
  CHECK_THROWS_AS(loop.modify_io(id, 8), aet::Error);
  loop.remove_io(id);
}

// ---------------------------------------------------------------------------
// run, run_once, stop, exceptions

TEST_CASE("run returns when nothing is left to wait for") {
  aet::Loop loop;
  loop.run();  // empty: returns at once
  CHECK_FALSE(loop.run_once(-1));
  int fired = 0;
  aet::Timer a = loop.after(0.002, [&] { ++fired; });
  aet::Timer b = loop.after(0.004, [&] { ++fired; });
  loop.run();
  CHECK(fired == 2);
}

TEST_CASE("run_once with a finite timeout waits that long even with nothing to wait for") {
  aet::Loop loop;
  const double start = aet::Loop::now();
  CHECK(loop.run_once(0.02));
  CHECK(aet::Loop::now() - start >= 0.02);
  CHECK(loop.run_once(0));
}

TEST_CASE("stop makes run return after the current dispatch, and run can go on later") {
  aet::Loop loop;
  int ticks = 0, others = 0;
  aet::Timer ticker = loop.every(0.001, [&] {
    if (++ticks % 3 == 0) loop.stop();
  });
  loop.run();
  CHECK(ticks == 3);
  loop.stop();  // a stop before run() does not count
  loop.run();
  CHECK(ticks == 6);
  // Stopping lets the rest of the round run: a timer due together still fires.
  ticker.reset();
  const double deadline = aet::Loop::now() + 0.002;
  loop.start_timer_at(deadline, 0, [&] { loop.stop(); });
  loop.start_timer_at(deadline, 0, [&] { ++others; });
  aet::Timer later = loop.after(5, [&] { ++others; });
  loop.run();
  CHECK(others == 1);
}

TEST_CASE("an exception from a timer callback propagates out of run and the loop stays usable") {
  aet::Loop loop;
  const double deadline = aet::Loop::now() + 0.002;
  int after_throw = 0;
  loop.start_timer_at(deadline, 0, [] { throw std::runtime_error("timer failed"); });
  loop.start_timer_at(deadline, 0, [&] { ++after_throw; });  // same round, after the throw
  CHECK_THROWS_WITH(loop.run(), "timer failed");
  CHECK(after_throw == 0);
  loop.run();  // the rest of the round is served now
  CHECK(after_throw == 1);
  int more = 0;
  aet::Timer t = loop.after(0.001, [&] { ++more; });
  loop.run();
  CHECK(more == 1);
}

TEST_CASE("an exception from an io callback propagates out of run_once and the loop stays usable") {
  aet::Loop loop;
  Pipe a, b;
  a.put();
  b.put();
  int b_calls = 0;
  aet::IoWatcher wa = loop.io(a.read_end, aet::io_read, [&](unsigned) {
    a.take();
    throw std::logic_error("io failed");
  });
  aet::IoWatcher wb = loop.io(b.read_end, aet::io_read, [&](unsigned) {
    b.take();
    ++b_calls;
    loop.stop();
  });
  CHECK_THROWS_AS(loop.run_once(1), std::logic_error);
  CHECK(b_calls == 0);
  loop.run();  // b's readiness is still there: level-triggered
  CHECK(b_calls == 1);
}

TEST_CASE("run and run_once may not be called from inside a callback") {
  aet::Loop loop;
  bool threw_run_once = false, threw_run = false, threw_process = false;
  aet::Timer t = loop.after(0, [&] {
    try {
      loop.run_once(0);
    } catch (const aet::Error&) {
      threw_run_once = true;
    }
    try {
      loop.run();
    } catch (const aet::Error&) {
      threw_run = true;
    }
    try {
      loop.process(nullptr, 0);
    } catch (const aet::Error&) {
      threw_process = true;
    }
  });
  loop.run();
  CHECK(threw_run_once);
  CHECK(threw_run);
  CHECK(threw_process);
}

namespace {
void ignore_signal(int) {}
}  // namespace

TEST_CASE("a signal interrupting poll does not disturb run") {
  struct sigaction action {}, previous{};
  action.sa_handler = ignore_signal;
  sigemptyset(&action.sa_mask);
  REQUIRE(sigaction(SIGALRM, &action, &previous) == 0);
  itimerval interval{};
  interval.it_value.tv_usec = 10000;  // SIGALRM in 10 ms, while poll() waits
  REQUIRE(setitimer(ITIMER_REAL, &interval, nullptr) == 0);
  aet::Loop loop;
  int fired = 0;
  const double start = aet::Loop::now();
  aet::Timer t = loop.after(0.05, [&] { ++fired; });
  loop.run();
  sigaction(SIGALRM, &previous, nullptr);
  CHECK(fired == 1);
  CHECK(aet::Loop::now() - start >= 0.05);
}

// ---------------------------------------------------------------------------
// No busy waiting

TEST_CASE("an idle loop sleeps in poll until its next timer") {
  aet::Loop loop;
  bool fired = false;
  aet::Timer t = loop.after(0.2, [&] { fired = true; });
  const double cpu_before = thread_cpu_seconds();
  int rounds = 0;
  while (!fired && rounds < 1000) {
    REQUIRE(loop.run_once(-1));
    ++rounds;
  }
  CHECK(fired);
  CHECK(rounds <= 2);
  CHECK(thread_cpu_seconds() - cpu_before < 0.05);
}

TEST_CASE("a timer due in a fraction of a millisecond does not make the loop spin") {
  aet::Loop loop;
  for (int attempt = 0; attempt < 20; ++attempt) {
    bool fired = false;
    aet::Timer t = loop.after(0.0015 + attempt * 0.0001, [&] { fired = true; });
    int rounds = 0;
    while (!fired && rounds < 1000) {
      REQUIRE(loop.run_once(-1));
      ++rounds;
    }
    REQUIRE(fired);
    CHECK(rounds <= 2);  // a timeout rounded down would wake early and spin
  }
}

TEST_CASE("prepare returns the timeout rounded up to whole ms, 0 when due, -1 with none") {
  aet::Loop loop;
  std::vector<pollfd> fds;
  CHECK(loop.prepare(fds) == -1);
  const double deadline = aet::Loop::now() + 0.0105;
  aet::EventHost::Id id = loop.start_timer_at(deadline, 0, [] {});
  const int timeout = loop.prepare(fds);
  const double left_ms = (deadline - aet::Loop::now()) * 1000;
  CHECK(timeout >= left_ms);  // never less than what is left
  CHECK(timeout <= 11);
  loop.stop_timer(id);
  loop.start_timer(0, 0, [] {});
  CHECK(loop.prepare(fds) == 0);
  CHECK(fds.empty());
}

TEST_CASE("now is monotonic seconds") {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  const double system = static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  const double a = aet::Loop::now();
  CHECK(a >= system);
  CHECK(a - system < 0.5);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  CHECK(aet::Loop::now() - a >= 0.005);
}

// ---------------------------------------------------------------------------
// Embedding

TEST_CASE("an application's own poll loop serves its pipe and the loop's interests") {
  aet::Loop loop;
  Pipe own, library;
  std::string own_got, library_got;
  bool timer_fired = false;
  double timer_at = 0;
  const double start = aet::Loop::now();
  aet::IoWatcher watcher = loop.io(library.read_end, aet::io_read, [&](unsigned) { library_got += library.take(); });
  aet::Timer timer = loop.after(0.05, [&] {
    timer_fired = true;
    timer_at = aet::Loop::now();
  });
  own.put("mine");
  library.put("yours");
  int rounds = 0;
  const double cpu_before = thread_cpu_seconds();
  while (!timer_fired && rounds < 100) {
    ++rounds;
    std::vector<pollfd> fds;
    fds.push_back(pollfd{own.read_end, POLLIN, 0});  // the application's own entry first
    int timeout = 10000;                             // the application's own limit
    const int needed = loop.prepare(fds);
    if (needed >= 0 && needed < timeout) timeout = needed;
    REQUIRE(poll(fds.data(), fds.size(), timeout) >= 0);
    if (fds[0].revents & POLLIN) own_got += own.take();
    loop.process(fds);  // the whole array: its own entry is ignored
  }
  CHECK(own_got == "mine");
  CHECK(library_got == "yours");
  CHECK(timer_fired);
  CHECK(timer_at - start >= 0.05);
  CHECK(rounds <= 3);  // the returned timeout was honoured, no spinning
  CHECK(thread_cpu_seconds() - cpu_before < 0.05);
}

// ---------------------------------------------------------------------------
// The same watchers on epoll (tests/epoll_host.hpp)

TEST_CASE("IoWatcher and Timer run on an epoll host") {
  aet_test::EpollHost host;
  Pipe pipe;
  std::string got;
  int ticks = 0;
  aet::IoWatcher reader(host, pipe.read_end, aet::io_read, [&](unsigned events) {
    CHECK(events == aet::io_read);
    got += pipe.take();
  });
  aet::Timer writer(host, 0.01, 0, [&] { pipe.put("epoll"); });
  aet::Timer ticker;
  ticker = aet::Timer(host, 0.001, 0.001, [&] {
    if (++ticks == 3) ticker.reset();
  });
  REQUIRE(aet_test::run_until(host, [&] { return got == "epoll" && ticks == 3; }, 10));
  reader.reset();
  CHECK_FALSE(host.run_once(-1));  // nothing left to wait for
}

TEST_CASE("watchers on an epoll host share an fd and may remove each other during dispatch") {
  aet_test::EpollHost host;
  int sock[2];
  REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sock) == 0);
  REQUIRE(write(sock[1], "x", 1) == 1);
  unsigned read_seen = 0, write_seen = 0;
  int late_calls = 0;
  aet::IoWatcher late;
  aet::IoWatcher reader(host, sock[0], aet::io_read, [&](unsigned e) {
    read_seen = e;
    late.reset();  // same fd, ready in this round
  });
  aet::IoWatcher writer(host, sock[0], aet::io_write, [&](unsigned e) { write_seen = e; });
  late = aet::IoWatcher(host, sock[0], aet::io_read, [&](unsigned) { ++late_calls; });
  REQUIRE(host.run_once(1));
  CHECK(read_seen == aet::io_read);
  CHECK(write_seen == aet::io_write);
  CHECK(late_calls == 0);
  writer.set_events(0);
  write_seen = 0;
  REQUIRE(host.run_once(0));
  CHECK(write_seen == 0);
  close(sock[1]);  // a hang-up reaches the reader
  read_seen = 0;
  REQUIRE(host.run_once(1));
  CHECK(read_seen == aet::io_read);
  reader.reset();
  writer.reset();
  close(sock[0]);
}

TEST_CASE("timers on an epoll host fire in deadline order and can be stopped by each other") {
  aet_test::EpollHost host;
  std::vector<int> order;
  aet::Timer c(host, 0.003, 0, [&] { order.push_back(3); });
  aet::Timer b;
  aet::Timer a(host, 0.001, 0, [&] {
    order.push_back(1);
    b.reset();
  });
  b = aet::Timer(host, 0.002, 0, [&] { order.push_back(2); });
  std::this_thread::sleep_for(std::chrono::milliseconds(10));
  REQUIRE(host.run_once(0));
  CHECK(order == std::vector<int>{1, 3});
}
