// aet::Json: values, accessors, the strict parser and the printer.
#include <catch2/catch.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "allocation_counter.hpp"
#include "anyevent_task.hpp"

using aet::Json;

namespace {

// The message of the JsonParseError that parsing `text` throws, or "" when
// it parses.
std::string parse_error(const std::string& text, Json::ParseOptions options = {}) {
  try {
    Json::parse(text, options);
  } catch (const aet::JsonParseError& e) {
    return e.what();
  }
  return "";
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const aet::JsonError& e) {
    return e.what();
  }
  return "";
}

// parse(dump(v)) and parse(dump(2)) give back v, type for type.
void require_round_trip(const Json& v) {
  INFO(v.dump());
  Json compact = Json::parse(v.dump());
  REQUIRE(compact == v);
  REQUIRE(compact.type() == v.type());
  REQUIRE(compact.dump() == v.dump());
  Json pretty = Json::parse(v.dump(2));
  REQUIRE(pretty == v);
  REQUIRE(pretty.dump() == v.dump());
}

std::string nested(std::size_t depth, const std::string& open, const std::string& close,
                   const std::string& middle = "") {
  std::string s;
  for (std::size_t i = 0; i < depth; ++i) s += open;
  s += middle;
  for (std::size_t i = 0; i < depth; ++i) s += close;
  return s;
}

}  // namespace

TEST_CASE("a value is 16 bytes") { STATIC_REQUIRE(sizeof(Json) == 16); }

TEST_CASE("values are built from C++ values with the expected types") {
  CHECK(Json().is_null());
  CHECK(Json(nullptr).is_null());
  CHECK(Json(true).as_bool() == true);
  CHECK(Json(false).type() == Json::Type::Bool);
  CHECK(Json(42).as_int() == 42);
  CHECK(Json(static_cast<unsigned char>(200)).as_int() == 200);
  CHECK(Json(-7L).is_int());
  CHECK(Json(std::numeric_limits<std::int64_t>::min()).as_int() == std::numeric_limits<std::int64_t>::min());
  CHECK(Json(std::uint64_t{9223372036854775807u}).is_int());
  CHECK(Json(std::uint64_t{9223372036854775808u}).is_double());
  CHECK(Json(std::uint64_t{9223372036854775808u}).as_double() == 9223372036854775808.0);
  CHECK(Json(2.5).as_double() == 2.5);
  CHECK(Json(2.5f).is_double());
  CHECK(Json("text").as_string() == "text");
  CHECK(Json(std::string("s")).is_string());
  CHECK(Json(std::string_view("view")).as_string() == "view");
  CHECK(Json(Json::Array{1, 2}).size() == 2);
  CHECK(Json(Json::Object{{"k", 1}}).is_object());
  CHECK_THROWS_AS(Json(static_cast<const char*>(nullptr)), aet::JsonError);
}

TEST_CASE("braces always make an array and object() always an object") {
  Json a{1, 2, 3};
  REQUIRE(a.is_array());
  REQUIRE(a.size() == 3);

  // Two elements whose first is a string: still an array, not an object.
  Json pair{"key", 1};
  REQUIRE(pair.is_array());
  REQUIRE(pair.dump() == R"(["key",1])");

  // A list of pairs: an array of arrays.
  Json pairs{{"a", 1}, {"b", 2}};
  REQUIRE(pairs.dump() == R"([["a",1],["b",2]])");

  // A one-element array of a Json: Json::array({x}) on every compiler
  // (braces around a single Json copy it under Clang before 18).
  Json wrapped = Json::array({Json::object({{"a", 1}})});
  REQUIRE(wrapped.is_array());
  REQUIRE(wrapped.size() == 1);
  REQUIRE(wrapped[0].is_object());
  REQUIRE(Json::array({Json{1}}).dump() == "[[1]]");
  REQUIRE(Json::array({Json::array()}).dump() == "[[]]");
  REQUIRE(Json{Json::object(), Json::object()}.dump() == "[{},{}]");
  REQUIRE(Json{Json{1}, 2}.dump() == "[[1],2]");
  REQUIRE(Json{"one"}.dump() == R"(["one"])");
  REQUIRE(Json{1}.dump() == "[1]");

  Json empty_braces{};
  REQUIRE(empty_braces.is_null());
  REQUIRE(Json::array().dump() == "[]");
  REQUIRE(Json::object().dump() == "{}");
  REQUIRE(Json::array({1, "x"}).dump() == R"([1,"x"])");

  Json o = Json::object({{"a", 1}, {"b", {1, 2}}, {"c", Json::object({{"d", nullptr}})}});
  REQUIRE(o.is_object());
  REQUIRE(o.dump() == R"({"a":1,"b":[1,2],"c":{"d":null}})");

  // Copies are made with parentheses or `=`.
  Json copy(o);
  Json assigned = o;
  REQUIRE(copy == o);
  REQUIRE(assigned == o);
  REQUIRE(copy.is_object());
}

TEST_CASE("object() and Json(Object) reject a duplicate key") {
  std::string message = error_of([] { Json::object({{"a", 1}, {"b", 2}, {"a", 3}}); });
  REQUIRE(message.find("duplicate key \"a\"") != std::string::npos);
  Json::Object many;
  for (int i = 0; i < 40; ++i) many.emplace_back("k" + std::to_string(i), i);
  REQUIRE_NOTHROW(Json(many));
  many.emplace_back("k17", 0);
  REQUIRE_THROWS_AS(Json(many), aet::JsonError);
}

TEST_CASE("typed accessors name the expected and the actual type") {
  REQUIRE(error_of([] { Json(1).as_string(); }) == "expected string, got number");
  REQUIRE(error_of([] { Json(1.5).as_bool(); }) == "expected boolean, got number");
  REQUIRE(error_of([] { Json("x").as_int(); }) == "expected integer, got string");
  REQUIRE(error_of([] { Json().as_double(); }) == "expected number, got null");
  REQUIRE(error_of([] { Json::object().as_array(); }) == "expected array, got object");
  REQUIRE(error_of([] { Json::array().as_object(); }) == "expected object, got array");
  REQUIRE(error_of([] { Json(true).as_string(); }) == "expected string, got boolean");
  REQUIRE(error_of([] { Json(1.5).as_int(); }) == "expected integer, got number 1.5");
  REQUIRE(error_of([] { Json(1e300).as_int(); }).find("expected integer") == 0);
  // An integral double converts to int, an int to double.
  REQUIRE(Json(2.0).as_int() == 2);
  REQUIRE(Json(-3).as_double() == -3.0);
  // Errors derive from aet::Error.
  REQUIRE_THROWS_AS(Json(1).as_string(), aet::Error);
  REQUIRE(std::string(aet::to_string(Json::Type::Int)) == "number");
  REQUIRE(std::string(aet::to_string(Json::Type::Object)) == "object");
}

