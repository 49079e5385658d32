// kv_transactions: a checkout is a transaction.
//
// Each worker can open a transaction on a small file-backed key/value store:
// `begin` takes an exclusive lock on the store and a private copy of it,
// `put` changes the copy, `commit` writes it back atomically, `rollback`
// drops it. Because a checkout keeps its worker to itself until released,
// the calls of one checkout are one transaction; and `checkout_done` rolls
// back whatever a released checkout left uncommitted, so a forgotten or
// failed transaction never leaks into the next checkout.
//
//   kv_transactions          (the store lives in a fresh /tmp directory)

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "anyevent_task.hpp"

namespace {

// Worker-side state: one per worker process (each has its own copy).
struct Store {
  std::string path;
  int lock_fd = -1;              // held while a transaction is open
  std::optional<aet::Json> copy;  // the transaction's private copy

  aet::Json load() const {
    std::ifstream in(path);
    std::stringstream text;
    text << in.rdbuf();
    return text.str().empty() ? aet::Json::object() : aet::Json::parse(text.str());
  }
  void begin() {
    if (copy) throw std::runtime_error("a transaction is already open");
    lock_fd = open((path + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock_fd < 0 || flock(lock_fd, LOCK_EX) != 0) throw std::runtime_error("cannot lock the store");
    copy = load();
  }
  void put(const std::string& key, const aet::Json& value) {
    if (!copy) throw std::runtime_error("put outside a transaction");
    (*copy)[key] = value;
  }
  void commit() {
    if (!copy) throw std::runtime_error("commit outside a transaction");
    std::string tmp = path + ".tmp";
    std::ofstream(tmp) << copy->dump();
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot write the store");
    end();
  }
  bool rollback() {
    bool was_open = copy.has_value();
    end();
    return was_open;
  }
  void end() {
    copy.reset();
    if (lock_fd >= 0) close(lock_fd);  // closing releases the flock
    lock_fd = -1;
  }
};

Store store;

}  // namespace

int main() {
  char dir[] = "/tmp/kv_transactions-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  store.path = std::string(dir) + "/store.json";

  aet::ServerOptions so;
  so.listen = std::string("unix:") + dir + "/kv.sock";
  so.name = "kv";
  so.checkout_done = [] {
    if (store.rollback()) std::printf("  [worker %d] checkout released mid-transaction: rolled back\n", getpid());
    std::fflush(stdout);
  };
  so.interface = aet::Methods{
      {"begin", [](const aet::Json&) -> aet::Json { store.begin(); return true; }},
      {"put", [](const aet::Json& a) -> aet::Json { store.put(a[0].as_string(), a[1]); return true; }},
      {"commit", [](const aet::Json&) -> aet::Json { store.commit(); return true; }},
      {"rollback", [](const aet::Json&) -> aet::Json { return store.rollback(); }},
      {"get_all", [](const aet::Json&) -> aet::Json { return store.load(); }},
  };
  aet::TaskServer server = aet::fork_task_server(so);

  aet::Loop loop;
  aet::ClientOptions co;
  co.connect = so.listen;
  co.name = "kv";
  co.max_workers = 1;  // one worker, so every checkout below reuses it
  aet::Client client(loop, co);
  int failures = 0;
  aet::Json final_state;
  auto ignore = [](aet::Checkout&, aet::Json) {};

  aet::frame_try(
      [&] {
        // 1. A committed transaction.
        {
          aet::Checkout t = client.checkout();
          t.call("begin", {}, ignore);
          t.call("put", {"apples", 3}, ignore);
          t.call("put", {"pears", 5}, ignore);
          t.call("commit", {}, [](aet::Checkout&, aet::Json) { std::puts("transaction 1: committed apples and pears"); });
        }
        // 2. A transaction released without commit: checkout_done rolls it back.
        {
          aet::Checkout t = client.checkout();
          t.call("begin", {}, ignore);
          t.call("put", {"apples", 0}, [](aet::Checkout&, aet::Json) {
            std::puts("transaction 2: set apples to 0, then released without commit");
          });
        }
        // 3. Read what is really stored.
        client.checkout().call("get_all", {}, [&](aet::Checkout&, aet::Json all) {
          final_state = all;
          std::printf("store now holds: %s\n", all.dump().c_str());
          loop.stop();
        });
      },
      [&](const std::exception& e, const std::string& trace) {
        std::printf("error: %s\n%s\n", e.what(), trace.c_str());
        ++failures;
        loop.stop();
      },
      "kv_transactions");

  aet::Timer deadline = loop.after(30, [&] { ++failures; loop.stop(); });
  loop.run();
  server.stop();
  std::remove(store.path.c_str());
  std::remove((store.path + ".lock").c_str());
  rmdir(dir);
  bool ok = failures == 0 && final_state.is_object() && final_state["apples"] == aet::Json(3) &&
            final_state["pears"] == aet::Json(5);
  std::puts(ok ? "the uncommitted change was rolled back" : "unexpected store contents");
  return ok ? 0 : 1;
}
