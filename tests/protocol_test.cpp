// The wire protocol: frame encoding, message shape checks, incremental decoding.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "allocation_counter.hpp"
#include "anyevent_task.hpp"

using aet::FrameDecoder;
using aet::Json;

namespace {

std::string header(std::uint32_t length) {
  std::string h(4, '\0');
  h[0] = static_cast<char>(length >> 24);
  h[1] = static_cast<char>(length >> 16);
  h[2] = static_cast<char>(length >> 8);
  h[3] = static_cast<char>(length);
  return h;
}

std::string raw_frame(const std::string& body) { return header(static_cast<std::uint32_t>(body.size())) + body; }

template <class F>
std::string protocol_error(F&& f) {
  try {
    f();
  } catch (const aet::ProtocolError& e) {
    return e.what();
  }
  return "";
}

std::string check_error(const std::string& text) {
  return protocol_error([&] { aet::check_message(Json::parse(text)); });
}

// A stream of every kind of message, small and large.
std::vector<Json> sample_messages() {
  std::vector<Json> messages;
  messages.push_back(Json{"do", Json::object(), "hash", "secret"});
  messages.push_back(Json{"ok", Json::object({{"ld", Json::object({{"logs", Json::array()}})}}), "crypted"});
  messages.push_back(Json{"do", Json::object({{"unknown", 1}}), 1, 2.5, nullptr, true});
  messages.push_back(Json{"er", Json::object(), "caf\xc3\xa9 \xf0\x9f\x98\x80 failed\n"});
  messages.push_back(Json{"dn", Json::object()});
  Json big = Json::array();
  for (int i = 0; i < 3000; ++i) big.push_back(Json::object({{"i", i}, {"s", "text \"" + std::to_string(i) + "\""}}));
  messages.push_back(Json{"ok", Json::object(), big});
  messages.push_back(Json{"do", Json::object()});
  messages.push_back(Json{"ok", Json::object(), Json::object({{"nested", Json{Json{1, 2}, Json{3}}}})});
  return messages;
}

std::string encode_all(const std::vector<Json>& messages) {
  std::string stream;
  for (const Json& m : messages) aet::append_frame(stream, m);
  return stream;
}

// Feeds `stream` in chunks whose sizes come from `next_size`, draining the
// decoder after each chunk.
template <class NextSize>
std::vector<Json> decode_in_chunks(const std::string& stream, NextSize next_size) {
  FrameDecoder decoder;
  std::vector<Json> out;
  std::size_t pos = 0;
  while (pos < stream.size()) {
    const std::size_t n = std::min(next_size(), stream.size() - pos);
    decoder.feed(stream.data() + pos, n);
    pos += n;
    while (auto m = decoder.next()) out.push_back(std::move(*m));
  }
  REQUIRE(decoder.buffered() == 0);
  REQUIRE_FALSE(decoder.next().has_value());
  return out;
}

// The same, the bytes written into input_space() and committed, as a
// socket read into the decoder would; `at_least` is asked for each time.
template <class NextSize>
std::vector<Json> decode_in_place(const std::string& stream, NextSize next_size, std::size_t at_least) {
  FrameDecoder decoder;
  std::vector<Json> out;
  std::size_t pos = 0;
  while (pos < stream.size()) {
    const auto space = decoder.input_space(at_least);
    REQUIRE((space.second >= at_least || decoder.buffered() > 0));  // else a body's rest
    if (space.second == 0) {  // no room and none asked for: fed instead, as the client does
      const std::size_t n = std::min(next_size(), stream.size() - pos);
      decoder.feed(stream.data() + pos, n);
      pos += n;
    } else {
      const std::size_t n = std::min({next_size(), stream.size() - pos, space.second});
      std::memcpy(space.first, stream.data() + pos, n);
      decoder.commit(n);
      pos += n;
    }
    while (auto m = decoder.next()) out.push_back(std::move(*m));
  }
  REQUIRE(decoder.buffered() == 0);
  REQUIRE_FALSE(decoder.next().has_value());
  return out;
}

using aet::detail::OutgoingBytes;

// `message` as a frame into `out`, long strings left out, as the worker
// and the client write theirs.
void append_left_out_frame(OutgoingBytes& out, const Json& message) {
  const std::size_t start = out.bytes().size(), left_out_before = out.left_out_size();
  out.bytes().append(4, '\0');
  out.append_json(message);
  aet::detail::seal_frame(out.bytes(), start, out.left_out_size() - left_out_before);
}

// Sends all of `out` through a non-blocking socketpair while the other
// end reads pieces of random sizes (so that sends stop anywhere, inside
// and between pieces); returns what arrived. `more`, if given, is appended
// to `out` once part of it has gone.
std::string send_through_socket(OutgoingBytes& out, OutgoingBytes* more = nullptr) {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  const int small = 4096;
  ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  REQUIRE(::fcntl(sv[0], F_SETFL, O_NONBLOCK) == 0);
  std::mt19937 random(7);
  std::string received;
  int stalls = 0;
  while (!out.all_sent()) {
    const ssize_t n = out.send_some(sv[0], MSG_NOSIGNAL);
    if (n < 0) {
      REQUIRE(errno == EAGAIN);
      ++stalls;
      char piece[70000];
      const std::size_t want = 1 + random() % sizeof piece;
      const ssize_t got = ::recv(sv[1], piece, want, MSG_DONTWAIT);
      REQUIRE(got > 0);
      received.append(piece, static_cast<std::size_t>(got));
    }
    if (more && stalls == 3) {
      out.append(std::move(*more));
      more = nullptr;
    }
  }
  ::close(sv[0]);
  char piece[65536];
  for (ssize_t got; (got = ::recv(sv[1], piece, sizeof piece, 0)) > 0;) received.append(piece, static_cast<std::size_t>(got));
  ::close(sv[1]);
  return received;
}

}  // namespace