TEST_CASE("indexing, lookup and mutation of arrays and objects") {
  Json a{10, 20};
  REQUIRE(a[1].as_int() == 20);
  REQUIRE(error_of([&] { a[2]; }) == "index 2 out of range for an array of 2 elements");
  a[0] = "ten";
  REQUIRE(a.dump() == R"(["ten",20])");

  Json o = Json::object({{"name", "x"}});
  const Json& co = o;
  REQUIRE(co["name"].as_string() == "x");
  REQUIRE(error_of([&] { co["missing"]; }) == "missing key \"missing\"");
  REQUIRE(o.contains("name"));
  REQUIRE_FALSE(o.contains("nope"));
  REQUIRE(o.find("nope") == nullptr);
  REQUIRE(o.find("name")->as_string() == "x");
  REQUIRE(Json(1).find("name") == nullptr);
  REQUIRE(error_of([] { Json(1)["k"]; }) == "expected object, got number");
  REQUIRE(error_of([] { Json::object()[0]; }) == "expected array, got object");

  o["added"] = 5;  // inserts
  REQUIRE(o.size() == 2);
  REQUIRE(o.as_object().back().first == "added");
  o["added"] = 6;  // replaces
  REQUIRE(o.size() == 2);
  REQUIRE(o["added"].as_int() == 6);

  Json n;
  n["k"]["j"] = 1;  // null becomes an object
  REQUIRE(n.dump() == R"({"k":{"j":1}})");
  Json list;
  list.push_back(1);  // null becomes an array
  list.push_back("two");
  REQUIRE(list.dump() == R"([1,"two"])");
  REQUIRE_THROWS_AS(Json(1).push_back(2), aet::JsonError);

  REQUIRE(Json(5).size() == 0);
  REQUIRE(Json(5).empty());
  REQUIRE(Json::array().empty());
  REQUIRE_FALSE(Json{1}.empty());
}

TEST_CASE("assigning a value its own element works") {
  Json v = Json::parse(R"([[1, [2, "deep"]], 3])");
  v = std::move(v[0]);
  REQUIRE(v.dump() == R"([1,[2,"deep"]])");
  v = v[1];
  REQUIRE(v.dump() == R"([2,"deep"])");
  Json& self = v;
  v = self;
  REQUIRE(v.dump() == R"([2,"deep"])");
  Json moved = std::move(v);
  REQUIRE(v.is_null());
  REQUIRE(moved.size() == 2);
}

TEST_CASE("equality compares numbers by value and objects regardless of order") {
  REQUIRE(Json(1) == Json(1.0));
  REQUIRE(Json(1.0) == Json(1));
  REQUIRE(Json(1) != Json(1.5));
  REQUIRE(Json(std::numeric_limits<std::int64_t>::max()) != Json(9223372036854775807.0));
  REQUIRE(Json(0) == Json(-0.0));
  REQUIRE(Json("1") != Json(1));
  REQUIRE(Json() != Json(false));
  REQUIRE(Json::parse(R"({"a":1,"b":[true,null]})") == Json::parse(R"({"b":[true,null],"a":1})"));
  REQUIRE(Json::parse(R"({"a":1,"b":2})") != Json::parse(R"({"a":1,"c":2})"));
  REQUIRE(Json::parse(R"({"a":1})") != Json::parse(R"({"a":1,"b":2})"));
  REQUIRE(Json::parse("[1,2]") != Json::parse("[2,1]"));
  REQUIRE(Json{1, "a"} == Json::parse(R"([1.0, "a"])"));
}

TEST_CASE("integers that fit int64 stay integers, others become doubles") {
  Json max = Json::parse("9223372036854775807");
  REQUIRE(max.is_int());
  REQUIRE(max.as_int() == std::numeric_limits<std::int64_t>::max());
  Json min = Json::parse("-9223372036854775808");
  REQUIRE(min.is_int());
  REQUIRE(min.as_int() == std::numeric_limits<std::int64_t>::min());
  REQUIRE(Json::parse("9223372036854775808").is_double());
  REQUIRE(Json::parse("-9223372036854775809").is_double());
  REQUIRE(Json::parse("123456789012345678901234567890").as_double() == 123456789012345678901234567890.0);
  REQUIRE(Json::parse("0").is_int());
  REQUIRE(Json::parse("-0").is_int());
  REQUIRE(Json::parse("1.0").is_double());
  REQUIRE(Json::parse("1e2").is_double());
  REQUIRE(Json::parse("1E+2").as_double() == 100.0);
  REQUIRE(Json::parse("-1.5e-3").as_double() == -0.0015);
  require_round_trip(max);
  require_round_trip(min);
}

TEST_CASE("doubles round-trip exactly and stay doubles") {
  for (double d : {0.1, 1.0, -1.0, 100.0, 1e300, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                   0.30000000000000004, 123456789012345680.0, 1e16, 1e21, 1e-7, 3.14159, -2.5e-10,
                   9007199254740993.0, 0.5, 1234.5678}) {
    Json v(d);
    INFO(v.dump());
    Json back = Json::parse(v.dump());
    REQUIRE(back.is_double());
    REQUIRE(back.as_double() == d);
    require_round_trip(v);
  }
  REQUIRE(Json(0.1).dump() == "0.1");
  REQUIRE(Json(1.0).dump() == "1.0");
  REQUIRE(Json(100.0).dump() == "100.0");
  REQUIRE(Json(1e300).dump().find("e") != std::string::npos);
  REQUIRE(Json::parse("5e-324").as_double() == std::numeric_limits<double>::denorm_min());
}

TEST_CASE("negative zero keeps its sign") {
  Json z(-0.0);
  REQUIRE(z.dump() == "-0.0");
  Json back = Json::parse(z.dump());
  REQUIRE(back.is_double());
  REQUIRE(std::signbit(back.as_double()));
  REQUIRE(std::signbit(Json::parse("-0.0").as_double()));
  REQUIRE(std::signbit(Json::parse("-0e5").as_double()));
}

TEST_CASE("numbers too large for a double are refused, too small ones round to zero") {
  REQUIRE(parse_error("1e400").find("too large") != std::string::npos);
  REQUIRE(parse_error("-1e400").find("too large") != std::string::npos);
  REQUIRE(parse_error("[1" + std::string(400, '0') + "]").find("too large") != std::string::npos);
  REQUIRE(parse_error("1" + std::string(400, '0') + "e-10").find("too large") != std::string::npos);
  Json tiny = Json::parse("1e-400");
  REQUIRE(tiny.is_double());
  REQUIRE(tiny.as_double() == 0.0);
  REQUIRE(std::signbit(Json::parse("-1e-400").as_double()));
  REQUIRE(Json::parse("0." + std::string(400, '0') + "1").as_double() == 0.0);
}

