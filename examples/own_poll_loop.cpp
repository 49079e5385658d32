// own_poll_loop: an application that keeps its own poll() loop and embeds
// the client in it.
//
// The application reads lines from a descriptor (stdin when given `-`, else
// a pipe fed by a small producer process) in its own poll() loop. Before
// each poll() it lets the library append its descriptors and lower the
// timeout (Loop::prepare); after it, it hands the results back
// (Loop::process). Each line is sent to a worker, which counts its words.
//
//   own_poll_loop            lines from a built-in producer
//   own_poll_loop -          lines from stdin

#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "anyevent_task.hpp"

namespace {

// A child process that writes a few lines into a pipe, then closes it.
int start_producer(pid_t& pid) {
  int p[2];
  if (pipe(p) != 0) return -1;
  pid = fork();
  if (pid == 0) {
    close(p[0]);
    const char* lines[] = {"the quick brown fox", "jumps over", "the lazy dog",
                           "poll loops can host the client too", "bye"};
    for (const char* line : lines) {
      std::string l = std::string(line) + "\n";
      if (write(p[1], l.data(), l.size()) < 0) _exit(1);
      usleep(20000);  // a trickle, so lines arrive one by one
    }
    _exit(0);
  }
  close(p[1]);
  return p[0];
}

}  // namespace

int main(int argc, char** argv) {
  char dir[] = "/tmp/own_poll_loop-XXXXXX";
  if (!mkdtemp(dir)) return 1;
  aet::ServerOptions so;
  so.listen = std::string("unix:") + dir + "/words.sock";
  so.name = "words";
  so.interface = aet::Methods{{"count_words", [](const aet::Json& args) -> aet::Json {
                                 std::istringstream in(args[0].as_string());
                                 std::string word;
                                 int n = 0;
                                 while (in >> word) ++n;
                                 return n;
                               }}};
  aet::TaskServer server = aet::fork_task_server(so);

  pid_t producer = -1;
  int input = argc > 1 && std::strcmp(argv[1], "-") == 0 ? 0 : start_producer(producer);
  if (input < 0) return 1;

  aet::Loop library;  // never run(): driven from the poll() loop below
  aet::ClientOptions co;
  co.connect = so.listen;
  co.name = "words";
  aet::Client client(library, co);

  std::string pending;
  bool input_open = true;
  int sent = 0, answered = 0, failures = 0;
  auto on_error = [&](const std::exception& e, const std::string&) {
    std::printf("error: %s\n", e.what());
    ++failures;
    ++answered;
  };

  std::vector<pollfd> fds;
  while (input_open || answered < sent) {
    fds.clear();
    if (input_open) fds.push_back({input, POLLIN, 0});
    std::size_t library_first = fds.size();
    int app_timeout_ms = 5000;  // the application's own idle limit
    int library_timeout_ms = library.prepare(fds);
    int timeout = library_timeout_ms < 0 ? app_timeout_ms : std::min(app_timeout_ms, library_timeout_ms);
    int ready = poll(fds.data(), fds.size(), timeout);
    if (ready < 0 && errno != EINTR) return 1;
    if (ready == 0 && library_timeout_ms < 0) {
      std::puts("error: idle for 5 s");
      return 1;
    }

    if (input_open && fds[0].revents) {
      char buf[512];
      ssize_t n = read(input, buf, sizeof buf);
      if (n <= 0) input_open = false;
      else pending.append(buf, static_cast<std::size_t>(n));
      for (std::size_t nl; (nl = pending.find('\n')) != std::string::npos; pending.erase(0, nl + 1)) {
        std::string line = pending.substr(0, nl);
        ++sent;
        aet::frame_try(
            [&] {
              client.checkout().call("count_words", {line}, [&, line](aet::Checkout&, aet::Json n) {
                std::printf("%-36s -> %lld words\n", ("\"" + line + "\"").c_str(),
                            static_cast<long long>(n.as_int()));
                ++answered;
              });
            },
            on_error);
      }
    }
    library.process(fds.data() + library_first, fds.size() - library_first);
  }

  if (producer > 0) waitpid(producer, nullptr, 0);
  std::printf("%d lines answered by workers from the application's own poll loop\n", answered);
  server.stop();
  rmdir(dir);
  return failures == 0 && answered == sent ? 0 : 1;
}