TEST_CASE("a frame is a big-endian length and compact JSON") {
  Json m{"dn", Json::object()};
  REQUIRE(aet::encode_frame(m) == header(9) + R"(["dn",{}])");
  Json big{"ok", Json::object(), std::string(300, 'x')};
  std::string frame = aet::encode_frame(big);
  REQUIRE(frame.size() == 4 + 312);
  REQUIRE(frame.substr(0, 4) == header(312));
  REQUIRE(Json::parse(frame.substr(4)) == big);
  std::string long_body = aet::encode_frame(Json{"ok", Json::object(), std::string(0x012345, 'y')});
  REQUIRE(static_cast<unsigned char>(long_body[1]) == 0x01);
  REQUIRE(static_cast<unsigned char>(long_body[2]) == 0x23);
  REQUIRE(static_cast<unsigned char>(long_body[3]) == 0x45 + 12);
}

TEST_CASE("append_frame appends, and leaves the buffer alone when the message cannot be printed") {
  std::string out = "xyz";
  aet::append_frame(out, Json{"dn", Json::object()});
  REQUIRE(out == "xyz" + header(9) + R"(["dn",{}])");
  const std::string before = out;
  REQUIRE_THROWS_AS(aet::append_frame(out, Json{"ok", Json::object(), std::nan("")}), aet::JsonError);
  REQUIRE(out == before);
  REQUIRE_THROWS_AS(aet::append_frame(out, Json{"ok", Json::object(), "\xff"}), aet::JsonError);
  REQUIRE(out == before);
}

TEST_CASE("long strings left out of a frame are sent from their value, the same bytes as encode_frame") {
  const std::string plain(70000, 'p');
  std::string utf8;
  while (utf8.size() < 80000) utf8 += "caf\xc3\xa9 \xf0\x9f\x98\x80 ";
  std::string escaped = plain;
  escaped[40000] = '"';
  const Json parsed = Json::parse(Json(plain + "q").dump());  // marked as printing verbatim
  Json many = Json::array();
  for (int i = 0; i < 20; ++i) many.push_back(std::string(65536 + i, static_cast<char>('a' + i)));
  struct Case {
    Json message;
    std::size_t left_out;
  };
  const std::vector<Case> cases{
      {Json{"do", Json::object(), "echo", plain}, 1},
      {Json{"ok", Json::object(), utf8}, 1},
      {Json{"ok", Json::object(), escaped}, 0},  // to be escaped: copied
      {Json{"ok", Json::object(), std::string(65535, 's')}, 0},  // below left_out_min
      {Json{"ok", Json::object(), parsed}, 1},
      {Json{"ok", Json::object({{"ld", plain}}), Json::object({{"k", plain}, {"e", escaped}, {"u", utf8}})}, 3},
      {Json{"ok", Json::object(), many}, aet::detail::left_out_max},  // the rest copied
  };
  for (const Case& c : cases) {
    OutgoingBytes out;
    append_left_out_frame(out, c.message);
    CHECK(out.left_out_count() == c.left_out);
    const std::string expected = aet::encode_frame(c.message);
    REQUIRE(out.size() == expected.size());
    REQUIRE(out.contiguous() == expected);
    REQUIRE(send_through_socket(out) == expected);
    REQUIRE(out.all_sent());
    out.clear();
    REQUIRE(out.size() == 0);
    REQUIRE(out.left_out_count() == 0);
  }
}