TEST_CASE("NaN and infinities cannot be printed") {
  for (double d : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                   -std::numeric_limits<double>::infinity()}) {
    Json v{1, d};
    REQUIRE_THROWS_AS(v.dump(), aet::JsonError);
    std::string out = "prefix";
    REQUIRE_THROWS_AS(v.dump_to(out), aet::JsonError);
    REQUIRE(out == "prefix");  // left as it was
  }
  REQUIRE(error_of([] { Json(std::nan("")).dump(); }).find("finite") != std::string::npos);
}

TEST_CASE("strings decode every escape") {
  Json s = Json::parse(R"("q\" b\\ s\/ \b\f\n\r\t \u0041\u00e9\u20ac \u0000end")");
  REQUIRE(s.as_string() == std::string("q\" b\\ s/ \b\f\n\r\t A\xc3\xa9\xe2\x82\xac ") + '\0' + "end");
  require_round_trip(s);
}

TEST_CASE("astral characters work raw and as surrogate-pair escapes") {
  const std::string grin = "\xf0\x9f\x98\x80";  // U+1F600
  Json raw = Json::parse("\"" + grin + "\"");
  Json escaped = Json::parse(R"("\ud83d\ude00")");
  Json upper = Json::parse(R"("\uD83D\uDE00")");
  REQUIRE(raw.as_string() == grin);
  REQUIRE(escaped == raw);
  REQUIRE(upper == raw);
  REQUIRE(Json::parse(R"("\udbff\udfff")").as_string() == "\xf4\x8f\xbf\xbf");  // U+10FFFF
  REQUIRE(Json::parse(R"("\ud800\udc00")").as_string() == "\xf0\x90\x80\x80");  // U+10000
  REQUIRE(escaped.dump() == "\"" + grin + "\"");  // non-ASCII passes through
  require_round_trip(raw);
}

TEST_CASE("strings are printed with minimal escapes") {
  REQUIRE(Json("a\"b\\c/d").dump() == R"("a\"b\\c/d")");
  REQUIRE(Json("\n\t\r\b\f").dump() == R"("\n\t\r\b\f")");
  REQUIRE(Json(std::string("\x01\x1f", 2)).dump() == R"("\u0001\u001f")");
  REQUIRE(Json(std::string(1, '\0')).dump() == R"("\u0000")");
  REQUIRE(Json("\x7f").dump() == "\"\x7f\"");
  REQUIRE(Json("caf\xc3\xa9 \xe6\x97\xa5").dump() == "\"caf\xc3\xa9 \xe6\x97\xa5\"");
  std::string long_text(1000, 'x');
  long_text[500] = '\n';
  long_text += "\xe2\x82\xac\"";
  Json v(long_text);
  REQUIRE(Json::parse(v.dump()) == v);
  // Many escapes in a row grow the output correctly.
  std::string controls(300, '\x01');
  REQUIRE(Json(controls).dump().size() == 300 * 6 + 2);
  REQUIRE(Json::parse(Json(controls).dump()).as_string() == controls);
}

// The JSON text of s, byte by byte: what the printer's bulk paths must match.
std::string escaped_reference(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"') out += "\\\"";
    else if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\u%04x", c);
      out += hex;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

TEST_CASE("a byte to escape or check is found at every position of strings of every length") {
  // Strings are scanned 64, 16 and 8 bytes at a time: every offset of a
  // special byte against those blocks, and every tail length.
  const std::string specials[] = {"\"", "\\", "\n", std::string(1, '\x01'), std::string(1, '\0'), "\x7f",
                                  "\xc3\xa9", "\xe2\x82\xac", "\xf0\x9f\x98\x80"};
  for (std::size_t length = 1; length <= 150; ++length) {
    const std::string plain(length, 'a');
    REQUIRE(Json(plain).dump() == escaped_reference(plain));
    for (std::size_t at = 0; at < length; ++at) {
      for (const std::string& special : specials) {
        std::string text = plain;
        text.replace(at, 1, special);
        const std::string printed = Json(text).dump();
        if (printed != escaped_reference(text)) FAIL("length " << length << ", special at " << at);
        if (Json::parse(printed).as_string() != text) FAIL("read back: length " << length << ", at " << at);
      }
      std::string bad = plain;
      bad[at] = '\xff';
      if (error_of([&] { Json(bad).dump(); }).find("not UTF-8") == std::string::npos)
        FAIL("invalid UTF-8 printed: length " << length << ", at " << at);
      if (parse_error("\"" + bad + "\"").find("invalid UTF-8") == std::string::npos)
        FAIL("invalid UTF-8 parsed: length " << length << ", at " << at);
      std::string raw_control = plain;
      raw_control[at] = '\n';
      if (parse_error("\"" + raw_control + "\"").find("control character") == std::string::npos)
        FAIL("raw control character parsed: length " << length << ", at " << at);
    }
  }
}

TEST_CASE("every byte value is classified right wherever it falls in a string") {
  // The scanners test 64, 16 and 8 bytes at once with arithmetic on the
  // bytes: each of the 256 values, in each of those blocks and the tail.
  for (int value = 0; value < 256; ++value) {
    const char byte = static_cast<char>(value);
    for (std::size_t at : {3, 40, 70, 130, 145}) {
      std::string text(150, 'a');
      text[at] = byte;
      INFO("byte " << value << " at " << at);
      const std::string error = parse_error("\"" + text + "\"");
      if (value < 0x20) {
        REQUIRE(error.find("control character") != std::string::npos);
      } else if (byte == '"') {
        REQUIRE(error.find("after the JSON value") != std::string::npos);
      } else if (byte == '\\') {
        REQUIRE(error.find("invalid escape") != std::string::npos);
      } else if (value >= 0x80) {
        REQUIRE(error.find("invalid UTF-8") != std::string::npos);
        REQUIRE(error_of([&] { Json(text).dump(); }).find("not UTF-8") != std::string::npos);
      } else {
        REQUIRE(error.empty());
        REQUIRE(Json::parse("\"" + text + "\"").as_string() == text);
        REQUIRE(Json(text).dump() == "\"" + text + "\"");  // printed as it is
      }
      if (value < 0x80) REQUIRE(Json::parse(Json(text).dump()).as_string() == text);
    }
  }
}

TEST_CASE("a parsed string changed through as_string() is escaped when printed") {
  // The parser marks the strings it has checked as printable verbatim; a
  // change must drop the mark, on the value and never on a copy's original.
  Json v = Json::parse(R"(["plain", "caf\u00e9 \u65e5", "tab\there"])");
  REQUIRE(v.dump() == "[\"plain\",\"caf\xc3\xa9 \xe6\x97\xa5\",\"tab\\there\"]");
  Json copy = v[0];
  copy.as_string() = "q\"\n";
  REQUIRE(copy.dump() == R"("q\"\n")");
  REQUIRE(v[0].dump() == R"("plain")");
  std::string& text = v[0].as_string();
  REQUIRE(v.dump() == "[\"plain\",\"caf\xc3\xa9 \xe6\x97\xa5\",\"tab\\there\"]");
  text += '\\';
  text += '\xff';
  REQUIRE(error_of([&] { v.dump(); }).find("not UTF-8") != std::string::npos);
  text.pop_back();
  REQUIRE(v.dump() == "[\"plain\\\\\",\"caf\xc3\xa9 \xe6\x97\xa5\",\"tab\\there\"]");
  Json moved = std::move(v[1]);
  moved.as_string() += "\x01";
  REQUIRE(moved.dump() == "\"caf\xc3\xa9 \xe6\x97\xa5\\u0001\"");
}

TEST_CASE("long parsed strings are printed as read, wherever they fall in the output") {
  for (std::size_t length : {4096u, 4097u, 5000u, 70000u}) {
    const std::string a(length, 'a'), b(length * 2, 'b');
    const std::string text = "[1,\"" + a + "\",{\"k\":\"" + b + "\",\"e\":\"\\n\"},2.5,\"" + a + "\"]";
    const Json v = Json::parse(text);
    REQUIRE(v.dump() == text);
    std::string out = "prefix ";
    v.dump_to(out);
    REQUIRE(out == "prefix " + text);
    REQUIRE(Json::parse(v.dump(2)) == v);
  }
}

TEST_CASE("a long parsed string printed into a buffer with room for it allocates nothing") {
  const Json v = Json::parse("[\"" + std::string(1 << 20, 'v') + "\"]");
  std::string out;
  out.reserve(3u << 20);
  const long before = aet_test::allocations;
  v.dump_to(out);
  REQUIRE(aet_test::allocations == before);
  REQUIRE(out.size() == (1u << 20) + 4);
  v.dump_to(out);  // and again, after what is there
  REQUIRE(aet_test::allocations == before);
  REQUIRE(out == v.dump() + v.dump());
}

TEST_CASE("printing a string that is not UTF-8 is an error") {
  for (const char* bad : {"\xff", "a\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\x80"}) {
    INFO(bad);
    REQUIRE_THROWS_AS(Json(bad).dump(), aet::JsonError);
    REQUIRE_THROWS_AS(Json::object({{bad, 1}}).dump(), aet::JsonError);
  }
  REQUIRE(error_of([] { Json("ok \xff").dump(); }).find("not UTF-8") != std::string::npos);
}

TEST_CASE("valid documents of every kind are accepted and round-trip") {
  const std::vector<std::string> documents = {
      "null", "true", "false", "0", "-0", "1", "-1", "0.5", "-0.5e-2", "1E10", "1e+1", "1e-1", "123.456e78",
      R"("")", R"("plain")", "[]", "{}", "[[]]", "[{}]", R"({"":0})", R"({"a":{}})", " \t\r\n[ 1 , 2 ]\n ",
      R"([null,true,false,0,1.5,"s",[],{}])", R"({"a":[1,{"b":[null]}],"c":"d"})", R"("\u007f")",
      "\"\x7f\"", R"(["\u0001", "\/", "\\"])", "\"\xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf\"",
      R"({"key with spaces":"value","k\"q":1})", "[1,[2,[3,[4,[5]]]]]", "[-9223372036854775808,9223372036854775807]",
      "1.7976931348623157e308", "[0.1,0.2,0.30000000000000004]", R"({"a":1,"A":2})"};
  for (const std::string& text : documents) {
    INFO(text);
    Json v;
    REQUIRE_NOTHROW(v = Json::parse(text));
    require_round_trip(v);
  }
}

