// With two_units_b.cpp: both include the header and are linked into one
// binary, so a definition that is not `inline` fails the link.
#include <catch2/catch.hpp>

#include "anyevent_task.hpp"

std::string dump_in_unit_b(const aet::Json& value);

TEST_CASE("two translation units share one definition of the library") {
  aet::Json value = aet::Json::parse(R"(["a", 1, {"b": true}])");
  REQUIRE(dump_in_unit_b(value) == value.dump());
}