TEST_CASE("frames appended to outgoing bytes in the middle of a send follow what was there") {
  const Json first{"do", Json::object(), "echo", std::string(100000, 'f'), "small", std::string(90000, 'g')};
  const Json second{"do", Json::object(), "echo", std::string(120000, 'h')};
  OutgoingBytes out, more;
  append_left_out_frame(out, first);
  append_left_out_frame(more, second);
  REQUIRE(more.left_out_count() == 1);
  std::string dn = aet::encode_frame(Json{"dn", Json::object()});
  more.bytes() += dn;
  REQUIRE(send_through_socket(out, &more) == aet::encode_frame(first) + aet::encode_frame(second) + dn);
  REQUIRE(more.size() == 0);
}

TEST_CASE("out of memory, appending outgoing bytes or keeping a value changes nothing") {
  const Json first{"do", Json::object(), "echo", std::string(100000, 'f')};
  const std::string dn = aet::encode_frame(Json{"dn", Json::object()});
  int failures = 0;
  for (long n = 0; n < 40; ++n) {
    OutgoingBytes out, more;
    append_left_out_frame(out, first);
    out.bytes() += dn;
    Json second{"ok", Json::object(), std::string(120000, 's')};
    append_left_out_frame(more, second);
    more.keep(std::move(second));
    const std::string out_before = out.contiguous(), more_before = more.contiguous();
    Json third(std::string(70000, 't'));
    aet_test::fail_after = aet_test::allocations + n;
    bool appended = false, kept = false;
    try {
      out.append(std::move(more));
      appended = true;
      out.keep(std::move(third));
      kept = true;
    } catch (const std::bad_alloc&) {
      ++failures;
    }
    aet_test::fail_after = -1;
    INFO("allocation " << n);
    REQUIRE(out.contiguous() == (appended ? out_before + more_before : out_before));
    REQUIRE(out.size() == out.contiguous().size());
    if (!appended) REQUIRE(more.contiguous() == more_before);
    if (!kept) REQUIRE(third.as_string().size() == 70000);  // still the caller's
    REQUIRE(send_through_socket(out) == out.contiguous());
  }
  REQUIRE(failures > 0);  // the loop did reach the allocations
}

TEST_CASE("a value kept in outgoing bytes keeps the text left out, moves included") {
  OutgoingBytes moved;
  std::string expected;
  {
    Json message{"ok", Json::object(), std::string(200000, 'k')};
    expected = aet::encode_frame(message);
    OutgoingBytes out;
    append_left_out_frame(out, message);
    out.keep(std::move(message));
    message = Json();
    moved = std::move(out);
    REQUIRE(out.size() == 0);  // NOLINT(bugprone-use-after-move): a moved-from one is empty
    REQUIRE(out.all_sent());
  }
  REQUIRE(send_through_socket(moved) == expected);
}

TEST_CASE("a value that cannot be printed leaves outgoing bytes as they were") {
  const Json sent{"ok", Json::object(), std::string(70000, 'a')};  // outlives `out`, as it must
  OutgoingBytes out;
  append_left_out_frame(out, sent);
  const std::string before = out.contiguous();
  const std::size_t listed = out.left_out_count();
  REQUIRE_THROWS_AS(out.append_json(Json::array({std::string(70000, 'b'), "\xff"})), aet::JsonError);
  REQUIRE_THROWS_AS(out.append_json(Json::array({std::string(70000, 'b'), std::nan("")})), aet::JsonError);
  REQUIRE(out.left_out_count() == listed);
  REQUIRE(out.contiguous() == before);
  // Long text that is not UTF-8 is refused as the copying printer refuses it.
  REQUIRE_THROWS_WITH(out.append_json(Json(std::string(70000, 'c') + "\xc3")),
                      Catch::Contains("cannot print a string that is not UTF-8"));
  REQUIRE(out.contiguous() == before);
}