TEST_CASE("malformed documents are rejected with a reason") {
  struct Case {
    std::string text;
    std::string reason;
  };
  const std::vector<Case> cases = {
      // empty input and structure
      {"", "empty input"},
      {"   ", "expected a JSON value"},
      {"[1,]", "trailing comma before ']'"},
      {R"({"a":1,})", "trailing comma before '}'"},
      {"[1 2]", "expected ',' or ']'"},
      {R"({"a":1 "b":2})", "expected ',' or '}'"},
      {"[,1]", "expected a value"},
      {"[1,,2]", "expected a value"},
      {"[1", "expected ',' or ']', got end of input"},
      {"[", "expected a value, got end of input"},
      {R"({"a":1)", "expected ',' or '}', got end of input"},
      {R"({"a")", "expected ':'"},
      {R"({"a" 1})", "expected ':'"},
      {R"({"a":})", "expected a value"},
      {"{1:2}", "expected a string key"},
      {"{'a':1}", "expected a string key"},
      {"[}", "expected a value"},
      {R"({"a":1])", "expected ',' or '}'"},
      {"]", "expected a value"},
      // trailing garbage
      {"[1]x", "after the JSON value"},
      {"1 2", "after the JSON value"},
      {"{}}", "after the JSON value"},
      {std::string("1\0", 2), "after the JSON value"},
      {"\xef\xbb\xbf[]", "expected a value"},  // a byte-order mark is not JSON
      // numbers
      {"01", "leading zeros"},
      {"-01", "leading zeros"},
      {"00", "leading zeros"},
      {"-", "expected a digit after '-'"},
      {"-a", "expected a digit after '-'"},
      {"1.", "expected a digit after the decimal point"},
      {"1.e3", "expected a digit after the decimal point"},
      {".5", "expected a value"},
      {"+1", "expected a value"},
      {"1e", "expected a digit in the exponent"},
      {"1e+", "expected a digit in the exponent"},
      {"0x10", "after the JSON value"},
      {"NaN", "NaN and Infinity are not JSON"},
      {"Infinity", "NaN and Infinity are not JSON"},
      {"-Infinity", "expected a digit after '-'"},
      {"nan", "expected 'null'"},
      {"1e400", "too large"},
      // literals
      {"tru", "expected 'true'"},
      {"True", "expected a value"},
      {"nul", "expected 'null'"},
      {"fals", "expected 'false'"},
      {"falsey", "after the JSON value"},
      // strings: escapes
      {R"("\x")", "invalid escape \\x"},
      {R"("\'")", "invalid escape \\'"},
      {R"("\u12")", "\\u escape"},
      {R"("\u12G4")", "expected four hex digits"},
      {R"("\)", "unterminated string"},
      {R"("abc)", "unterminated string"},
      {R"(")", "unterminated string"},
      // strings: surrogates in escapes
      {R"("\ud800")", "lone high surrogate"},
      {R"("\ud800x")", "lone high surrogate"},
      {R"("\ud800\u0041")", "invalid surrogate pair"},
      {R"("\ud800\ud800")", "invalid surrogate pair"},
      {R"("\udc00")", "lone low surrogate"},
      {R"("\udc00\ud800")", "lone low surrogate"},  // reversed pair
      {R"("\udfff")", "lone low surrogate"},
      // strings: raw control characters
      {"\"a\x01\"", "control character U+0001"},
      {"\"a\nb\"", "control character U+000A"},
      {"\"a\tb\"", "control character U+0009"},
      {std::string("\"a\0b\"", 5), "control character U+0000"},
      // strings: UTF-8
      {"\"\xff\"", "invalid UTF-8"},
      {"\"\xfe\"", "invalid UTF-8"},
      {"\"\xf5\x80\x80\x80\"", "invalid UTF-8"},
      {"\"\x80\"", "unexpected continuation byte"},
      {"\"\xbf\"", "unexpected continuation byte"},
      {"\"\xc0\xaf\"", "overlong"},
      {"\"\xc1\xbf\"", "overlong"},
      {"\"\xe0\x80\xaf\"", "overlong"},
      {"\"\xe0\x9f\xbf\"", "overlong"},
      {"\"\xf0\x80\x80\xaf\"", "overlong"},
      {"\"\xf0\x8f\xbf\xbf\"", "overlong"},
      {"\"\xed\xa0\x80\"", "surrogate"},
      {"\"\xed\xbf\xbf\"", "surrogate"},
      {"\"\xf4\x90\x80\x80\"", "above U+10FFFF"},
      {"\"\xc3\"", "truncated"},
      {"\"\xe2\x82\"", "truncated"},
      {"\"\xf0\x9f\x98\"", "truncated"},
      {"\"\xe2\x82", "truncated"},
      {"\"\xc3x\"", "truncated"},
      {"\xc3\xa9", "expected a value"},
      // duplicate keys
      {R"({"a":1,"a":2})", "duplicate key \"a\""},
      {R"({"a":{"b":1,"b":1}})", "duplicate key \"b\""},
      {R"({"x":1,"y":2,"x":{}})", "duplicate key \"x\""},
  };
  for (const Case& c : cases) {
    INFO("document: " << c.text);
    std::string message = parse_error(c.text);
    INFO("message: " << message);
    REQUIRE(message.find("JSON parse error at line ") == 0);
    REQUIRE(message.find(c.reason) != std::string::npos);
  }
}

TEST_CASE("a duplicate key is found in a large object too") {
  std::string text = "{";
  for (int i = 0; i < 100; ++i) text += "\"key" + std::to_string(i) + "\":" + std::to_string(i) + ",";
  REQUIRE(Json::parse(text + "\"last\":0}").size() == 101);
  text += "\"key42\":0}";
  try {
    Json::parse(text);
    FAIL("accepted a duplicate key");
  } catch (const aet::JsonParseError& e) {
    REQUIRE(std::string(e.what()).find("duplicate key \"key42\"") != std::string::npos);
    REQUIRE(e.offset() == text.rfind("\"key42\""));
  }
}

TEST_CASE("parse errors give the byte offset, line and column") {
  const std::string text = "[\n  1,\n  2 3]";
  try {
    Json::parse(text);
    FAIL("accepted");
  } catch (const aet::JsonParseError& e) {
    REQUIRE(e.line() == 3);
    REQUIRE(e.column() == 5);
    REQUIRE(e.offset() == 11);
    REQUIRE(text[e.offset()] == '3');
    REQUIRE(std::string(e.what()) == "JSON parse error at line 3, column 5 (byte 11): expected ',' or ']', got '3'");
    REQUIRE(e.reason() == "expected ',' or ']', got '3'");
  }
  // Columns count characters, not bytes.
  try {
    Json::parse("[\"\xc3\xa9\xc3\xa9\", x]");
    FAIL("accepted");
  } catch (const aet::JsonParseError& e) {
    REQUIRE(e.line() == 1);
    REQUIRE(e.column() == 8);
    REQUIRE(e.offset() == 9);
  }
  REQUIRE(parse_error("{\n\"a\": 1,\n\"b\": tru\n}").find("line 3, column 6") != std::string::npos);
  REQUIRE_THROWS_AS(Json::parse("x"), aet::JsonError);  // JsonParseError is a JsonError
}

TEST_CASE("nesting is limited to 512 levels by default") {
  REQUIRE(Json::ParseOptions{}.max_depth == AET_DEFAULT_MAX_DEPTH);
  REQUIRE(AET_DEFAULT_MAX_DEPTH == 512);
  REQUIRE_NOTHROW(Json::parse(nested(512, "[", "]")));
  REQUIRE(parse_error(nested(513, "[", "]")).find("nesting deeper than 512 levels") != std::string::npos);
  REQUIRE_NOTHROW(Json::parse(nested(512, "{\"a\":", "}", "1")));
  REQUIRE(parse_error(nested(513, "{\"a\":", "}", "1")).find("nesting deeper") != std::string::npos);
  REQUIRE(parse_error("[" + nested(512, "{\"a\":", "}", "1") + "]").find("nesting deeper") != std::string::npos);
}

TEST_CASE("the nesting limit can be set") {
  Json::ParseOptions three;
  three.max_depth = 3;
  REQUIRE_NOTHROW(Json::parse("[[[1]]]", three));
  REQUIRE_NOTHROW(Json::parse("[[{}],[[]]]", three));
  std::string message = parse_error("[[[[1]]]]", three);
  REQUIRE(message.find("nesting deeper than 3 levels") != std::string::npos);
  REQUIRE(message.find("(byte 3)") != std::string::npos);
  Json::ParseOptions none;
  none.max_depth = 0;
  REQUIRE(Json::parse("\"scalar\"", none).is_string());
  REQUIRE(parse_error("[]", none).find("nesting deeper than 0 levels") != std::string::npos);
  Json::ParseOptions deep;
  deep.max_depth = 5000;
  REQUIRE(Json::parse(nested(5000, "[", "]"), deep).is_array());
}

TEST_CASE("100000 nested brackets are rejected without a crash") {
  REQUIRE(parse_error(std::string(100000, '[')).find("nesting deeper") != std::string::npos);
  REQUIRE(parse_error(nested(100000, "[", "]")).find("nesting deeper") != std::string::npos);
  std::string objects;
  for (int i = 0; i < 100000; ++i) objects += "{\"a\":";
  REQUIRE(parse_error(objects).find("nesting deeper") != std::string::npos);
}

TEST_CASE("pretty printing puts members on their own lines") {
  Json v = Json::parse(R"({"a":1,"b":[true,{"c":null}],"e":[],"f":{}})");
  REQUIRE(v.dump(2) ==
          "{\n"
          "  \"a\": 1,\n"
          "  \"b\": [\n"
          "    true,\n"
          "    {\n"
          "      \"c\": null\n"
          "    }\n"
          "  ],\n"
          "  \"e\": [],\n"
          "  \"f\": {}\n"
          "}");
  REQUIRE(Json{1, 2}.dump(0) == "[\n1,\n2\n]");
  REQUIRE(Json(5).dump(4) == "5");
  REQUIRE(v.dump(-1) == R"({"a":1,"b":[true,{"c":null}],"e":[],"f":{}})");
}

TEST_CASE("dump_to appends to what is already there") {
  std::string out = "head:";
  Json{1, "two"}.dump_to(out);
  REQUIRE(out == R"(head:[1,"two"])");
}

TEST_CASE("a large generated document round-trips") {
  Json doc = Json::array();
  for (int i = 0; i < 2000; ++i) {
    doc.push_back(Json::object({{"id", i},
                                {"big", std::int64_t{1} << 62 | i},
                                {"score", i / 7.0},
                                {"name", "n\xc3\xa9\"" + std::to_string(i) + "\\\n\xf0\x9f\x98\x80"},
                                {"tags", {"a", i % 2 == 0, nullptr}},
                                {"nested", Json::object({{"deep", {{i, -i * 1.5e-300}}}})}}));
  }
  std::string text = doc.dump();
  Json back = Json::parse(text);
  REQUIRE(back == doc);
  REQUIRE(back.dump() == text);
  REQUIRE(Json::parse(doc.dump(3)) == doc);
  REQUIRE(back[1999]["big"].as_int() == (std::int64_t{1} << 62 | 1999));
}

TEST_CASE("containers whose sizes change from one to the next parse and print right") {
  // The parser sizes a container's block from the last two non-empty ones
  // of its kind at its depth: sizes that repeat, shrink, grow past the
  // guess or exceed what it reserves, with empty ones between (which are
  // not counted), mixed with the other kind, and deeper than it keeps
  // sizes for.
  std::mt19937 rng(7);
  const std::size_t sizes[] = {2, 2, 2, 1, 3, 3, 0, 5, 5, 4, 40, 40, 33, 32, 32, 1, 2, 2};
  auto container = [&](std::size_t n, bool object, const std::string& element) {
    std::string s = object ? "{" : "[";
    for (std::size_t i = 0; i < n; ++i) {
      if (i) s += ',';
      if (object) s += "\"k" + std::to_string(i) + "\":";
      s += rng() % 3 == 0 ? "\"a string of some length " + std::to_string(rng()) + "\"" : element;
    }
    return s + (object ? "}" : "]");
  };
  std::string text = "[";
  for (std::size_t round = 0; round < 3; ++round)
    for (std::size_t n : sizes)
      for (bool object : {false, true}) {
        if (text.size() > 1) text += ',';
        text += container(n, object, container(sizes[(n + round) % 18], !object, std::to_string(n)));
      }
  text += "," + nested(40, "[[1,2],", "]", "3") + "," + nested(40, "{\"a\":{\"b\":1},\"c\":", "}", "[4,5]");
  text += "]";
  const Json doc = Json::parse(text);
  REQUIRE(doc.dump() == text);
  REQUIRE(doc[7].size() == sizes[3]);
  REQUIRE(doc[21].size() == sizes[10]);
  for (const Json& part : doc.as_array()) REQUIRE(Json(part) == part);
}

TEST_CASE("a document of records is laid out in the order a walk reads it") {
  // Each container's block comes before its elements' blocks, once the
  // parser has seen two records: a walk then runs forward through memory.
  // Where a record spans two slabs, their order is the allocator's, so
  // nearly all records are asked to be in order, not every one (before,
  // none was).
  std::string text = "[";
  for (int i = 0; i < 1000; ++i) text += R"({"id":1,"tags":["a","b"],"more":{"x":[1,2]}},)";
  text += "0]";
  const Json doc = Json::parse(text);
  auto address = [](const auto& container) { return reinterpret_cast<std::uintptr_t>(container.data()); };
  int in_order = 0;
  for (std::size_t i = 2; i < 1000; ++i) {
    const Json& record = doc[i];
    in_order += address(record.as_object()) < address(record["tags"].as_array()) &&
                address(record["tags"].as_array()) < address(record["more"].as_object()) &&
                address(record["more"].as_object()) < address(record["more"]["x"].as_array());
  }
  REQUIRE(in_order >= 950);
}

TEST_CASE("arrays and objects have the interface of std::vector") {
  Json::Array a;
  REQUIRE(a.empty());
  REQUIRE(a.size() == 0);
  REQUIRE(a.begin() == a.end());
  a.push_back(1);
  a.emplace_back("two");
  a.push_back(Json{3});
  REQUIRE(a.size() == 3);
  REQUIRE(a.front() == Json(1));
  REQUIRE(a.back() == Json{3});
  REQUIRE(a.at(1).as_string() == "two");
  REQUIRE_THROWS_AS(a.at(3), std::out_of_range);
  // Growing while the argument is one of the elements.
  for (int i = 0; i < 100; ++i) a.push_back(a[1]);
  REQUIRE(a.size() == 103);
  REQUIRE(a[102].as_string() == "two");
  a.insert(a.begin(), a[1]);
  REQUIRE(a[0].as_string() == "two");
  REQUIRE(a[1] == Json(1));
  a.erase(a.begin() + 3, a.end());
  REQUIRE(Json(a).dump() == R"(["two",1,"two"])");
  a.insert(a.begin() + 1, {Json(5), Json(6)});
  REQUIRE(Json(a).dump() == R"(["two",5,6,1,"two"])");
  a.erase(a.begin());
  a.pop_back();
  REQUIRE(Json(a).dump() == "[5,6,1]");
  std::stable_sort(a.begin(), a.end(), [](const Json& x, const Json& y) { return x.as_int() < y.as_int(); });
  REQUIRE(Json(a).dump() == "[1,5,6]");
  REQUIRE(a.rbegin()->as_int() == 6);
  REQUIRE((a.rbegin() + 1)->as_int() == 5);
  a.resize(5);
  REQUIRE(a[4].is_null());
  a.resize(6, Json("x"));
  REQUIRE(a[5].as_string() == "x");
  a.resize(2);
  REQUIRE(Json(a).dump() == "[1,5]");
  a.reserve(100);
  REQUIRE(a.capacity() >= 100);
  a.shrink_to_fit();
  REQUIRE(a.capacity() == 2);
  Json::Array copy = a;
  REQUIRE(copy == a);
  copy[0] = 9;
  REQUIRE(copy != a);
  Json::Array moved = std::move(copy);
  REQUIRE(copy.empty());
  REQUIRE(moved[0] == Json(9));
  moved = a;
  REQUIRE(moved == a);
  moved = {Json(1), Json(2), Json(3)};
  REQUIRE(moved.size() == 3);
  moved.clear();
  REQUIRE(moved.empty());
  Json::Array filled(3, Json("f"));
  REQUIRE(Json(filled).dump() == R"(["f","f","f"])");
  Json::Array sized(2);
  REQUIRE(sized[1].is_null());
  std::vector<Json> source{Json(1), Json(2)};
  Json::Array from_range(source.begin(), source.end());
  REQUIRE(from_range.size() == 2);

  Json::Object o;
  o.emplace_back("a", 1);
  o.push_back({"b", Json{true}});
  REQUIRE(o.size() == 2);
  REQUIRE(o[1].first == "b");
  Json obj(o);
  REQUIRE(obj.dump() == R"({"a":1,"b":[true]})");
  obj.as_object().erase(obj.as_object().begin());
  REQUIRE(obj.dump() == R"({"b":[true]})");
}

TEST_CASE("values taken from a parsed document outlive it") {
  std::string text = "[";
  for (int i = 0; i < 5000; ++i) text += R"({"s":"a string that is longer than sixteen bytes )" + std::to_string(i) + R"(","a":[1,2,{"k":"v"}],"t":"short"},)";
  text += "null]";
  Json kept_string, kept_array, kept_short;
  Json copy;
  {
    Json doc = Json::parse(text);
    kept_string = std::move(doc[10]["s"]);
    kept_array = std::move(doc[20]["a"]);
    kept_short = doc[30]["t"];
    copy = doc[40];
  }
  REQUIRE(kept_string.as_string() == "a string that is longer than sixteen bytes 10");
  REQUIRE(kept_array.dump() == R"([1,2,{"k":"v"}])");
  REQUIRE(kept_short.as_string() == "short");
  REQUIRE(copy["a"][2]["k"].as_string() == "v");
  // A parsed array still grows and shrinks like any other.
  Json parsed = Json::parse("[1,2,3]");
  for (int i = 0; i < 1000; ++i) parsed.push_back(i);
  parsed.as_array().erase(parsed.as_array().begin(), parsed.as_array().begin() + 500);
  parsed.as_array().shrink_to_fit();
  REQUIRE(parsed.size() == 503);
  Json strings = Json::parse(R"(["x","y"])");
  strings[0].as_string() += std::string(100, 'z');
  REQUIRE(strings[0].as_string().size() == 101);
}

TEST_CASE("a parsed document can be destroyed by another thread") {
  std::vector<Json> documents;
  for (int i = 0; i < 8; ++i) documents.push_back(Json::parse(R"([{"a":"b","c":[1,2,3]},"text",[[]]])"));
  Json part = std::move(documents[0][0]);
  std::thread other([moved = std::move(documents)]() mutable { moved.clear(); });
  other.join();
  REQUIRE(part.dump() == R"({"a":"b","c":[1,2,3]})");
}

TEST_CASE("a parse that fails half way frees what it built") {
  std::string text = "[";
  for (int i = 0; i < 20000; ++i) text += R"({"k":["v",1,{"x":"yyyyyyyyyyyyyyyyyyyyyy"}]},)";
  REQUIRE(parse_error(text + "]").find("trailing comma") != std::string::npos);
  REQUIRE(parse_error(text + "{\"k\":1,\"k\":2}]").find("duplicate key") != std::string::npos);
  REQUIRE(Json::parse(text + "0]").size() == 20001);
}

TEST_CASE("a failed parse leaves nothing behind for the next parse on its thread") {
  const std::string good = R"([{"a":[1,{"b":"c"}],"d":"e"},[2,[3]],"f"])";
  const Json expected = Json::parse(good);
  for (const std::string& bad : {std::string(R"([{"a":[1,{"b":"c"}],"d":)"), std::string(R"([[1,2],{"k":[3,)"),
                                 std::string(R"({"x":1,"x":2})")}) {
    INFO(bad);
    REQUIRE_FALSE(parse_error(bad).empty());
    REQUIRE(Json::parse(good) == expected);
    REQUIRE(Json::parse(good).dump() == good);
  }
}

namespace {
std::string parsed_at_thread_exit;
struct ParsesWhenDestroyed {
  ~ParsesWhenDestroyed() { parsed_at_thread_exit = Json::parse(R"([1,{"a":[2,"three"]},[[4]]])").dump(); }
};
}  // namespace

TEST_CASE("a parse in a thread_local's destructor, after the parser's own stacks are gone, works") {
  std::size_t parsed_in_thread = 0;
  std::thread thread([&] {
    // Made before the thread's first parse, so destroyed after the
    // parser's stacks at the thread's end.
    thread_local ParsesWhenDestroyed guard;
    (void)guard;
    parsed_in_thread = Json::parse("[1,2,3]").size();
  });
  thread.join();
  REQUIRE(parsed_in_thread == 3);
  REQUIRE(parsed_at_thread_exit == R"([1,{"a":[2,"three"]},[[4]]])");
}

TEST_CASE("a small document parses with one allocation, after a large one too") {
  const std::string small = R"(["ok",{"ld":{"pid":7}},["hello world",1,2.5]])";
  REQUIRE(Json::parse(small).dump() == small);  // the thread's stacks are in use from here on
  std::string large = "[";
  for (int i = 0; i < 5000; ++i) large += R"({"k":[1,2],"v":"w"},)";
  large += "0]";
  for (int round = 0; round < 2; ++round) {
    const long before = aet_test::allocations;
    const Json parsed = Json::parse(small);
    REQUIRE(aet_test::allocations - before == 1);  // the slab its values live in
    REQUIRE(parsed.dump() == small);
    REQUIRE(Json::parse(large).size() == 5001);  // grows the stacks, which are then given back
  }
}

TEST_CASE("doubles print as the shortest text that reads back exactly") {
  // Significant digits of a number's text, without leading or trailing zeros.
  auto significant = [](const std::string& text) {
    std::string digits;
    for (char c : text.substr(0, text.find_first_of("eE")))
      if (c >= '0' && c <= '9') digits += c;
    const std::size_t first = digits.find_first_not_of('0');
    if (first == std::string::npos) return std::size_t{0};
    return digits.find_last_not_of('0') - first + 1;
  };
  std::mt19937_64 rng(2024);
  for (int i = 0; i < 200000; ++i) {
    double d;
    switch (i % 4) {
      case 0: {  // any bit pattern
        const std::uint64_t bits = rng();
        std::memcpy(&d, &bits, sizeof d);
        if (!std::isfinite(d)) continue;
        break;
      }
      case 1:  // binary fractions, powers of two among them
        d = static_cast<double>(rng() % 100000000) / static_cast<double>(std::uint64_t{1} << (rng() % 40));
        break;
      case 2: {  // short decimals of every size
        char text[64];
        std::snprintf(text, sizeof text, "%.*g", static_cast<int>(1 + rng() % 17),
                      std::ldexp(static_cast<double>(rng() % 1000000007), static_cast<int>(rng() % 120) - 80));
        d = std::strtod(text, nullptr);
        break;
      }
      default:
        d = static_cast<double>(rng() % 100000) / 977.0;
    }
    if (rng() % 2) d = -d;
    const std::string text = Json(d).dump();
    char reference[64];
    const std::string shortest(reference, std::to_chars(reference, reference + sizeof reference, d).ptr);
    INFO(text << " vs " << shortest);
    const Json back = Json::parse(text);
    REQUIRE(back.is_double());
    REQUIRE(back.as_double() == d);
    REQUIRE(std::signbit(back.as_double()) == std::signbit(d));
    REQUIRE(significant(text) == significant(shortest));
  }
}

TEST_CASE("decimal literals parse to the nearest double") {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 100000; ++i) {
    char text[64];
    if (i % 2)
      std::snprintf(text, sizeof text, "%llu.%0*llue%d", static_cast<unsigned long long>(rng() % 100000),
                    static_cast<int>(rng() % 12), static_cast<unsigned long long>(rng() % 1000000),
                    static_cast<int>(rng() % 60) - 30);
    else
      std::snprintf(text, sizeof text, "%.*g", static_cast<int>(1 + rng() % 17),
                    std::ldexp(static_cast<double>(rng()), static_cast<int>(rng() % 200) - 100));
    double expected = 0;
    std::from_chars(text, text + std::strlen(text), expected);
    INFO(text);
    REQUIRE(Json::parse(text).as_double() == expected);
  }
}

