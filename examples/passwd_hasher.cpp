// passwd_hasher: bcrypt in worker processes while the event loop keeps going.
//
// bcrypt is slow on purpose; run in the event loop it would freeze every
// other client for tens of milliseconds per hash. Here each hash runs in a
// forked worker; the loop only waits for replies, and a ticker on the loop
// shows that it never blocks.
//
//   passwd_hasher [--cost N] [--count N]     (defaults: cost 10, 4 passwords)

#include <crypt.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "anyevent_task.hpp"

namespace {

// A bcrypt setting string "$2b$CC$<22 chars of salt>" from /dev/urandom.
std::string bcrypt_setting(int cost) {
  unsigned char random[16];
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0 || read(fd, random, sizeof random) != static_cast<ssize_t>(sizeof random))
    throw std::runtime_error("cannot read /dev/urandom");
  close(fd);
  char setting[CRYPT_GENSALT_OUTPUT_SIZE];
  if (!crypt_gensalt_rn("$2b$", static_cast<unsigned long>(cost), reinterpret_cast<const char*>(random),
                        sizeof random, setting, sizeof setting))
    throw std::runtime_error("crypt_gensalt_rn failed: " + std::string(std::strerror(errno)));
  return setting;
}

std::string bcrypt(const std::string& password, const std::string& setting) {
  crypt_data data{};
  const char* out = crypt_r(password.c_str(), setting.c_str(), &data);
  if (!out || out[0] == '*') throw std::runtime_error("crypt_r refused the setting " + setting);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int cost = 10, count = 4;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--cost") == 0) cost = std::atoi(argv[i + 1]);
    else if (std::strcmp(argv[i], "--count") == 0) count = std::atoi(argv[i + 1]);
  }

  char dir[] = "/tmp/passwd_hasher-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  std::string address = std::string("unix:") + dir + "/hasher.sock";

  // The worker side: two methods, each a blocking call into libcrypt.
  aet::ServerOptions so;
  so.listen = address;
  so.name = "hasher";
  so.interface = aet::Methods{
      {"hash",
       [](const aet::Json& args) -> aet::Json {
         return bcrypt(args[0].as_string(), bcrypt_setting(static_cast<int>(args[1].as_int())));
       }},
      {"verify",
       [](const aet::Json& args) -> aet::Json {
         const std::string& hash = args[1].as_string();
         return bcrypt(args[0].as_string(), hash) == hash;
       }},
  };
  aet::TaskServer server = aet::fork_task_server(so);

  // The client side: one event loop, never blocked.
  aet::Loop loop;
  aet::ClientOptions co;
  co.connect = address;
  co.name = "hasher";
  co.max_workers = static_cast<unsigned>(count);
  aet::Client client(loop, co);

  int ticks = 0, hashed = 0, failures = 0;
  double started = aet::Loop::now();
  aet::Timer ticker = loop.every(0.01, [&] { ++ticks; });
  std::vector<std::string> hashes(static_cast<std::size_t>(count));

  auto report_error = [&](const std::exception& e, const std::string& trace) {
    std::printf("error: %s\n%s\n", e.what(), trace.c_str());
    ++failures;
    loop.stop();
  };

  aet::frame_try(
      [&] {
        for (int i = 0; i < count; ++i) {
          std::string password = "password-" + std::to_string(i);
          client.checkout().call("hash", {password, cost}, [&, i, password](aet::Checkout& c, aet::Json hash) {
            hashes[static_cast<std::size_t>(i)] = hash.as_string();
            std::printf("hashed %-11s -> %s  (%.0f ms, %d ticks so far)\n", password.c_str(),
                        hash.as_string().c_str(), (aet::Loop::now() - started) * 1000, ticks);
            if (++hashed < count) return;
            // All hashed: verify the first one, right and wrong, on this checkout.
            c.call("verify", {"password-0", hashes[0]}, [&](aet::Checkout& c2, aet::Json good) {
              c2.call("verify", {"wrong", hashes[0]}, [&, good](aet::Checkout&, aet::Json bad) {
                std::printf("verify password-0: %s, verify wrong: %s\n", good.as_bool() ? "match" : "no match",
                            bad.as_bool() ? "match" : "no match");
                if (!good.as_bool() || bad.as_bool()) ++failures;
                loop.stop();
              });
            });
          });
        }
      },
      report_error, "passwd_hasher");

  aet::Timer deadline = loop.after(60, [&] {
    std::puts("error: gave up after 60 seconds");
    ++failures;
    loop.stop();
  });
  loop.run();

  std::printf("%d hashes with cost %d in %.0f ms; the loop ticked %d times meanwhile\n", hashed, cost,
              (aet::Loop::now() - started) * 1000, ticks);
  server.stop();
  rmdir(dir);
  return failures == 0 && hashed == count && ticks > 0 ? 0 : 1;
}