TEST_CASE("well-formed messages pass the shape check") {
  for (const char* text : {R"(["do",{}])", R"(["do",{},"method",1,[2],{"a":3}])", R"(["dn",{}])",
                           R"(["dn",{"anything":[1]}])", R"(["ok",{},null])", R"(["ok",{"ld":{}},{"r":1}])",
                           R"(["er",{},"it failed"])", R"(["er",{"x":1},""])"}) {
    INFO(text);
    REQUIRE_NOTHROW(aet::check_message(Json::parse(text)));
  }
}

TEST_CASE("every shape violation is a protocol error with a clear message") {
  REQUIRE(check_error(R"({"do":1})") == "message is not an array but object");
  REQUIRE(check_error(R"("do")") == "message is not an array but string");
  REQUIRE(check_error("null").find("message is not an array") == 0);
  REQUIRE(check_error("[]") == "message is an empty array");
  REQUIRE(check_error("[1,{}]") == "message command is not a string but number");
  REQUIRE(check_error(R"(["xx",{}])") == "unknown command \"xx\"");
  REQUIRE(check_error(R"(["DO",{}])") == "unknown command \"DO\"");
  REQUIRE(check_error(R"(["",{}])") == "unknown command \"\"");
  REQUIRE(check_error("[\"" + std::string(100, 'z') + "\",{}]").find("...") != std::string::npos);
  REQUIRE(check_error(R"(["do"])") == "\"do\" message has no meta");
  REQUIRE(check_error(R"(["ok"])") == "\"ok\" message has no meta");
  REQUIRE(check_error(R"(["do",[]])") == "meta is not an object but array");
  REQUIRE(check_error(R"(["ok",null,1])") == "meta is not an object but null");
  REQUIRE(check_error(R"(["dn",{},1])") == "\"dn\" message has 3 elements, expected 2");
  REQUIRE(check_error(R"(["ok",{}])") == "\"ok\" message has 2 elements, expected 3");
  REQUIRE(check_error(R"(["ok",{},1,2])") == "\"ok\" message has 4 elements, expected 3");
  REQUIRE(check_error(R"(["er",{}])") == "\"er\" message has 2 elements, expected 3");
  REQUIRE(check_error(R"(["er",{},"a","b"])") == "\"er\" message has 4 elements, expected 3");
  REQUIRE(check_error(R"(["er",{},42])") == "\"er\" message is not a string but number");
  REQUIRE_THROWS_AS(aet::check_message(Json(1)), aet::Error);
}

TEST_CASE("messages decode the same in every chunking") {
  const std::vector<Json> messages = sample_messages();
  const std::string stream = encode_all(messages);
  for (std::size_t chunk : {std::size_t{1}, std::size_t{2}, std::size_t{3}, std::size_t{7}, std::size_t{64},
                            std::size_t{4096}, stream.size()}) {
    INFO("chunk size " << chunk);
    std::vector<Json> out = decode_in_chunks(stream, [chunk] { return chunk; });
    REQUIRE(out == messages);
  }
  std::mt19937 rng(12345);
  for (int round = 0; round < 20; ++round) {
    INFO("random round " << round);
    const std::size_t limit = round < 10 ? 16 : 70000;
    std::vector<Json> out =
        decode_in_chunks(stream, [&] { return std::uniform_int_distribution<std::size_t>(1, limit)(rng); });
    REQUIRE(out == messages);
  }
}

TEST_CASE("bytes read straight into the decoder decode as fed ones do") {
  const std::vector<Json> messages = sample_messages();
  const std::string stream = encode_all(messages);
  for (std::size_t at_least : {std::size_t{0}, std::size_t{1}, std::size_t{5}, std::size_t{65536}}) {
    for (std::size_t chunk : {std::size_t{1}, std::size_t{3}, std::size_t{64}, stream.size()}) {
      INFO("at least " << at_least << ", chunk " << chunk);
      REQUIRE(decode_in_place(stream, [chunk] { return chunk; }, at_least) == messages);
    }
  }
  std::mt19937 rng(777);
  for (int round = 0; round < 10; ++round) {
    auto size = [&] { return std::uniform_int_distribution<std::size_t>(1, 5000)(rng); };
    REQUIRE(decode_in_place(stream, size, 16) == messages);
  }
}