TEST_CASE("set copies its value before inserting, so a member can be copied to new keys") {
  const std::string text = "a long string value that is not small, so it lives on the heap";
  Json j = Json::object({{"a", text}});
  // j["k"] = j["a"] would copy from the storage the insertion just freed.
  for (int i = 0; i < 64; ++i) j.set("k" + std::to_string(i), j["a"]);
  REQUIRE(j.size() == 65);
  for (int i = 0; i < 64; ++i) REQUIRE(j["k" + std::to_string(i)].as_string() == text);
  REQUIRE(j.as_object()[64].first == "k63");
}

TEST_CASE("set replaces a member in place, turns null into an object and refuses other types") {
  Json j = Json::object({{"a", 1}, {"b", 2}});
  Json& stored = j.set("a", Json::array({j["b"], j["a"]}));
  REQUIRE(&stored == &j.as_object()[0].second);
  REQUIRE(j.dump() == R"({"a":[2,1],"b":2})");
  j.set("a", j["a"][0]);  // a value taken from inside the member it replaces
  REQUIRE(j.dump() == R"({"a":2,"b":2})");
  Json n;
  n.set("x", true);
  REQUIRE(n.dump() == R"({"x":true})");
  Json s = "text";
  REQUIRE(error_of([&] { s.set("x", 1); }) == "expected object, got string");
}

