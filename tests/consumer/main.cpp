// Proves the target carries the include path and the C++17 requirement.
#include <anyevent_task.hpp>

#include <cstdio>

int main() {
  aet::Json v = aet::Json::parse(R"({"consumer":[1,2,3]})");
  std::puts(v.dump().c_str());
  return v["consumer"].size() == 3 ? 0 : 1;
}