TEST_CASE("once a large frame's header is in, input_space holds all of its body") {
  const Json message{"ok", Json::object(), std::string(1 << 20, 'x')};
  const std::string frame = aet::encode_frame(message);
  FrameDecoder decoder;
  auto space = decoder.input_space(16);
  std::memcpy(space.first, frame.data(), 16);
  decoder.commit(16);
  space = decoder.input_space(0);
  REQUIRE(space.second >= frame.size() - 16);
  std::memcpy(space.first, frame.data() + 16, frame.size() - 16);
  decoder.commit(frame.size() - 16);
  auto got = decoder.next();
  REQUIRE(got.has_value());
  REQUIRE(*got == message);
  REQUIRE(decoder.buffered() == 0);
}

TEST_CASE("a bad header committed in place breaks the stream as a fed one does") {
  const std::string good = aet::encode_frame(Json{"ok", Json::object(), 1});
  const std::string bytes = good + header(5000) + "xx";
  FrameDecoder decoder(100);
  auto space = decoder.input_space(bytes.size());
  std::memcpy(space.first, bytes.data(), bytes.size());
  REQUIRE_NOTHROW(decoder.commit(bytes.size()));
  REQUIRE(decoder.buffered() == good.size());
  REQUIRE(decoder.next().has_value());
  const std::string message = "frame of 5000 bytes exceeds the limit of 100";
  REQUIRE(protocol_error([&] { decoder.next(); }) == message);
  REQUIRE(protocol_error([&] { decoder.input_space(); }) == message);
  REQUIRE(protocol_error([&] { decoder.commit(0); }) == message);

  FrameDecoder at_once(100);
  space = at_once.input_space(8);
  std::memcpy(space.first, header(0).data(), 4);
  REQUIRE(protocol_error([&] { at_once.commit(4); }) == "zero-length frame");
}

TEST_CASE("input_space without a minimum never moves a buffered frame") {
  const std::string frame = aet::encode_frame(Json{"ok", Json::object(), std::string(100000, 'x')});
  FrameDecoder decoder;
  decoder.feed(frame);
  const long before = aet_test::allocations;
  decoder.input_space(0);
  REQUIRE(aet_test::allocations == before);
  REQUIRE(decoder.buffered() == frame.size());
  REQUIRE(decoder.next().has_value());
}

TEST_CASE("the end of a large frame read in small pieces does not move what is buffered") {
  // The room asked for is capped by what the body still needs, so reading
  // its last bytes a few at a time never regrows (and copies) the frame.
  const std::string frame = aet::encode_frame(Json{"ok", Json::object(), std::string(1 << 20, 'x')});
  FrameDecoder decoder;
  decoder.feed(frame.data(), frame.size() - 1000);
  const long before = aet_test::allocations;
  for (std::size_t pos = frame.size() - 1000; pos < frame.size(); pos += 10) {
    const auto space = decoder.input_space();
    REQUIRE(space.second >= 10);
    std::memcpy(space.first, frame.data() + pos, 10);
    decoder.commit(10);
  }
  REQUIRE(aet_test::allocations == before);
  REQUIRE(decoder.next().has_value());
}

TEST_CASE("a copied decoder decodes on its own, a moved-from one starts empty") {
  const std::string good = aet::encode_frame(Json{"ok", Json::object(), "one"});
  FrameDecoder original;
  original.feed(good + good.substr(0, 7));
  FrameDecoder copy = original;
  copy.feed(good.substr(7));
  REQUIRE(copy.next() == Json{"ok", Json::object(), "one"});
  REQUIRE(copy.next() == Json{"ok", Json::object(), "one"});
  REQUIRE(original.buffered() == good.size() + 7);
  FrameDecoder moved = std::move(original);
  REQUIRE(moved.next().has_value());
  REQUIRE(moved.buffered() == 7);
  REQUIRE(original.buffered() == 0);
  REQUIRE_FALSE(original.next().has_value());
  original.feed(good);
  REQUIRE(original.next() == Json{"ok", Json::object(), "one"});
  const auto space = original.input_space(good.size());
  std::memcpy(space.first, good.data(), good.size());
  original.commit(good.size());
  REQUIRE(original.next() == Json{"ok", Json::object(), "one"});
}

TEST_CASE("committing more than input_space gave is refused") {
  FrameDecoder decoder;
  const auto space = decoder.input_space(8);
  REQUIRE_THROWS_AS(decoder.commit(space.second + 1), aet::Error);
  REQUIRE(decoder.buffered() == 0);
}