TEST_CASE("an element appended from the same array survives the growth it causes") {
  const std::string text = "a long string value that is not small, so it lives on the heap";
  Json j = Json::array({text});
  for (int i = 0; i < 40; ++i) j.push_back(j[0]);
  Json::Array a(1, Json(text));
  for (int i = 0; i < 40; ++i) {
    a.push_back(a[0]);
    a.emplace_back(a.back());
    a.insert(a.begin(), a.back());
  }
  REQUIRE(j.size() == 41);
  REQUIRE(a.size() == 121);
  for (const Json& v : j.as_array()) REQUIRE(v.as_string() == text);
  for (const Json& v : a) REQUIRE(v.as_string() == text);
}

TEST_CASE("a large first element does not make dump reserve far more than it writes") {
  Json inner = Json::array({std::string(3u << 20, 'z')});
  for (int i = 0; i < 15; ++i) inner.push_back(i);
  Json doc = Json::array({std::string(8u << 20, 'x'), 1, std::string(100, 'y'), inner});
  std::string out;
  doc.dump_to(out);
  REQUIRE(out.size() == (8u << 20) + (3u << 20) + 100 + 49);
  REQUIRE(out.capacity() <= 2 * out.size());
}

// The first element of this long array grows the output buffer while it is
// written; sizing the rest from it must measure within one buffer (the
// ASan build with -fsanitize=pointer-subtract and
// ASAN_OPTIONS=detect_invalid_pointer_pairs=2 checks that).
TEST_CASE("a long array whose first element outgrows the output buffer is sized and printed right") {
  for (std::size_t first : {200u, 300u, 5000u}) {
    Json doc = Json::array({std::string(first, 's')});
    for (int i = 0; i < 100; ++i) doc.push_back(std::string(first, 't'));
    std::string out;
    doc.dump_to(out);
    REQUIRE(out.size() == 101 * (first + 3) + 1);
    REQUIRE(out.capacity() <= 2 * out.size());
    REQUIRE(Json::parse(out) == doc);
  }
}

