// Errors & frames: catchers and frame-local bindings that travel with
// callbacks, traces, and the cost of wrapping.
#include <catch2/catch.hpp>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include "anyevent_task.hpp"

#include "allocation_counter.hpp"

using aet_test::allocations;

namespace {

using Callback = std::function<void()>;

struct Caught {
  std::vector<std::string> errors;
  std::vector<std::string> traces;
};

aet::Catcher recorder(Caught& caught) {
  return [&caught](const std::exception& e, const std::string& trace) {
    caught.errors.push_back(e.what());
    caught.traces.push_back(trace);
  };
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

std::string at(int line, const std::string& name) {
  return std::string(__FILE__) + ":" + std::to_string(line) + " - " + name;
}

}  // namespace

TEST_CASE("a callback called after its creating scope has ended reaches the catcher of that scope") {
  Caught caught;
  std::vector<Callback> later;
  aet::frame_try(
      [&] {
        for (int i = 0; i < 3; ++i) {
          later.push_back(aet::fub([i] { throw std::runtime_error("failure " + std::to_string(i)); }));
        }
      },
      recorder(caught));
  REQUIRE(caught.errors.empty());
  REQUIRE(!aet::current_frame());
  for (int i = 2; i >= 0; --i) later[static_cast<std::size_t>(i)]();
  REQUIRE(caught.errors == std::vector<std::string>{"failure 2", "failure 1", "failure 0"});
  later[0]();
  REQUIRE(caught.errors.size() == 4);
}

TEST_CASE("frame_try catches at once and returns normally") {
  Caught caught;
  bool after = false;
  aet::frame_try([] { throw aet::Error("at once"); }, recorder(caught));
  after = true;
  REQUIRE(after);
  REQUIRE(caught.errors == std::vector<std::string>{"at once"});
}

TEST_CASE("code that does not throw never calls the catcher") {
  Caught caught;
  int runs = 0;
  auto cb = aet::frame([&](int n) { runs += n; }, recorder(caught));
  cb(2);
  cb(3);
  REQUIRE(runs == 5);
  REQUIRE(caught.errors.empty());
}

TEST_CASE("the caller's frame is restored after a framed call, also when it throws") {
  aet::FrameContext outer_seen, inner_seen, after_ok, after_throw;
  auto ok = aet::fub([&] { inner_seen = aet::current_frame(); });
  auto fails = aet::fub([] { throw std::runtime_error("no catcher"); });
  aet::frame_try(
      [&] {
        outer_seen = aet::current_frame();
        ok();
        after_ok = aet::current_frame();
        try {
          fails();
        } catch (const std::runtime_error&) {
        }
        after_throw = aet::current_frame();
      },
      [](const std::exception&, const std::string&) {});
  REQUIRE(outer_seen);
  REQUIRE(inner_seen);
  REQUIRE(inner_seen.trace() != outer_seen.trace());
  REQUIRE(after_ok.trace() == outer_seen.trace());
  REQUIRE(after_throw.trace() == outer_seen.trace());
  REQUIRE(!aet::current_frame());
}

TEST_CASE("the innermost catcher gets the error and the outer ones do not") {
  Caught outer, inner;
  Callback cb;
  aet::frame_try(
      [&] {
        aet::frame_try([&] { cb = aet::fub([] { throw std::runtime_error("deep"); }); }, recorder(inner));
      },
      recorder(outer));
  cb();
  REQUIRE(inner.errors == std::vector<std::string>{"deep"});
  REQUIRE(outer.errors.empty());
}

TEST_CASE("a catcher that throws hands the new error to the next catcher out with the first trace") {
  Caught outer;
  std::string inner_trace;
  Callback cb;
  aet::frame_try(
      [&] {
        cb = aet::frame([] { throw std::runtime_error("first"); },
                        [&](const std::exception& e, const std::string& trace) {
                          inner_trace = trace;
                          throw std::runtime_error(std::string("second after ") + e.what());
                        },
                        "inner");
      },
      recorder(outer), "outer");
  cb();
  REQUIRE(outer.errors == std::vector<std::string>{"second after first"});
  REQUIRE(!inner_trace.empty());
  REQUIRE(outer.traces == std::vector<std::string>{inner_trace});
  auto lines = lines_of(inner_trace);
  REQUIRE(lines.size() == 2);
  REQUIRE(lines[0].find(" - inner") != std::string::npos);
  REQUIRE(lines[1].find(" - outer") != std::string::npos);
}

TEST_CASE("a chain of throwing catchers ends in the outermost one") {
  Caught outermost;
  Callback cb;
  auto rethrow_with = [](const char* tag) {
    return [tag](const std::exception& e, const std::string&) {
      throw std::runtime_error(std::string(tag) + " " + e.what());
    };
  };
  aet::frame_try(
      [&] {
        aet::frame_try(
            [&] { cb = aet::frame([] { throw std::runtime_error("e1"); }, rethrow_with("e3")); },
            rethrow_with("e2"));
      },
      recorder(outermost));
  cb();
  REQUIRE(outermost.errors == std::vector<std::string>{"e2 e3 e1"});
}

TEST_CASE("an error thrown in frames without any catcher propagates to the caller") {
  auto cb = aet::fub([] { throw std::runtime_error("nobody catches"); });
  REQUIRE_THROWS_WITH(cb(), "nobody catches");
  REQUIRE(!aet::current_frame());
}

TEST_CASE("a catcher that throws with no catcher further out propagates the new error to the caller") {
  auto cb = aet::frame([] { throw std::runtime_error("original"); },
                       [](const std::exception&, const std::string&) { throw aet::Error("replaced"); });
  REQUIRE_THROWS_AS(cb(), aet::Error);
  REQUIRE_THROWS_WITH(cb(), "replaced");
  REQUIRE(!aet::current_frame());
}

TEST_CASE("a catcher runs in the frame around its own, so callbacks it creates go to the next catcher") {
  Caught outer;
  int inner_calls = 0;
  Callback from_catcher;
  Callback cb;
  aet::frame_try(
      [&] {
        cb = aet::frame([] { throw std::runtime_error("once"); },
                        [&](const std::exception&, const std::string&) {
                          ++inner_calls;
                          from_catcher = aet::fub([] { throw std::runtime_error("from the catcher"); });
                        });
      },
      recorder(outer));
  cb();
  REQUIRE(inner_calls == 1);
  from_catcher();
  REQUIRE(inner_calls == 1);
  REQUIRE(outer.errors == std::vector<std::string>{"from the catcher"});
}

TEST_CASE("an exception that is not a std::exception arrives as aet::Error(\"unknown exception\")") {
  std::string what;
  bool was_aet_error = false;
  aet::frame_try([] { throw 42; },
                 [&](const std::exception& e, const std::string&) {
                   what = e.what();
                   was_aet_error = dynamic_cast<const aet::Error*>(&e) != nullptr;
                 });
  REQUIRE(what == "unknown exception");
  REQUIRE(was_aet_error);
}

TEST_CASE("an exception that is not a std::exception propagates unchanged when nothing catches it") {
  auto cb = aet::fub([] { throw 42; });
  int thrown = 0;
  try {
    cb();
  } catch (int value) {
    thrown = value;
  }
  REQUIRE(thrown == 42);
}

TEST_CASE("the trace lists frames innermost first with the file and line of their creation") {
  Caught caught;
  Callback cb;
  int outer_line = 0, inner_line = 0;
  auto inner_code = [] { throw std::runtime_error("x"); };
  auto outer_code = [&] {
    cb = aet::frame(inner_code, {}, "INNER NAME"); inner_line = __LINE__;
  };
  aet::frame_try(outer_code, recorder(caught), "OUTER NAME"); outer_line = __LINE__;
  cb();
  REQUIRE(caught.traces.size() == 1);
  REQUIRE(caught.traces[0] == at(inner_line, "INNER NAME") + "\n" + at(outer_line, "OUTER NAME") + "\n");
}

TEST_CASE("unnamed frames read ANONYMOUS FRAME in the trace") {
  Caught caught;
  Callback cb;
  int fub_line = 0, try_line = 0;
  auto thrower = [] { throw std::runtime_error("x"); };
  auto outer_code = [&] { cb = aet::fub(thrower); fub_line = __LINE__; };
  aet::frame_try(outer_code, recorder(caught)); try_line = __LINE__;
  cb();
  REQUIRE(caught.traces.size() == 1);
  REQUIRE(caught.traces[0] ==
          at(fub_line, "ANONYMOUS FRAME") + "\n" + at(try_line, "ANONYMOUS FRAME") + "\n");
}

TEST_CASE("an error escaping unrelated frames keeps its first trace in the catcher further up") {
  Caught caught;
  auto stray = aet::frame([] { throw std::runtime_error("stray"); }, {}, "STRAY");
  const std::string stray_trace = stray.context().trace();
  aet::frame_try([&] { stray(); }, recorder(caught), "CATCHING");
  REQUIRE(caught.errors == std::vector<std::string>{"stray"});
  REQUIRE(caught.traces == std::vector<std::string>{stray_trace});
  REQUIRE(stray_trace.find("STRAY") != std::string::npos);
  REQUIRE(stray_trace.find("CATCHING") == std::string::npos);
}

TEST_CASE("a framed callable is never wrapped twice") {
  auto cb = aet::frame([] { throw std::runtime_error("x"); }, {}, "ONCE");
  using Cb = decltype(cb);
  STATIC_REQUIRE(aet::is_framed<Cb>::value);
  STATIC_REQUIRE(aet::is_framed_v<const Cb&>);
  STATIC_REQUIRE(!aet::is_framed_v<std::function<void()>>);

  auto by_fub = aet::fub(cb);
  auto by_frame = aet::frame(cb, {}, "IGNORED NAME");
  STATIC_REQUIRE(std::is_same_v<decltype(by_fub), Cb>);
  STATIC_REQUIRE(std::is_same_v<decltype(by_frame), Cb>);
  REQUIRE(by_fub.context().trace() == cb.context().trace());
  REQUIRE(by_frame.context().trace() == cb.context().trace());
  REQUIRE(lines_of(cb.context().trace()).size() == 1);

  Caught caught;
  auto rewrapped = aet::fub(aet::fub(aet::fub(cb)));
  aet::frame_try([&] { rewrapped(); }, recorder(caught));
  REQUIRE(caught.traces == std::vector<std::string>{cb.context().trace()});
}

TEST_CASE("framing a framed callable with a catcher adds one frame holding that catcher, innermost") {
  Caught added;
  auto with_catcher = aet::frame(aet::fub([] { throw std::runtime_error("y"); }), recorder(added), "ADDED");
  STATIC_REQUIRE(!aet::is_framed<decltype(with_catcher)::code_type>::value);
  with_catcher();
  REQUIRE(added.errors == std::vector<std::string>{"y"});
  auto lines = lines_of(added.traces[0]);
  REQUIRE(lines.size() == 2);
  REQUIRE(lines[0].find(" - ADDED") != std::string::npos);
  REQUIRE(lines[1].find(" - ANONYMOUS FRAME") != std::string::npos);
}

TEST_CASE("two branches of the same parent frame keep their own catchers and locals") {
  static aet::FrameLocal<std::string> branch;
  Caught caught_a, caught_b;
  std::vector<std::string> seen;
  Callback a, b;
  aet::frame_try(
      [&] {
        aet::frame_try(
            [&] {
              branch.bind("A", [&] {
                a = aet::fub([&] {
                  seen.push_back(branch.value_or("none"));
                  throw std::runtime_error("from A");
                });
              });
            },
            recorder(caught_a));
        aet::frame_try(
            [&] {
              branch.bind("B", [&] {
                b = aet::fub([&] {
                  seen.push_back(branch.value_or("none"));
                  throw std::runtime_error("from B");
                });
              });
            },
            recorder(caught_b));
      },
      [](const std::exception&, const std::string&) { FAIL("the common parent's catcher ran"); });
  a();
  b();
  b();
  a();
  REQUIRE(seen == std::vector<std::string>{"A", "B", "B", "A"});
  REQUIRE(caught_a.errors == std::vector<std::string>{"from A", "from A"});
  REQUIRE(caught_b.errors == std::vector<std::string>{"from B", "from B"});
}

TEST_CASE("a frame-local binding is seen inside, by callbacks created inside, and nowhere else") {
  static aet::FrameLocal<int> request_id;
  std::vector<int> seen;
  Callback later;
  auto outside_cb = aet::fub([&] { seen.push_back(request_id.value_or(-1)); });
  REQUIRE(request_id.get() == nullptr);
  request_id.bind(7, [&] {
    REQUIRE(request_id.get() != nullptr);
    seen.push_back(*request_id.get());
    later = aet::fub([&] { seen.push_back(request_id.value_or(-1)); });
    outside_cb();  // made outside the binding: does not see it
  });
  REQUIRE(request_id.get() == nullptr);
  later();
  outside_cb();
  REQUIRE(seen == std::vector<int>{7, -1, 7, -1});
}

TEST_CASE("an inner binding shadows an outer one and other variables are independent") {
  static aet::FrameLocal<int> level;
  static aet::FrameLocal<int> other;
  std::vector<int> seen;
  aet::frame_local(level, 1, [&] {
    aet::frame_local(other, 100, [&] {
      aet::frame_local(level, 2, [&] {
        seen.push_back(level.value_or(0));
        seen.push_back(other.value_or(0));
      });
      seen.push_back(level.value_or(0));
    });
    seen.push_back(other.value_or(0));
  });
  REQUIRE(seen == std::vector<int>{2, 100, 1, 0});
}

TEST_CASE("an error escaping a binding goes to the catcher around it") {
  static aet::FrameLocal<int> bound;
  Caught caught;
  aet::frame_try([&] { bound.bind(1, [] { throw std::runtime_error("in binding"); }); }, recorder(caught));
  REQUIRE(caught.errors == std::vector<std::string>{"in binding"});
  REQUIRE_THROWS_WITH(bound.bind(2, [] { throw std::runtime_error("uncaught"); }), "uncaught");
  REQUIRE(!aet::current_frame());
}

TEST_CASE("FrameContext::raise delivers an error to the catchers of that context") {
  Caught caught;
  aet::FrameContext saved;
  aet::frame_try([&] { saved = aet::fub([] {}).context(); }, recorder(caught), "SAVED");
  saved.raise(std::make_exception_ptr(aet::Error("raised later")));
  REQUIRE(caught.errors == std::vector<std::string>{"raised later"});
  REQUIRE(caught.traces == std::vector<std::string>{saved.trace()});
  REQUIRE(lines_of(saved.trace()).size() == 2);
}

TEST_CASE("FrameContext::raise rethrows when the context has no catcher") {
  aet::FrameContext empty;
  REQUIRE(!empty);
  REQUIRE_THROWS_WITH(empty.raise(std::make_exception_ptr(aet::Error("nobody"))), "nobody");
  auto cb = aet::fub([] {});
  REQUIRE_THROWS_WITH(cb.context().raise(std::make_exception_ptr(aet::Error("still nobody"))),
                      "still nobody");
}

TEST_CASE("FrameContext::run runs code with the context's catchers and bindings") {
  static aet::FrameLocal<int> bound;
  Caught caught;
  aet::FrameContext saved;
  aet::frame_try([&] { bound.bind(5, [&] { saved = aet::current_frame(); }); }, recorder(caught));
  int seen = 0;
  saved.run([&] { seen = bound.value_or(0); });
  REQUIRE(seen == 5);
  saved.run([] { throw std::runtime_error("run"); });
  REQUIRE(caught.errors == std::vector<std::string>{"run"});
  REQUIRE(!aet::current_frame());
}

TEST_CASE("framed callables take arguments and keep mutable state") {
  int total = 0;
  auto add = aet::fub([&total, calls = 0](int a, const std::string& b) mutable {
    ++calls;
    total += a * calls + static_cast<int>(b.size());
  });
  add(1, "ab");
  add(10, "");
  std::function<void(int, const std::string&)> stored = add;
  stored(100, "x");
  REQUIRE(total == (1 + 2) + 20 + (300 + 1));
}

TEST_CASE("a framed callable may destroy its own holder while it runs") {
  Caught caught;
  std::unique_ptr<Callback> holder;
  aet::frame_try(
      [&] {
        holder = std::make_unique<Callback>(aet::fub([&holder] {
          holder.reset();
          throw std::runtime_error("after self destruction");
        }));
      },
      recorder(caught));
  (*holder)();
  REQUIRE(!holder);
  REQUIRE(caught.errors == std::vector<std::string>{"after self destruction"});
}

TEST_CASE("callbacks that schedule callbacks forever do not grow an endless chain of frames") {
  Caught caught;
  Callback next;
  int steps = 0;
  std::function<void()> step = [&] {
    if (++steps == 1000) throw std::runtime_error("done");
    next = aet::fub([&] { step(); });
  };
  aet::frame_try([&] { next = aet::fub([&] { step(); }); }, recorder(caught), "ROOT");
  while (caught.errors.empty() && steps < 2000) {
    Callback current = std::move(next);
    current();
  }
  REQUIRE(steps == 1000);
  REQUIRE(caught.errors == std::vector<std::string>{"done"});
  auto lines = lines_of(caught.traces[0]);
  REQUIRE(lines.size() <= aet::detail::max_plain_frame_run + 1);
  REQUIRE(lines.back().find(" - ROOT") != std::string::npos);
}

TEST_CASE("wrapping costs one allocation and calling a framed callable none") {
  Caught caught;
  Callback inside;
  int runs = 0;
  aet::frame_try(
      [&] {
        long before = allocations.load();
        auto cb = aet::fub([&runs] { ++runs; });
        long after_wrap = allocations.load();
        cb();
        cb();
        long after_calls = allocations.load();
        REQUIRE(after_wrap - before == 1);
        REQUIRE(after_calls == after_wrap);

        before = allocations.load();
        auto named = aet::frame([&runs](int n) { runs += n; }, {}, "short");
        after_wrap = allocations.load();
        named(2);
        REQUIRE(after_wrap - before == 1);
        REQUIRE(allocations.load() == after_wrap);
      },
      recorder(caught));
  REQUIRE(runs == 4);
  REQUIRE(caught.errors.empty());
}

TEST_CASE("SystemError carries the errno value and its description") {
  aet::SystemError error("open /nowhere", ENOENT);
  REQUIRE(error.code() == ENOENT);
  REQUIRE(std::string(error.what()).find("open /nowhere: ") == 0);
  REQUIRE(std::string(error.what()).size() > std::string("open /nowhere: ").size());
}