TEST_CASE("messages fed together come out one by one") {
  const std::vector<Json> messages = sample_messages();
  FrameDecoder decoder;
  decoder.feed(encode_all(messages));
  for (const Json& m : messages) {
    auto got = decoder.next();
    REQUIRE(got.has_value());
    REQUIRE(*got == m);
  }
  REQUIRE_FALSE(decoder.next().has_value());
  REQUIRE(decoder.buffered() == 0);
}

TEST_CASE("a truncated frame yields nothing yet and is counted as buffered") {
  const std::string frame = aet::encode_frame(Json{"ok", Json::object(), "a result"});
  FrameDecoder decoder;
  decoder.feed(frame.substr(0, 2));  // part of the header
  REQUIRE_FALSE(decoder.next().has_value());
  REQUIRE(decoder.buffered() == 2);
  decoder.feed(frame.substr(2, 8));  // the rest of the header and part of the body
  REQUIRE_FALSE(decoder.next().has_value());
  REQUIRE(decoder.buffered() == 10);
  decoder.feed(frame.substr(10, frame.size() - 11));  // all but the last byte
  REQUIRE_FALSE(decoder.next().has_value());
  REQUIRE(decoder.buffered() == frame.size() - 1);
  decoder.feed(frame.substr(frame.size() - 1));
  REQUIRE(decoder.buffered() == frame.size());
  auto m = decoder.next();
  REQUIRE(m.has_value());
  REQUIRE((*m)[2].as_string() == "a result");
  REQUIRE(decoder.buffered() == 0);
}

TEST_CASE("an oversize header is refused before its body arrives") {
  FrameDecoder decoder(1000);
  decoder.feed(header(1000).substr(0, 3));
  REQUIRE(decoder.buffered() == 3);
  std::string message = protocol_error([&] { decoder.feed(header(1001).substr(3)); });
  REQUIRE(message == "frame of 1001 bytes exceeds the limit of 1000");
  REQUIRE(decoder.buffered() == 0);  // nothing of it is kept
  // The stream is broken for good.
  REQUIRE(protocol_error([&] { decoder.feed("more"); }) == message);
  REQUIRE(protocol_error([&] { decoder.next(); }) == message);

  FrameDecoder limit_ok(1000);
  limit_ok.feed(header(1000));  // exactly the limit is fine
  REQUIRE_FALSE(limit_ok.next().has_value());
  REQUIRE(limit_ok.buffered() == 4);
}

TEST_CASE("the default frame limit is 64 MiB") {
  REQUIRE(aet::default_max_frame == 67108864u);
  FrameDecoder decoder;
  REQUIRE(protocol_error([&] { decoder.feed(header(70000000)); }) ==
          "frame of 70000000 bytes exceeds the limit of 67108864");
  FrameDecoder at_limit;
  REQUIRE_NOTHROW(at_limit.feed(header(67108864)));
}

TEST_CASE("messages before a bad header are still delivered, then the error") {
  const std::string good = aet::encode_frame(Json{"ok", Json::object(), 1});
  FrameDecoder decoder(100);
  REQUIRE_NOTHROW(decoder.feed(good));
  REQUIRE_FALSE(decoder.broken());
  REQUIRE_NOTHROW(decoder.feed(good + header(5000) + std::string(50, 'x')));
  REQUIRE(decoder.broken());
  REQUIRE(decoder.buffered() == 2 * good.size());
  REQUIRE(decoder.next().has_value());
  REQUIRE(decoder.next().has_value());
  REQUIRE(protocol_error([&] { decoder.next(); }) == "frame of 5000 bytes exceeds the limit of 100");
  REQUIRE(protocol_error([&] { decoder.next(); }) == "frame of 5000 bytes exceeds the limit of 100");
  REQUIRE(protocol_error([&] { decoder.feed(good); }) == "frame of 5000 bytes exceeds the limit of 100");
}

TEST_CASE("a zero-length frame is a protocol error") {
  FrameDecoder decoder;
  REQUIRE(protocol_error([&] { decoder.feed(header(0)); }) == "zero-length frame");
  REQUIRE(protocol_error([&] { decoder.next(); }) == "zero-length frame");

  FrameDecoder after_good;
  after_good.feed(aet::encode_frame(Json{"dn", Json::object()}) + header(0));
  REQUIRE(after_good.next().has_value());
  REQUIRE(protocol_error([&] { after_good.next(); }) == "zero-length frame");
}