TEST_CASE("fractions longer than 19 digits parse to the nearest double") {
  std::mt19937_64 rng(11);
  for (int i = 0; i < 20000; ++i) {
    std::string number = std::to_string(rng() % 1000) + ".";
    const std::size_t digits = 1 + rng() % 48;
    for (std::size_t d = 0; d < digits; ++d) number += static_cast<char>('0' + rng() % 10);
    if (i % 3 == 0) number += "e" + std::to_string(static_cast<int>(rng() % 40) - 20);
    double expected = 0;
    std::from_chars(number.data(), number.data() + number.size(), expected);
    INFO(number);
    REQUIRE(Json::parse(number).as_double() == expected);
    const Json in_array = Json::parse("[" + number + ",7]");  // a non-digit after the run
    REQUIRE(in_array[0].as_double() == expected);
    REQUIRE(in_array[1].as_int() == 7);
  }
  REQUIRE(parse_error("0.12345678901234567890:") != "");
}

TEST_CASE("a number with more than 2^31 fractional digits parses") {
  // 2 GiB of digits without 2 GiB of memory: one page of '0's mapped over
  // and over, after a first page that starts "0.".
  constexpr std::size_t chunk = std::size_t{1} << 20;
  constexpr std::size_t chunks = 2049;
  const int zeros = ::memfd_create("zeros", MFD_CLOEXEC);
  REQUIRE(zeros >= 0);
  REQUIRE(::ftruncate(zeros, chunk) == 0);
  void* fill = ::mmap(nullptr, chunk, PROT_READ | PROT_WRITE, MAP_SHARED, zeros, 0);
  REQUIRE(fill != MAP_FAILED);
  std::memset(fill, '0', chunk);
  ::munmap(fill, chunk);
  void* region = ::mmap(nullptr, chunk * chunks, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(region != MAP_FAILED);
  char* text = static_cast<char*>(region);
  std::memset(text, '0', chunk);
  text[1] = '.';
  text[2] = '5';
  for (std::size_t i = 1; i < chunks; ++i)
    REQUIRE(::mmap(text + i * chunk, chunk, PROT_READ, MAP_SHARED | MAP_FIXED, zeros, 0) != MAP_FAILED);
  ::close(zeros);
  const std::string_view number(text, chunk * chunks);
  REQUIRE(number.size() - 2 > (std::size_t{1} << 31));
  Json v;
  const bool parsed = [&] {
    try {
      v = Json::parse(number);
      return true;
    } catch (...) {
      return false;
    }
  }();
  ::munmap(region, chunk * chunks);
  REQUIRE(parsed);
  REQUIRE(v.as_double() == 0.5);
}