TEST_CASE("a frame that is not JSON is a protocol error and the stream goes on") {
  const std::string good = aet::encode_frame(Json{"dn", Json::object()});
  for (const std::string& body : {std::string("not json"), std::string("[\"ok\",{},1"), std::string("[1,]"),
                                  std::string("\"\xff\""), std::string("[\"ok\",{},1] trailing"),
                                  std::string(" "), std::string("\0\0\0", 3)}) {
    INFO(body);
    FrameDecoder decoder;
    decoder.feed(raw_frame(body) + good);
    std::string message = protocol_error([&] { decoder.next(); });
    REQUIRE(message.find("bad JSON in frame: JSON parse error at line 1, column ") == 0);
    auto after = decoder.next();
    REQUIRE(after.has_value());
    REQUIRE((*after)[0].as_string() == "dn");
    REQUIRE(decoder.buffered() == 0);
  }
}

TEST_CASE("a frame with a bad shape is a protocol error and the stream goes on") {
  const std::string good = aet::encode_frame(Json{"ok", Json::object(), "fine"});
  for (const char* body : {R"({"do":{}})", R"(["xx",{}])", R"(["ok",{}])", R"(["er",{},1])", R"(["dn",[]])", "42"}) {
    INFO(body);
    FrameDecoder decoder;
    decoder.feed(raw_frame(body) + good);
    REQUIRE_THROWS_AS(decoder.next(), aet::ProtocolError);
    auto after = decoder.next();
    REQUIRE(after.has_value());
    REQUIRE((*after)[2].as_string() == "fine");
  }
  FrameDecoder decoder;
  decoder.feed(raw_frame(R"(["zz",{}])"));
  REQUIRE(protocol_error([&] { decoder.next(); }) == "unknown command \"zz\"");
}

TEST_CASE("the decoder applies its JSON nesting limit") {
  const std::string deep = aet::encode_frame(Json{"ok", Json::object(), Json::parse("[[[[[1]]]]]")});
  FrameDecoder strict(aet::default_max_frame, 4);
  strict.feed(deep);
  REQUIRE(protocol_error([&] { strict.next(); }).find("nesting deeper than 4 levels") != std::string::npos);
  FrameDecoder relaxed(aet::default_max_frame, 6);
  relaxed.feed(deep);
  REQUIRE(relaxed.next().has_value());
}

TEST_CASE("a large frame decodes from chunks") {
  Json payload = Json::array();
  for (int i = 0; i < 200000; ++i) payload.push_back("element " + std::to_string(i));
  const Json message{"ok", Json::object(), payload};
  const std::string frame = aet::encode_frame(message);
  REQUIRE(frame.size() > 3000000);
  FrameDecoder decoder;
  std::size_t pos = 0;
  while (pos + 65536 < frame.size()) {
    decoder.feed(frame.data() + pos, 65536);
    pos += 65536;
    REQUIRE_FALSE(decoder.next().has_value());
    REQUIRE(decoder.buffered() == pos);
  }
  decoder.feed(frame.data() + pos, frame.size() - pos);
  auto got = decoder.next();
  REQUIRE(got.has_value());
  REQUIRE(*got == message);
  REQUIRE(decoder.buffered() == 0);
}

TEST_CASE("a long stream of small messages keeps the buffer small") {
  std::string stream;
  const int count = 50000;
  for (int i = 0; i < count; ++i) aet::append_frame(stream, Json{"do", Json::object(), "m", i});
  FrameDecoder decoder;
  int seen = 0;
  std::size_t most_buffered = 0;
  for (std::size_t pos = 0; pos < stream.size(); pos += 5) {
    decoder.feed(stream.data() + pos, std::min<std::size_t>(5, stream.size() - pos));
    most_buffered = std::max(most_buffered, decoder.buffered());
    while (auto m = decoder.next()) {
      REQUIRE((*m)[3].as_int() == seen);
      ++seen;
    }
  }
  REQUIRE(seen == count);
  REQUIRE(most_buffered < 32);
  REQUIRE(decoder.buffered() == 0);

  // Undrained, the decoder holds exactly what it was given.
  FrameDecoder undrained;
  undrained.feed(stream.substr(0, 1000));
  REQUIRE(undrained.buffered() == 1000);
}
